"""bench/gpu_check.py and bench/gpu_prep.py: the GPU check's code path, on the tiny presets on a CPU.

The check must never come back empty: the report is written after every step, a failing
step is recorded and the run goes on, a budget stops it cleanly, and the prepared run needs
neither the network nor a build step.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from bench.gpu_prep import MANIFEST, materialize, prepare
from ham_engine import TransferParams, architectures, tiny
from ham_engine.engine import HamEngine

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _ignored(path: Path) -> bool:
    """Whether git ignores ``path`` (so writing it leaves `git status` clean)."""
    return subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder as `python -m bench.gpu_prep --no-wheels` writes it (tiny presets, recipes, vocabulary)."""
    if architectures.find_clip_vocab() is None:
        pytest.skip("the CLIP vocabulary is missing: `make clip-vocab`")
    folder = tmp_path_factory.mktemp("prepared")
    manifest = prepare(folder, wheels=False)
    assert set(manifest["architectures"]) == {"sd21-base", "sdxl-base"}
    # SD 2.1-base: 1.29 B parameters; SDXL-base: 3.5 B (counted on the meta device).
    assert 1.2e9 < manifest["architectures"]["sd21-base"]["parameters"] < 1.4e9
    assert 3.4e9 < manifest["architectures"]["sdxl-base"]["parameters"] < 3.6e9
    return folder


def test_the_prepared_smoke_run_measures_everything_without_network_or_build(
    prepared: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("HAM_TINY_DIR", raising=False)
    monkeypatch.delenv("HAM_DTYPE", raising=False)

    def no_network(*args: Any) -> None:
        raise AssertionError(f"the prepared run opened a connection: {args}")

    def no_build(*args: Any) -> None:
        raise AssertionError("the prepared run built a preset")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(tiny, "build_random_pipeline", no_build)
    module = _gpu_check()
    assert module.main(["--smoke", "--device", "cpu", "--prepared", str(prepared)]) == 0
    out = REPO / "bench" / "scratch" / "gpu_check-smoke.json"  # the smoke default: ignored, never committed
    assert _ignored(out) and _ignored(out.with_suffix(".txt"))
    report = json.loads(out.read_text())
    assert report["status"] == "complete" and report["errors"] == [] and report["not_run"] == []
    assert report["smoke"] is True and report["speed_dtype"] == "fp32"
    assert set(report["architectures"]) == {"tiny", "tiny-xl"}
    for entry in report["architectures"].values():
        precision = entry["precision"]
        assert set(precision) == {"fp32", "bf16"} and all(r["finite"] for r in precision.values())
        assert 0 < precision["bf16"]["relative_to_std"] < 0.5  # bf16 is close to fp32, not equal
        steps = entry["steps"]
        speed = entry["speed"]
        assert (speed["cold"]["unet_rows"], speed["warm"]["unet_rows"], speed["text"]["unet_rows"]) == (
            5 * steps,
            3 * steps,
            6 * steps,
        )
        assert (speed["cold"]["cache_hit"], speed["warm"]["cache_hit"]) == (False, True)
        assert entry["unet"]["ham_over_stock"] > 0
    # The most valuable figures come first: every architecture's cold and warm before the rest.
    order = [s["step"] for s in report["steps"]]
    assert order[:6] == [f"{a}/{k}" for a in ("tiny", "tiny-xl") for k in ("load", "speed.cold", "speed.warm")]
    assert "UNet batch 3" in capsys.readouterr().out
    assert "UNet batch 3" in out.with_suffix(".txt").read_text()


def test_a_failing_architecture_and_an_ending_budget_leave_a_partial_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path / "presets"))
    monkeypatch.delenv("HAM_DTYPE", raising=False)
    module = _gpu_check()
    jump = [0.0]
    budget = module.Budget(3600.0, clock=lambda: time.monotonic() + jump[0])
    load = module.load_engine

    def failing_load(source: str, device: torch.device, dtype: str) -> Any:
        engine = load(source, device, dtype)
        if source == "tiny-xl":  # the second architecture overflows: a real NumericalError
            with torch.no_grad():
                engine.model.unet.conv_in.weight.mul_(1e30)
        if source == "tiny-v":  # the third: the budget ends during its first UNet call
            engine.model.unet.register_forward_pre_hook(lambda *args: jump.__setitem__(0, 7200.0))
        return engine

    monkeypatch.setattr(module, "load_engine", failing_load)
    cases = [
        module.Case(name, 64, 2, 2, row_s=0.01, transfer_s=0.1, load_s=0.1, build_s=0.0)
        for name in ("tiny", "tiny-xl", "tiny-v")
    ]
    out = tmp_path / "gpu_check.json"
    code = module.main(["--smoke", "--device", "cpu", "--out", str(out)], budget=budget, cases=cases)
    assert code == module.EXIT_PARTIAL == 3
    report = json.loads(out.read_text())
    assert report["status"] == "partial"
    first = report["architectures"]["tiny"]
    assert (first["speed"]["cold"]["unet_rows"], first["speed"]["warm"]["unet_rows"]) == (10, 6)
    assert first["speed"]["warm"]["cache_hit"] is True
    errors = "\n".join(report["errors"])
    assert re.search(r"tiny-xl/load: NumericalError: the UNet output .* not finite", errors)
    assert "tiny-v/load: stopped: the budget ended" in errors
    assert report["architectures"]["tiny-xl"]["load"]["error"].startswith("NumericalError")
    not_run = report["not_run"]
    assert "tiny-xl/speed.cold: needs tiny-xl/load, which did not succeed" in not_run
    assert "tiny/speed.text: the budget ended" in not_run and "tiny-v/precision.bf16: the budget ended" in not_run
    statuses = {s["step"]: s["status"] for s in report["steps"]}
    assert statuses["tiny/speed.warm"] == "ok" and statuses["tiny-v/load"] == "stopped"
    assert len(statuses) == 3 * 7  # every planned step is accounted for
    text = out.with_suffix(".txt").read_text()
    assert "status: partial" in text and "not run:" in text and "NumericalError" in text


