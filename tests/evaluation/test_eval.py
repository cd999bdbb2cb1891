"""``ham eval`` end to end on the tiny model with random metric weights: outputs, metrics.json, table, sheet."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from ham_cli.main import main
from ham_engine.evaluation.pairs import make_pairs
from ham_engine.evaluation.runner import PairResult
from ham_engine.evaluation.suite import MetricSuite
from ham_engine.evaluation.weights import ALEXNET, FID_INCEPTION, LPIPS_HEADS, VGG16, WeightStore, sha256
from tests.evaluation.conftest import CLIP_FOLDER, DINO_FOLDER
from tests.fixtures.waiting import wait_until

DATA = Path(__file__).resolve().parents[1] / "data"
NUMBERS = ("fid", "lpips", "lpips_gray", "cfsd", "dino", "clip_i", "clip_t", "art_fid", "dc", "cc")


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two contents, two styles (each with its describing text)."""
    root = tmp_path_factory.mktemp("benchmark")
    (root / "content").mkdir()
    (root / "style").mkdir()
    for name in ("content0.png", "content1.png"):
        shutil.copy(DATA / name, root / "content" / name)
    for name, text in (("style0.png", "an ink engraving"), ("style1.png", "a watercolour")):
        shutil.copy(DATA / name, root / "style" / name)
        (root / "style" / name).with_suffix(".txt").write_text(text + "\n")
    return root


@pytest.fixture
def eval_env(hermetic_caches: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path_factory.getbasetemp() / "ham-tiny-eval"))
    monkeypatch.delenv("HAM_MODEL", raising=False)
    monkeypatch.delenv("HAM_DEVICE", raising=False)
    monkeypatch.delenv("HAM_DTYPE", raising=False)


def _argv(benchmark: Path, out: Path, weights: Path, *extra: str, verify: bool = False) -> list[str]:
    # The test networks are random, so not the published files: every run but the refusal's allows that.
    allow = [] if verify else ["--allow-unverified-weights"]
    return ["eval", "--content", str(benchmark / "content"), "--style", str(benchmark / "style"),
            "--out", str(out), "--weights", str(weights), "--clip-model", CLIP_FOLDER, "--dino-model", DINO_FOLDER,
            "--model", "tiny", "--device", "cpu", "--steps", "2", "--size", "64", "--quiet", *allow, *extra]


