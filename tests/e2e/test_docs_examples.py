"""The examples of ``README.md``, ``docs/api.md`` and ``docs/client.md``, pasted in order, work as described.

Each document's code blocks are taken out in order and run against a live stack (the API and a
tiny-model worker, with the documents' own webhook secret), as a reader pastes them: the shell
blocks of ``docs/api.md`` one after the other in one ``bash`` session (so ``$JOB``, ``$STYLE``...
carry over) from ``tests/data``, the Python blocks of ``docs/client.md`` one after the other in one
interpreter. Only what a reader does differently is left out: starting the stack, setting
``API``/``KEY`` (set to the test stack's), and the TypeScript section (its own test). A block
passes when it exits 0, no answer is an ``internal_error``, and what its comments announce (``#
202 200 409``, ``# 404 not_found``) appears in what it printed.

``README.md`` is pasted from the repository root against a stack without API keys, like ``make up``'s
(its own Redis database and queue): its shell blocks in one ``bash`` session, its Python blocks (the
client's and the engine's, ``HamEngine.load("tiny")``) in one interpreter, with the stack's URL for
``http://127.0.0.1:8000``. Each ``out.png`` goes to the test's temp folder instead (one per block, each
checked to be an image), so nothing is written into the repository. ``README_LEFT_OUT`` names the README
blocks that are not run, each with its reason; the test asserts it leaves out exactly those.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import TENANTS, Stack, run_stack

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)
DOC_SECRET = "whsec-demo"
# What a reader does once, not as part of an example: start a stack, point the shell at it.
_SETUP = re.compile(r"(^|\s)ham up\b|^API=|^KEY=|^cd clients/|^npm |^HAM_API_URL=|^make ")
_ANNOUNCED = re.compile(r"#\s*((?:[1-5]\d\d\b[^\n#]*?)+)$", re.MULTILINE)
_MARK = "@@block-done"

# README blocks not run (their first line), each with why: what a reader does once, or no example at all.
README_LEFT_OUT = {
    "make up      # Redis + API + one worker on http://127.0.0.1:8000 (built-in `tiny` model unless HAM_MODEL "
    "names a real one)": "setup: starts the stack (the test runs its own, like it)",
    "make up TORCH_SPEC=torch TORCH_INDEX=https://download.pytorch.org/whl/cu128":
        "setup of a GPU host: installs a CUDA torch from the network",
    "make test                                  # lint + all tests":
        "development commands: the whole suite and the benchmarks, not examples of the service",
}
README_URL = "http://127.0.0.1:8000"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docs_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from run_stack(redis_url, tmp_path_factory, HAM_WEBHOOK_SECRET=DOC_SECRET)


@pytest.fixture(scope="module")
def readme_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Like ``make up``'s: no API keys (README's examples send none); its own Redis database and queue."""
    yield from run_stack(redis_url, tmp_path_factory, redis_db="12", HAM_API_KEYS="", HAM_QUEUE_NAME="ham-readme")


def blocks(doc: str, lang: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every ``lang`` block of ``doc``, in order, setup blocks left out."""
    return [(line, code) for line, block_lang, code in _fenced(doc) if block_lang == lang and not _is_setup(code)]


def _fenced(doc: str) -> list[tuple[int, str, str]]:
    """``(line, language, code)`` of every fenced block of ``doc``, in order."""
    text = (ROOT / doc).read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group("lang"), m.group("code")) for m in FENCE.finditer(text)]


def _is_setup(code: str) -> bool:
    return any(_SETUP.search(line) for line in code.splitlines())


def announced_statuses(code: str) -> list[str]:
    """What a block's comments say it prints: the error code where one is named (``# 422 invalid_url``:
    the body says ``invalid_url``), else the HTTP statuses (``# 202 200 409``: ``curl -w``)."""
    expected = []
    for comment in _ANNOUNCED.findall(code):
        codes = re.findall(r"\b[a-z]+_[a-z_]+\b", comment)
        expected += codes or re.findall(r"\b[1-5]\d\d\b", comment)
    return expected


def test_the_api_docs_shell_examples_run_in_order(docs_stack: Stack, tmp_path: Path):
    found = blocks("docs/api.md", "bash")
    assert len(found) > 15
    script = ["set +e"]
    for index, (_, code) in enumerate(found):
        script.append(f"{code}\necho; echo '{_MARK} {index} rc='$?")
    env = {**docs_stack.env, "API": docs_stack.base_url, "KEY": TENANTS["alpha"], "PATH": _path(docs_stack)}
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=DATA, env=env, capture_output=True, text=True,
                          timeout=900)
    outputs = re.split(rf"^{_MARK} (\d+) rc=(\d+)$", done.stdout, flags=re.MULTILINE)
    # re.split with two groups: [out0, index0, rc0, out1, index1, rc1, ..., tail]
    results = {int(outputs[i + 1]): (outputs[i], int(outputs[i + 2])) for i in range(0, len(outputs) - 1, 3)}
    assert sorted(results) == list(range(len(found))), done.stdout[-3000:] + done.stderr[-3000:]
    for index, (line, code) in enumerate(found):
        output, rc = results[index]
        where = f"docs/api.md:{line}\n{code}\n--- printed:\n{output[-2000:]}"
        assert rc == 0, where
        assert '"internal_error"' not in output, where
        for status in announced_statuses(code):
            assert status in output, f"{status} announced but not printed: {where}"


