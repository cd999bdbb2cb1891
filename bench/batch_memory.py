"""Peak memory of ``transfer_batch`` per K (styles), each K in a fresh process.

    python -m bench.batch_memory [--model random-small] [--size 256] [--steps 15] [--max-k 4]

On CUDA the engine's ``stats.peak_memory_bytes`` is the allocator's peak of the run
itself. On a CPU it is the process's peak RSS, which never goes down, so this script runs
each K (cold: every style inverted and live) in its own process and reports the peak RSS
over the RSS after loading the model: the transfer's working memory. A measurement,
never a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(model: str, size: int, steps: int, k: int) -> dict:
    """Run one cold K-style batch here; returns rows per step and the peak RSS over the loaded model."""
    import torch
    from PIL import Image

    from ham_engine.engine import HamEngine
    from ham_engine.params import TransferParams

    torch.set_num_threads(1)
    engine = HamEngine.load(model, device="cpu")
    content = Image.open(REPO / "tests" / "data" / "content0.png").convert("RGB")
    styles = [Image.open(REPO / "tests" / "data" / f"style{i}.png").convert("RGB") for i in range(k)]
    loaded = _rss()
    batch = engine.transfer_batch(content, styles, params=TransferParams(steps=steps, size=size))
    return {
        "k": k,
        "rows_per_sampling_step": batch.stats.unet_rows_by_phase["sample"] // steps,
        "rows_per_inversion_step": batch.stats.unet_rows_by_phase["invert"] // steps,
        "rss_after_load_bytes": loaded,
        "peak_over_load_bytes": _rss() - loaded,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random-small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--max-k", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "batch_memory.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.model, args.size, args.steps, args.one)))
        return 0
    rows = []
    for k in range(1, args.max_k + 1):
        cmd = [sys.executable, "-m", "bench.batch_memory", "--model", args.model, "--size", str(args.size),
               "--steps", str(args.steps), "--one", str(k)]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"K={k}: {r['rows_per_inversion_step']} rows/inversion step, {r['rows_per_sampling_step']} rows/"
              f"sampling step, peak RSS over the loaded model {r['peak_over_load_bytes'] / 2**20:.0f} MiB", flush=True)
    result = {"model": args.model, "size": args.size, "steps": args.steps, "runs": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
