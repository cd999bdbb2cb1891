"""Shared engine fixtures: the tiny models loaded once per session, the small test images.

The engine tests run on ``HAM_TEST_DEVICE`` (default cpu) in ``HAM_TEST_DTYPE`` (default
fp32); CI runs them once more in bf16 on the CPU. Tests whose tolerance depends on the
dtype read it from :func:`tolerance`.
"""

from __future__ import annotations

import os
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

TEST_DEVICE = os.environ.get("HAM_TEST_DEVICE") or "cpu"
TEST_DTYPE = os.environ.get("HAM_TEST_DTYPE") or "fp32"
FULL_PRECISION = TEST_DTYPE in ("fp32", "float32")


def tolerance(fp32: dict[str, float], reduced: dict[str, float]) -> dict[str, float]:
    """``assert_close`` tolerances for the dtype under test: ``fp32`` in float32, else ``reduced``."""
    return fp32 if FULL_PRECISION else reduced


def _load_engine(name: str, tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    # A private preset folder keeps the session hermetic (no reliance on ~/.cache).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAM_TINY_DIR", str(tmp_path_factory.mktemp("ham-tiny")))
        patch.delenv("HAM_DTYPE", raising=False)
        return HamEngine.load(name, device=TEST_DEVICE, dtype=TEST_DTYPE)


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    """The epsilon-prediction tiny model (CPU, fp32), shared by the whole session."""
    return _load_engine("tiny", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_v_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    """The v-prediction tiny model (CPU, fp32), shared by the whole session."""
    return _load_engine("tiny-v", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_xl_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    """The SDXL-shaped tiny model (two text encoders, text_time embedding), shared by the session."""
    return _load_engine("tiny-xl", tmp_path_factory)


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
