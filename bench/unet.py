"""One UNet call of a full-size SD 2.1-base–shaped UNet: stock attention vs HAM's processors.

Builds ``UNet2DConditionModel`` from Stable Diffusion 2.1-base's published UNet config with
random weights (no download), then times one denoising call at batch 1, 2 and 3 with the
stock SDPA processors, and at batch 3 (content teacher, style teacher, student) with GAR on
every decoder self-attention and LAT on every decoder cross-attention, as a cold HAM
sampling step runs it. Meant for a GPU; on a CPU use ``--size 256 --repeats 1``.

    python -m bench.unet --device cuda --dtype fp16          # table on stdout, JSON in bench/results/unet.json
    python -m bench.unet --device cpu --size 256 --repeats 1 # smoke run

Absolute times are only meaningful from a GPU; write them with the card's name into
docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ham_engine.attention import (
    CONTENT_TEACHER,
    CROSS_ATTENTION,
    SELF_ATTENTION,
    STUDENT,
    STYLE_TEACHER,
    BranchLayout,
    ModulationContext,
    modulated_attention,
    resolve_layers,
)
from ham_engine.params import DEFAULT_LAYERS

# stabilityai/stable-diffusion-2-1-base, unet/config.json (the fields that shape the network).
SD21_BASE_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
TEXT_TOKENS = 77
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(unet: UNet2DConditionModel, batch: int, latent: int, device: torch.device, dtype: torch.dtype,
               repeats: int, warmup: int) -> float:
    """Fastest of ``repeats`` timed calls, in seconds."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(batch, 4, latent, latent, generator=generator).to(device, dtype)
    text = torch.randn(batch, TEXT_TOKENS, 1024, generator=generator).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    best = float("inf")
    for i in range(warmup + repeats):
        _sync(device)
        started = time.perf_counter()
        unet(sample, timestep, encoder_hidden_states=text, return_dict=False)
        _sync(device)
        if i >= warmup:
            best = min(best, time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size/8)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/unet.json"))
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD21_BASE_UNET).to(device, dtype).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    latent = args.size // 8

    rows: list[dict] = []
    with torch.inference_mode():
        for batch in (1, 2, 3):
            seconds = _time_call(unet, batch, latent, device, dtype, args.repeats, args.warmup)
            rows.append({"attention": "stock", "batch": batch, "seconds": seconds})
        layout = BranchLayout((CONTENT_TEACHER, STYLE_TEACHER, STUDENT))
        context = ModulationContext(
            alpha=0.75,
            beta=0.25,
            gar_layers=resolve_layers(unet, DEFAULT_LAYERS, SELF_ATTENTION, "gar_layers"),
            lat_layers=resolve_layers(unet, DEFAULT_LAYERS, CROSS_ATTENTION, "lat_layers"),
        )
        context.begin_step(0, layout, modulating=True)
        with modulated_attention(unet, context):
            seconds = _time_call(unet, 3, latent, device, dtype, args.repeats, args.warmup)
        rows.append({"attention": "HAM (GAR+LAT)", "batch": 3, "seconds": seconds})

    stock3 = rows[2]["seconds"]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"SD 2.1-base-shaped UNet, {params / 1e6:.0f} M params, random weights, {args.size}² "
          f"({latent}² latents), {dtype}, {card}, torch {torch.__version__}")
    print(f"{'attention':<16}{'batch':>6}{'ms/call':>10}{'vs stock b3':>13}")
    for row in rows:
        print(f"{row['attention']:<16}{row['batch']:>6}{row['seconds'] * 1e3:>10.1f}{row['seconds'] / stock3:>13.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"device": card, "dtype": str(dtype), "size": args.size, "unet_params": params,
              "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
