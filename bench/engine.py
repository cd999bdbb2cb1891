"""Engine benchmark: UNet work and wall time per HAM transfer, against stock diffusers DDIM.

    python -m bench.engine [--quick] [--out PATH] [--models tiny random-small] [--threads 1]

For each model (random SD-shaped presets from ``ham_engine.tiny``; no download) it runs,
``--repeats`` times and interleaved so that machine drift hits every variant alike:

* **cold**: an image-style transfer with an empty style cache (style inverted, batch 3);
* **warm**: the same style again (cache hit: no style inversion, batch 2);
* **off**: SINI, GAR and LAT all off (the student alone, batch 1);
* **stock b1 / b3**: ``StableDiffusionPipeline`` with ``DDIMScheduler`` and the stock SDPA
  processors, from the same inverted content latent, at batch 1 and 3, no CFG.

and reports the fastest repeat of each phase (the least disturbed on a shared machine;
medians are in the JSON) plus two ratios with targets:

(a) off sampling / stock b1 sampling (HAM's machinery costs nothing when idle), ≤ 1.05;
(b) warm / cold transfer wall time (what the style cache saves), ≤ 0.65.

It also checks that ``off`` reproduces the stock latents and ``warm`` the ``cold`` image.

A second table covers the feature tiers and multi-style batches (issue 9), rows and wall
time of: **cold**; **warm (memory)**, the style from this engine's LRU; **warm (store)**, a
fresh engine on the same feature-store directory; **content+style warm** from memory and
from the store; and ``transfer_batch`` with K = 1..4 styles, cold and with every style
warm, against K separate one-style jobs (each on an empty engine, as K jobs on K
workers). Each batch image's largest pixel difference from its one-style transfer is
reported (the bound docs/performance.md states).

A table goes to stdout, everything to JSON. This is a measurement, never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from ham_engine.engine import HamEngine, TransferStats
from ham_engine.params import TransferParams

REPO = Path(__file__).resolve().parents[1]
CONTENT = REPO / "tests" / "data" / "content0.png"
STYLE = REPO / "tests" / "data" / "style0.png"
TARGET_OFF_VS_STOCK = 1.05
TARGET_WARM_VS_COLD = 0.65
PHASES = ("encode", "invert", "sample", "decode", "total")


@dataclass(frozen=True)
class BenchCase:
    """One model and the transfer shape it is measured at."""

    model: str
    size: int
    steps: int
    repeats: int


FULL = {
    "tiny": BenchCase("tiny", size=128, steps=20, repeats=5),
    "random-small": BenchCase("random-small", size=256, steps=15, repeats=3),
}
QUICK = {
    "tiny": BenchCase("tiny", size=64, steps=5, repeats=1),
    "random-small": BenchCase("random-small", size=128, steps=4, repeats=1),
}


def stock_pipeline(engine: HamEngine) -> StableDiffusionPipeline:
    """diffusers' own SD pipeline over the engine's components, with a fresh DDIM scheduler."""
    model = engine.model
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDIMScheduler.from_config(model.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_sample(pipe: StableDiffusionPipeline, start: torch.Tensor, empty: torch.Tensor, steps: int, batch: int):
    """Seconds and latents of a stock DDIM sampling loop from ``start`` at ``batch`` rows, no CFG."""
    processors = {type(p) for p in pipe.unet.attn_processors.values()}
    assert processors == {AttnProcessor2_0}, f"stock run would not use stock attention: {processors}"
    height, width = (side * pipe.vae_scale_factor for side in start.shape[-2:])
    started = time.perf_counter()
    latents = pipe(
        prompt_embeds=empty.expand(batch, -1, -1),
        latents=start.expand(batch, -1, -1, -1).clone(),
        num_inference_steps=steps,
        guidance_scale=1.0,
        height=height,
        width=width,
        output_type="latent",
    ).images
    return time.perf_counter() - started, latents


def _best(values: list[float]) -> float:
    # The fastest repeat is the one least disturbed by other work on a shared machine.
    # transfer_latents (the "off" run) has no decode phase and no total: NaN, printed as "-".
    return float(min(values)) if values else float("nan")


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _cell(seconds: float) -> str:
    return f"{'-':>7}" if seconds != seconds else f"{seconds:7.2f}"


def _run_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    first = runs[0]
    return {
        "unet_calls": first["unet_calls"],
        "unet_rows": first["unet_rows"],
        "unet_rows_by_phase": first["unet_rows_by_phase"],
        "style_cache_hit": first["style_cache_hit"],
        "seconds": {p: _best([r["seconds"][p] for r in runs if p in r["seconds"]]) for p in PHASES},
        "seconds_median": {p: _median([r["seconds"][p] for r in runs if p in r["seconds"]]) for p in PHASES},
        "seconds_all": {p: [r["seconds"].get(p) for r in runs] for p in PHASES},
    }


@contextmanager
def unet_clock(unet: torch.nn.Module) -> Iterator[list[float]]:
    """Sum the wall time spent inside ``unet``'s forward while the block runs (into the yielded list)."""
    spent = [0.0]
    forward = unet.forward

    def timed_forward(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    unet.forward = timed_forward  # an instance attribute shadows the method; deleted below
    try:
        yield spent
    finally:
        del unet.forward


@dataclass
class _Round:
    """One measurement of every variant."""

    cold: dict[str, Any]
    warm: dict[str, Any]
    off: dict[str, Any]
    stock_b1: float
    stock_b3: float
    off_loop_overhead: float  # seconds per UNet call spent outside the UNet (inversion + sampling)
    stock_loop_overhead: float  # the same for the stock pipeline's sampling loop
    warm_vs_cold_pixel_max_diff: int
    off_vs_stock_latent_max_diff: float


def _one_round(
    engine: HamEngine,
    pipe: StableDiffusionPipeline,
    content: Image.Image,
    style: Image.Image,
    params: TransferParams,
    empty: torch.Tensor,
) -> _Round:
    off = TransferParams(steps=params.steps, size=params.size, sini=False, gar=False, lat=False)
    engine.style_cache.clear()
    engine.content_cache.clear()
    cold = engine.transfer(content, style=style, params=params)
    engine.content_cache.clear()  # "warm" is the style cache alone; the content cache is measured below
    warm = engine.transfer(content, style=style, params=params)
    assert cold.stats.style_cache_hit is False and warm.stats.style_cache_hit is True
    pixel_diff = np.abs(np.asarray(cold.image, dtype=np.int16) - np.asarray(warm.image, dtype=np.int16)).max()
    unet = engine.model.unet
    engine.content_cache.clear()  # "off" inverts its content too, as a stock run would
    with unet_clock(unet) as off_unet_seconds:
        off_latents = engine.transfer_latents(content, style=style, params=off)
    off_loop = off_latents.stats.seconds["invert"] + off_latents.stats.seconds["sample"]
    with torch.inference_mode():
        with unet_clock(unet) as stock_unet_seconds:
            stock_b1, latents = stock_sample(pipe, off_latents.content_terminal, empty, params.steps, batch=1)
        stock_b3 = stock_sample(pipe, off_latents.content_terminal, empty, params.steps, batch=3)[0]
    return _Round(
        cold=cold.stats.to_dict(),
        warm=warm.stats.to_dict(),
        off=off_latents.stats.to_dict(),
        stock_b1=stock_b1,
        stock_b3=stock_b3,
        off_loop_overhead=(off_loop - off_unet_seconds[0]) / off_latents.stats.unet_calls,
        stock_loop_overhead=(stock_b1 - stock_unet_seconds[0]) / params.steps,
        warm_vs_cold_pixel_max_diff=int(pixel_diff),
        off_vs_stock_latent_max_diff=(latents.float() - off_latents.student).abs().max().item(),
    )


def unet_call_seconds(engine: HamEngine, latent_hw: tuple[int, int], empty: torch.Tensor, batch: int) -> float:
    """Fastest of a few bare UNet calls at ``batch`` rows: how the model's cost scales with rows."""
    model = engine.model
    latents = torch.randn(batch, model.unet.config.in_channels, *latent_hw, generator=torch.Generator().manual_seed(0))
    timestep = model.scheduler.config.num_train_timesteps // 2
    times = []
    with torch.inference_mode():
        for _ in range(6):
            started = time.perf_counter()
            model.unet(latents, timestep, encoder_hidden_states=empty.expand(batch, -1, -1))
            times.append(time.perf_counter() - started)
    return min(times[1:])


def bench_model(case: BenchCase) -> dict[str, Any]:
    """Measure one model; see the module docstring for what runs."""
    started_load = time.perf_counter()
    engine = HamEngine.load(case.model, device="cpu")
    load_seconds = time.perf_counter() - started_load
    content, style = Image.open(CONTENT).convert("RGB"), Image.open(STYLE).convert("RGB")
    pipe = stock_pipeline(engine)
    with torch.inference_mode():
        empty = engine.model.encode_prompt([""]).hidden_states

    # A short round first: on CPU the first call at each batch shape pays for kernel set-up.
    _one_round(engine, pipe, content, style, TransferParams(steps=2, size=case.size), empty)
    params = TransferParams(steps=case.steps, size=case.size)
    rounds = []
    for repeat in range(case.repeats):
        started = time.perf_counter()
        rounds.append(_one_round(engine, pipe, content, style, params, empty))
        seconds = time.perf_counter() - started
        print(f"  {case.model}: round {repeat + 1}/{case.repeats} took {seconds:.0f} s", file=sys.stderr, flush=True)

    latent_hw = tuple(side // engine.model.vae_scale_factor for side in reversed(rounds[0].cold["size"]))
    per_call = {batch: unet_call_seconds(engine, latent_hw, empty, batch) for batch in (1, 2, 3)}

    import tempfile

    with tempfile.TemporaryDirectory(prefix="ham-bench-features-") as workdir:
        features = bench_features(engine, case, Path(workdir))
    off_overhead = _median([r.off_loop_overhead for r in rounds])
    stock_overhead = _median([r.stock_loop_overhead for r in rounds])
    summary = {
        "case": case.__dict__,
        "loop_overhead_seconds_per_call": {"ham_off": off_overhead, "stock_b1": stock_overhead},
        "unet_call_seconds_by_batch": per_call,
        "load_seconds": load_seconds,
        "unet_parameters": sum(p.numel() for p in engine.model.unet.parameters()),
        "cold": _run_summary([r.cold for r in rounds]),
        "warm": _run_summary([r.warm for r in rounds]),
        "off": _run_summary([r.off for r in rounds]),
        "stock_b1_sample_seconds": _best([r.stock_b1 for r in rounds]),
        "stock_b3_sample_seconds": _best([r.stock_b3 for r in rounds]),
        "stock_b1_all": [r.stock_b1 for r in rounds],
        "stock_b3_all": [r.stock_b3 for r in rounds],
        "warm_vs_cold_pixel_max_diff": max(r.warm_vs_cold_pixel_max_diff for r in rounds),
        "off_vs_stock_latent_max_abs_diff": max(r.off_vs_stock_latent_max_diff for r in rounds),
        "features": features,
    }
    cold_s, warm_s = summary["cold"]["seconds"], summary["warm"]["seconds"]
    summary["ratios"] = {
        "off_sample_vs_stock_b1": summary["off"]["seconds"]["sample"] / summary["stock_b1_sample_seconds"],
        "warm_vs_cold_total": warm_s["total"] / cold_s["total"],
        # Not targets, for reading the two above: rows saved, and GAR+LAT's cost over stock at batch 3.
        "warm_vs_cold_rows": summary["warm"]["unet_rows"] / summary["cold"]["unet_rows"],
        "cold_sample_vs_stock_b3": cold_s["sample"] / summary["stock_b3_sample_seconds"],
        # What (b) would be if a transfer were only its UNet calls (warm: b1 invert + b2 sample;
        # cold: b2 + b3): the floor set by how the UNet's cost scales with batch rows.
        "warm_vs_cold_unet_bound": (per_call[1] + per_call[2]) / (per_call[2] + per_call[3]),
        # (a) without the machine's noise: the same UNet call plus each loop's own time outside it.
        "off_vs_stock_b1_from_overhead": (per_call[1] + off_overhead) / (per_call[1] + stock_overhead),
    }
    # The same ratios from medians, to show how much the shared machine's noise moves them.
    summary["ratios_median"] = {
        "off_sample_vs_stock_b1": summary["off"]["seconds_median"]["sample"] / _median(summary["stock_b1_all"]),
        "warm_vs_cold_total": summary["warm"]["seconds_median"]["total"] / summary["cold"]["seconds_median"]["total"],
    }
    return summary


STYLES = [REPO / "tests" / "data" / f"style{i}.png" for i in range(4)]


def _timed(run: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def _pixel_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _max_diff(images: list[Image.Image], singles: list[Any]) -> int:
    return max(_pixel_diff(a, b.image) for a, b in zip(images, singles, strict=True))


def bench_features(engine: HamEngine, case: BenchCase, workdir: Path) -> dict[str, Any]:
    """Rows and wall time through the feature tiers and multi-style batches (see the module docstring)."""
    import shutil

    model = engine.model
    params = TransferParams(steps=case.steps, size=case.size)
    content = Image.open(CONTENT).convert("RGB")
    styles = [Image.open(path).convert("RGB") for path in STYLES]
    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, seconds: float, stats: TransferStats, **extra: Any) -> None:
        rows[name] = {"seconds": seconds, "unet_rows": stats.unet_rows, "unet_calls": stats.unet_calls,
                      "peak_memory_bytes": stats.peak_memory_bytes, **extra}  # fmt: skip

    store = workdir / "features"
    shutil.rmtree(store, ignore_errors=True)
    first = HamEngine(model)  # memory only
    seconds, cold = _timed(lambda: first.transfer(content, style=styles[0], params=params))
    record("cold", seconds, cold.stats)
    first.content_cache.clear()
    seconds, warm = _timed(lambda: first.transfer(content, style=styles[0], params=params))
    record("warm (memory)", seconds, warm.stats, pixel_diff_vs_cold=_pixel_diff(warm.image, cold.image))
    seconds, both = _timed(lambda: first.transfer(content, style=styles[0], params=params))
    record("content+style warm (memory)", seconds, both.stats, pixel_diff_vs_cold=_pixel_diff(both.image, cold.image))
    HamEngine(model, feature_store=store).transfer(content, style=styles[0], params=params)  # fills the store
    fresh = HamEngine(model, feature_store=store)
    seconds, from_store = _timed(lambda: fresh.transfer(content, style=styles[0], params=params))
    record("content+style warm (store)", seconds, from_store.stats,
           pixel_diff_vs_cold=_pixel_diff(from_store.image, cold.image))  # fmt: skip
    shutil.rmtree(store / "content", ignore_errors=True)
    fresh = HamEngine(model, feature_store=store)
    seconds, style_store = _timed(lambda: fresh.transfer(content, style=styles[0], params=params))
    assert style_store.stats.style_cache_tier == "store" and not style_store.stats.content_cache_hit
    record("warm (store)", seconds, style_store.stats, pixel_diff_vs_cold=_pixel_diff(style_store.image, cold.image))

    batches: dict[str, dict[str, Any]] = {}
    for k in range(1, len(styles) + 1):
        chosen = styles[:k]
        singles, single_seconds, single_rows = [], 0.0, 0
        for style in chosen:  # K separate jobs, each on an empty engine
            seconds, single = _timed(lambda style=style: HamEngine(model).transfer(content, style=style, params=params))
            singles.append(single)
            single_seconds += seconds
            single_rows += single.stats.unet_rows
        engine_k = HamEngine(model)
        seconds, batch = _timed(lambda chosen=chosen, e=engine_k: e.transfer_batch(content, chosen, params=params))
        cold_row = {"seconds": seconds, "unet_rows": batch.stats.unet_rows,
                    "peak_memory_bytes": batch.stats.peak_memory_bytes,
                    "pixel_diff_vs_single": _max_diff(batch.images, singles)}  # fmt: skip
        # Every style warm, the content not (a new photo in K house styles).
        warm_singles_seconds, warm_singles_rows = 0.0, 0
        for style in chosen:
            engine_k.content_cache.clear()
            seconds, single = _timed(lambda style=style, e=engine_k: e.transfer(content, style=style, params=params))
            warm_singles_seconds += seconds
            warm_singles_rows += single.stats.unet_rows
        engine_k.content_cache.clear()
        seconds, warm_batch = _timed(lambda chosen=chosen, e=engine_k: e.transfer_batch(content, chosen, params=params))
        batches[str(k)] = {
            "cold": cold_row,
            "cold_separate": {"seconds": single_seconds, "unet_rows": single_rows},
            "warm": {"seconds": seconds, "unet_rows": warm_batch.stats.unet_rows,
                     "pixel_diff_vs_single": _max_diff(warm_batch.images, singles)},
            "warm_separate": {"seconds": warm_singles_seconds, "unet_rows": warm_singles_rows},
        }  # fmt: skip
    return {"steps": case.steps, "size": case.size, "runs": rows, "batches": batches}


def print_feature_table(results: dict[str, Any]) -> None:
    """Rows (in units of N = steps) and wall time through the tiers and the K-style batches."""
    for name, r in results["models"].items():
        f = r.get("features")
        if not f:
            continue
        n = f["steps"]
        print(f"{name} {f['size']}px {n} steps: feature tiers (rows in units of N = {n})")
        cold = f["runs"]["cold"]["seconds"]
        for run, row in f["runs"].items():
            diff = row.get("pixel_diff_vs_cold")
            print(f"  {run:<30} {row['unet_rows'] / n:5.1f}N  {row['seconds']:7.2f} s  x{row['seconds'] / cold:5.2f}"
                  + (f"   max |diff| vs cold {diff}" if diff is not None else ""))  # fmt: skip
        print(f"  {'K':>3} {'batch cold':>16} {'K jobs cold':>16} {'ratio':>6} {'batch warm':>16} {'K jobs warm':>16}"
              f" {'ratio':>6} {'max|diff|':>9}")  # fmt: skip
        for k, b in f["batches"].items():
            cells = []
            for kind in ("cold", "warm"):
                mine, theirs = b[kind], b[f"{kind}_separate"]
                cells.append(f"{mine['unet_rows'] / n:5.1f}N {mine['seconds']:7.2f}s"
                             f" {theirs['unet_rows'] / n:5.1f}N {theirs['seconds']:7.2f}s"
                             f" {mine['seconds'] / theirs['seconds']:6.2f}")  # fmt: skip
            diff = max(b["cold"]["pixel_diff_vs_single"], b["warm"]["pixel_diff_vs_single"])
            print(f"  {k:>3} {cells[0]} {cells[1]} {diff:>9}")
    print()


def print_table(results: dict[str, Any]) -> None:
    """A fixed-width table of the best repeats and the ratios."""
    header = f"{'model':<28} {'run':<10} {'calls':>5} {'rows':>5} " + " ".join(f"{p:>7}" for p in PHASES)
    print(header)
    print("-" * len(header))
    for name, r in results["models"].items():
        case = r["case"]
        label = f"{name} {case['size']}px {case['steps']} steps"
        for run in ("cold", "warm", "off"):
            s = r[run]
            phases = " ".join(_cell(s["seconds"][p]) for p in PHASES)
            print(f"{label:<28} {run:<10} {s['unet_calls']:>5} {s['unet_rows']:>5} {phases}")
            label = ""
        for batch in (1, 3):
            seconds = r[f"stock_b{batch}_sample_seconds"]
            calls, rows = case["steps"], case["steps"] * batch
            print(f"{'':<28} {f'stock b{batch}':<10} {calls:>5} {rows:>5} {'':>7} {'':>7} {seconds:7.2f}")
        ratios = r["ratios"]
        print(
            f"  (a) off sample / stock b1 = {ratios['off_sample_vs_stock_b1']:.3f} (target <= {TARGET_OFF_VS_STOCK})"
            f"   (b) warm / cold total = {ratios['warm_vs_cold_total']:.3f} (target <= {TARGET_WARM_VS_COLD})"
            f"   rows warm/cold = {ratios['warm_vs_cold_rows']:.3f}"
            f"   cold sample / stock b3 = {ratios['cold_sample_vs_stock_b3']:.3f}"
        )
        per_call = r["unet_call_seconds_by_batch"]
        print(
            f"  one UNet call at batch 1/2/3: {per_call[1] * 1000:.1f} / {per_call[2] * 1000:.1f} /"
            f" {per_call[3] * 1000:.1f} ms   -> UNet-only bound for (b) = {ratios['warm_vs_cold_unet_bound']:.3f}"
        )
        overhead = r["loop_overhead_seconds_per_call"]
        print(
            f"  time outside the UNet per call: HAM off {overhead['ham_off'] * 1000:.2f} ms,"
            f" stock {overhead['stock_b1'] * 1000:.2f} ms   -> (a) from overhead ="
            f" {ratios['off_vs_stock_b1_from_overhead']:.3f}"
        )
        print(
            f"  warm vs cold image max |diff| = {r['warm_vs_cold_pixel_max_diff']} (of 255);"
            f" off vs stock latents max |diff| = {r['off_vs_stock_latent_max_abs_diff']:.2e}"
        )
    print()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one repeat: a smoke run")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output path (default bench/results/engine.json; with --quick the ignored bench/scratch/engine.json, "
        "so a smoke run never replaces the committed figures)",
    )
    parser.add_argument("--models", nargs="+", choices=sorted(FULL), default=list(FULL), help="models to measure")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a busy 2-core machine two OpenMP threads spin against "
        "each other and run 2-7x slower and erratically; use 0 for torch's default on an idle machine)",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else FULL
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "quick": args.quick,
        "targets": {"off_sample_vs_stock_b1": TARGET_OFF_VS_STOCK, "warm_vs_cold_total": TARGET_WARM_VS_COLD},
        "models": {},
    }
    started = time.perf_counter()
    for name in args.models:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results["models"][name] = bench_model(cases[name])
    results["wall_seconds"] = time.perf_counter() - started
    print_table(results)
    print_feature_table(results)
    out = Path(args.out or REPO / "bench" / ("scratch" if args.quick else "results") / "engine.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out} ({results['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
