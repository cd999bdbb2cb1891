"""Stable Diffusion 3.x: an MM-DiT (``SD3Transformer2DModel``), flow matching, three text encoders.

As ``StableDiffusion3Pipeline`` encodes a prompt: CLIP-L and CLIP-G each give their
penultimate hidden states (77 tokens, concatenated along the channels, 768 + 1280) and
their projected pooled outputs (concatenated: ``pooled_projections``, 2048); the CLIP
states are zero-padded to the T5 width (``joint_attention_dim``, 4096) and followed by
T5-XXL's ``max_sequence_length`` (256) token states, or by zeros of that shape when the
model has no T5 (``text_encoder_3`` null in ``model_index.json``, which diffusers
allows, and which the architecture test uses to fit in memory). The empty prompt is
encoded as any other (SD3's own CFG uncond does so).

The transformer is called through :class:`SD3Denoiser`, a
:class:`~ham_engine.dit.JointDenoiser`: latents ``[B, 16, h, w]`` (the transformer
patches them itself), the timestep σ·1000 expanded to the batch, as the pipeline does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from ham_engine.dit import JointDenoiser
from ham_engine.families import ModelFamily, PromptEmbeddings

MAX_SEQUENCE_LENGTH = 256  # the pipeline's default T5 length (also the zero block's without T5)


class SD3Denoiser(JointDenoiser):
    """``SD3Transformer2DModel`` in the UNet call convention: ``pooled_projections`` from ``added_cond_kwargs``."""

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor]:
        if added_cond_kwargs is None or "pooled_projections" not in added_cond_kwargs:
            raise ValueError("SD3 needs pooled_projections with every call (PromptEmbeddings of the sd3 family)")
        return self.transformer(
            hidden_states=sample,
            timestep=timestep.expand(sample.shape[0]),
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=added_cond_kwargs["pooled_projections"],
            return_dict=False,
        )


def late_blocks(num_layers: int) -> tuple[str, ...]:
    """The joint attention of the later half of the blocks: HAM's default layers on a DiT **[our reading]**."""
    return tuple(f"transformer_blocks.{i}.attn" for i in range(num_layers // 2, num_layers))


class StableDiffusion3(ModelFamily):
    """SD 3 / 3.5 (``StableDiffusion3Pipeline``): CLIP-L, CLIP-G, optional T5, an SD3 transformer."""

    name: ClassVar[str] = "sd3"
    default_size: ClassVar[int] = 1024
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    transformer_class: ClassVar[type] = SD3Transformer2DModel
    denoiser: ClassVar[type[JointDenoiser]] = SD3Denoiser
    stock_processor: ClassVar[type] = JointAttnProcessor2_0

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[torch.nn.Module],
        dtype: torch.dtype,
        joint_attention_dim: int,
        num_layers: int,
        t5: tuple[Any, torch.nn.Module] | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> None:
        super().__init__(tokenizers, text_encoders, dtype)
        self.joint_attention_dim = joint_attention_dim
        self.t5 = t5
        self.max_sequence_length = max_sequence_length
        self.default_layers = late_blocks(num_layers)  # type: ignore[misc]

    @classmethod
    def check_transformer(cls, config: Mapping[str, Any]) -> list[str]:
        """What in a ``transformer/config.json`` this family cannot run (empty when fine)."""
        problems = []
        kind = config.get("_class_name", "SD3Transformer2DModel")
        if kind != "SD3Transformer2DModel":
            problems.append(f"a {kind} (the sd3 family runs SD3Transformer2DModel)")
        return problems

    @classmethod
    def load(
        cls, source: str, dtype: torch.dtype, local: Mapping[str, Any], model_index: Mapping[str, Any]
    ) -> StableDiffusion3:
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder=f, **local) for f in ("tokenizer", "tokenizer_2")]
        encoders = [
            CLIPTextModelWithProjection.from_pretrained(source, subfolder=f, dtype=dtype, **local)
            for f in ("text_encoder", "text_encoder_2")
        ]
        t5 = None
        if _listed(model_index, "text_encoder_3") and _listed(model_index, "tokenizer_3"):
            from transformers import AutoTokenizer, T5EncoderModel

            t5 = (
                AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3", **local),
                T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", dtype=dtype, **local),
            )
        transformer = model_index["transformer"]
        return cls(
            tokenizers,
            encoders,
            dtype,
            joint_attention_dim=int(transformer["joint_attention_dim"]),
            num_layers=int(transformer["num_layers"]),
            t5=t5,
        )

    def modules(self) -> tuple[torch.nn.Module, ...]:
        return self.text_encoders + ((self.t5[1],) if self.t5 is not None else ())

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: tuple[int, int], device: torch.device) -> PromptEmbeddings:
        """``hidden_states [B, 77 + 256, joint_attention_dim]`` and ``pooled_projections [B, P_L + P_G]``."""
        hidden, pooled = [], []
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            tokens = self.tokenize(tokenizer, prompts)
            output = text_encoder(tokens.input_ids.to(device), output_hidden_states=True)
            pooled.append(output[0])
            hidden.append(output.hidden_states[-2].to(self.dtype))
        clip = torch.cat(hidden, dim=-1)
        if self.t5 is None:
            t5 = torch.zeros(
                (len(prompts), self.max_sequence_length, self.joint_attention_dim), device=clip.device, dtype=self.dtype
            )
        else:
            tokenizer, encoder = self.t5
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            t5 = encoder(ids.to(device))[0].to(self.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        states = torch.cat([clip, t5], dim=-2)
        return PromptEmbeddings(states, {"pooled_projections": torch.cat(pooled, dim=-1).to(self.dtype)})


def _listed(model_index: Mapping[str, Any], part: str) -> bool:
    """Whether ``model_index.json`` names a component for ``part`` (``[null, null]`` or absent: none)."""
    entry = model_index.get(part)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


__all__ = ["SD3Denoiser", "StableDiffusion3", "late_blocks"]
