"""Reconstruction error of the two DDIM inversion conventions (docs/method.md).

    python -m bench.inversion [--out bench/results/inversion.json]

Inverts a fixed Gaussian latent ([1, 4, 8, 8], seed 5) along an N-step schedule with
``convention="target"`` and ``"source"``, samples it back with the same schedule and no
modulation, and prints the mean absolute error per N, for the random ``tiny`` (ε) and
``tiny-v`` (v-prediction) UNets as built and "damped" (``conv_out`` scaled by 0.1: nearly
the identity denoiser, so nearly invertible). A measurement, never a test; takes ~2 min.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from ham_engine.engine import HamEngine
from ham_engine.inversion import INVERSIONS, DdimSchedule, ddim_invert, ddim_step

REPO = Path(__file__).resolve().parents[1]
STEPS = (5, 10, 20, 50, 100)


def unet_fn(engine: HamEngine, scale: float):
    """The engine's UNet with its output scaled by ``scale``, as a ``ModelFn`` with the empty prompt."""
    unet = copy.deepcopy(engine.model.unet)
    unet.conv_out.weight.mul_(scale)
    unet.conv_out.bias.mul_(scale)
    text = engine.model.encode_prompt([""])
    return lambda latents, _, timestep: unet(latents, timestep, encoder_hidden_states=text).sample


def reconstruction_error(model, engine: HamEngine, clean: torch.Tensor, steps: int, convention: str) -> float:
    """Mean |sample(invert(clean)) − clean| over ``steps`` DDIM steps."""
    schedule = DdimSchedule.from_scheduler(engine.model.scheduler, steps, "cpu")
    latents = ddim_invert(model, clean, schedule, convention=convention)[0]
    for k in range(steps):
        output = model(latents, k, schedule.timesteps[k])
        latents = ddim_step(output, latents, *schedule.alphas_of_step(k), schedule.prediction_type)
    return float((latents - clean).abs().mean())


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "inversion.json"), help="JSON output path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    results: dict[str, list[float]] = {}
    print(f"{'model':<22} {'convention':<10} " + " ".join(f"{n:>8}" for n in STEPS))
    for name in ("tiny", "tiny-v"):
        engine = HamEngine.load(name, device="cpu")
        for scale, label in ((0.1, "damped"), (1.0, "as built")):
            model = unet_fn(engine, scale)
            for convention in INVERSIONS:
                with torch.inference_mode():
                    errors = [reconstruction_error(model, engine, clean, n, convention) for n in STEPS]
                results[f"{name} {label} {convention}"] = errors
                print(f"{name + ' ' + label:<22} {convention:<10} " + " ".join(f"{e:8.4f}" for e in errors))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": STEPS, "mean_abs_error": results}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
