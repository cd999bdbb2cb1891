"""Shared engine fixtures: the tiny models loaded once per session, the small test images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ham_engine.engine import HamEngine

DATA = Path(__file__).resolve().parents[1] / "data"

# The tiny models' tensors are too small to gain from intra-op threads, and on a busy
# 2-core CI box (servers and other tests alongside) OpenMP workers spinning for a core
# make each UNet call 10-50x slower. One thread keeps the engine tests fast and steady.
torch.set_num_threads(1)


def _load_engine(name: str, tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    # A private preset folder keeps the session hermetic (no reliance on ~/.cache).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAM_TINY_DIR", str(tmp_path_factory.mktemp("ham-tiny")))
        patch.delenv("HAM_DTYPE", raising=False)
        return HamEngine.load(name, device="cpu")


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    """The epsilon-prediction tiny model (CPU, fp32), shared by the whole session."""
    return _load_engine("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_v_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    """The v-prediction tiny model (CPU, fp32), shared by the whole session."""
    return _load_engine("tiny-v", tmp_path_factory)


@pytest.fixture
def engine(tiny_engine: HamEngine) -> HamEngine:
    """The shared tiny model behind a fresh engine: an empty style cache for each test."""
    return HamEngine(tiny_engine.model)


def _image(name: str) -> Image.Image:
    with Image.open(DATA / name) as image:
        image.load()
        return image.copy()


@pytest.fixture(scope="session")
def content_image() -> Image.Image:
    return _image("content0.png")


@pytest.fixture(scope="session")
def style_image() -> Image.Image:
    return _image("style0.png")


@pytest.fixture(scope="session")
def other_style_image() -> Image.Image:
    return _image("style1.png")
