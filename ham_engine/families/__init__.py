"""Model families: what differs between SD 1.x/2.x and SDXL, behind one seam.

The engine core (branches, SINI, GAR, LAT, inversion, caches) never asks which model it
runs. A :class:`ModelFamily` owns everything that does differ: the text encoders and
tokenizers, prompt encoding (SDXL: two encoders, pooled embeddings), the extra
conditioning each UNet call needs (SDXL: ``text_embeds`` and ``time_ids`` from the output
size), the default output size and layers. The prompt encoding comes back as
:class:`PromptEmbeddings`, rows the engine slices and concatenates like a tensor and
hands to the UNet with :meth:`PromptEmbeddings.unet_kwargs`.

:func:`check_unet` refuses, from the configs alone and before any weight is read, a
model the engine cannot run (an inpainting UNet, a class-conditional one, ...), naming
what it found.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ham_engine.params import DEFAULT_LAYERS


@dataclass(frozen=True, eq=False)
class PromptEmbeddings:
    """Text conditioning of ``B`` UNet rows.

    ``hidden_states`` ``[B, L, D]`` is what cross-attention reads; ``added`` holds per-row
    tensors the UNet takes as ``added_cond_kwargs`` (SDXL: ``text_embeds`` ``[B, P]`` and
    ``time_ids`` ``[B, 6]``), empty for SD 1.x/2.x.
    """

    hidden_states: torch.Tensor
    added: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = self.hidden_states.shape[0]
        for name, tensor in self.added.items():
            if tensor.shape[0] != rows:
                raise ValueError(f"added conditioning {name!r} has {tensor.shape[0]} rows, the prompts {rows}")

    def __len__(self) -> int:
        return int(self.hidden_states.shape[0])

    @property
    def shape(self) -> torch.Size:
        """The shape of :attr:`hidden_states`."""
        return self.hidden_states.shape

    def __getitem__(self, rows: slice) -> PromptEmbeddings:
        if not isinstance(rows, slice):
            raise TypeError("PromptEmbeddings rows are taken with a slice, e.g. text[:1]")
        return PromptEmbeddings(self.hidden_states[rows], {k: v[rows] for k, v in self.added.items()})

    def expand(self, batch: int, *_: int) -> PromptEmbeddings:
        """One row repeated ``batch`` times (views, as ``Tensor.expand``)."""
        if len(self) != 1:
            raise ValueError(f"only one row can be expanded, got {len(self)}")
        return PromptEmbeddings(
            self.hidden_states.expand(batch, *self.hidden_states.shape[1:]),
            {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()},
        )

    @classmethod
    def cat(cls, items: Sequence[PromptEmbeddings]) -> PromptEmbeddings:
        """Rows of ``items`` one after the other (as ``torch.cat``)."""
        if not items:
            raise ValueError("nothing to concatenate")
        keys = set(items[0].added)
        if any(set(item.added) != keys for item in items):
            raise ValueError("prompt embeddings of different families cannot be concatenated")
        return cls(
            torch.cat([item.hidden_states for item in items]),
            {k: torch.cat([item.added[k] for item in items]) for k in sorted(keys)},
        )

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of a ``UNet2DConditionModel`` call for these rows."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden_states}
        if self.added:
            kwargs["added_cond_kwargs"] = dict(self.added)
        return kwargs


class UnsupportedModel(ValueError):
    """The model folder holds a pipeline HAM cannot run; the message names what was found."""


class ModelFamily(ABC):
    """What one family of latent-diffusion models needs beyond the shared UNet/VAE/DDIM core.

    An instance holds the family's loaded text encoders and tokenizers on the model's
    device. Subclasses set the class attributes and implement :meth:`load` and
    :meth:`encode_prompt`.
    """

    name: ClassVar[str]
    default_size: ClassVar[int]  # the output's longer side the model was trained at
    # False for a guidance-distilled model (FLUX.1-dev): a text style teacher then runs without CFG rows.
    classifier_free_guidance: ClassVar[bool] = True
    default_layers: ClassVar[tuple[str, ...]] = DEFAULT_LAYERS
    # Subfolders of a diffusers folder that must exist for this family (besides unet, vae, scheduler).
    text_parts: ClassVar[tuple[str, ...]]

    def __init__(self, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], dtype: torch.dtype) -> None:
        self.tokenizers = tuple(tokenizers)
        self.text_encoders = tuple(text_encoders)
        self.dtype = dtype

    @classmethod
    @abstractmethod
    def load(
        cls, source: str, dtype: torch.dtype, local: Mapping[str, Any], model_index: Mapping[str, Any]
    ) -> ModelFamily:
        """Read this family's tokenizers and text encoders from ``source`` (a folder or HF id)."""

    @abstractmethod
    def encode_prompt(self, prompts: list[str], size: tuple[int, int], device: torch.device) -> PromptEmbeddings:
        """Conditioning rows for ``prompts`` of an output ``size`` (width, height), in the model dtype."""

    @classmethod
    def check_unet(cls, config: Mapping[str, Any]) -> list[str]:
        """What in ``config`` this family cannot run (empty when the UNet is fine)."""
        return []

    def modules(self) -> tuple[torch.nn.Module, ...]:
        """The torch modules this family owns (to freeze and move with the model)."""
        return self.text_encoders

    @staticmethod
    def tokenize(tokenizer: Any, prompts: list[str]) -> Any:
        """``prompts`` padded and truncated to the tokenizer's length (77 for CLIP), as SD does."""
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )


