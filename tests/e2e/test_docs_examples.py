"""The examples of ``docs/api.md`` and ``docs/client.md``, pasted in order, work as described.

Each document's code blocks are taken out in order and run against a live stack (the API and a
tiny-model worker, with the documents' own webhook secret), as a reader pastes them: the shell
blocks of ``docs/api.md`` one after the other in one ``bash`` session (so ``$JOB``, ``$STYLE``...
carry over) from ``tests/data``, the Python blocks of ``docs/client.md`` one after the other in one
interpreter. Only what a reader does differently is left out: starting the stack, setting
``API``/``KEY`` (set to the test stack's), and the TypeScript section (its own test). A block
passes when it exits 0, no answer is an ``internal_error``, and what its comments announce (``#
202 200 409``, ``# 404 not_found``) appears in what it printed.
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
_SETUP = re.compile(r"(^|\s)ham up\b|^API=|^KEY=|^cd clients/|^npm |^HAM_API_URL=")
_ANNOUNCED = re.compile(r"#\s*((?:[1-5]\d\d\b[^\n#]*?)+)$", re.MULTILINE)
_MARK = "@@block-done"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docs_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from run_stack(redis_url, tmp_path_factory, HAM_WEBHOOK_SECRET=DOC_SECRET)


def blocks(doc: str, lang: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every ``lang`` block of ``doc``, in order, setup blocks left out."""
    text = (ROOT / doc).read_text()
    found = []
    for match in FENCE.finditer(text):
        code = match.group("code")
        if match.group("lang") != lang or any(_SETUP.search(line) for line in code.splitlines()):
            continue
        found.append((text.count("\n", 0, match.start()) + 1, code))
    return found


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


def _path(stack: Stack) -> str:
    # `ham` (ham submit, ham styles) from this interpreter's environment first.
    return f"{Path(sys.executable).parent}:{stack.env.get('PATH', '')}"
