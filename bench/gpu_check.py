"""One GPU check, ready to run: precision, speed and memory of HAM on SD 2.1-base and SDXL-base.

A GPU is lent rarely and briefly, so the check is built never to come back empty: it writes
its JSON and its table (atomically) after every measurement, each measurement is guarded (a
failure is recorded with its message and the run goes on), and ``--budget-s`` is a
wall-clock budget: the most valuable figures come first and no step starts that the budget
cannot hold, by the check's own estimate (rescaled by what the finished steps took). A
transfer running when the budget ends stops between two steps; a SIGTERM stops the run the
same way. Order of the plan (``--plan`` prints it with its estimates, without running):

1. per architecture (SD 2.1-base 512², then SDXL-base 1024²): build from the recipe, load in
   fp16 and warm up; **speed** at N=50 — seconds per transfer cold (style inverted) and warm
   (style cached), with the transfer's peak CUDA memory;
2. per architecture: the text-guided transfer (CFG); **stock vs HAM**, one batch-3 UNet call
   with the stock SDPA processors and with GAR + LAT (HAM's overhead per call); **precision**,
   the same short transfer (10 steps) in fp32, fp16 and bf16: are the latents finite, and how
   far are fp16/bf16 from fp32 (max and mean |Δz_0|, relative to fp32's std; a
   ``NumericalError`` there is a finding, reported as not finite);
3. optionally (``--compile``) the warm transfer again with ``torch.compile`` on the UNet.

The architectures have random weights from the published configs. Prepared (``python -m
bench.gpu_prep`` here, which writes ``.gpu/``), the device run draws them on the GPU from a
seed in seconds and needs no network; unprepared, :mod:`ham_engine.architectures` builds them
on the CPU on first use (minutes; ~3 GB and ~7 GB on disk). ``--smoke`` runs the same code on
the tiny presets on a CPU in seconds (what the test suite runs), into ``bench/scratch/``.

Exit status: 0 every step ran and every dtype stayed finite; 1 every step ran but a dtype
produced a non-finite latent; 3 partial — a step failed, was stopped or did not run (the
report's ``errors`` and ``not_run`` say which).

    python3 bench/gpu_check.py --budget-s 480 --out OUT/gpu_check.json   # the device run
    python bench/gpu_check.py --plan                                      # the plan and its estimate
    python bench/gpu_check.py --smoke                                     # tiny presets, CPU, seconds
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # the budget counts from here: imports take seconds on a cold machine

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import zipfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PREPARED = ROOT / ".gpu"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Nothing here is downloaded: a hub call on a machine without network would only wait.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _use_prepared_wheels(prepared: Path) -> list[str]:
    """Unpack the prepared pure-Python wheels (diffusers) onto ``sys.path`` when they are not installed."""
    wheels = sorted((prepared / "wheels").glob("*.whl"))
    missing = [w for w in wheels if importlib.util.find_spec(w.name.split("-")[0]) is None]
    if not missing:
        return []
    site = Path(tempfile.mkdtemp(prefix="ham-gpu-site-"))
    for wheel in missing:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    return [w.name for w in missing]


UNPACKED_WHEELS = _use_prepared_wheels(PREPARED)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ham_engine import HamEngine, TransferCancelled, TransferParams  # noqa: E402
from ham_engine.attention import (  # noqa: E402
    CONTENT_TEACHER,
    STUDENT,
    STYLE_TEACHER,
    BranchLayout,
    ModulationContext,
    modulated_attention,
)
from ham_engine.engine import NumericalError  # noqa: E402

DATA = ROOT / "tests" / "data"
SCRATCH = ROOT / "bench" / "scratch"
EXIT_COMPLETE, EXIT_NOT_FINITE, EXIT_PARTIAL = 0, 1, 3


@dataclass(frozen=True)
class Case:
    """One architecture, the shapes it is checked at, and what its steps are estimated to take.

    The estimates are seconds on the machine the case is meant for (an H200 for the full
    cases, this project's 2-core CPU for the smoke ones): ``row_s`` per UNet row at the speed
    dtype (fp32 costs ``fp32_factor`` times more: no TF32), ``transfer_s`` per transfer
    outside the UNet (VAE, text encoder), ``load_s`` to load the weights, ``build_s`` to draw
    them from the prepared recipe.
    """

    name: str  # an architecture of ham_engine.architectures, or a tiny preset (--smoke)
    size: int
    steps: int
    precision_steps: int
    row_s: float
    transfer_s: float
    load_s: float
    build_s: float
    fp32_factor: float = 8.0


FULL = [
    Case("sd21-base", 512, 50, 10, row_s=0.015, transfer_s=1.0, load_s=10.0, build_s=15.0),
    Case("sdxl-base", 1024, 50, 10, row_s=0.045, transfer_s=3.0, load_s=20.0, build_s=35.0),
]
SMOKE = [
    Case("tiny", 64, 2, 2, row_s=0.02, transfer_s=0.2, load_s=1.0, build_s=0.0, fp32_factor=1.0),
    Case("tiny-xl", 64, 2, 2, row_s=0.02, transfer_s=0.2, load_s=1.0, build_s=0.0, fp32_factor=1.0),
]
# An unprepared full run builds on the CPU (measured on a 2-core machine: 73 s and 190 s).
CPU_BUILD_S = {"sd21-base": 75.0, "sdxl-base": 190.0}

# --- Issue 21: diffusion transformers, checked on request only (`--only flux1-dev`). ---------
# FLUX.1-dev full size (ham_engine.architectures "flux1-dev": 12 B transformer + 4.7 B T5,
# random weights from the published configs, ~34 GB in bf16), so the default run (FULL) keeps
# its budget without it. 28 steps: FluxPipeline's default. The estimates are guesses (2 x 12 B
# x 4608 tokens per row at 1024 px) until a lent GPU measures them; gpu_prep has no recipe for
# it yet, so it builds where it runs.
ON_REQUEST = [Case("flux1-dev", 1024, 28, 10, row_s=0.3, transfer_s=5.0, load_s=60.0, build_s=300.0)]


class Stopped(Exception):
    """The run was told to stop (SIGTERM): the step in progress ends, the report is written."""


class Budget:
    """A wall-clock budget that ends ``reserve_s`` early, leaving time to write the report and exit."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic, start: float | None = None):
        self.seconds = seconds
        self.clock = clock
        self.start = clock() if start is None else start
        self.reserve_s = 0.0 if seconds is None else min(10.0, 0.05 * seconds)

    def remaining(self) -> float:
        """Seconds left before the run must stop (inf without a budget)."""
        if self.seconds is None:
            return float("inf")
        return self.start + self.seconds - self.reserve_s - self.clock()

    def expired(self) -> bool:
        """True once the budget has ended (the engine polls this between steps)."""
        return self.remaining() <= 0


@dataclass
class Step:
    """One guarded measurement of the plan: its result lands at ``report[architectures][case][key]``."""

    case: Case
    key: str  # "speed.cold", "precision.fp16", ...
    estimate_s: float
    run: Callable[[Check], Any]
    requires: tuple[str, ...] = ()  # keys of the same case that must have succeeded

    @property
    def id(self) -> str:
        return f"{self.case.name}/{self.key}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images() -> tuple[Image.Image, Image.Image]:
    return Image.open(DATA / "content0.png").convert("RGB"), Image.open(DATA / "style0.png").convert("RGB")


def load_engine(source: str, device: torch.device, dtype: str) -> HamEngine:
    """The engine of one step (a seam the tests use to inject a failing model)."""
    return HamEngine.load(source, device=device, dtype=dtype)


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


@dataclass
class Check:
    """The run's state: device, budget, the loaded fp16 engines and fp32 references, and the report."""

    device: torch.device
    budget: Budget
    prepared: Path | None
    arch_dir: Path
    smoke: bool
    fast: str
    report: dict[str, Any]
    engines: dict[str, HamEngine] = field(default_factory=dict)
    references: dict[str, torch.Tensor] = field(default_factory=dict)

    def source(self, case: Case) -> tuple[str, dict[str, float]]:
        """The model to load for ``case`` and how long building it took (a preset name for --smoke)."""
        if self.smoke:
            return case.name, {}
        started = time.perf_counter()
        if self.prepared is not None:
            from bench.gpu_prep import materialize

            folder = materialize(case.name, self.prepared, self.arch_dir, self.device)
        else:
            from ham_engine.architectures import ensure_architecture

            folder = ensure_architecture(case.name)
        return str(folder), {"build_seconds": time.perf_counter() - started}

    def transfer(self, engine: HamEngine, **kwargs: Any) -> dict[str, Any]:
        """One timed transfer that stops between two steps once the budget ends."""
        return _timed(engine, cancelled=self.budget.expired, **kwargs)

    def release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -- the steps ------------------------------------------------------------------------------


def _load(case: Case) -> Callable[[Check], dict[str, Any]]:
    def run(check: Check) -> dict[str, Any]:
        source, entry = check.source(case)
        started = time.perf_counter()
        engine = load_engine(source, check.device, check.fast)
        entry["load_seconds"] = time.perf_counter() - started
        content, style = _images()
        started = time.perf_counter()
        engine.transfer(
            content, style=style, params=TransferParams(steps=2, size=case.size), cancelled=check.budget.expired
        )
        entry["warmup_seconds"] = time.perf_counter() - started
        check.engines[case.name] = engine
        return entry

    return run


def _speed(case: Case, kind: str) -> Callable[[Check], dict[str, Any]]:
    """cold: empty style cache; warm: the same style again; text: a style prompt under CFG."""

    def run(check: Check) -> dict[str, Any]:
        engine = check.engines[case.name]
        content, style = _images()
        params = TransferParams(steps=case.steps, size=case.size)
        if kind == "cold":
            engine.style_cache.clear()
        if kind == "text":  # its own warm-up: the text path compiles other kernels
            engine.transfer(content, style_prompt="an ink engraving", params=TransferParams(steps=2, size=case.size))
        # Each run inverts its content: these figures are the style cache's alone (the
        # content cache has its own bench, bench/engine.py's feature tiers).
        engine.content_cache.clear()
        if kind == "text":
            return check.transfer(engine, content=content, style_prompt="an ink engraving", params=params)
        return check.transfer(engine, content=content, style=style, params=params)

    return run


def _precision(case: Case, dtype: str) -> Callable[[Check], dict[str, Any]]:
    """z_0 of the same short transfer in ``dtype``, compared with fp32's."""

    def run(check: Check) -> dict[str, Any]:
        source, _ = check.source(case)
        content, style = _images()
        params = TransferParams(steps=case.precision_steps, size=case.size)
        engine = load_engine(source, check.device, dtype)
        try:
            latents = (
                engine.transfer_latents(content, style=style, params=params, cancelled=check.budget.expired)
                .student.float()
                .cpu()
            )
        except NumericalError as exc:  # a finding about the dtype, not a failure of the check
            return {"finite": False, "error": str(exc)}
        finally:
            del engine
            check.release()
        entry: dict[str, Any] = {"finite": bool(torch.isfinite(latents).all())}
        if dtype == "fp32":
            check.references[case.name] = latents
        elif case.name in check.references:
            reference = check.references[case.name]
            delta = (latents - reference).abs()
            scale = float(reference.std())
            entry.update(
                max_abs=float(delta.max()), mean_abs=float(delta.mean()), relative_to_std=float(delta.mean()) / scale
            )
        return entry

    return run


def _unet(case: Case, repeats: int) -> Callable[[Check], dict[str, float]]:
    """One batch-3 UNet call: stock processors vs GAR + LAT on the family's default layers."""

    def run(check: Check) -> dict[str, float]:
        from ham_engine.attention import CROSS_ATTENTION, SELF_ATTENTION, resolve_layers

        model = check.engines[case.name].model
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

    return run


def _compiled_warm(case: Case) -> Callable[[Check], dict[str, Any]]:
    """The warm transfer with ``torch.compile`` on the UNet (the first call compiles, not timed)."""

    def run(check: Check) -> dict[str, Any]:
        engine = check.engines[case.name]
        content, style = _images()
        params = TransferParams(steps=case.steps, size=case.size)
        original = engine.model.unet
        try:
            engine.model.unet = torch.compile(original)  # type: ignore[assignment]
            engine.transfer(content, style=style, params=params, cancelled=check.budget.expired)
            return check.transfer(engine, content=content, style=style, params=params)
        finally:
            engine.model.unet = original

    return run


def plan(
    cases: list[Case], dtypes: list[str], fast: str, compile_unet: bool, repeats: int, prepared: bool
) -> list[Step]:
    """The steps in the order of their value: every architecture's cold/warm speed first."""
    steps: list[Step] = []
    for case in cases:

        def rows(n: int, c: Case = case) -> float:
            return n * c.steps * c.row_s + c.transfer_s

        build = 0.0 if case.build_s == 0 else case.build_s if prepared else CPU_BUILD_S.get(case.name, case.build_s)
        warmup = 5 * 2 * case.row_s + case.transfer_s
        steps += [
            Step(case, "load", build + case.load_s + warmup, _load(case)),
            Step(case, "speed.cold", rows(5), _speed(case, "cold"), ("load",)),
            Step(case, "speed.warm", rows(3), _speed(case, "warm"), ("speed.cold",)),
        ]
    for case in cases:
        precision_rows = 5 * case.precision_steps * case.row_s
        steps += [
            Step(
                case,
                "speed.text",
                6 * case.steps * case.row_s + 12 * case.row_s + 2 * case.transfer_s,
                _speed(case, "text"),
                ("load",),
            ),
            Step(case, "unet", 2 * (repeats + 1) * 3 * case.row_s + 1.0, _unet(case, repeats), ("load",)),
        ]
        for dtype in dtypes:
            factor = case.fp32_factor if dtype == "fp32" else 1.0
            steps.append(
                Step(
                    case,
                    f"precision.{dtype}",
                    case.load_s + precision_rows * factor + case.transfer_s,
                    _precision(case, dtype),
                    ("load",),
                )
            )
    if compile_unet:
        for case in cases:
            steps.append(
                Step(case, "compiled_warm", 120.0 + 6 * case.steps * case.row_s, _compiled_warm(case), ("load",))
            )
    return steps


# -- running and reporting -------------------------------------------------------------------


def _store(report: dict[str, Any], step: Step, value: Any) -> None:
    entry = report["architectures"].setdefault(step.case.name, {"size": step.case.size, "steps": step.case.steps})
    *path, last = step.key.split(".")
    for part in path:
        entry = entry.setdefault(part, {})
    entry[last] = value


def _scale(done: list[tuple[float, float]]) -> float:
    """How much slower than estimated the finished steps ran (never below 1: estimates stay a floor)."""
    estimated = sum(e for e, _ in done)
    return max(1.0, sum(a for _, a in done) / estimated) if estimated > 0 else 1.0


def run(check: Check, steps: list[Step], on_progress: Callable[[dict[str, Any]], None] = lambda r: None) -> dict:
    """Run ``steps`` in order, each guarded; ``on_progress(report)`` after each (the atomic writes)."""
    report = check.report
    report.update(status="running", errors=[], not_run=[], steps=[])
    report["plan_estimate_s"] = round(sum(s.estimate_s for s in steps), 1)
    outcome: dict[str, str] = {}
    done: list[tuple[float, float]] = []
    stopped = ""
    for step in steps:
        record: dict[str, Any] = {"step": step.id, "estimate_s": round(step.estimate_s, 1)}
        failed = [r for r in step.requires if outcome.get(f"{step.case.name}/{r}") != "ok"]
        need = step.estimate_s * _scale(done)
        left = check.budget.remaining()
        reason = (
            stopped
            or (f"needs {step.case.name}/{failed[0]}, which did not succeed" if failed else "")
            or (f"budget: needs ~{need:.0f} s, {max(left, 0):.0f} s left" if need > left else "")
        )
        if reason:
            record.update(status="not run", reason=reason)
            report["not_run"].append(f"{step.id}: {reason}")
        else:
            started = time.perf_counter()
            try:
                _store(report, step, step.run(check))
                record["status"] = "ok"
            except (TransferCancelled, Stopped) as exc:
                stopped = "the budget ended" if check.budget.expired() else f"stopped ({exc})"
                record.update(status="stopped", reason=stopped)
                report["errors"].append(f"{step.id}: stopped: {stopped}")
            except Exception as exc:  # guarded: record it, run the next step
                message = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                record.update(status="error", error=message)
                report["errors"].append(f"{step.id}: {message}")
                _store(report, step, {"error": message})
                check.release()
            record["seconds"] = round(time.perf_counter() - started, 2)
            done.append((step.estimate_s, record["seconds"]))
        outcome[step.id] = record["status"]
        report["steps"].append(record)
        report["elapsed_s"] = round(check.budget.clock() - check.budget.start, 1)
        detail = record.get("error") or record.get("reason") or f"{record.get('seconds', 0):.1f} s"
        print(f"[{report['elapsed_s']:7.1f} s] {step.id}: {record['status']} ({detail})", file=sys.stderr, flush=True)
        on_progress(report)
    report["status"] = "partial" if report["errors"] or report["not_run"] else "complete"
    on_progress(report)
    return report


def exit_code(report: dict[str, Any]) -> int:
    """0 complete and finite, 1 complete with a non-finite dtype, 3 partial."""
    if report["status"] != "complete":
        return EXIT_PARTIAL
    precision = [r for e in report["architectures"].values() for r in e.get("precision", {}).values()]
    return EXIT_NOT_FINITE if any(not r.get("finite", False) for r in precision) else EXIT_COMPLETE


def table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (whatever has been measured so far)."""
    lines = [
        f"device: {report['device']}  torch {report['torch']}  speed dtype: {report['speed_dtype']}  "
        f"status: {report['status']}  elapsed {report.get('elapsed_s', 0):.0f} s"
        + (f" of {report['budget_s']:.0f} s" if report.get("budget_s") else "")
    ]
    for name, entry in report["architectures"].items():
        lines.append(f"\n{name} ({entry['size']}², N={entry['steps']})")
        load = entry.get("load", {})
        if load:
            lines.append(
                "  load   "
                + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f} s" for k, v in load.items() if isinstance(v, float))
                + (f"  {load['error']}" if "error" in load else "")
            )
        for kind, result in entry.get("speed", {}).items():
            if "error" in result:
                lines.append(f"  {kind:5s} error: {result['error']}")
                continue
            peak = result["peak_memory_bytes"]
            memory = f"{peak / 2**30:.2f} GiB" if isinstance(peak, int) else "n/a (CPU)"
            lines.append(f"  {kind:5s} {result['seconds']:8.2f} s  rows {result['unet_rows']:4d}  peak {memory}")
        unet = entry.get("unet")
        if unet and "error" not in unet:
            lines.append(
                f"  UNet batch 3: stock {unet['stock_seconds'] * 1e3:.1f} ms, HAM {unet['ham_seconds'] * 1e3:.1f} ms, "
                f"ratio {unet['ham_over_stock']:.2f}"
            )
        elif unet:
            lines.append(f"  UNet batch 3 error: {unet['error']}")
        for dtype, result in entry.get("precision", {}).items():
            detail = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())
            lines.append(f"  precision {dtype:5s} {detail}")
        if "compiled_warm" in entry:
            lines.append(f"  compiled warm: {entry['compiled_warm']}")
    for title, items in (("errors", report.get("errors")), ("not run", report.get("not_run"))):
        if items:
            lines.append(f"\n{title}:")
            lines += [f"  {item}" for item in items]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_report(report: dict[str, Any], out: Path) -> None:
    """The JSON at ``out`` and the table beside it (``.txt``), each replaced atomically."""
    _write_atomic(out, json.dumps(report, indent=2) + "\n")
    _write_atomic(out.with_suffix(".txt"), table(report))


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "?"
    return versions


def main(argv: list[str] | None = None, budget: Budget | None = None, cases: list[Case] | None = None) -> int:
    """Run the check; ``budget`` and ``cases`` replace ``--budget-s`` and the architectures (for tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny presets, seconds on a CPU (writes to bench/scratch/)"
    )
    parser.add_argument("--compile", action="store_true", help="also time the warm transfer under torch.compile")
    parser.add_argument("--only", choices=[c.name for c in FULL + ON_REQUEST], help="check one architecture")
    parser.add_argument("--repeats", type=int, default=5, help="timed UNet calls per processor set")
    parser.add_argument("--budget-s", type=float, default=None, help="wall-clock budget in seconds, from the start")
    parser.add_argument("--plan", action="store_true", help="print the plan and its estimated duration; run nothing")
    parser.add_argument(
        "--prepared",
        type=Path,
        default=PREPARED if (PREPARED / "manifest.json").is_file() else None,
        help="the folder `python -m bench.gpu_prep` wrote (default .gpu/ when present)",
    )
    parser.add_argument(
        "--arch-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "ham-architectures",
        help="where a prepared run writes the architectures it draws (default: the temp folder)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the JSON (a .txt table beside it); default bench/results/gpu_check.json, "
        "bench/scratch/gpu_check-smoke.json with --smoke",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (args.smoke or args.plan) and device.type != "cuda":
        parser.error("the full check needs a GPU; use --smoke on a CPU (or --plan)")
    if cases is None:
        cases = SMOKE if args.smoke else [c for c in FULL if args.only in (None, c.name)]
        cases += [c for c in ON_REQUEST if not args.smoke and args.only == c.name]  # issue 21: on request
    prepared = args.prepared
    if prepared is not None:
        from bench.gpu_prep import load_manifest

        load_manifest(prepared)  # a clear error before anything runs
        if args.smoke and (prepared / "tiny").is_dir():
            os.environ.setdefault("HAM_TINY_DIR", str(prepared / "tiny"))
    on_gpu = device.type == "cuda" or (args.plan and not args.smoke)  # --plan: the GPU run's plan
    dtypes = ["fp32", "fp16", "bf16"] if on_gpu else ["fp32", "bf16"]
    fast = "fp16" if on_gpu else "fp32"
    steps = plan(cases, dtypes, fast, args.compile, 1 if args.smoke else args.repeats, prepared is not None)
    if args.plan:
        total = 0.0
        for step in steps:
            total += step.estimate_s
            print(f"{step.id:32s} ~{step.estimate_s:6.1f} s   (by then ~{total:6.0f} s)")
        print(
            f"estimated total: {total:.0f} s ({total / 60:.1f} min) plus start-up"
            + (f"; budget {args.budget_s:.0f} s" if args.budget_s else "")
        )
        return 0
    budget = budget or Budget(args.budget_s, start=STARTED)
    out = args.out or (
        SCRATCH / "gpu_check-smoke.json" if args.smoke else ROOT / "bench" / "results" / "gpu_check.json"
    )
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "versions": _versions(),
        "unpacked_wheels": UNPACKED_WHEELS,
        "prepared": str(prepared) if prepared is not None else None,
        "smoke": args.smoke,
        "speed_dtype": fast,
        "budget_s": budget.seconds,
        "architectures": {},
    }
    check = Check(device, budget, prepared, args.arch_dir, args.smoke, fast, report)

    def stop(signum: int, frame: Any) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        run(check, steps, on_progress=lambda r: write_report(r, out))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(table(report))
    print(f"wrote {out} and {out.with_suffix('.txt').name}: {report['status']}")
    return exit_code(report)


if __name__ == "__main__":
    raise SystemExit(main())