def _common_unet_problems(config: Mapping[str, Any], latent_channels: int) -> list[str]:
    problems = []
    kind = config.get("_class_name", "UNet2DConditionModel")
    if kind != "UNet2DConditionModel":
        problems.append(f"a {kind} (HAM runs UNet2DConditionModel)")
    in_channels, out_channels = config.get("in_channels", 4), config.get("out_channels", 4)
    if in_channels != latent_channels:
        hint = " (an inpainting UNet?)" if in_channels == 9 else " (a depth or image-conditioned UNet?)"
        problems.append(
            f"in_channels={in_channels} but the VAE has {latent_channels} latent channels"
            + (hint if in_channels > latent_channels else "")
        )
    if out_channels != latent_channels:
        problems.append(f"out_channels={out_channels} but the VAE has {latent_channels} latent channels")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        problems.append(
            f"class conditioning (class_embed_type={config.get('class_embed_type')!r}, "
            f"num_class_embeds={config.get('num_class_embeds')!r})"
        )
    if config.get("encoder_hid_dim_type") is not None or config.get("encoder_hid_dim") is not None:
        problems.append(f"an encoder projection (encoder_hid_dim_type={config.get('encoder_hid_dim_type')!r})")
    blocks = list(config.get("down_block_types") or []) + list(config.get("up_block_types") or [])
    if not any("CrossAttn" in block for block in blocks):
        problems.append("no cross-attention blocks (HAM's LAT and text conditioning need them)")
    return problems


def family_for(unet_config: Mapping[str, Any], latent_channels: int, source: str) -> type[ModelFamily]:
    """The family that runs a UNet with ``unet_config``; :class:`UnsupportedModel` naming what was found."""
    from ham_engine.families.sd import StableDiffusion
    from ham_engine.families.sdxl import StableDiffusionXL

    addition = unet_config.get("addition_embed_type")
    family: type[ModelFamily] | None = {None: StableDiffusion, "text_time": StableDiffusionXL}.get(addition)
    problems = _common_unet_problems(unet_config, latent_channels)
    if family is None:
        problems.append(f"addition_embed_type={addition!r} (SD 1.x/2.x have none, SDXL has 'text_time')")
    else:
        problems += family.check_unet(unet_config)
    if problems:
        raise UnsupportedModel(
            f"model: {source!r} is not a UNet HAM can run: " + "; ".join(problems) + ". "
            "Supported: Stable Diffusion 1.x/2.x and SDXL text-to-image UNets (4 latent channels)."
        )
    assert family is not None
    return family


# Diffusion-transformer pipelines (``model_index.json``'s ``_class_name``) → their family's module and class.
TRANSFORMER_PIPELINES: dict[str, tuple[str, str]] = {
    "StableDiffusion3Pipeline": ("ham_engine.families.sd3", "StableDiffusion3"),
    "FluxPipeline": ("ham_engine.families.flux", "Flux"),
}


def transformer_family_for(model_index: Mapping[str, Any]) -> type[ModelFamily] | None:
    """The family of a diffusion-transformer pipeline (SD3, FLUX), or None for a UNet pipeline.

    Read from ``model_index.json``'s ``_class_name``; such a family loads through
    :func:`ham_engine.dit.load_dit_model`.
    """
    import importlib

    entry = TRANSFORMER_PIPELINES.get(str(model_index.get("_class_name")))
    if entry is None:
        return None
    module, name = entry
    return getattr(importlib.import_module(module), name)


__all__ = ["ModelFamily", "PromptEmbeddings", "UnsupportedModel", "family_for", "transformer_family_for"]
