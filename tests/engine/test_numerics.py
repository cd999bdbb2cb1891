"""Numeric safety: overflows stop the transfer, precision choices keep warm == cold in bf16 too."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from ham_engine import TransferParams
from ham_engine.engine import HamEngine, NumericalError
from ham_engine.loading import vae_dtype_for

SMALL = TransferParams(steps=3, size=64)


def _load(name: str, dtype: str, tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HAM_TINY_DIR", str(tmp_path_factory.mktemp("ham-tiny")))
        return HamEngine.load(name, device="cpu", dtype=dtype)


@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    return _load("tiny", "bf16", tmp_path_factory)


@pytest.fixture
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> HamEngine:
    engine = _load("tiny", "fp32", tmp_path_factory)
    with torch.no_grad():
        engine.model.unet.conv_in.weight.mul_(1e30)  # the first GroupNorm's variance overflows
    return engine


@pytest.mark.parametrize("style_prompt", [None, "an ink engraving"])
def test_an_overflow_inside_the_unet_raises_numerical_error_instead_of_a_black_image(
    overflowing: HamEngine, content_image: Image.Image, style_image: Image.Image, style_prompt: str | None
) -> None:
    style = None if style_prompt else style_image
    with pytest.raises(NumericalError, match=r"UNet output .* not finite"):
        overflowing.transfer(content_image, style=style, style_prompt=style_prompt, params=SMALL)
    assert all(type(p) is AttnProcessor2_0 for p in overflowing.model.unet.attn_processors.values())
    assert len(overflowing.style_cache) == 0


def test_the_overflow_advice_names_a_wider_dtype_only_where_there_is_one(
    overflowing: HamEngine, content_image: Image.Image
) -> None:
    with pytest.raises(NumericalError) as raised:
        overflowing.transfer(content_image, style_prompt="a mosaic", params=SMALL)
    message = str(raised.value)
    assert "already runs in fp32" in message and "HAM_DTYPE" not in message


def test_an_overflow_in_the_vae_decoder_raises_numerical_error(
    tmp_path_factory: pytest.TempPathFactory, content_image: Image.Image
) -> None:
    engine = _load("tiny", "fp32", tmp_path_factory)
    with torch.no_grad():
        engine.model.vae.decoder.conv_in.weight.mul_(1e30)
    with pytest.raises(NumericalError, match="decoded image"):
        engine.transfer(content_image, style_prompt="a mosaic", params=SMALL)


def test_the_vae_runs_in_float32_on_cpu_and_where_fp16_would_overflow(bf16_engine: HamEngine) -> None:
    model = bf16_engine.model
    assert (model.unet.dtype, model.vae.dtype) == (torch.bfloat16, torch.float32)
    assert vae_dtype_for(torch.float16, torch.device("cuda")) == torch.float32
    assert vae_dtype_for(torch.bfloat16, torch.device("cuda")) == torch.bfloat16  # fp32's range
    assert vae_dtype_for(torch.bfloat16, torch.device("cpu")) == torch.float32  # bf16 is slow on a CPU


def test_clean_latents_stay_float32_and_each_image_encodes_as_it_would_alone(
    bf16_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    from ham_engine.images import image_to_tensor

    model = bf16_engine.model
    a, b = image_to_tensor(content_image, 64, 64), image_to_tensor(style_image, 64, 64)
    together = model.encode_image(torch.cat([a, b]))
    assert together.dtype == torch.float32
    # Not rounded to the model dtype: bf16 keeps 8 bits of mantissa, these latents more.
    assert not torch.equal(together, together.to(torch.bfloat16).float())
    assert torch.equal(together, torch.cat([model.encode_image(a), model.encode_image(b)]))


def test_warm_equals_cold_within_one_level_in_bf16(
    bf16_engine: HamEngine, content_image: Image.Image, style_image: Image.Image
) -> None:
    engine = HamEngine(bf16_engine.model)
    cold = engine.transfer(content_image, style=style_image, params=SMALL)
    warm = engine.transfer(content_image, style=style_image, params=SMALL)
    assert (cold.stats.style_cache_hit, warm.stats.style_cache_hit) == (False, True)
    assert cold.stats.dtype == "bfloat16"
    diff = np.abs(np.asarray(cold.image, dtype=np.int16) - np.asarray(warm.image, dtype=np.int16))
    assert diff.max() <= 1, f"warm differs from cold by up to {diff.max()}/255"
    # ... while the picture is not a constant (a NaN turned black would pass the bound above).
    assert np.asarray(cold.image).std() > 1.0
