"""FLUX.1: double- and single-stream MM-DiT (``FluxTransformer2DModel``), flow matching, CLIP-L and T5.

As ``FluxPipeline`` does it: CLIP-L's pooled output conditions every block
(``pooled_projections``, 768), T5-XXL's ``max_sequence_length`` (512) token states are
the text stream (``encoder_hidden_states``, 4096); the empty prompt is encoded as any
other. The latents ``[B, 16, h, w]`` are packed into 2 x 2 patches ``[B, h/2 · w/2, 64]``
with their position ids for each call and unpacked after, bit for bit the pipeline's
packing; the timestep is σ·1000 cast to the model dtype and divided by 1000, and a
guidance-distilled model (``guidance_embeds``, FLUX.1-dev) gets its guidance embedding,
the same value on every call **[our reading]** (:attr:`Flux.guidance`, FLUX.1-dev's
pipeline default 3.5): its classifier-free guidance is distilled into that embedding, so a
text style teacher runs without CFG rows (docs/method.md, "FLUX").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

from ham_engine.attention import ModulationContext
from ham_engine.dit import JointDenoiser
from ham_engine.families import ModelFamily, PromptEmbeddings
from ham_engine.flux_attention import FluxHamProcessor, FluxRecorder, flux_layers, installed_flux_processors
from ham_engine.joint_attention import modulated_joint_attention, recording_joint_attention
from ham_engine.recording import TeacherRecording

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (the distilled guidance of FLUX.1-dev)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids of ``height x width`` packed latent cells (as ``FluxPipeline._prepare_latent_image_ids``)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h/2 · w/2, 4C]`` (``FluxPipeline._pack_latents``)."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, h/2 · w/2, 4C]`` → ``[B, C, h, w]`` (``FluxPipeline._unpack_latents`` in latent cells)."""
    b, _, channels = latents.shape
    latents = latents.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, height, width)


class FluxDenoiser(JointDenoiser):
    """``FluxTransformer2DModel`` in the UNet call convention (packing, ids, timestep/1000, guidance)."""

    def __init__(self, transformer: torch.nn.Module, guidance: float = DEFAULT_GUIDANCE) -> None:
        super().__init__(transformer)
        self.guidance = guidance
        self.text_tokens = 0  # the text length of the call in progress (single-stream blocks split there)

    @property
    def config(self) -> Any:
        """The transformer's config with ``in_channels`` the latent's (the transformer's counts packed cells)."""
        from diffusers.configuration_utils import FrozenDict

        config = self.transformer.config
        return FrozenDict({**config, "in_channels": int(config.in_channels) // 4})

    def patch_tokens(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // 2) * (latent_width // 2)

    def flow_sigmas(self, steps: int) -> list[float]:
        return [float(s) for s in np.linspace(1.0, 1 / steps, steps)]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        if added_cond_kwargs is None or "pooled_projections" not in added_cond_kwargs:
            raise ValueError("FLUX needs pooled_projections with every call (PromptEmbeddings of the flux family)")
        batch, _, height, width = sample.shape
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], self.guidance, device=sample.device, dtype=torch.float32).expand(batch)
        self.text_tokens = int(encoder_hidden_states.shape[1])
        output = self.transformer(
            hidden_states=pack(sample),
            timestep=timestep.expand(batch).to(sample.dtype) / 1000,
            guidance=guidance,
            pooled_projections=added_cond_kwargs["pooled_projections"],
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype),
            img_ids=image_ids(height // 2, width // 2, sample.device, sample.dtype),
            return_dict=False,
        )[0]
        return (unpack(output, height, width),)

    def ham_attention_layers(self, kind: str) -> list[str]:
        return flux_layers(self.transformer, kind)

    def ham_modulated_attention(self, context: ModulationContext) -> AbstractContextManager[ModulationContext]:
        processor = partial(FluxHamProcessor, text_tokens=lambda: self.text_tokens)
        return modulated_joint_attention(self.transformer, context, processor, installed_flux_processors)

    def ham_recording_attention(self, recording: TeacherRecording) -> AbstractContextManager[TeacherRecording]:
        processor = partial(FluxRecorder, text_tokens=lambda: self.text_tokens)
        return recording_joint_attention(self.transformer, recording, processor, installed_flux_processors)


def late_single_blocks(num_single_layers: int) -> tuple[str, ...]:
    """The later half of the single-stream blocks: HAM's default layers on FLUX **[our reading]**."""
    return tuple(
        f"single_transformer_blocks.{i}.attn" for i in range(num_single_layers // 2, num_single_layers)
    )


class Flux(ModelFamily):
    """FLUX.1 dev / schnell (``FluxPipeline``): CLIP-L (pooled) and T5 (tokens), a FLUX transformer."""

    name: ClassVar[str] = "flux"
    default_size: ClassVar[int] = 1024
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    transformer_class: ClassVar[type] = FluxTransformer2DModel
    stock_processor: ClassVar[type] = FluxAttnProcessor
    classifier_free_guidance: ClassVar[bool] = False  # distilled: the guidance embedding carries it

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[torch.nn.Module],
        dtype: torch.dtype,
        num_single_layers: int,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> None:
        super().__init__(tokenizers, text_encoders, dtype)
        self.max_sequence_length = max_sequence_length
        self.default_layers = late_single_blocks(num_single_layers)  # type: ignore[misc]

    @staticmethod
    def denoiser(transformer: torch.nn.Module) -> FluxDenoiser:
        return FluxDenoiser(transformer)

    @classmethod
    def check_transformer(cls, config: Mapping[str, Any]) -> list[str]:
        """What in a ``transformer/config.json`` this family cannot run (empty when fine)."""
        problems = []
        kind = config.get("_class_name", "FluxTransformer2DModel")
        if kind != "FluxTransformer2DModel":
            problems.append(f"a {kind} (the flux family runs FluxTransformer2DModel)")
        if int(config.get("in_channels", 64)) % 4:
            problems.append(f"in_channels={config.get('in_channels')} is not 4 x the latent channels (2 x 2 packing)")
        return problems

    @classmethod
    def load(cls, source: str, dtype: torch.dtype, local: Mapping[str, Any], model_index: Mapping[str, Any]) -> Flux:
        tokenizers = [
            CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **local),
            AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", **local),
        ]
        encoders = [
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **local),
            T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype, **local),
        ]
        transformer = model_index["transformer"]
        return cls(tokenizers, encoders, dtype, num_single_layers=int(transformer["num_single_layers"]))

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: tuple[int, int], device: torch.device) -> PromptEmbeddings:
        """``hidden_states [B, 512, 4096]`` (T5) and ``pooled_projections [B, 768]`` (CLIP-L's pooled output)."""
        (clip_tokenizer, t5_tokenizer), (clip, t5) = self.tokenizers, self.text_encoders
        tokens = self.tokenize(clip_tokenizer, prompts)
        pooled = clip(tokens.input_ids.to(device), output_hidden_states=False).pooler_output
        ids = t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_length=False,
            return_overflowing_tokens=False,
            return_tensors="pt",
        ).input_ids
        states = t5(ids.to(device), output_hidden_states=False)[0]
        return PromptEmbeddings(states.to(self.dtype), {"pooled_projections": pooled.to(self.dtype)})


__all__ = ["Flux", "FluxDenoiser", "late_single_blocks", "pack", "unpack"]
