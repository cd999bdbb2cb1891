"""SD 3.5-medium, full size, random weights, offline: HAM's SD3 family on the published architecture.

Built once from the published configs (:mod:`ham_engine.architectures`, ``sd35-medium``:
the 2.5 B-parameter MM-DiT-X transformer with QK RMS-norm and dual attention in blocks
0-12, SD3's 16-channel VAE, CLIP-L and CLIP-G with the real CLIP tokenizer; T5-XXL left out
as diffusers allows), loaded through ``HamEngine.load(folder)`` like a downloaded model, and
run through an image-style and a text-style transfer. Minutes and ~14 GB, so it runs only
with ``HAM_TEST_ARCHITECTURES=1`` (``.ci/run`` sets it), under the big-memory lock. Stored
bf16, computed in float32 (a CPU without bf16 units runs bf16 many times slower).
"""

from __future__ import annotations

import gc
import os
import resource
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
    pytest.mark.timeout(3600),
]

# One step at 64 px: 4 x 4 image tokens and 77 + 256 text tokens per row; the rows still count 5N / 5N.
PARAMS = TransferParams(steps=1, size=64)


@pytest.fixture(scope="module")
def sd35() -> Iterator[HamEngine]:
    if find_clip_vocab() is None:
        pytest.fail("the CLIP vocabulary is missing: run `make clip-vocab` (or set HAM_CLIP_VOCAB)")
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # full-size tensors gain from every core
    engine = None
    try:
        engine = HamEngine.load(str(ensure_architecture("sd35-medium")), device="cpu", dtype="fp32")
        yield engine
    finally:
        torch.set_num_threads(threads)
        engine = None
        gc.collect()


def test_sd35_medium_loads_as_published_with_two_clips_and_no_t5(sd35: HamEngine) -> None:
    model = sd35.model
    transformer = model.transformer
    assert (model.family.name, model.prediction_type, model.family.t5) == ("sd3", "flow", None)
    config = transformer.config
    assert (config.num_layers, config.num_attention_heads * config.attention_head_dim) == (24, 1536)
    assert (config.joint_attention_dim, config.pooled_projection_dim, config.qk_norm) == (4096, 2048, "rms_norm")
    assert 2.2e9 < sum(p.numel() for p in transformer.parameters()) < 2.3e9  # 2.24 B, pos_embed a buffer
    assert model.family.default_layers == tuple(f"transformer_blocks.{i}.attn" for i in range(12, 24))
    # 24 joint attentions carry LAT; GAR also sees the 13 image-only attentions of the dual blocks.
    assert len(attention_layers(model.unet, CROSS_ATTENTION)) == 24
    assert len(attention_layers(model.unet, SELF_ATTENTION)) == 24 + 13
    for tokenizer in model.family.tokenizers:
        assert len(tokenizer) == 49408
    text = model.encode_prompt(["", "an oil painting"], size=(64, 64))
    assert text.shape == (2, 77 + 256, 4096) and text.added["pooled_projections"].shape == (2, 2048)


def test_sd35_medium_runs_an_image_style_and_a_text_style_transfer(
    sd35: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    n = PARAMS.steps
    image = sd35.transfer(content_image, style=style_image, params=PARAMS)
    assert image.stats.unet_rows_by_phase == {"invert": 2 * n, "sample": 3 * n}
    text = sd35.transfer(content_image, style_prompt="an oil painting", params=PARAMS)
    assert text.stats.unet_rows_by_phase == {"invert": 0, "sample": 5 * n} and text.stats.cfg
    for result in (image, text):
        assert result.image.size == (64, 64) and result.stats.family == "sd3"
        pixels = np.asarray(result.image, dtype=np.int16)
        assert pixels.std() > 0  # a picture, not a flat (NaN-cleared) one
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"sd35-medium: peak RSS {peak / 2**30:.1f} GiB, seconds {image.stats.seconds} / {text.stats.seconds}")
