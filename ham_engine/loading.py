"""Load a Stable Diffusion model (an HF id, a local folder, or a random preset) for HAM.

Every model, including the random ``tiny`` preset, goes through the components'
``from_pretrained(..., subfolder=...)``: one code path for tests and production. The
scheduler is always DDIM (HAM inverts and samples with DDIM), built from the model's own
scheduler config so its noise schedule and prediction type are the model's.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers.utils import logging as hf_logging

from ham_engine import tiny
from ham_engine.families import ModelFamily, PromptEmbeddings, family_for, transformer_family_for
from ham_engine.inversion import DdimSchedule

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

# What diffusers' StableDiffusionPipeline forces on every scheduler config it is given:
# outdated SD configs lack both, and DDIMScheduler's own default (clip_sample=True) would
# clamp latents to [-1, 1]. HAM samples as the stock pipeline would.
SD_SCHEDULER_FIXES = {"steps_offset": 1, "clip_sample": False}


@dataclass
class DiffusionModel:
    """The parts of a latent-diffusion pipeline HAM needs, on one device, frozen.

    ``name`` is what the user asked for ("tiny", an HF id, a folder); caches key on it.
    ``family`` (:mod:`ham_engine.families`) owns the text encoders, prompt encoding and
    the extra conditioning of each UNet call. The VAE runs in :attr:`vae_dtype`, which
    cannot overflow (float32 unless the model dtype is bfloat16 on a GPU);
    :meth:`encode_image` and :meth:`decode_latents` handle the casts and always hand
    float32 to the caller.
    """

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    family: ModelFamily
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The (first) text encoder."""
        return self.family.text_encoders[0]

    @property
    def tokenizer(self) -> Any:
        """The (first) tokenizer."""
        return self.family.tokenizers[0]

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: "epsilon", "v_prediction" or "sample"."""
        return str(self.scheduler.config.prediction_type)

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell spans per side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype the VAE runs in."""
        return self.vae.dtype

    def schedule(self, steps: int, size: tuple[int, int] | None = None) -> DdimSchedule:
        """The sampling/inversion schedule of ``steps`` steps for an output ``size`` (DDIM: any size)."""
        return DdimSchedule.from_scheduler(self.scheduler, steps, self.device)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: tuple[int, int] | None = None) -> PromptEmbeddings:
        """Conditioning rows for ``prompts`` in the model dtype, for an output ``size`` (width, height).

        ``size`` matters only to families that condition on it (SDXL's ``time_ids``); it
        defaults to the family's square default size.
        """
        if size is None:
            size = (self.family.default_size, self.family.default_size)
        return self.family.encode_prompt(list(prompts), size, self.device)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 latents of images ``[B, 3, H, W]`` in [-1, 1]: the posterior mean times the scaling factor.

        Each image is encoded on its own, so a latent does not depend on what else is in
        the batch (batched convolutions may round differently from single ones).
        """
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = [self.vae.encode(one[None]).latent_dist.mean for one in pixels]
        return torch.cat(latents).float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels ``[B, 3, H, W]`` in [-1, 1], float32, from latents (NaN stays NaN for the caller to see)."""
        latents = (latents.float() / self.vae.config.scaling_factor).to(device=self.device, dtype=self.vae.dtype)
        pixels = self.vae.decode(latents).sample
        return pixels.float().clamp(-1.0, 1.0)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The argument, else ``HAM_DEVICE``, else CUDA when available, else CPU."""
    choice = device or os.environ.get("HAM_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(choice)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {choice!r} is not a torch device (try 'cpu', 'cuda' or 'cuda:0')") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {choice!r} was asked for but CUDA is not available here; use 'cpu'")
    return resolved


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The argument, else ``HAM_DTYPE``, else float16 on CUDA and float32 elsewhere.

    On a CPU float32 is the default and the advice: bfloat16 runs there, but without bf16
    matrix units (AMX / AVX512-BF16) it measured 26-84x slower than float32 (3x3
    convolutions dominate); it halves the memory, which is all it buys on such a CPU.
    """
    choice = dtype or os.environ.get("HAM_DTYPE") or None
    if choice is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(choice, torch.dtype):
        resolved = choice
    else:
        key = choice.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype: {choice!r} is not one of fp32, fp16, bf16")
        resolved = _DTYPES[key]
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype: {resolved} is not one of fp32, fp16, bf16")
    if resolved == torch.float16 and device.type == "cpu":
        raise ValueError(
            "dtype: fp16 is not supported on CPU; use fp32 (bf16 works but is many times slower "
            "than fp32 on a CPU without bf16 matrix units)"
        )
    return resolved


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _not_found(
    model: str, cause: Exception, text_parts: tuple[str, ...] = ("text_encoder", "tokenizer"), denoiser: str = "unet"
) -> ValueError:
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    folder = Path(model).expanduser()
    if folder.is_dir():
        parts = ", ".join(f"{p}/" for p in (denoiser, "vae", *text_parts, "scheduler"))
        return ValueError(f"model: {model!r} is not a diffusers pipeline folder (needs {parts}): {reason}")
    if model.startswith((".", "/", "~")):
        return ValueError(f"model: folder {model!r} does not exist")
    if _hub_offline():
        return ValueError(
            f"model: {model!r} not found locally and the Hub is offline (HF_HUB_OFFLINE=1): download it with "
            f"`huggingface-cli download {model}` or point HAM_MODEL at a folder"
        )
    return ValueError(
        f"model: {model!r} could not be loaded from the local cache or the Hub ({reason}); check the id, "
        f"download it with `huggingface-cli download {model}`, or point HAM_MODEL at a folder"
    )


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide per-load progress bars (they would clutter the CLI's own bar) and a library-compat warning."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 still passes an argument huggingface_hub 1.x ignores; nothing for a user to do.
            warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _read_json(source: str, name: str, local: dict[str, Any]) -> dict[str, Any]:
    """``name`` from a model folder or the HF cache/Hub; {} when the model has none."""
    folder = Path(source)
    if folder.is_dir():
        path = folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(source, name, **local)).read_text(encoding="utf-8"))
    except Exception:  # an optional file: the components' own loading reports a missing model
        return {}


