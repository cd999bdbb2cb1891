"""Recorded teachers benchmark: UNet rows, wall time and memory of the teacher strategies.

    python -m bench.recording [--quick] [--out bench/results/recording.json] [--models random-small sd21-base]
                              [--device cuda] [--size 512] [--steps 50] [--repeats 3]

For each model it runs an image-style transfer in three ways, each cold (empty style cache)
then warm (the same style again), interleaved over ``--repeats`` rounds:

* **target/live** – today's default: inversion at the target timestep, teachers in the
  sampling batch (5N rows cold, 3N warm);
* **source/live** – the source-convention inversion, teachers still live (the same rows);
* **source/recorded** – the source inversion records what GAR and LAT read from the
  teachers; after the first step the sampling batch is the student alone (3N+2 cold, 2N+1
  warm).

It reports rows, the fastest repeat's wall time and process CPU time (with one torch
thread the CPU time is what the transfer itself took, whatever else loads the machine),
the bytes recorded, the peak memory the transfer added (CUDA: max allocated; CPU: resident
set sampled every 2 ms, over what the process held before), the recorded/live time ratio
measured in the same run, and the largest difference between source/live and source/recorded (latents and 8-bit pixels).

Models: ``random-small`` (``ham_engine.tiny``) and ``sd21-base``: the full Stable Diffusion
2.1-base architecture (``ham_engine.architectures``: UNet, VAE, OpenCLIP-H text encoder from
the published configs, random weights; built once, needs ``make clip-vocab``; ~5.5 GB RSS in
fp32). A measurement, never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from PIL import Image

from ham_engine.architectures import ensure_architecture
from ham_engine.engine import HamEngine
from ham_engine.loading import resolve_device
from ham_engine.params import TransferParams

REPO = Path(__file__).resolve().parents[1]
CONTENT = REPO / "tests" / "data" / "content0.png"
STYLE = REPO / "tests" / "data" / "style0.png"
VARIANTS = (("target", "live"), ("source", "live"), ("source", "recorded"))
MEASURED = ("student", "seconds", "cpu_seconds", "added_peak_memory_bytes")  # summarised over repeats


@dataclass(frozen=True)
class Case:
    """One model and the transfer shape it is measured at."""

    model: str
    size: int
    steps: int
    repeats: int


FULL = {
    "random-small": Case("random-small", size=256, steps=10, repeats=2),
    "sd21-base": Case("sd21-base", size=128, steps=5, repeats=1),
}
QUICK = {
    "random-small": Case("random-small", size=128, steps=4, repeats=1),
    "sd21-base": Case("sd21-base", size=64, steps=3, repeats=1),
}


def load(name: str, device: torch.device) -> HamEngine:
    """The engine for ``name``: a random preset, or SD 2.1-base's architecture (``ham_engine.architectures``)."""
    if name == "sd21-base":
        # Built once (~2.5 GB under HAM_ARCH_DIR; needs `make clip-vocab`), loaded like a real model.
        return HamEngine.load(str(ensure_architecture("sd21-base")), device=device, dtype="fp32")
    return HamEngine.load(name, device=device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def added_peak_memory(device: torch.device, run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and the peak memory it added over what was held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = run()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    before, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = run()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], _rss_bytes()) - before


def _one(engine: HamEngine, content: Image.Image, style: Image.Image, params: TransferParams) -> dict[str, Any]:
    device = engine.model.device
    started, started_cpu = time.perf_counter(), time.process_time()
    result, added = added_peak_memory(
        device, lambda: engine.transfer_latents(content, style=style, params=params)
    )
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    stats = result.stats
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "unet_rows": stats.unet_rows,
        "unet_rows_by_phase": stats.unet_rows_by_phase,
        "teachers": stats.teachers,
        "record_bytes": stats.record_bytes,
        "record_fallback": stats.record_fallback,
        "added_peak_memory_bytes": added,
        "student": result.student,
    }


