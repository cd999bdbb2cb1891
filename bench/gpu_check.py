"""One GPU check, ready to run: precision, speed and memory of HAM on SD 2.1-base and SDXL-base.

For each architecture (random weights from the published configs, built offline by
:mod:`ham_engine.architectures`; the first run builds them, ~3 GB and ~7 GB on disk):

1. **precision** – the same short transfer (image style, 10 steps, the family's default
   size) in fp32, fp16 and bf16: are the latents finite, and how far are fp16/bf16 from
   fp32 (max and mean |Δ| of z_0, relative to fp32's std)? A ``NumericalError`` is
   reported, not raised;
2. **speed** – seconds per transfer at N=50 in fp16 (SD 2.1-base 512², SDXL 1024²):
   cold (style inverted), warm (style cached), text (CFG), each after one warm-up;
   peak CUDA memory of each;
3. **stock vs HAM** – one UNet call at batch 3 with the stock SDPA processors and with
   GAR + LAT on every decoder layer: HAM's overhead per call;
4. optionally (``--compile``) the warm transfer again with ``torch.compile`` on the UNet.

A table goes to stdout, everything to ``bench/results/gpu_check.json``. On one H200 it is
meant to finish in under 8 minutes, builds excluded. ``--smoke`` runs the same code on
the tiny presets on a CPU in seconds (what the test suite runs).

    python bench/gpu_check.py                       # on the GPU machine
    python bench/gpu_check.py --smoke --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ham_engine import TransferParams  # noqa: E402
from ham_engine.attention import (  # noqa: E402
    CONTENT_TEACHER,
    STUDENT,
    STYLE_TEACHER,
    BranchLayout,
    ModulationContext,
    modulated_attention,
)
from ham_engine.engine import HamEngine, NumericalError  # noqa: E402

DATA = ROOT / "tests" / "data"


@dataclass(frozen=True)
class Case:
    """One architecture and the shapes it is checked at."""

    name: str  # an architecture of ham_engine.architectures, or a tiny preset (--smoke)
    size: int
    steps: int
    precision_steps: int


FULL = [Case("sd21-base", 512, 50, 10), Case("sdxl-base", 1024, 50, 10)]
SMOKE = [Case("tiny", 64, 2, 2), Case("tiny-xl", 64, 2, 2)]


def _source(case: Case, smoke: bool) -> str:
    if smoke:
        return case.name
    from ham_engine.architectures import ensure_architecture

    return str(ensure_architecture(case.name))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images() -> tuple[Image.Image, Image.Image]:
    return Image.open(DATA / "content0.png").convert("RGB"), Image.open(DATA / "style0.png").convert("RGB")


def precision(source: str, case: Case, device: torch.device, dtypes: list[str]) -> dict[str, Any]:
    """z_0 of the same transfer in each dtype, compared with fp32's."""
    content, style = _images()
    params = TransferParams(steps=case.precision_steps, size=case.size)
    results: dict[str, Any] = {}
    reference = None
    for dtype in dtypes:
        engine = HamEngine.load(source, device=device, dtype=dtype)
        try:
            latents = engine.transfer_latents(content, style=style, params=params).student.float().cpu()
        except NumericalError as exc:
            results[dtype] = {"finite": False, "error": str(exc)}
            continue
        finally:
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
        entry: dict[str, Any] = {"finite": bool(torch.isfinite(latents).all())}
        if dtype == "fp32":
            reference = latents
        elif reference is not None:
            delta = (latents - reference).abs()
            scale = float(reference.std())
            entry.update(
                max_abs=float(delta.max()), mean_abs=float(delta.mean()), relative_to_std=float(delta.mean()) / scale
            )
        results[dtype] = entry
    return results


def _timed(engine: HamEngine, **kwargs: Any) -> dict[str, Any]:
    device = engine.model.device
    _sync(device)
    started = time.perf_counter()
    result = engine.transfer(**kwargs)
    _sync(device)
    stats = result.stats
    return {
        "seconds": time.perf_counter() - started,
        "unet_rows": stats.unet_rows,
        "peak_memory_bytes": stats.peak_memory_bytes,
        "cache_hit": stats.style_cache_hit,
    }


def speed(engine: HamEngine, case: Case) -> dict[str, Any]:
    """Seconds per transfer, cold / warm / text, after one warm-up of each path."""
    content, style = _images()
    params = TransferParams(steps=case.steps, size=case.size)
    warmup = TransferParams(steps=2, size=case.size)
    engine.transfer(content, style=style, params=warmup)
    engine.transfer(content, style_prompt="an ink engraving", params=warmup)
    engine.style_cache.clear()
    runs = {
        "cold": {"content": content, "style": style, "params": params},
        "warm": {"content": content, "style": style, "params": params},
        "text": {"content": content, "style_prompt": "an ink engraving", "params": params},
    }
    timed = {}
    for name, kwargs in runs.items():
        # Each run inverts its content: these figures are the style cache's alone (the
        # content cache has its own bench, bench/engine.py's feature tiers).
        engine.content_cache.clear()
        timed[name] = _timed(engine, **kwargs)
    return timed


