"""``ham transfer``: writes a real PNG; bad input is exit status 2 with one line on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ham_engine.cli import main

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
CONTENT = str(DATA / "content0.png")
STYLE = str(DATA / "style0.png")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture
def cli_env(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HAM_TINY_DIR", str(tiny_dir))
    monkeypatch.delenv("HAM_MODEL", raising=False)
    monkeypatch.delenv("HAM_DEVICE", raising=False)
    monkeypatch.delenv("HAM_RECORD_BYTES", raising=False)
    return tiny_dir


def test_transfer_subprocess_writes_a_png_with_the_content_aspect(cli_env: Path, tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.open(CONTENT).resize((128, 64)).save(wide)
    out = tmp_path / "out.png"
    command = [sys.executable, "-m", "ham_engine.cli", "transfer", str(wide), "--style", STYLE]
    command += ["-o", str(out), "--size", "128", "--steps", "3", "--stats"]
    # One OpenMP thread: on a busy 2-core CI box two spinning threads make the tiny UNet 10x slower.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert (image.mode, image.size) == ("RGB", (128, 64))
        image.load()
    stats = json.loads(done.stdout)
    assert stats["steps"] == 3
    assert stats["size"] == [128, 64]
    assert stats["unet_calls"] > 0
    assert "transfer" in done.stderr
    assert "100%" in done.stderr  # the progress bar reached the end


def test_transfer_with_a_style_prompt_only(cli_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "prompt.png"
    argv = ["transfer", CONTENT, "--style-prompt", "an ink engraving", "-o", str(out), "--size", "64", "--steps", "2"]
    assert main([*argv, "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)
    assert capsys.readouterr().err == ""


def test_transfer_records_the_teachers_within_the_budget_it_is_given(
    cli_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["transfer", CONTENT, "--style", STYLE, "-o", str(tmp_path / "o.png"), "--size", "64", "--steps", "3"]
    argv += ["--inversion", "source", "--teachers", "recorded", "--stats", "--quiet"]
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["teachers"] == {"content_teacher": "recorded", "style_teacher": "recorded"}
    assert stats["unet_rows"] == 3 * 3 + 2
    monkeypatch.setenv("HAM_RECORD_BYTES", "1000")  # too small: the teachers run live
    assert main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["record_budget_bytes"], stats["teachers"]["content_teacher"]) == (1000, "live")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--style", "missing-style.png"], "style: cannot read 'missing-style.png'"),
        (["--style", STYLE, "--alpha", "1.5"], "alpha: must be in [0.0, 1.0], got 1.5"),
        ([], "style: give a style image, a style_prompt, or both"),
        (["--style", STYLE, "--size", "100"], "size: must be a multiple of 64"),
        (["--style", STYLE, "--steps", "0"], "steps: must be an integer in [1, 1000], got 0"),
        (["--style", STYLE, "--model", "./no-such-model"], "model: folder './no-such-model' does not exist"),
        (["--style", STYLE, "--device", "gpu"], "device: 'gpu'"),
        (["--style", STYLE, "--teachers", "recorded"], "teachers: 'recorded' needs inversion='source'"),
        (["--style", STYLE, "--record-bytes", "-1"], "record_bytes: must be an integer >= 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(cli_env, tmp_path, capsys, extra: list[str], message: str) -> None:
    status = main(["transfer", CONTENT, "-o", str(tmp_path / "out.png"), "--quiet", *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1
    assert err.startswith("ham transfer: error: ")
    assert message in err
    assert not (tmp_path / "out.png").exists()


def test_a_missing_content_file_exits_2(cli_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(["transfer", str(tmp_path / "nope.png"), "--style", STYLE, "-o", str(tmp_path / "o.png"), "-q"])
    assert status == 2
    assert capsys.readouterr().err == f"ham transfer: error: content: cannot read '{tmp_path / 'nope.png'}'" + (
        ": No such file or directory\n"
    )


def test_a_style_file_that_is_not_an_image_exits_2(cli_env: Path, tmp_path: Path, capsys) -> None:
    notes = tmp_path / "style.png"
    notes.write_text("not a picture")
    status = main(["transfer", CONTENT, "--style", str(notes), "-o", str(tmp_path / "o.png"), "-q"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("ham transfer: error: style: not a readable image")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("output", "message"),
    [("out.txt", "needs an image extension such as .png"), ("no-such-dir/out.png", "does not exist")],
)
def test_a_bad_output_path_exits_2_before_any_work(tmp_path, capsys, output: str, message: str) -> None:
    status = main(["transfer", CONTENT, "--style", STYLE, "-o", str(tmp_path / output), "-q"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("ham transfer: error: output: ")
    assert message in err


def test_a_missing_output_option_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["transfer", CONTENT, "--style", STYLE])
    assert exit_info.value.code == 2
    assert "the following arguments are required: -o/--output" in capsys.readouterr().err


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, ham_engine.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_a_feature_store_directory_makes_a_second_run_warm(cli_env: Path, tmp_path: Path, capsys) -> None:
    store = tmp_path / "features"
    args = ["transfer", CONTENT, "--style", STYLE, "--size", "64", "--steps", "3", "--stats", "-q"]
    args += ["--feature-store", str(store)]
    assert main([*args, "-o", str(tmp_path / "a.png")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*args, "-o", str(tmp_path / "b.png")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["style_cache_hit"], first["unet_rows"]) == (False, 15)
    assert (second["style_cache_tier"], second["content_cache_tier"], second["unet_rows"]) == ("store", "store", 6)