@pytest.mark.slow
def test_a_two_by_two_run_writes_outputs_metrics_table_and_sheet_and_a_rerun_reuses_them(
    benchmark: Path, random_weights: Path, eval_env: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    assert main(_argv(benchmark, out, random_weights)) == 0

    outputs = sorted(p.name for p in (out / "outputs").glob("*.png"))
    assert outputs == ["content0__style0.png", "content0__style1.png", "content1__style0.png", "content1__style1.png"]
    for name in outputs:
        with Image.open(out / "outputs" / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))

    document = json.loads((out / "metrics.json").read_text())
    values = document["metrics"]
    for name in NUMBERS:
        assert isinstance(values[name], float), (name, values[name])
    assert values["art_fid"] == pytest.approx((1 + values["lpips"]) * (1 + values["fid"]))
    assert values["dc"] == pytest.approx((1 + values["dino"]) * (1 + values["clip_t"]))
    assert values["cc"] == pytest.approx((1 + values["clip_i"]) * (1 + values["clip_t"]))
    assert values["fid"] > 0 and values["lpips"] > 0 and values["cfsd"] > 0
    for name in ("dino", "clip_i", "clip_t"):
        assert -1 <= values[name] <= 1
    pairs = document["pairs"]
    assert [p["name"] for p in pairs] == [n.removesuffix(".png") for n in outputs]
    assert all(p["reused"] is False and p["wall_s"] > 0 for p in pairs)
    assert values["lpips"] == pytest.approx(sum(p["lpips"] for p in pairs) / 4)
    assert {p["style_text"] for p in pairs} == {"an ink engraving", "a watercolour"}

    # What was loaded, and the record to reproduce the run.
    assert set(document["metric_weights"]) == {"fid", "lpips_trunk", "lpips_heads", "cfsd", "clip", "dino"}
    fid = document["metric_weights"]["fid"]
    assert fid["file"].endswith("pt_inception-2015-12-05-6726825d.pth")
    assert len(fid["sha256"]) == 64 and fid["expected_sha256"] == "6726825d" and fid["verified"] is False
    # Random networks: nothing is verified, and the report says so instead of printing the paper's rows.
    assert document["weights_verified"] is False
    assert any("pt_inception-2015-12-05-6726825d.pth (fid) is not the published file" in problem
               for problem in document["unverified_weights"])
    assert any(f"{CLIP_FOLDER}/model.safetensors (clip) cannot be verified" in problem
               for problem in document["unverified_weights"])
    assert set(document["paper"]) == {"omitted"}
    record = document["record"]
    assert record["model"] == "tiny" and record["device"] == "cpu" and record["dtype"] == "float32"
    assert record["seed"] == 0 and record["params"]["steps"] == 2 and record["pairs"] == "all"
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= set(record["model_weights_sha256"])
    assert record["versions"]["torch"] and record["versions"]["diffusers"]
    assert set(record["wall_s_per_pair"]) == {p["name"] for p in pairs}

    table = (out / "table.md").read_text()
    lines = table.splitlines()
    assert lines[0].startswith("| method | ArtFID↓ | FID↓ | LPIPS↓")
    assert lines[2].startswith("| this run (tiny, 4 pairs, 64 px, 2 steps), UNVERIFIED weights | "
                               f"{values['art_fid']:.3f} |")
    assert "n/a" not in lines[2]
    assert "(paper)" not in table and "StyleID" not in table
    assert lines[4].startswith("Not comparable with the paper: the paper's rows are not printed")
    assert any(line.startswith("- unverified: ") and "vgg16-397923af.pth (cfsd)" in line for line in lines)

    with Image.open(out / "contact_sheet.png") as sheet:
        # (1 + 2 styles) columns x (1 + 2 contents) rows of 192-px cells with a 12-px label.
        assert sheet.size == (3 * 192, 3 * (192 + 12))
        sheet = sheet.convert("RGB")
        assert sheet.getpixel((100, 100)) == (255, 255, 255)  # the corner cell has a label, no picture
        # Row 1 (content0), column 2 (style1): that pair's output, padded to the cell.
        cell = sheet.crop((2 * 192, 204 + 12, 3 * 192, 2 * 204))
        with Image.open(out / "outputs" / "content0__style1.png") as output:
            expected = ImageOps.pad(output.convert("RGB"), (192, 192), color=(255, 255, 255))
        assert list(cell.getdata()) == list(expected.getdata())
        with Image.open(benchmark / "style" / "style1.png") as style:
            expected = ImageOps.pad(style.convert("RGB"), (192, 192), color=(255, 255, 255))
        assert list(sheet.crop((2 * 192, 12, 3 * 192, 204)).getdata()) == list(expected.getdata())

    # A rerun with the same inputs and parameters reuses every output and recomputes the metrics.
    stamps = {name: (out / "outputs" / name).stat().st_mtime_ns for name in outputs}
    assert main(_argv(benchmark, out, random_weights)) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert all(p["reused"] for p in again["pairs"])
    assert {name: (out / "outputs" / name).stat().st_mtime_ns for name in outputs} == stamps
    assert again["metrics"] == values  # same outputs, same weights: the same numbers

    # Other parameters make new outputs.
    assert main(_argv(benchmark, out, random_weights, "--alpha", "0.5", "--pairs", "diagonal", "--skip-metrics")) == 0
    changed = {name: (out / "outputs" / name).stat().st_mtime_ns for name in outputs}
    assert changed["content0__style0.png"] != stamps["content0__style0.png"]
    assert changed["content0__style1.png"] == stamps["content0__style1.png"]  # not in the diagonal
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == (3 * 192, 2 * (192 + 12))  # content | style | output, one row per pair
    record = json.loads((out / "outputs" / "content0__style0.json").read_text())
    assert record["request"]["params"]["alpha"] == 0.5

    # A damaged output (a crash mid-copy, a full disk) is made again, whatever its record says.
    damaged = out / "outputs" / "content1__style1.png"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert main(_argv(benchmark, out, random_weights, "--alpha", "0.5", "--pairs", "diagonal", "--skip-metrics")) == 0
    with Image.open(damaged) as image:
        image.load()
        assert image.size == (64, 64)
    assert (out / "outputs" / "content0__style0.png").stat().st_mtime_ns == changed["content0__style0.png"]


