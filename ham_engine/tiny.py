"""Random SD-shaped pipelines built offline: ``tiny``/``tiny-xl`` for tests and demos, ``random-small`` for the bench.

Nothing here downloads anything. A preset is built from a fixed seed (so its weights are
the same on every machine), written to disk in the layout of a diffusers Stable Diffusion
repository (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; SDXL's
``tiny-xl`` adds ``text_encoder_2/`` and ``tokenizer_2/``; the diffusion transformers
``tiny-sd3`` and ``tiny-flux`` have ``transformer/`` instead of ``unet/``, a flow-matching
scheduler and their families' text encoders, FLUX's T5 with a locally built tokenizer) and then
loaded back by :func:`ham_engine.loading.load_model` through the same ``from_pretrained``
path a real model takes.

The weights are random: these models exercise every code path of HAM, but **the pictures
they make are noise-like**, not art. Use a real SD 1.x / 2.x model for real images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ham_engine.files import build_folder_atomically

# Bump when the saved layout or any preset changes: the cache folder name carries it, so
# an old cache is rebuilt instead of being loaded with the wrong shapes.
FORMAT_VERSION = "1"

TOKENIZER_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# A few BPE merges so the tokenizer really merges; the rest of the text falls back to bytes.
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n"),
    ("in", "g</w>"),
    ("o", "n</w>"),
    ("e", "r</w>"),
    ("o", "f</w>"),
    ("a", "r"),
    ("s", "t"),
    ("o", "il</w>"),
    ("i", "l</w>"),
)


@dataclass(frozen=True)
class RandomPipelineConfig:
    """Shapes of a random SD-shaped pipeline (UNet, VAE, CLIP text encoder).

    The UNet always has cross-attention transformer blocks in the decoder (``up_blocks.*``
    with ``attn1``/``attn2``), like SD, so every HAM layer pattern has something to match.
    ``family="sdxl"`` builds an SDXL-shaped pipeline: two CLIP text encoders (the second
    with a projection whose pooled output is ``text_embeds``), cross-attention over both
    encoders' channels, and the UNet's ``text_time`` added embedding.
    """

    unet_channels: tuple[int, ...]
    unet_layers_per_block: int
    unet_down_blocks: tuple[str, ...]
    unet_up_blocks: tuple[str, ...]
    attention_head_dim: int
    unet_norm_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...]
    vae_norm_groups: int
    sample_size: int
    prediction_type: str = "epsilon"
    seed: int = 0
    family: str = "sd"
    addition_time_embed_dim: int = 8  # SDXL only (SDXL-base: 256)


TINY = RandomPipelineConfig(
    unet_channels=(32, 64),
    unet_layers_per_block=1,
    unet_down_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    unet_up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    unet_norm_groups=32,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    # Four VAE blocks: three downsamplings, a latent 8x smaller than the image, like SD.
    vae_channels=(8, 16, 16, 16),
    vae_norm_groups=8,
    sample_size=8,
)

# SD-like proportions scaled down to what a 2-core CPU runs in seconds per step at 256 px.
RANDOM_SMALL = RandomPipelineConfig(
    unet_channels=(64, 128, 256),
    unet_layers_per_block=2,
    unet_down_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    unet_norm_groups=32,
    text_hidden=128,
    text_layers=2,
    text_heads=4,
    vae_channels=(32, 64, 64, 64),
    vae_norm_groups=32,
    sample_size=32,
)

# SDXL's layout at tiny scale: no attention in the first level, decoder attention first.
TINY_XL = RandomPipelineConfig(
    **{
        **TINY.__dict__,
        "unet_down_blocks": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "unet_up_blocks": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "family": "sdxl",
    }
)

PRESETS: dict[str, RandomPipelineConfig | RandomTransformerConfig] = {  # tiny_dit adds tiny-sd3, tiny-flux
    "tiny": TINY,
    "tiny-xl": TINY_XL,
    "tiny-v": RandomPipelineConfig(**{**TINY.__dict__, "prediction_type": "v_prediction"}),
    "random-small": RANDOM_SMALL,
}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte → printable character map (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_tokenizer(folder: Path) -> int:
    """Write a byte-level CLIP tokenizer (vocab.json, merges.txt, configs) into ``folder``.

    Returns the vocabulary size. The layout is the one SD repositories ship, so
    ``CLIPTokenizer.from_pretrained(folder)`` reads it like a real one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in _MERGES] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
    (folder / "merges.txt").write_text(merges, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TOKENIZER_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return len(vocab)


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """The DDIM scheduler with Stable Diffusion's training schedule."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def _text_config(config: RandomPipelineConfig, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * 4,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=config.text_hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_random_pipeline(config: RandomPipelineConfig | RandomTransformerConfig, folder: Path) -> None:
    """Build a seeded random SD-, SDXL- or SD3-shaped pipeline and save it into ``folder`` (diffusers layout).

    The global torch RNG is left untouched.
    """
    if isinstance(config, RandomTransformerConfig):
        return build_random_transformer_pipeline(config, folder)
    if config.family not in ("sd", "sdxl"):
        raise ValueError(f"family: {config.family!r} is not 'sd' or 'sdxl'")
    xl = config.family == "sdxl"
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    if xl:
        write_tokenizer(folder / "tokenizer_2")
    unet_extra = {}
    if xl:
        # Cross-attention reads both encoders' hidden states side by side; the added
        # embedding takes the pooled text (projection_dim) and six size numbers.
        unet_extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": config.addition_time_embed_dim,
            "projection_class_embeddings_input_dim": config.text_hidden + 6 * config.addition_time_embed_dim,
            "use_linear_projection": True,
        }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        unet = UNet2DConditionModel(
            sample_size=config.sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=config.unet_channels,
            layers_per_block=config.unet_layers_per_block,
            down_block_types=config.unet_down_blocks,
            up_block_types=config.unet_up_blocks,
            cross_attention_dim=config.text_hidden * (2 if xl else 1),
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.unet_norm_groups,
            **unet_extra,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
            block_out_channels=config.vae_channels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=config.vae_norm_groups,
            sample_size=config.sample_size * 2 ** (len(config.vae_channels) - 1),
            scaling_factor=0.13025 if xl else 0.18215,
        )
        text_encoder = CLIPTextModel(_text_config(config, vocab_size))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(config, vocab_size)) if xl else None
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    if text_encoder_2 is not None:
        text_encoder_2.save_pretrained(folder / "text_encoder_2")
    sd_scheduler(config.prediction_type).save_pretrained(folder / "scheduler")
    write_model_index(folder, xl)


def write_model_index(folder: Path, xl: bool) -> None:
    """``model_index.json`` of a StableDiffusion(XL)Pipeline folder with DDIM and no safety checker."""
    if xl:
        model_index = {
            "_class_name": "StableDiffusionXLPipeline",
            "_diffusers_version": "0.42.1",
            "force_zeros_for_empty_prompt": True,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    else:
        model_index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")


def cache_root() -> Path:
    """Where random presets are saved: ``HAM_TINY_DIR`` or ``~/.cache/ham/tiny``."""
    return Path(os.environ.get("HAM_TINY_DIR") or Path.home() / ".cache" / "ham" / "tiny").expanduser()


def ensure_preset(name: str) -> Path:
    """Return the folder of random preset ``name``, building and saving it on first use.

    The folder is written under a temporary name and renamed into place, so a reader never
    sees a half-written model and two processes building at once both end up with one
    complete copy (the loser of the rename race throws its copy away).
    """
    if name not in PRESETS:
        raise ValueError(f"model: unknown random preset {name!r}; known: {', '.join(PRESETS)}")
    target = cache_root() / f"{name}.fmt{FORMAT_VERSION}"
    # The cache may be shared between users: the folder is world-readable, not private like a temp dir.
    return build_folder_atomically(target, lambda staging: build_random_pipeline(PRESETS[name], staging),
                                   "model_index.json", shared=True)


# The diffusion-transformer presets (SD3, FLUX) live in their own module; imported last, as
# it builds on this one's tokenizer.
from ham_engine.tiny_dit import (  # noqa: E402
    TINY_FLUX,
    TINY_SD3,
    RandomTransformerConfig,
    build_random_transformer_pipeline,
    write_t5_tokenizer,
)

PRESETS.update({"tiny-sd3": TINY_SD3, "tiny-flux": TINY_FLUX})
__all__ = ["PRESETS", "RandomPipelineConfig", "RandomTransformerConfig", "ensure_preset", "write_t5_tokenizer"]
