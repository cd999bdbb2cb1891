"""Random metric weights, saved under the published file names, for the evaluation tests.

Every network is the real architecture with seeded random weights: the numbers it gives
are meaningless, but every loading path, shape and formula runs as it would with the
published weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

from ham_engine import tiny
from ham_engine.evaluation.inception import FidInceptionV3
from ham_engine.evaluation.networks import LpipsAlex, Vgg16Trunk
from ham_engine.evaluation.weights import ALEXNET, FID_INCEPTION, LPIPS_HEADS, VGG16

# Small tensors, a busy shared CPU: one thread keeps these tests steady (as tests/engine does).
torch.set_num_threads(1)

CLIP_FOLDER = "clip-test"
DINO_FOLDER = "dino-test"


def write_clip(folder: Path) -> None:
    """A tiny random CLIP (text + vision towers) with a byte-level tokenizer, in the HF layout."""
    vocab = tiny.write_tokenizer(folder)
    text = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77,
            "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)


def write_dino(folder: Path) -> None:
    """A tiny random DINO-style ViT (no pooler), in the HF layout."""
    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)


def build_random_weights(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """Write every metric's weights into ``folder`` by their published names (except those in ``skip``)."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if FID_INCEPTION.filename not in skip:
            inception = FidInceptionV3()
            # He initialisation keeps activations alive through ~50 convolutions (PyTorch's default
            # init shrinks them to ~1e-8 by pool3, which would make every FID ~0).
            for module in inception.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            torch.save(inception.state_dict(), folder / FID_INCEPTION.filename)
        lpips = LpipsAlex()
        if ALEXNET.filename not in skip:
            torch.save(lpips.trunk.state_dict(), folder / ALEXNET.filename)
        if LPIPS_HEADS.filename not in skip:
            for head in lpips.heads:
                head.data.copy_(torch.rand_like(head))  # LPIPS's learnt heads are non-negative
            torch.save(lpips.head_state(), folder / LPIPS_HEADS.filename)
        if VGG16.filename not in skip:
            torch.save(Vgg16Trunk().state_dict(), folder / VGG16.filename)
        if CLIP_FOLDER not in skip:
            write_clip(folder / CLIP_FOLDER)
        if DINO_FOLDER not in skip:
            write_dino(folder / DINO_FOLDER)
    return folder


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --weights folder holding every metric's network with random weights."""
    return build_random_weights(tmp_path_factory.mktemp("metric-weights"))


@pytest.fixture
def hermetic_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty torch and Hugging Face caches: nothing on this machine stands in for a missing weight."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path
