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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

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

PRESETS: dict[str, RandomPipelineConfig | RandomTransformerConfig] = {
    "tiny": TINY,
    "tiny-xl": TINY_XL,
    "tiny-v": RandomPipelineConfig(**{**TINY.__dict__, "prediction_type": "v_prediction"}),
    "random-small": RANDOM_SMALL,
    "tiny-sd3": TINY_SD3,
    "tiny-flux": TINY_FLUX,
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
        build_random_transformer_pipeline(config, folder)
        return
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


def _clip_config(hidden: int, config: RandomTransformerConfig, vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_random_transformer_pipeline(config: RandomTransformerConfig, folder: Path) -> None:
    """Build a seeded random SD3-shaped pipeline into ``folder`` (``transformer/``, ``vae/``, two CLIPs, ...)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
            block_out_channels=config.vae_channels,
            layers_per_block=1,
            latent_channels=config.latent_channels,
            norm_num_groups=config.vae_norm_groups,
            scaling_factor=1.5305,  # SD3's
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        encoders = [CLIPTextModelWithProjection(_clip_config(h, config, vocab_size)) for h in config.text_hidden]
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    for subfolder, encoder in zip(("text_encoder", "text_encoder_2"), encoders, strict=True):
        encoder.save_pretrained(folder / subfolder)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift).save_pretrained(folder / "scheduler")
    model_index = {
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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
            block_out_channels=config.vae_channels,
            layers_per_block=1,
            latent_channels=config.latent_channels,
            norm_num_groups=config.vae_norm_groups,
            scaling_factor=0.3611,  # FLUX.1's
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
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
    model_index = {
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
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")


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
    root = cache_root()
    target = root / f"{name}.fmt{FORMAT_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared between users
        build_random_pipeline(PRESETS[name], staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its complete copy first; use that one.
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