def test_the_client_docs_python_examples_run_in_order(docs_stack: Stack, tmp_path: Path):
    found = blocks("docs/client.md", "python")
    assert len(found) >= 3
    program = ["import sys", "namespace = {}"]
    for line, code in found:
        code = code.replace("http://127.0.0.1:8000", docs_stack.base_url).replace("secret-key", TENANTS["alpha"])
        program.append(f"print('running docs/client.md:{line}', flush=True)")
        program.append(f"exec(compile({code!r}, 'docs/client.md:{line}', 'exec'), namespace)")
    done = subprocess.run([sys.executable, "-c", "\n".join(program)], cwd=DATA, env=docs_stack.env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("running")] == [
        f"running docs/client.md:{line}" for line, _ in found
    ]


def test_the_readme_leaves_out_exactly_the_blocks_it_names():
    left_out = [code.splitlines()[0] for _, lang, code in _fenced("README.md") if lang in ("bash", "python")
                and _is_setup(code)]
    assert left_out == list(README_LEFT_OUT)


def _readme_blocks(lang: str, tmp_path: Path) -> list[tuple[int, str, Path | None]]:
    """README's ``lang`` blocks as run here: the stack's URL, and ``out.png`` (where a block writes one) in
    ``tmp_path``, one per block; ``(line, code, that file or None)``."""
    found = []
    for line, code in blocks("README.md", lang):
        out = tmp_path / f"{lang}-{line}-out.png" if "out.png" in code else None
        if out is not None:
            code = code.replace("out.png", str(out))
        code = code.replace("/tmp/ham-features", str(tmp_path / "features"))
        found.append((line, code, out))
    return found


def _top_level() -> set[str]:
    return {path.name for path in ROOT.iterdir()}


def test_the_readme_shell_examples_run_in_order(readme_stack: Stack, tmp_path: Path):
    found = _readme_blocks("bash", tmp_path)
    assert len(found) == 4  # upload and follow, JSON by data: URI, ham submit, ham transfer
    before = _top_level()
    script = ["set +e"]
    for index, (_, code, _) in enumerate(found):
        script.append(f"{code.replace(README_URL, readme_stack.base_url)}\necho; echo '{_MARK} {index} rc='$?")
    env = {**readme_stack.env, "HAM_API_URL": readme_stack.base_url, "PATH": _path(readme_stack)}
    done = subprocess.run(["bash", "-c", "\n".join(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    outputs = re.split(rf"^{_MARK} (\d+) rc=(\d+)$", done.stdout, flags=re.MULTILINE)
    results = {int(outputs[i + 1]): (outputs[i], int(outputs[i + 2])) for i in range(0, len(outputs) - 1, 3)}
    assert sorted(results) == list(range(len(found))), done.stdout[-3000:] + done.stderr[-3000:]
    for index, (line, code, out) in enumerate(found):
        output, rc = results[index]
        where = f"README.md:{line}\n{code}\n--- printed:\n{output[-2000:]}\n--- stderr:\n{done.stderr[-2000:]}"
        assert rc == 0, where
        announced = announced_statuses(code)
        assert '"internal_error"' not in output and (announced or '"error":{' not in output), where
        for status in announced:
            assert status in output, f"{status} announced but not printed: {where}"
        if out is not None:
            _assert_image(out, where)
    assert "event: succeeded" in results[0][0]  # the event stream ran to the job's end
    assert _top_level() == before, "a README example wrote into the repository"


def test_the_readme_python_examples_run_in_order(readme_stack: Stack, tmp_path: Path):
    found = _readme_blocks("python", tmp_path)
    assert [("HamEngine.load" in code) for _, code, _ in found] == [False, False, True]  # client, client, engine
    before = _top_level()
    program = ["namespace = {}"]
    for line, code, _ in found:
        program.append(f"print('running README.md:{line}', flush=True)")
        program.append(f"exec(compile({code.replace(README_URL, readme_stack.base_url)!r}, 'README.md:{line}', "
                       "'exec'), namespace)")
    done = subprocess.run([sys.executable, "-c", "\n".join(program)], cwd=ROOT, env=readme_stack.env,
                          capture_output=True, text=True, timeout=900)
    printed = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, printed
    assert [line for line in done.stdout.splitlines() if line.startswith("running")] == [
        f"running README.md:{line}" for line, _, _ in found
    ]
    assert "succeeded" in done.stdout and "TransferStats(" in done.stdout, printed  # what the blocks print
    for line, _, out in found:
        if out is not None:
            _assert_image(out, f"README.md:{line}\n{printed}")
    assert _top_level() == before, "a README example wrote into the repository"


def _assert_image(path: Path, where: str) -> None:
    from PIL import Image

    assert path.exists(), f"{path.name} not written: {where}"
    with Image.open(path) as image:
        image.verify()


def _path(stack: Stack) -> str:
    # `ham` (ham submit, ham styles) from this interpreter's environment first.
    return f"{Path(sys.executable).parent}:{stack.env.get('PATH', '')}"
