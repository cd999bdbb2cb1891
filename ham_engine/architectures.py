"""Full-size SD 1.5, SD 2.1-base and SDXL-base pipelines with random weights, built offline.

The published component configs (``unet/config.json``, ``vae/config.json``,
``text_encoder*/config.json`` of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1-base and stabilityai/stable-diffusion-xl-base-1.0) are
written out with seeded random weights and the real 49 408-token CLIP BPE tokenizer, in
the layout of the published repositories, so :func:`ham_engine.loading.load_model` reads
them exactly as it reads the real ones. Nothing is downloaded: the tokenizer's vocabulary
is the ``bpe_simple_vocab_16e6.txt.gz`` that open_clip (MIT) ships in its wheel
(``make clip-vocab`` fetches it from PyPI).

Weights are drawn tensor by tensor into a model built on the meta device and stored as
16-bit safetensors, so building SDXL-base (3.5 B parameters) never holds a float32 copy
(7 GB on disk instead of 14). SD stores float16; SDXL stores bfloat16, the dtype the test
suite runs it in on a CPU, so loading it holds one copy of the weights, not a 16-bit
one and a converted one (float32 SDXL-base would need ~14 GB of RAM).

They are random: these pipelines prove that HAM runs the real architectures (shapes,
attention layouts, conditioning), not that the pictures are good. Weight scale:
N(0, 1/fan_in) for matrices and convolutions, ones for norms, zeros for biases, which
keeps activations finite through every block.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ham_engine import tiny
from ham_engine.files import build_folder_atomically
from ham_engine.tiny_dit import FLUX_MODEL_INDEX, SD3_MODEL_INDEX

FORMAT_VERSION = "1"
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408

_SD_VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
_SD_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
_CLIP_L = {  # openai/clip-vit-large-patch14's text tower (SD 1.x, SDXL's first encoder)
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# name -> components: (subfolder, class name, config); tokenizers: (subfolder, pad token).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "sd15": {
        "pipeline": "StableDiffusionPipeline",
        "unet": _SD_UNET,
        "vae": _SD_VAE,
        "text": [("text_encoder", "CLIPTextModel", _CLIP_L)],
        "tokenizers": [("tokenizer", tiny.EOS_TOKEN)],
    },
    "sd21-base": {
        "pipeline": "StableDiffusionPipeline",
        "unet": {
            **_SD_UNET,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "upcast_attention": False,
        },
        "vae": _SD_VAE,
        "text": [
            (
                "text_encoder",
                "CLIPTextModel",
                {
                    "hidden_act": "gelu",
                    "hidden_size": 1024,
                    "intermediate_size": 4096,
                    "num_attention_heads": 16,
                    "num_hidden_layers": 23,
                    "projection_dim": 512,
                },
            )
        ],
        "tokenizers": [("tokenizer", "!")],
    },
    "sdxl-base": {
        "pipeline": "StableDiffusionXLPipeline",
        "storage": torch.bfloat16,
        "unet": {
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": False,
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-05,
            "norm_num_groups": 32,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "use_linear_projection": True,
        },
        "vae": {**_SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text": [
            ("text_encoder", "CLIPTextModel", _CLIP_L),
            (
                "text_encoder_2",
                "CLIPTextModelWithProjection",
                {
                    "hidden_act": "gelu",
                    "hidden_size": 1280,
                    "intermediate_size": 5120,
                    "num_attention_heads": 20,
                    "num_hidden_layers": 32,
                    "projection_dim": 1280,
                },
            ),
        ],
        "tokenizers": [("tokenizer", tiny.EOS_TOKEN), ("tokenizer_2", "!")],
    },
}


T5_TOKENIZER = "t5"  # in a spec's tokenizers: write tiny's character-level T5 tokenizer there

# SD 3.5-medium (stabilityai/stable-diffusion-3.5-medium): an MM-DiT-X transformer (SD3's joint
# blocks, QK RMS-norm, a second image-only attention in blocks 0-12), SD3's 16-channel VAE, CLIP-L
# and CLIP-G with projections; T5-XXL left out (``text_encoder_3`` null, as diffusers allows): its
# 4.7 B parameters would not fit beside the rest in CI's memory (docs/method.md).
_CLIP_G = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
ARCHITECTURES["sd35-medium"] = {
    "pipeline": "StableDiffusion3Pipeline",
    # Stored float32, the dtype the CPU test computes in: loading 16-bit weights into float32
    # holds both copies (measured peak RSS 19.4 GB with bf16 storage).
    "storage": torch.float32,
    "transformer": {
        "_class_name": "SD3Transformer2DModel",
        "attention_head_dim": 64,
        "caption_projection_dim": 1536,
        "dual_attention_layers": list(range(13)),
        "in_channels": 16,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 24,
        "out_channels": 16,
        "patch_size": 2,
        "pooled_projection_dim": 2048,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "sample_size": 128,
    },
    "vae": {
        **_SD_VAE,
        "latent_channels": 16,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "text": [
        ("text_encoder", "CLIPTextModelWithProjection", _CLIP_L),
        ("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_G),
    ],
    "tokenizers": [("tokenizer", tiny.EOS_TOKEN), ("tokenizer_2", "!")],
    "scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
}


# FLUX.1-dev (black-forest-labs/FLUX.1-dev): 19 double-stream and 38 single-stream blocks (12 B
# parameters), guidance-distilled, CLIP-L (pooled) and T5-XXL (4.7 B). About 34 GB in bf16: too
# big for CI or a CPU box; bench/gpu_check.py measures it on a lent GPU. The T5 tokenizer is a
# locally built character-level one (the real SentencePiece model is not redistributable offline);
# with random weights only the ids' range matters.
_T5_XXL = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "feed_forward_proj": "gated-gelu",
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "num_heads": 64,
    "num_layers": 24,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "vocab_size": 32128,
}
ARCHITECTURES["flux1-dev"] = {
    "pipeline": "FluxPipeline",
    "storage": torch.bfloat16,
    "transformer": {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    },
    "vae": {**ARCHITECTURES["sd35-medium"]["vae"], "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "text": [("text_encoder", "CLIPTextModel", _CLIP_L), ("text_encoder_2", "T5EncoderModel", _T5_XXL)],
    "tokenizers": [("tokenizer", tiny.EOS_TOKEN), ("tokenizer_2", T5_TOKENIZER)],
    "scheduler": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
}


def _write_index(folder: Path, model_index: dict[str, Any]) -> None:
    """The pipeline's ``model_index.json`` (the tables the tiny DiT presets write too)."""
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")