def bench_model(case: Case, device: torch.device) -> dict[str, Any]:
    """Measure one model; see the module docstring."""
    started = time.perf_counter()
    engine = load(case.model, device)
    load_seconds = time.perf_counter() - started
    content, style = Image.open(CONTENT).convert("RGB"), Image.open(STYLE).convert("RGB")
    runs: dict[str, list[dict[str, Any]]] = {}
    # A short warm-up first: the first call at each batch shape pays for kernel set-up.
    for inversion, teachers in VARIANTS:
        engine.style_cache.clear()
        _one(engine, content, style, TransferParams(steps=2, size=case.size, inversion=inversion, teachers=teachers))
    for repeat in range(case.repeats):
        for inversion, teachers in VARIANTS:
            params = TransferParams(steps=case.steps, size=case.size, inversion=inversion, teachers=teachers)
            engine.style_cache.clear()
            for warmth in ("cold", "warm"):
                runs.setdefault(f"{inversion}/{teachers} {warmth}", []).append(_one(engine, content, style, params))
        print(f"  {case.model}: round {repeat + 1}/{case.repeats}", file=sys.stderr, flush=True)

    def decoded(student: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            pixels = engine.model.decode_latents(student)[0]
        return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy().astype(np.int16)

    summary: dict[str, Any] = {"case": case.__dict__, "load_seconds": load_seconds, "runs": {}}
    for name, repeats in runs.items():
        first = repeats[0]
        summary["runs"][name] = {
            **{k: v for k, v in first.items() if k not in MEASURED},
            "seconds": min(r["seconds"] for r in repeats),
            "seconds_all": [r["seconds"] for r in repeats],
            "cpu_seconds": min(r["cpu_seconds"] for r in repeats),
            "cpu_seconds_all": [r["cpu_seconds"] for r in repeats],
            "added_peak_memory_bytes": max(r["added_peak_memory_bytes"] for r in repeats),
        }
    for warmth in ("cold", "warm"):
        live, recorded = runs[f"source/live {warmth}"][0], runs[f"source/recorded {warmth}"][0]
        summary[f"{warmth}_recorded_vs_live_latent_max_abs_diff"] = float(
            (live["student"] - recorded["student"]).abs().max()
        )
        summary[f"{warmth}_recorded_vs_live_pixel_max_diff"] = int(
            np.abs(decoded(live["student"]) - decoded(recorded["student"])).max()
        )
    r = summary["runs"]
    summary["ratios"] = {
        f"{warmth}_{what}": r[f"source/recorded {warmth}"][key] / r[f"{base} {warmth}"][key]
        for warmth in ("cold", "warm")
        for what, key, base in (
            ("seconds_recorded_vs_source_live", "seconds", "source/live"),
            ("seconds_recorded_vs_target_live", "seconds", "target/live"),
            ("cpu_seconds_recorded_vs_source_live", "cpu_seconds", "source/live"),
            ("cpu_seconds_recorded_vs_target_live", "cpu_seconds", "target/live"),
            ("rows_recorded_vs_live", "unet_rows", "source/live"),
        )
    }
    return summary


def print_table(results: dict[str, Any]) -> None:
    """A fixed-width table per model, then the ratios."""
    header = (
        f"{'model':<30} {'run':<22} {'rows':>5} {'seconds':>8} {'CPU s':>8} {'recorded MB':>12} {'added peak MB':>14}"
    )
    print(header)
    print("-" * len(header))
    for name, m in results["models"].items():
        case = m["case"]
        label = f"{name} {case['size']}px {case['steps']} steps"
        for run, s in m["runs"].items():
            print(
                f"{label:<30} {run:<22} {s['unet_rows']:>5} {s['seconds']:8.2f} {s['cpu_seconds']:8.2f}"
                f" {s['record_bytes'] / 2**20:12.2f}"
                f" {s['added_peak_memory_bytes'] / 2**20:14.1f}"
            )
            label = ""
        ratios = m["ratios"]
        print(
            "  recorded / source-live: wall seconds cold {cold_seconds_recorded_vs_source_live:.3f},"
            " warm {warm_seconds_recorded_vs_source_live:.3f}; CPU seconds cold"
            " {cold_cpu_seconds_recorded_vs_source_live:.3f}, warm {warm_cpu_seconds_recorded_vs_source_live:.3f};"
            "  rows cold {cold_rows_recorded_vs_live:.3f}, warm {warm_rows_recorded_vs_live:.3f}".format(**ratios)
        )
        print(
            f"  recorded vs live: latents max |diff| cold {m['cold_recorded_vs_live_latent_max_abs_diff']:.2e},"
            f" warm {m['warm_recorded_vs_live_latent_max_abs_diff']:.2e}; pixels max |diff| cold"
            f" {m['cold_recorded_vs_live_pixel_max_diff']}, warm {m['warm_recorded_vs_live_pixel_max_diff']} (of 255)"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small sizes, one repeat: a smoke run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "recording.json"), help="JSON output path")
    parser.add_argument("--models", nargs="+", choices=sorted(FULL), default=list(FULL), help="models to measure")
    parser.add_argument("--device", default=None, help="torch device (default: HAM_DEVICE, else CUDA if available)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per model (default: the case's)")
    parser.add_argument("--size", type=int, default=None, help="output size in px (default: the case's)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the case's)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cases = QUICK if args.quick else FULL
    cases = {
        name: Case(c.model, args.size or c.size, args.steps or c.steps, args.repeats or c.repeats)
        for name, c in cases.items()
    }
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "device": str(device),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "quick": args.quick,
        "models": {},
    }
    started = time.perf_counter()
    for name in args.models:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results["models"][name] = bench_model(cases[name], device)
    results["wall_seconds"] = time.perf_counter() - started
    print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