def test_a_missing_weight_is_reported_unavailable_with_what_to_put_where(
    benchmark: Path, random_weights: Path, hermetic_caches: Path, tmp_path: Path
) -> None:
    # The same networks but no VGG-16, no DINO folder, and a style without text.
    partial = tmp_path / "partial"
    shutil.copytree(random_weights, partial, ignore=shutil.ignore_patterns(VGG16.filename, DINO_FOLDER))
    # A file under the FID Inception's name that holds another network.
    shutil.copy(partial / ALEXNET.filename, partial / FID_INCEPTION.filename)
    style_dir = tmp_path / "style"
    shutil.copytree(benchmark / "style", style_dir)
    (style_dir / "style1.txt").unlink()
    pairs = make_pairs(benchmark / "content", style_dir, "diagonal")
    # The contents stand in for outputs: the metrics need images, not a diffusion run.
    results = [PairResult(pair, pair.content, 0.0, False, {}) for pair in pairs]
    suite = MetricSuite(WeightStore(partial), clip_model=CLIP_FOLDER, dino_model="facebook/dino-vits16",
                        allow_unverified=True)
    evaluation = suite.evaluate(results)
    values = evaluation.metrics

    assert values["cfsd"] == (
        f"unavailable: put vgg16-397923af.pth (torchvision's ImageNet VGG-16 (the CFSD features)) into {partial}/ "
        f"or {hermetic_caches / 'torch-home' / 'hub' / 'checkpoints'}/"
    )
    assert values["dino"].startswith(f"unavailable: put the Hugging Face folder of facebook/dino-vits16 (DINO) "
                                     f"at {partial}/dino-vits16")
    assert values["dc"] == "unavailable: needs dino and clip_t, which are unavailable"
    assert values["clip_t"] == (
        "unavailable: 1 of 2 pairs lack clip_t: no style text: put style1.txt (e.g. 'an ink engraving') "
        "beside style1.png"
    )
    assert isinstance(evaluation.per_pair[0]["clip_t"], float)
    # The rest is still computed: an output identical to its content has LPIPS 0 and CLIP-I 1.
    assert values["lpips"] == 0.0 and values["lpips_gray"] == 0.0
    assert values["clip_i"] == pytest.approx(1.0)
    assert values["fid"].startswith(
        "unavailable: weights: pt_inception-2015-12-05-6726825d.pth does not match the network (missing Conv2d_1a_3x3"
    )
    assert values["fid"].endswith("replace it with the published file")
    assert values["art_fid"] == "unavailable: needs fid, which is unavailable"
    assert set(evaluation.weights) == {"lpips_trunk", "lpips_heads", "clip"}  # what really loaded