def find_clip_vocab() -> Path | None:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``: ``HAM_CLIP_VOCAB``, else the repository's ``.cache/``."""
    explicit = os.environ.get("HAM_CLIP_VOCAB")
    candidates = [Path(explicit)] if explicit else []
    candidates.append(Path(__file__).resolve().parents[1] / ".cache" / "clip" / CLIP_VOCAB_FILE)
    return next((p for p in candidates if p.is_file()), None)


def write_clip_tokenizer(folder: Path, vocab_gz: Path, pad_token: str) -> int:
    """The real CLIP BPE tokenizer (vocab.json, merges.txt) from open_clip's merge list, as HF ships it."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(vocab_gz, "rt", encoding="utf-8") as stream:
        lines = stream.read().split("\n")
    # As open_clip.SimpleTokenizer: the first 48 894 merges, after the version line.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(tiny.bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [tiny.BOS_TOKEN, tiny.EOS_TOKEN]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{vocab_gz}: {len(tokens)} tokens, expected CLIP's {CLIP_VOCAB_SIZE}")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": tiny.TOKENIZER_MAX_LENGTH,
        "bos_token": tiny.BOS_TOKEN,
        "eos_token": tiny.EOS_TOKEN,
        "unk_token": tiny.EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return len(tokens)


def _random_state(module: torch.nn.Module, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded ``dtype`` weights for every persistent tensor of a meta-device ``module``."""
    state = {}
    for name, meta in module.state_dict().items():
        generator = torch.Generator().manual_seed(seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        if meta.ndim >= 2:
            fan_in = meta[0].numel()
            tensor = torch.randn(meta.shape, generator=generator).mul_(fan_in**-0.5)
        elif name.endswith("bias"):
            tensor = torch.zeros(meta.shape)
        else:
            tensor = torch.ones(meta.shape)
        state[name] = tensor.to(dtype)
    return state


def build_architecture(name: str, folder: Path, vocab_gz: Path, seed: int = 0) -> None:
    """Write architecture ``name`` with random 16-bit weights into ``folder`` (diffusers layout)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = ARCHITECTURES[name]
    storage = spec.get("storage", torch.float16)
    folder.mkdir(parents=True, exist_ok=True)
    for subfolder, pad in spec["tokenizers"]:
        if pad == T5_TOKENIZER:
            tiny.write_t5_tokenizer(folder / subfolder)
        else:
            write_clip_tokenizer(folder / subfolder, vocab_gz, pad)
    from transformers import T5Config, T5EncoderModel

    text_classes = {
        "CLIPTextModel": CLIPTextModel,
        "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
        "T5EncoderModel": T5EncoderModel,
    }
    for index, (subfolder, class_name, fields) in enumerate(spec["text"]):
        if class_name == "T5EncoderModel":
            config = T5Config(pad_token_id=0, eos_token_id=1, **fields)
        else:
            config = CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, **fields
            )
        with init_empty_weights():
            model = text_classes[class_name](config)
        (folder / subfolder).mkdir()
        model.config.dtype = str(storage).removeprefix("torch.")
        model.config.save_pretrained(folder / subfolder)
        save_file(_random_state(model, seed + 100 * index, storage), str(folder / subfolder / "model.safetensors"))
        del model
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    denoiser: tuple[str, Any] = ("unet", UNet2DConditionModel)
    if "transformer" in spec:
        transformers_by_name = {c.__name__: c for c in (SD3Transformer2DModel, FluxTransformer2DModel)}
        denoiser = ("transformer", transformers_by_name[spec["transformer"]["_class_name"]])
    for subfolder, cls in (denoiser, ("vae", AutoencoderKL)):
        with init_empty_weights():
            model = cls.from_config(spec[subfolder])
        model.save_config(folder / subfolder)
        weights = folder / subfolder / "diffusion_pytorch_model.safetensors"
        save_file(_random_state(model, seed + len(subfolder), storage), str(weights), metadata={"format": "pt"})
        del model
    (folder / "scheduler").mkdir()
    scheduler = spec.get("scheduler") or {"_class_name": "DDIMScheduler", **_SCHEDULER}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2), encoding="utf-8")
    if spec["pipeline"] == "StableDiffusion3Pipeline":
        _write_index(folder, SD3_MODEL_INDEX)
    elif spec["pipeline"] == "FluxPipeline":
        _write_index(folder, FLUX_MODEL_INDEX)
    else:
        tiny.write_model_index(folder, xl=spec["pipeline"] == "StableDiffusionXLPipeline")


def cache_root() -> Path:
    """Where built architectures are kept: ``HAM_ARCH_DIR`` or ``~/.cache/ham/architectures``."""
    return Path(os.environ.get("HAM_ARCH_DIR") or Path.home() / ".cache" / "ham" / "architectures").expanduser()


def ensure_architecture(name: str, vocab_gz: Path | None = None) -> Path:
    """The folder of architecture ``name``, built on first use (atomically, as :func:`tiny.ensure_preset`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"architecture: unknown {name!r}; known: {', '.join(ARCHITECTURES)}")
    storage = str(ARCHITECTURES[name].get("storage", torch.float16)).removeprefix("torch.")
    target = cache_root() / f"{name}.{storage}.fmt{FORMAT_VERSION}"

    def build(staging: Path) -> None:
        vocab = vocab_gz or find_clip_vocab()  # needed only to build: a built folder holds its tokenizer
        if vocab is None:
            raise ValueError(f"architecture: {CLIP_VOCAB_FILE} not found; run `make clip-vocab` or set HAM_CLIP_VOCAB")
        build_architecture(name, staging, vocab)

    return build_folder_atomically(target, build, "model_index.json")