def test_the_report_on_disk_holds_every_finished_step_when_the_run_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path / "presets"))
    module = _gpu_check()
    speed = module._speed

    def dying(case: Any, kind: str) -> Any:
        def run(check: Any) -> Any:
            raise KeyboardInterrupt  # not guarded: the process dies here

        return run if kind == "warm" else speed(case, kind)

    monkeypatch.setattr(module, "_speed", dying)
    out = tmp_path / "gpu_check.json"
    cases = [module.Case("tiny", 64, 2, 2, row_s=0.01, transfer_s=0.1, load_s=0.1, build_s=0.0)]
    with pytest.raises(KeyboardInterrupt):
        module.main(["--smoke", "--device", "cpu", "--out", str(out)], cases=cases)
    report = json.loads(out.read_text())
    assert report["status"] == "running"
    assert report["architectures"]["tiny"]["speed"]["cold"]["unet_rows"] == 10
    assert [s["step"] for s in report["steps"]] == ["tiny/load", "tiny/speed.cold"]


def test_the_documented_device_run_fits_its_budget_by_the_checks_own_estimate() -> None:
    module = _gpu_check()
    docs = (REPO / "docs" / "performance.md").read_text()
    command = re.search(r"python3 bench/gpu_check\.py --budget-s (\d+)[^\n]*", docs)
    assert command, "docs/performance.md documents the device run"
    budget = int(command.group(1))
    assert budget <= 8 * 60
    steps = module.plan(module.FULL, ["fp32", "fp16", "bf16"], "fp16", False, 5, prepared=True)
    total = sum(s.estimate_s for s in steps)
    start_up = 60  # imports and CUDA's initialisation on a cold machine
    assert total + start_up < budget
    # The most valuable figures first: SD 2.1-base cold/warm, then SDXL-base's.
    assert [s.id for s in steps[:6]] == [
        f"{a}/{k}" for a in ("sd21-base", "sdxl-base") for k in ("load", "speed.cold", "speed.warm")
    ]


def test_the_budget_refuses_a_step_it_cannot_hold_and_ends_early_for_the_report() -> None:
    module = _gpu_check()
    now = [100.0]
    budget = module.Budget(200.0, clock=lambda: now[0])
    assert budget.reserve_s == 10.0 and budget.remaining() == 190.0 and not budget.expired()
    now[0] = 295.0
    assert budget.expired()  # 5 s before the end: the reserve is for writing and exiting
    assert module.Budget(None).remaining() == float("inf")
    assert module._scale([]) == 1.0 and module._scale([(10.0, 5.0)]) == 1.0 and module._scale([(10.0, 30.0)]) == 3.0


def test_materialize_writes_the_architecture_with_weights_drawn_on_the_device(
    prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device builder on a miniature spec: same layout as the product's builder, seeded, loadable."""
    mini = {
        "pipeline": "StableDiffusionPipeline",
        "unet": {
            "block_out_channels": [32, 64],
            "layers_per_block": 1,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 8,
            "cross_attention_dim": 32,
            "sample_size": 8,
        },
        "vae": {
            "block_out_channels": [8, 16],
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "norm_num_groups": 8,
            "latent_channels": 4,
            "sample_size": 64,
        },
        "text": [
            (
                "text_encoder",
                "CLIPTextModel",
                {
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_attention_heads": 4,
                    "num_hidden_layers": 2,
                    "projection_dim": 32,
                },
            ),
        ],
        "tokenizers": [("tokenizer", tiny.EOS_TOKEN)],
    }
    monkeypatch.setitem(architectures.ARCHITECTURES, "mini", mini)
    manifest = json.loads((prepared / MANIFEST).read_text())
    manifest["architectures"]["mini"] = {"seed": 3, "storage": "float16", "parameters": 0, "bytes": 0}
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "prepared" / "clip").symlink_to(prepared / "clip")
    first = materialize("mini", tmp_path / "prepared", tmp_path / "a", torch.device("cpu"))
    again = materialize("mini", tmp_path / "prepared", tmp_path / "b", torch.device("cpu"))
    assert materialize("mini", tmp_path / "prepared", tmp_path / "a", torch.device("cpu")) == first  # kept
    weights = sorted(first.rglob("*.safetensors"))
    assert [w.relative_to(first) for w in weights] == [
        w.relative_to(again) for w in sorted(again.rglob("*.safetensors"))
    ]
    for path in weights:
        a, b = load_file(path), load_file(again / path.relative_to(first))
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float16 for k in a)  # seeded, 16-bit
    engine = HamEngine.load(str(first), device="cpu", dtype="fp32")
    content = Image.open(REPO / "tests" / "data" / "content0.png").convert("RGB")
    result = engine.transfer(content, style_prompt="an ink engraving", params=TransferParams(steps=2, size=64))
    assert result.image.size == (64, 64) and result.stats.unet_rows > 0


def test_the_full_check_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _gpu_check().main(["--device", "cpu", "--out", str(tmp_path / "x.json")])