def test_bad_input_is_exit_status_2_naming_the_field(
    benchmark: Path, random_weights: Path, eval_env: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = _argv(benchmark, tmp_path / "out", random_weights)
    argv[argv.index("--content") + 1] = str(tmp_path / "nowhere")
    assert main(argv) == 2
    assert "ham eval: error: content: folder" in capsys.readouterr().err
    argv = _argv(benchmark, tmp_path / "out", tmp_path / "no-weights")
    assert main(argv) == 2
    assert "weights: folder" in capsys.readouterr().err
    assert main([*_argv(benchmark, tmp_path / "out", random_weights), "--alpha", "2"]) == 2
    assert "alpha: must be in [0.0, 1.0]" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = _argv(benchmark, tmp_path / "out", random_weights)
    argv[argv.index("--style") + 1] = str(empty)
    assert main(argv) == 2
    assert "style: no images" in capsys.readouterr().err
    assert not (tmp_path / "out" / "outputs").exists()  # nothing ran


def test_unverified_weights_are_refused_before_any_transfer_naming_the_file_and_the_published_hash(
    benchmark: Path, random_weights: Path, eval_env: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main(_argv(benchmark, out, random_weights, verify=True)) == 2
    err = capsys.readouterr().err
    assert err.startswith("ham eval: error: weights: ")
    inception = random_weights / FID_INCEPTION.filename
    assert (f"{inception} (fid) is not the published file: its SHA-256 is {sha256(inception)}, the published one "
            "starts with 6726825d (pytorch-fid's release fid_weights") in err
    assert f"{random_weights / VGG16.filename} (cfsd) is not the published file" in err
    assert f"{random_weights / CLIP_FOLDER / 'model.safetensors'} (clip) cannot be verified: not read from the " in err
    assert "pass --allow-unverified-weights" in err
    assert not (out / "outputs").exists()  # refused before the first transfer

    # The lpips wheel's heads (the one published file on this machine) pass; alone they are not refused.
    heads_only = tmp_path / "heads-only"
    heads_only.mkdir()
    shutil.copy(_installed_heads(), heads_only / LPIPS_HEADS.filename)
    checks = WeightStore(heads_only).audit(CLIP_FOLDER, DINO_FOLDER)
    assert [(c.role, c.verified) for c in checks] == [("lpips_heads", True)]


def _installed_heads() -> Path:
    found = WeightStore(None).find(LPIPS_HEADS)
    if found is None:
        pytest.skip("the lpips wheel is not installed (make setup installs it)")
    return found


def test_ham_eval_help_lists_the_engine_parameters_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from ham_cli.main import main\n"
        "try:\n"
        "    main(['eval', '--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo, timeout=60)
    assert done.returncode == 0, done.stderr
    for option in ("--content", "--style", "--pairs", "--out", "--weights", "--steps", "--alpha", "--no-lat",
                   "--step-start", "--clip-model"):
        assert option in done.stdout
    assert "TORCH False" in done.stdout


@pytest.mark.slow
def test_an_interrupted_run_keeps_finished_outputs_and_the_next_run_resumes(
    benchmark: Path, random_weights: Path, eval_env: None, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    argv = _argv(benchmark, out, random_weights, "--skip-metrics")
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "ham_engine.evaluation.cli", *argv], cwd=repo, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def running() -> None:
            assert child.poll() is None, child.communicate()[1][-2000:]

        wait_until(lambda: list((out / "outputs").glob("*.json")), 240, "the first pair's output", check=running)
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    finished = sorted(p.stem for p in (out / "outputs").glob("*.json"))
    if child.returncode == 0:
        pytest.skip("the run finished before the interrupt reached it")
    assert child.returncode == 130, stderr[-2000:]
    assert "interrupted (finished outputs are kept; rerun to resume)" in stderr
    assert 1 <= len(finished) < 4
    assert sorted(p.stem for p in (out / "outputs").glob("*.png")) == finished  # no PNG without its record
    assert not list((out / "outputs").glob(".*.tmp"))  # nothing half-written left behind

    stamps = {name: (out / "outputs" / f"{name}.png").stat().st_mtime_ns for name in finished}
    assert main(argv) == 0
    assert len(list((out / "outputs").glob("*.png"))) == len(list((out / "outputs").glob("*.json"))) == 4
    assert {name: (out / "outputs" / f"{name}.png").stat().st_mtime_ns for name in finished} == stamps


def test_ham_eval_flags_come_from_the_param_specs_with_their_bounds_and_choices() -> None:
    """``ham eval`` takes the engine parameters as ``ham transfer`` does: one flag per spec, its range in --help."""
    import argparse

    from ham_engine.evaluation.cli import add_eval_parser
    from ham_engine.params import PARAM_SPECS, TransferParams

    parser = argparse.ArgumentParser(prog="ham")
    add_eval_parser(parser.add_subparsers(dest="command"))
    subparser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["eval"]
    text = " ".join(subparser.format_help().split())
    for spec in PARAM_SPECS:
        flag = spec.name.replace("_", "-")
        assert (f"--no-{flag}" if spec.kind is bool else f"--{flag}") in text
        if spec.kind is not bool:
            assert spec.allowed() in text, spec.name
    args = parser.parse_args(["eval", "--content", "c", "--style", "s"])
    assert TransferParams(**{spec.name: getattr(args, spec.name) for spec in PARAM_SPECS}) == TransferParams()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--content", "c", "--style", "s", "--inversion", "forward"])