def unet_ratio(engine: HamEngine, case: Case, repeats: int) -> dict[str, float]:
    """One batch-3 UNet call: stock processors vs GAR + LAT on the family's default layers."""
    from ham_engine.attention import CROSS_ATTENTION, SELF_ATTENTION, resolve_layers

    model = engine.model
    device, dtype = model.device, model.dtype
    latent = case.size // model.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, model.unet.config.in_channels, latent, latent, generator=generator).to(device, dtype)
    text = model.encode_prompt(["", "", ""], size=(case.size, case.size))
    timestep = torch.tensor(500, device=device)

    def best() -> float:
        times = []
        for i in range(repeats + 1):
            _sync(device)
            started = time.perf_counter()
            with torch.inference_mode():
                model.unet(sample, timestep, **text.unet_kwargs(), return_dict=False)
            _sync(device)
            if i:
                times.append(time.perf_counter() - started)
        return min(times)

    stock = best()
    layers = model.family.default_layers
    context = ModulationContext(
        alpha=0.75,
        beta=0.25,
        gar_layers=resolve_layers(model.unet, layers, SELF_ATTENTION, "gar_layers"),
        lat_layers=resolve_layers(model.unet, layers, CROSS_ATTENTION, "lat_layers"),
    )
    context.begin_step(0, BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT)), modulating=True)
    with modulated_attention(model.unet, context):
        ham = best()
    return {"stock_seconds": stock, "ham_seconds": ham, "ham_over_stock": ham / stock}


def compiled_warm(engine: HamEngine, case: Case) -> dict[str, Any]:
    """The warm transfer with ``torch.compile`` on the UNet (first call compiles, not timed)."""
    content, style = _images()
    params = TransferParams(steps=case.steps, size=case.size)
    original = engine.model.unet
    try:
        engine.model.unet = torch.compile(original)  # type: ignore[assignment]
        engine.transfer(content, style=style, params=params)  # compiles, fills the cache
        return _timed(engine, content=content, style=style, params=params)
    except Exception as exc:  # report, do not abort the rest of the check
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        engine.model.unet = original


def run(cases: list[Case], device: torch.device, smoke: bool, compile_unet: bool, repeats: int) -> dict[str, Any]:
    dtypes = ["fp32", "bf16"] if device.type == "cpu" else ["fp32", "fp16", "bf16"]
    fast = "fp32" if device.type == "cpu" else "fp16"
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "smoke": smoke,
        "speed_dtype": fast,
        "architectures": {},
    }
    for case in cases:
        started = time.perf_counter()
        source = _source(case, smoke)
        entry: dict[str, Any] = {"size": case.size, "steps": case.steps}
        entry["precision"] = precision(source, case, device, dtypes)
        engine = HamEngine.load(source, device=device, dtype=fast)
        entry["speed"] = speed(engine, case)
        entry["unet"] = unet_ratio(engine, case, repeats)
        if compile_unet:
            entry["compiled_warm"] = compiled_warm(engine, case)
        entry["check_seconds"] = time.perf_counter() - started
        report["architectures"][case.name] = entry
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


def print_table(report: dict[str, Any]) -> None:
    print(f"device: {report['device']}  torch {report['torch']}  speed dtype: {report['speed_dtype']}")
    for name, entry in report["architectures"].items():
        print(f"\n{name} ({entry['size']}², N={entry['steps']})")
        for dtype, result in entry["precision"].items():
            detail = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
            print(f"  precision {dtype:5s} {detail}")
        for kind, result in entry["speed"].items():
            peak = result["peak_memory_bytes"]
            memory = f"{peak / 2**30:.2f} GiB" if isinstance(peak, int) else "n/a (CPU)"
            print(f"  {kind:5s} {result['seconds']:8.2f} s  rows {result['unet_rows']:4d}  peak {memory}")
        unet = entry["unet"]
        print(f"  UNet batch 3: stock {unet['stock_seconds'] * 1e3:.1f} ms, HAM {unet['ham_seconds'] * 1e3:.1f} ms, "
              f"ratio {unet['ham_over_stock']:.2f}")
        if "compiled_warm" in entry:
            print(f"  compiled warm: {entry['compiled_warm']}")
        print(f"  check took {entry['check_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--smoke", action="store_true", help="tiny presets, seconds on a CPU")
    parser.add_argument("--compile", action="store_true", help="also time the warm transfer under torch.compile")
    parser.add_argument("--only", choices=[c.name for c in FULL], help="check one architecture")
    parser.add_argument("--repeats", type=int, default=5, help="timed UNet calls per processor set")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not args.smoke and device.type != "cuda":
        parser.error("the full check needs a GPU; use --smoke on a CPU")
    cases = SMOKE if args.smoke else [c for c in FULL if args.only in (None, c.name)]
    report = run(cases, device, args.smoke, args.compile, 1 if args.smoke else args.repeats)
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    bad = [n for n, e in report["architectures"].items() for r in e["precision"].values() if not r["finite"]]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
