"""Reconstruction error of the two DDIM inversion conventions (docs/method.md).

    python -m bench.inversion [--models tiny tiny-v sd21-base] [--out bench/results/inversion.json]

Inverts a fixed Gaussian latent ([1, 4, 8, 8], seed 5) along an N-step schedule with
``convention="target"`` and ``"source"``, samples it back with the same schedule and no
modulation, and prints the mean absolute error per N, for the random ``tiny`` (ε) and
``tiny-v`` (v-prediction) UNets as built and "damped" (``conv_out`` scaled by 0.1: nearly
the identity denoiser, so nearly invertible), and for ``sd21-base``: the full SD 2.1-base
UNet (``bench/unet.py``'s config, random weights, a seeded stand-in for the empty
prompt's embedding; ~3.5 GB RAM, 5–20 steps). A measurement, never a test; the tiny
models take ~2 min, sd21-base ~10 min on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from bench.unet import SD21_BASE_UNET, TEXT_TOKENS
from ham_engine.engine import HamEngine
from ham_engine.inversion import INVERSIONS, DdimSchedule, ModelFn, ddim_invert, ddim_step
from ham_engine.tiny import sd_scheduler

REPO = Path(__file__).resolve().parents[1]
STEPS = {"tiny": (5, 10, 20, 50, 100), "tiny-v": (5, 10, 20, 50, 100), "sd21-base": (5, 10, 20)}


@contextmanager
def scaled_output(unet: torch.nn.Module, text: dict, scale: float) -> Iterator[ModelFn]:
    """``unet`` with its output scaled by ``scale`` (in place, undone after), as a ``ModelFn`` on ``text`` kwargs."""
    original = unet.conv_out.weight.clone(), unet.conv_out.bias.clone()
    with torch.no_grad():
        unet.conv_out.weight.mul_(scale)
        unet.conv_out.bias.mul_(scale)
    try:
        yield lambda latents, _, timestep: unet(latents, timestep, **text).sample
    finally:
        with torch.no_grad():
            unet.conv_out.weight.copy_(original[0])
            unet.conv_out.bias.copy_(original[1])


def model_under_test(name: str):
    """(UNet, its keyword arguments for the empty prompt, scheduler) of ``name``."""
    if name == "sd21-base":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SD21_BASE_UNET).eval().requires_grad_(False)
            text = torch.randn(1, TEXT_TOKENS, SD21_BASE_UNET["cross_attention_dim"])
        return unet, {"encoder_hidden_states": text}, sd_scheduler()
    engine = HamEngine.load(name, device="cpu")
    with torch.inference_mode():
        text = engine.model.encode_prompt([""])
    return engine.model.unet, text.unet_kwargs(), engine.model.scheduler


def reconstruction_error(model, scheduler, clean: torch.Tensor, steps: int, convention: str) -> float:
    """Mean |sample(invert(clean)) − clean| over ``steps`` DDIM steps."""
    schedule = DdimSchedule.from_scheduler(scheduler, steps, "cpu")
    latents = ddim_invert(model, clean, schedule, convention=convention)[0]
    for k in range(steps):
        output = model(latents, k, schedule.timesteps[k])
        latents = ddim_step(output, latents, *schedule.alphas_of_step(k), schedule.prediction_type)
    return float((latents - clean).abs().mean())


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "inversion.json"), help="JSON output path")
    parser.add_argument("--models", nargs="+", choices=sorted(STEPS), default=["tiny", "tiny-v"], help="UNets")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    results: dict[str, dict[str, list[float]]] = {}
    for name in args.models:
        unet, text, scheduler = model_under_test(name)
        print(f"{name:<22} {'convention':<10} " + " ".join(f"{n:>8}" for n in STEPS[name]), flush=True)
        for scale, label in ((0.1, "damped"), (1.0, "as built")):
            for convention in INVERSIONS:
                with scaled_output(unet, text, scale) as model, torch.inference_mode():
                    errors = [reconstruction_error(model, scheduler, clean, n, convention) for n in STEPS[name]]
                results[f"{name} {label} {convention}"] = {"steps": list(STEPS[name]), "mean_abs_error": errors}
                line = " ".join(f"{e:8.4f}" for e in errors)
                print(f"{name + ' ' + label:<22} {convention:<10} {line}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