def vae_dtype_for(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The VAE's dtype: float32, except bfloat16 on a GPU (bf16 has float32's range; fp16 overflows).

    SD's and SDXL's VAEs overflow in float16 at high resolution (black or NaN images);
    on a CPU bfloat16 is many times slower than float32 and saves little for the VAE.
    """
    return dtype if (dtype == torch.bfloat16 and device.type != "cpu") else torch.float32


def load_model(
    model: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> DiffusionModel:
    """Load ``model`` for HAM: a random preset (:data:`ham_engine.tiny.PRESETS`), an HF id or a folder.

    Random presets (:mod:`ham_engine.tiny`, noise-like pictures) are built offline on
    first use and loaded back from their cache folder. An HF id is read from the local
    Hugging Face cache (``HF_HUB_OFFLINE=1`` is respected) or downloaded when online.
    SD3 and FLUX load through :func:`ham_engine.dit.load_dit_model`; otherwise the
    model family (SD 1.x/2.x or SDXL) is read from the UNet's config, and a UNet HAM
    cannot run is refused before any weight is read
    (:class:`~ham_engine.families.UnsupportedModel`). Raises ``ValueError`` with what to
    do when the model cannot be found.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model: give 'tiny', a Hugging Face model id or a local folder")
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(resolved_device, dtype)
    vae_dtype = vae_dtype_for(resolved_dtype, resolved_device)
    with _quiet_loading():
        source = str(tiny.ensure_preset(model)) if model in tiny.PRESETS else model
        if Path(source).expanduser().is_dir():
            source = str(Path(source).expanduser())
        # Offline, go straight to the local cache instead of failing a Hub call per component.
        local = {"local_files_only": True} if _hub_offline() else {}
        model_index = _read_json(source, "model_index.json", local)
        if transformer_family_for(model_index) is not None:  # SD3 / FLUX: a transformer, flow matching
            from ham_engine.dit import load_dit_model
            return load_dit_model(model, source, resolved_device, resolved_dtype, local, model_index)
        try:
            unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", **local)
            vae_config = AutoencoderKL.load_config(source, subfolder="vae", **local)
        except (OSError, ValueError) as exc:
            raise _not_found(model, exc) from exc
        family_type = family_for(unet_config, int(vae_config.get("latent_channels", 4)), model)
        try:
            config = DDIMScheduler.load_config(source, subfolder="scheduler", **local)
            scheduler = DDIMScheduler.from_config(config, **SD_SCHEDULER_FIXES)
            family = family_type.load(source, resolved_dtype, local, model_index)
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype, **local)
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=resolved_dtype, **local)
        except (OSError, ValueError) as exc:
            raise _not_found(model, exc, family_type.text_parts) from exc
    for part in (unet, vae, *family.modules()):
        part.eval()
        part.requires_grad_(False)
        part.to(resolved_device)
    # HAM's processors mirror the stock SDPA processor; start every model from it.
    unet.set_attn_processor(AttnProcessor2_0())
    return DiffusionModel(
        name=model,
        unet=unet,
        vae=vae,
        family=family,
        scheduler=scheduler,
        device=resolved_device,
        dtype=resolved_dtype,
    )
