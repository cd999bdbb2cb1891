"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden state conditions the UNet."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from ham_engine.families import ModelFamily, PromptEmbeddings


class StableDiffusion(ModelFamily):
    """SD 1.x and 2.x (``StableDiffusionPipeline``): ``text_encoder/`` and ``tokenizer/``."""

    name: ClassVar[str] = "sd"
    default_size: ClassVar[int] = 512
    text_parts: ClassVar[tuple[str, ...]] = ("text_encoder", "tokenizer")

    @classmethod
    def load(
        cls, source: str, dtype: torch.dtype, local: Mapping[str, Any], model_index: Mapping[str, Any]
    ) -> StableDiffusion:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **local)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **local)
        return cls([tokenizer], [text_encoder], dtype)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], size: tuple[int, int], device: torch.device) -> PromptEmbeddings:
        """``[B, 77, D]``: the text encoder's last hidden state, as ``StableDiffusionPipeline`` uses it."""
        (tokenizer,), (text_encoder,) = self.tokenizers, self.text_encoders
        tokens = self.tokenize(tokenizer, prompts)
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        embeddings = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return PromptEmbeddings(embeddings.to(self.dtype))
