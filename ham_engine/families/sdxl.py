"""SDXL: two CLIP text encoders, pooled text embeddings and size conditioning on every UNet call.

As ``StableDiffusionXLPipeline`` does it: each prompt goes through both tokenizers and
encoders; the penultimate hidden states of the two are concatenated along the channels
(768 + 1280 = 2048 for SDXL-base) for cross-attention; the second encoder's projected
pooled output is ``text_embeds``; ``time_ids`` are (original size, crop top-left, target
size) = ``(h, w, 0, 0, h, w)`` of the output. With ``force_zeros_for_empty_prompt``
(``model_index.json``, true for SDXL-base) the empty prompt is all zeros, the
conditioning SDXL's own classifier-free guidance uses for its unconditional half; HAM
uses the empty prompt wherever the paper conditions on nothing (inversion, content
teacher, student, CFG's uncond half), so it is zeros there too (see docs/method.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ham_engine.families import ModelFamily, PromptEmbeddings

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


class StableDiffusionXL(ModelFamily):
    """SDXL base (``StableDiffusionXLPipeline``): ``text_encoder{,_2}/`` and ``tokenizer{,_2}/``."""

    name: ClassVar[str] = "sdxl"
    default_size: ClassVar[int] = 1024
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[torch.nn.Module],
        dtype: torch.dtype,
        force_zeros_for_empty_prompt: bool = True,
    ) -> None:
        super().__init__(tokenizers, text_encoders, dtype)
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def load(
        cls, source: str, dtype: torch.dtype, local: Mapping[str, Any], model_index: Mapping[str, Any]
    ) -> StableDiffusionXL:
        tokenizers = [CLIPTokenizer.from_pretrained(source, subfolder=f, **local) for f in ("tokenizer", "tokenizer_2")]
        first = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **local)
        second = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2", dtype=dtype, **local)
        force_zeros = bool(model_index.get("force_zeros_for_empty_prompt", True))
        return cls(tokenizers, [first, second], dtype, force_zeros_for_empty_prompt=force_zeros)

    @classmethod
    def check_unet(cls, config: Mapping[str, Any]) -> list[str]:
        problems = []
        if not config.get("addition_time_embed_dim"):
            problems.append("addition_embed_type='text_time' without addition_time_embed_dim")
        return problems

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: tuple[int, int], device: torch.device) -> PromptEmbeddings:
        """``hidden_states [B, 77, D1 + D2]``, ``text_embeds [B, P]`` and ``time_ids [B, 6]`` for ``size`` (w, h)."""
        hidden, pooled = [], None
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            tokens = self.tokenize(tokenizer, prompts)
            output = text_encoder(tokens.input_ids.to(device), output_hidden_states=True)
            if output[0].ndim == 2:  # the projected pooled output: the last encoder's
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        states = torch.cat(hidden, dim=-1).to(self.dtype)
        text_embeds = pooled.to(self.dtype)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=states.device)
            states = torch.where(empty[:, None, None], torch.zeros_like(states), states)
            text_embeds = torch.where(empty[:, None], torch.zeros_like(text_embeds), text_embeds)
        width, height = size
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=states.device)
        return PromptEmbeddings(states, {"text_embeds": text_embeds, "time_ids": time_ids.expand(len(prompts), -1)})
