"""transfer_batch: K styles for one content in one run, each image its one-style transfer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ham_engine.engine import HamEngine, Style
from ham_engine.params import ParamError, TransferParams
from tests.engine.conftest import DATA

STEPS = 4
SMALL = TransferParams(steps=STEPS, size=64)
# A student in a batch of 1 + 2K rows vs 3: float rounding, after the VAE and 8-bit
# quantisation at most this many levels per channel (measured: docs/performance.md).
PIXEL_BOUND = 2


def _image(name: str) -> Image.Image:
    with Image.open(DATA / name) as image:
        return image.convert("RGB")


def _max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


STYLES = [_image(f"style{i}.png") for i in range(4)]


def test_four_cold_image_styles_run_14n_rows_and_match_their_one_style_transfers(
    tiny_engine: HamEngine, content_image: Image.Image
) -> None:
    engine = HamEngine(tiny_engine.model)
    batch = engine.transfer_batch(content_image, STYLES, params=SMALL)
    assert len(batch.images) == 4
    assert batch.stats.unet_rows_by_phase == {"invert": 5 * STEPS, "sample": 9 * STEPS}
    assert batch.stats.unet_calls == 2 * STEPS
    assert [s.style_cache_hit for s in batch.stats.styles] == [False] * 4
    singles = [HamEngine(tiny_engine.model).transfer(content_image, style=s, params=SMALL) for s in STYLES]
    for image, single in zip(batch.images, singles, strict=True):
        assert _max_diff(image, single.image) <= PIXEL_BOUND
    # The four pictures really differ from each other (no style served another's student).
    assert min(_max_diff(a, b) for i, a in enumerate(batch.images) for b in batch.images[i + 1 :]) > 10 * PIXEL_BOUND

    # All four warm: the content teacher and four students, 5 rows a step; the content
    # warm too, so no inversion (6N with a new content).
    warm = engine.transfer_batch(content_image, STYLES, params=SMALL)
    assert warm.stats.unet_rows_by_phase == {"invert": 0, "sample": 5 * STEPS}
    assert [s.style_cache_tier for s in warm.stats.styles] == ["memory"] * 4
    other_content = _image("content1.png")
    fresh_content = engine.transfer_batch(other_content, STYLES, params=SMALL)
    assert fresh_content.stats.unet_rows == 6 * STEPS
    for image, single in zip(warm.images, singles, strict=True):
        assert _max_diff(image, single.image) <= PIXEL_BOUND


def test_a_mixed_batch_of_image_text_and_image_with_prompt_styles_matches_each_alone(
    tiny_engine: HamEngine, content_image: Image.Image
) -> None:
    styles = [STYLES[0], "a watercolour", Style(image=STYLES[1], prompt="an oil painting"), STYLES[0]]
    engine = HamEngine(tiny_engine.model)
    batch = engine.transfer_batch(content_image, styles, params=SMALL)
    assert [s.mode for s in batch.stats.styles] == ["image", "text", "image+text", "image"]
    assert [s.cfg for s in batch.stats.styles] == [False, True, False, False]
    # CFG for the text style: its teacher and its student get an uncond and a cond row each;
    # the content teacher and the image styles' rows serve both halves: 1 + 2 + 4 + 2 + 2 rows a step.
    assert batch.stats.unet_rows_by_phase["sample"] == 11 * STEPS
    alone = [
        HamEngine(tiny_engine.model).transfer(content_image, style=STYLES[0], params=SMALL),
        HamEngine(tiny_engine.model).transfer(content_image, style_prompt="a watercolour", params=SMALL),
        HamEngine(tiny_engine.model).transfer(
            content_image, style=STYLES[1], style_prompt="an oil painting", params=SMALL
        ),
    ]
    for i, single in enumerate([*alone, alone[0]]):
        assert _max_diff(batch.images[i], single.image) <= PIXEL_BOUND, i
    # Again with the image styles cached: their students share one row across the CFG halves
    # beside the text style's two, and the content comes from the cache (no inversion).
    warm = engine.transfer_batch(content_image, styles, params=SMALL)
    assert [s.style_cache_hit for s in warm.stats.styles] == [True, None, True, True]
    assert warm.stats.unet_rows_by_phase == {"invert": 0, "sample": (1 + 1 + 4 + 1 + 1) * STEPS}
    for i, single in enumerate([*alone, alone[0]]):
        assert _max_diff(warm.images[i], single.image) <= PIXEL_BOUND, i


def test_one_style_batch_is_the_one_style_transfer(tiny_engine: HamEngine, content_image: Image.Image) -> None:
    batch = HamEngine(tiny_engine.model).transfer_batch(content_image, [STYLES[2]], params=SMALL)
    single = HamEngine(tiny_engine.model).transfer(content_image, style=STYLES[2], params=SMALL)
    assert np.array_equal(np.asarray(batch.images[0]), np.asarray(single.image))
    assert batch.stats.unet_rows == single.stats.unet_rows == 5 * STEPS


@pytest.mark.parametrize(
    ("styles", "field"),
    [
        ([], "styles"),
        ("an oil painting", "styles"),
        ([STYLES[0]] * 3, "styles"),  # above max_styles=2
        ([STYLES[0], 42], "styles[1]"),
        ([STYLES[0], "   "], "styles[1]"),
        ([Style()], "styles[0]"),
    ],
)
def test_bad_style_lists_are_refused_naming_the_field(
    tiny_engine: HamEngine, content_image: Image.Image, styles, field: str
) -> None:
    engine = HamEngine(tiny_engine.model, max_styles=2)
    with pytest.raises(ParamError) as raised:
        engine.transfer_batch(content_image, styles, params=SMALL)
    assert raised.value.field == field
