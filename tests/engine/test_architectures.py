"""The real architectures: SD 1.5, SD 2.1-base and SDXL-base, full size, random weights, offline.

Built once from the published configs (:mod:`ham_engine.architectures`, float16 safetensors
in ``HAM_ARCH_DIR``) with the real CLIP BPE tokenizer, loaded through
``HamEngine.load(folder)`` like a downloaded model, and run through a short transfer:
image style cold and warm, text style under CFG. Minutes and gigabytes, so they run only
with ``HAM_TEST_ARCHITECTURES=1`` (``.ci/run`` sets it). SD runs in float32 (~7 GB RSS);
SDXL-base in float32 would hold ~14 GB, so it is stored and runs in bfloat16 (peak RSS of
the whole module 9.7 GB): the compute dtype is stated per architecture below.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from ham_engine import TransferParams
from ham_engine.architectures import ensure_architecture, find_clip_vocab
from ham_engine.attention import CROSS_ATTENTION, SELF_ATTENTION, attention_layers
from ham_engine.engine import HamEngine

pytestmark = [
    pytest.mark.architectures,
    pytest.mark.skipif(
        os.environ.get("HAM_TEST_ARCHITECTURES") != "1", reason="full-size architectures: set HAM_TEST_ARCHITECTURES=1"
    ),
    pytest.mark.timeout(1800),
]

# name -> (family, compute dtype, decoder self-attention layers, cross-attention width, steps).
# One step keeps each architecture to a few minutes on 2 cores (SDXL-base in bf16 on a CPU
# without bf16 units: ~20-30 s per UNet row at 64 px); the rows still scale as 5N / 3N / 6N.
# Measured on a 2-core VM: the 9 tests in 2 min 52 s (builds cached), peak RSS 9.7 GB; the
# first build of all three adds ~7-12 min and ~12 GB of disk under HAM_ARCH_DIR.
EXPECTED = {
    "sd15": ("sd", "fp32", 9, 768, 1),
    "sd21-base": ("sd", "fp32", 9, 1024, 1),
    "sdxl-base": ("sdxl", "bf16", 36, 2048, 1),
}


def _params(name: str) -> TransferParams:
    return TransferParams(steps=EXPECTED[name][4], size=64)


@pytest.fixture(scope="module", params=list(EXPECTED))
def architecture(request: pytest.FixtureRequest) -> Iterator[tuple[str, HamEngine]]:
    if find_clip_vocab() is None:
        pytest.fail("the CLIP vocabulary is missing: run `make clip-vocab` (or set HAM_CLIP_VOCAB)")
    name = request.param
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # full-size tensors gain from every core
    try:
        engine = HamEngine.load(str(ensure_architecture(name)), device="cpu", dtype=EXPECTED[name][1])
        yield name, engine
    finally:
        torch.set_num_threads(threads)
        engine = None
        gc.collect()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_the_architecture_loads_as_published_with_the_real_clip_tokenizer(architecture) -> None:
    name, engine = architecture
    family, _, up_self, width, _ = EXPECTED[name]
    model = engine.model
    assert model.family.name == family
    assert model.unet.config.cross_attention_dim == width
    for tokenizer in model.family.tokenizers:
        assert len(tokenizer) == 49408
        ids = tokenizer(["an oil painting"]).input_ids[0]
        assert ids == [49406, 550, 2870, 3086, 49407]  # CLIP's own ids: one token per word
    up = [n for n in attention_layers(model.unet, SELF_ATTENTION) if n.startswith("up_blocks.")]
    assert len(up) == up_self
    assert len([n for n in attention_layers(model.unet, CROSS_ATTENTION) if n.startswith("up_blocks.")]) == up_self


def test_image_style_cold_then_warm_gives_the_same_picture_with_fewer_rows(
    architecture, content_image: Image.Image, style_image: Image.Image
) -> None:
    name, engine = architecture
    params = _params(name)
    steps = params.steps
    engine.style_cache.clear()
    engine.content_cache.clear()
    cold = engine.transfer(content_image, style=style_image, params=params)
    warm = engine.transfer(content_image, style=style_image, params=params)
    assert (cold.stats.style_cache_hit, warm.stats.style_cache_hit) == (False, True)
    # The repeat finds the content's inversion in the content cache too: no inversion pass.
    assert (cold.stats.content_cache_hit, warm.stats.content_cache_hit) == (False, True)
    assert cold.stats.unet_rows_by_phase == {"invert": 2 * steps, "sample": 3 * steps}
    assert warm.stats.unet_rows_by_phase == {"invert": 0, "sample": 2 * steps}
    assert cold.image.size == (64, 64)
    diff = np.abs(_pixels(cold.image) - _pixels(warm.image))
    assert diff.max() <= 1, f"warm differs from cold by up to {diff.max()}/255 ({cold.stats.dtype})"
    assert _pixels(cold.image).std() > 1.0  # a picture, not a constant (the engine refuses NaN)


def test_text_style_runs_under_cfg_with_five_rows_per_step(architecture, content_image: Image.Image) -> None:
    name, engine = architecture
    params = _params(name)
    engine.content_cache.clear()
    result = engine.transfer(content_image, style_prompt="an ink engraving", params=params)
    assert result.stats.cfg is True
    assert result.stats.unet_rows_by_phase == {"invert": params.steps, "sample": 5 * params.steps}
    assert _pixels(result.image).std() > 1.0
