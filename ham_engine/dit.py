"""Diffusion transformers (SD3, FLUX) behind the engine's UNet-shaped seam.

The engine drives a denoiser the way it drives an SD UNet: ``unet(latents [B, C, h, w],
timestep, encoder_hidden_states=..., added_cond_kwargs=..., return_dict=False)``, a
schedule's ``step``/``invert``, and HAM's processors installed by
:func:`~ham_engine.attention.modulated_attention`. For a transformer:

* :class:`JointDenoiser` wraps the diffusers transformer in that call convention (a
  family subclass maps the arguments: SD3's ``pooled_projections``, FLUX's packed
  latents and guidance) and lists/installs its own joint-attention processors
  (:mod:`ham_engine.joint_attention`), named relative to the transformer
  (``transformer_blocks.12.attn``);
* :class:`FlowDiffusionModel` is a :class:`~ham_engine.loading.DiffusionModel` whose
  schedule is flow-matching Euler (:class:`~ham_engine.flow.FlowSchedule`) and whose VAE
  latents carry the ``shift_factor`` SD3 and FLUX use;
* :func:`load_dit_model` reads one from a diffusers folder (``transformer/``, ``vae/``,
  the family's text encoders, ``scheduler/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from ham_engine.attention import ModulationContext
from ham_engine.families import UnsupportedModel, transformer_family_for
from ham_engine.flow import FLOW_PREDICTION, FlowSchedule
from ham_engine.joint_attention import joint_layers, modulated_joint_attention, recording_joint_attention
from ham_engine.loading import DiffusionModel, _not_found, vae_dtype_for
from ham_engine.recording import TeacherRecording


class JointDenoiser(torch.nn.Module):
    """A diffusers transformer called like a ``UNet2DConditionModel`` (subclasses map the arguments)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    @property
    def config(self) -> Any:
        """The transformer's config (``in_channels`` is the latent's channel count)."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def patch_tokens(self, latent_height: int, latent_width: int) -> int:
        """How many image tokens a latent of this size becomes."""
        patch = int(self.transformer.config.patch_size)
        return (latent_height // patch) * (latent_width // patch)

    def flow_sigmas(self, steps: int) -> list[float] | None:
        """The unshifted sigmas the stock pipeline passes its scheduler (None: the scheduler's own)."""
        return None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        raise NotImplementedError

    # -- the attention seam (ham_engine.attention and ham_engine.recording call these) --

    def ham_attention_layers(self, kind: str) -> list[str]:
        """The transformer's attention modules HAM can modulate as ``kind`` (GAR or LAT)."""
        return joint_layers(self.transformer, kind)

    def ham_modulated_attention(self, context: ModulationContext) -> AbstractContextManager[ModulationContext]:
        """Install GAR/LAT on ``context``'s layers for a block (a layer may carry both)."""
        return modulated_joint_attention(self.transformer, context)

    def ham_recording_attention(self, recording: TeacherRecording) -> AbstractContextManager[TeacherRecording]:
        """Install the inversion recorders on ``recording``'s layers for a block."""
        return recording_joint_attention(self.transformer, recording)


@dataclass
class FlowDiffusionModel(DiffusionModel):
    """A flow-matching transformer pipeline (SD3, FLUX): ``unet`` is its :class:`JointDenoiser`."""

    @property
    def prediction_type(self) -> str:
        """Always "flow": the transformer predicts the velocity ε − x0."""
        return FLOW_PREDICTION

    @property
    def transformer(self) -> torch.nn.Module:
        """The diffusers transformer inside the denoiser."""
        return self.unet.transformer

    def schedule(self, steps: int, size: tuple[int, int] | None = None) -> FlowSchedule:
        """The stock pipeline's flow schedule of ``steps`` steps (a dynamic shift reads the ``size``)."""
        if size is None:
            size = (self.family.default_size, self.family.default_size)
        width, height = size
        tokens = self.unet.patch_tokens(height // self.vae_scale_factor, width // self.vae_scale_factor)
        sigmas = self.unet.flow_sigmas(steps)
        return FlowSchedule.from_scheduler(self.scheduler, steps, self.device, image_seq_len=tokens, sigmas=sigmas)

    def _shift(self) -> float:
        return float(self.vae.config.get("shift_factor") or 0.0)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Float32 latents: (posterior mean − shift_factor) · scaling_factor, each image on its own."""
        pixels = pixels.to(device=self.device, dtype=self.vae.dtype)
        latents = [self.vae.encode(one[None]).latent_dist.mean for one in pixels]
        return (torch.cat(latents).float() - self._shift()) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], float32: the VAE on latents / scaling_factor + shift_factor (as the pipelines)."""
        latents = latents.float() / self.vae.config.scaling_factor + self._shift()
        pixels = self.vae.decode(latents.to(device=self.device, dtype=self.vae.dtype)).sample
        return pixels.float().clamp(-1.0, 1.0)


def load_dit_model(
    name: str,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    local: Mapping[str, Any],
    model_index: Mapping[str, Any],
) -> FlowDiffusionModel:
    """Read a transformer pipeline folder (``model_index.json``'s class names the family).

    A transformer the family cannot run is refused from its config, before any weight is
    read (:class:`~ham_engine.families.UnsupportedModel`); a missing part is a
    ``ValueError`` saying what to do (as for a UNet pipeline).
    """
    family_type = transformer_family_for(model_index)
    if family_type is None:
        raise UnsupportedModel(f"model: {name!r} is not a diffusion-transformer pipeline HAM knows")
    try:
        return _load(name, source, family_type, device, dtype, local, model_index)
    except (OSError, ValueError) as exc:
        if isinstance(exc, UnsupportedModel):
            raise
        raise _not_found(name, exc, family_type.text_parts, denoiser="transformer") from exc


def _load(
    name: str,
    source: str,
    family_type: Any,
    device: torch.device,
    dtype: torch.dtype,
    local: Mapping[str, Any],
    model_index: Mapping[str, Any],
) -> FlowDiffusionModel:
    transformer_class = family_type.transformer_class
    config = transformer_class.load_config(source, subfolder="transformer", **local)
    problems = family_type.check_transformer(config)
    if problems:
        raise UnsupportedModel(f"model: {name!r} is not a transformer HAM can run: " + "; ".join(problems))
    scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler", **local)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    family = family_type.load(source, dtype, dict(local), {**model_index, "transformer": dict(config)})
    vae_dtype = vae_dtype_for(dtype, device)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype, **local)
    transformer = transformer_class.from_pretrained(source, subfolder="transformer", torch_dtype=dtype, **local)
    for part in (transformer, vae, *family.modules()):
        part.eval()
        part.requires_grad_(False)
        part.to(device)
    # HAM's processors mirror the stock joint processor; start every model from it.
    transformer.set_attn_processor(family_type.stock_processor())
    denoiser = family_type.denoiser(transformer)
    denoiser.eval()
    return FlowDiffusionModel(
        name=name, unet=denoiser, vae=vae, family=family, scheduler=scheduler, device=device, dtype=dtype
    )
