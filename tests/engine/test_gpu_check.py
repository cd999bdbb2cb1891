"""bench/gpu_check.py --smoke: the GPU check's code path, on the tiny presets on a CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_smoke_mode_runs_every_check_and_writes_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HAM_TINY_DIR", str(tmp_path / "presets"))
    monkeypatch.delenv("HAM_DTYPE", raising=False)
    out = tmp_path / "gpu_check.json"
    assert _gpu_check().main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
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
    assert "UNet batch 3" in capsys.readouterr().out


def test_the_full_check_refuses_to_run_without_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _gpu_check().main(["--device", "cpu", "--out", str(tmp_path / "x.json")])
