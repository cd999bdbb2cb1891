"""Random diffusion-transformer pipelines built offline: ``tiny-sd3`` and ``tiny-flux``.

As :mod:`ham_engine.tiny` (same seeds discipline, same cache, same ``from_pretrained``
path back): an SD3-shaped pipeline (``transformer/`` with QK RMS-norm and SD3.5's dual
attention, CLIP-L- and CLIP-G-shaped encoders, no T5, a 16-channel VAE with a shift,
flow-matching Euler) and a FLUX.1-shaped one (double- then single-stream blocks, a
guidance embedding, CLIP-L pooled, a small T5 with a locally built character-level
tokenizer). Random weights: they prove the code paths, not the pictures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection


@dataclass(frozen=True)
class RandomTransformerConfig:
    """Shapes of a random diffusion-transformer pipeline (``family="sd3"``: SD3/3.5-shaped).

    An SD3 transformer with QK RMS-norm and SD3.5's dual attention in its first block,
    CLIP-L- and CLIP-G-shaped text encoders of different widths (so the zero-padding to
    the joint width is exercised), no T5 (its token states are zeros, as diffusers allows),
    a 16-channel VAE with a ``shift_factor`` and the flow-matching Euler scheduler.
    """

    family: str
    layers: int
    heads: int
    head_dim: int
    text_hidden: tuple[int, int]  # CLIP-L-like, CLIP-G-like
    joint_attention_dim: int
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...]
    vae_norm_groups: int
    latent_channels: int = 16
    patch_size: int = 2
    pos_embed_max_size: int = 64  # latents up to 128 cells a side: 1024 px
    dual_attention_layers: tuple[int, ...] = (0,)
    qk_norm: str | None = "rms_norm"
    shift: float = 3.0
    seed: int = 0
    single_layers: int = 0  # FLUX: single-stream blocks after the double-stream ``layers``
    guidance_embeds: bool = True  # FLUX: a guidance-distilled model (FLUX.1-dev)
    rope_axes: tuple[int, int, int] = (4, 6, 6)  # FLUX: rotary dims per position axis, summing to head_dim


TINY_SD3 = RandomTransformerConfig(
    family="sd3",
    layers=4,
    heads=2,
    head_dim=16,
    text_hidden=(16, 32),
    joint_attention_dim=64,
    text_layers=2,
    text_heads=4,
    vae_channels=(8, 16, 16, 16),
    vae_norm_groups=8,
)

# FLUX.1-dev's layout at tiny scale: double-stream then single-stream blocks, CLIP-L pooled, T5 tokens.
TINY_FLUX = RandomTransformerConfig(
    family="flux",
    layers=2,
    single_layers=4,
    heads=2,
    head_dim=16,
    text_hidden=(16, 0),  # CLIP-L-like (pooled); the T5 is joint_attention_dim wide
    joint_attention_dim=32,
    text_layers=2,
    text_heads=4,
    vae_channels=(8, 16, 16, 16),
    vae_norm_groups=8,
    qk_norm="rms_norm",
)


def _random_vae(config: RandomTransformerConfig, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A 16-channel VAE of ``config``'s widths with the family's latent scaling and shift."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        block_out_channels=config.vae_channels,
        layers_per_block=1,
        latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_groups,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


SD3_MODEL_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": [None, None],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "tokenizer_3": [None, None],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

FLUX_MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _clip_config(hidden: int, config: RandomTransformerConfig, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=77,  # CLIP's (ham_engine.tiny.TOKENIZER_MAX_LENGTH)
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_random_transformer_pipeline(config: RandomTransformerConfig, folder: Path) -> None:
    """Build a seeded random SD3-shaped pipeline into ``folder`` (``transformer/``, ``vae/``, two CLIPs, ...)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from ham_engine.tiny import write_tokenizer  # imported here: ham_engine.tiny imports this module

    if config.family == "flux":
        build_random_flux_pipeline(config, folder)
        return
    if config.family != "sd3":
        raise ValueError(f"family: {config.family!r} is not 'sd3' or 'flux'")
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer_2")
    inner = config.heads * config.head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        transformer = SD3Transformer2DModel(
            sample_size=config.pos_embed_max_size,
            patch_size=config.patch_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            num_layers=config.layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.heads,
            joint_attention_dim=config.joint_attention_dim,
            caption_projection_dim=inner,
            pooled_projection_dim=sum(config.text_hidden),
            pos_embed_max_size=config.pos_embed_max_size,
            dual_attention_layers=config.dual_attention_layers,
            qk_norm=config.qk_norm,
        )
        vae = _random_vae(config, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
        encoders = [CLIPTextModelWithProjection(_clip_config(h, config, vocab_size)) for h in config.text_hidden]
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    for subfolder, encoder in zip(("text_encoder", "text_encoder_2"), encoders, strict=True):
        encoder.save_pretrained(folder / subfolder)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift).save_pretrained(folder / "scheduler")
    model_index = SD3_MODEL_INDEX
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")


T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def write_t5_tokenizer(folder: Path, max_length: int = 512) -> int:
    """Write a character-level T5-style fast tokenizer (pad 0, eos 1, unk 2; ``</s>`` appended); its vocab size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {token: i for i, token in enumerate([*T5_SPECIAL, *characters])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )
    fast.save_pretrained(folder)
    return len(vocab)


def build_random_flux_pipeline(config: RandomTransformerConfig, folder: Path) -> None:
    """Build a seeded random FLUX.1-shaped pipeline into ``folder`` (``transformer/``, CLIP-L, T5, ...)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from ham_engine.tiny import write_tokenizer  # imported here: ham_engine.tiny imports this module

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder / "tokenizer")
    t5_vocab = write_t5_tokenizer(folder / "tokenizer_2")
    clip_hidden = config.text_hidden[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=config.latent_channels * 4,
            num_layers=config.layers,
            num_single_layers=config.single_layers,
            attention_head_dim=config.head_dim,
            num_attention_heads=config.heads,
            joint_attention_dim=config.joint_attention_dim,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=config.guidance_embeds,
            axes_dims_rope=config.rope_axes,
        )
        vae = _random_vae(config, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's
        clip = CLIPTextModel(_clip_config(clip_hidden, config, vocab_size))
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=t5_vocab,
                d_model=config.joint_attention_dim,
                d_kv=config.joint_attention_dim // config.text_heads,
                d_ff=config.joint_attention_dim * 2,
                num_layers=config.text_layers,
                num_heads=config.text_heads,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=config.shift,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(folder / "scheduler")
    model_index = FLUX_MODEL_INDEX
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
