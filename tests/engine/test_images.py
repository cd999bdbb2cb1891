"""Image conversion: every input mode becomes sensible RGB, sizes follow the content, tensors round-trip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ham_engine.images import (
    MAX_PIXELS,
    image_digest,
    image_to_tensor,
    open_image,
    output_size,
    tensor_to_image,
    to_rgb,
)

DATA = Path(__file__).resolve().parents[1] / "data"


def test_rgb_passes_through_unchanged() -> None:
    image = Image.open(DATA / "content0.png").convert("RGB")
    assert np.array_equal(np.asarray(to_rgb(image)), np.asarray(image))


def test_transparent_pixels_become_white_and_opaque_ones_keep_their_colour() -> None:
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[0, 0] = (10, 20, 30, 255)
    pixels[0, 1] = (200, 0, 0, 0)
    pixels[1, 0] = (0, 0, 0, 128)
    rgb = np.asarray(to_rgb(Image.fromarray(pixels, "RGBA")))
    assert tuple(rgb[0, 0]) == (10, 20, 30)
    assert tuple(rgb[0, 1]) == (255, 255, 255)
    assert tuple(rgb[1, 0]) == (127, 127, 127)


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putdata([0, 1])
    image.info["transparency"] = 0
    assert list(to_rgb(image).getdata()) == [(255, 255, 255), (0, 0, 255)]


def test_sixteen_bit_greyscale_is_rescaled_not_clipped() -> None:
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]
    assert rgb.shape == (1, 3, 3)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [("L", 90, (90, 90, 90)), ("1", 1, (255, 255, 255)), ("CMYK", (0, 255, 255, 0), (255, 0, 0))],
)
def test_other_modes_convert_to_rgb(mode: str, colour: object, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(Image.new(mode, (3, 2), colour))
    assert rgb.mode == "RGB"
    assert rgb.size == (3, 2)
    assert rgb.getpixel((0, 0)) == expected


def test_premultiplied_greyscale_with_alpha_is_composited_on_white() -> None:
    image = Image.new("LA", (2, 1))
    image.putdata([(90, 255), (0, 0)])
    assert list(to_rgb(image.convert("La"), field="style").getdata()) == [(90, 90, 90), (255, 255, 255)]


def test_an_image_over_the_pixel_limit_is_a_value_error_naming_the_field() -> None:
    huge = Image.new("1", (20_000, MAX_PIXELS // 20_000 + 1))  # 1 bit per pixel: ~22 MB
    with pytest.raises(ValueError, match=r"^style: 20000x\d+ is too large"):
        to_rgb(huge, field="style")


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (4, 2), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    assert to_rgb(Image.open(buffer)).size == (2, 4)


def test_tensors_and_digests_see_the_upright_picture_whether_or_not_it_was_normalised() -> None:
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :2] = (255, 0, 0)  # left half red, right half blue
    pixels[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif.tobytes())
    raw = Image.open(buffer)
    upright = to_rgb(raw)
    assert upright.size == (2, 4)
    torch.testing.assert_close(image_to_tensor(raw, 2, 4), image_to_tensor(upright, 2, 4), atol=0, rtol=0)
    assert image_to_tensor(upright, 2, 4)[0, :, 0, 0].tolist() == [1.0, -1.0, -1.0]  # red on top
    assert image_digest(raw) == image_digest(upright)


def test_an_empty_image_is_a_value_error_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"^style: the image is empty \(0x5 pixels\)"):
        to_rgb(Image.new("RGB", (0, 5)), field="style")
    with pytest.raises(ValueError, match=r"^content: expected an image"):
        to_rgb(np.zeros((4, 4, 3)))  # type: ignore[arg-type]


def test_unreadable_bytes_and_missing_files_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^style: not a readable image"):
        open_image(b"definitely not a png", field="style")
    with pytest.raises(ValueError, match=r"^content: cannot read"):
        open_image(tmp_path / "missing.png")
    assert open_image((DATA / "style1.png").read_bytes()).size == (128, 128)


@pytest.mark.parametrize(
    ("width", "height", "size", "expected"),
    [
        (128, 128, 512, (512, 512)),
        (640, 480, 512, (512, 384)),
        (480, 640, 512, (384, 512)),
        (1920, 1080, 512, (512, 320)),  # 288 rounds to the nearest multiple of 64
        (4000, 10, 256, (256, 64)),  # never below one multiple
        (100, 1000, 64, (64, 64)),
    ],
)
def test_output_size_keeps_aspect_with_sides_multiple_of_64(width, height, size, expected) -> None:
    assert output_size(width, height, size) == expected


def test_output_size_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="size: must be a positive multiple of 64"):
        output_size(100, 100, 100)
    with pytest.raises(ValueError, match="content: the image is empty"):
        output_size(0, 100, 512)


def test_image_to_tensor_scales_to_minus_one_one() -> None:
    image = Image.fromarray(np.array([[[0, 127, 255], [255, 255, 255]]], dtype=np.uint8))
    tensor = image_to_tensor(image, 2, 1)
    assert tensor.shape == (1, 3, 1, 2)
    assert tensor.dtype == torch.float32
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([-1.0, 127 / 127.5 - 1, 1.0])


def test_cover_crops_the_centre_without_distortion() -> None:
    # A wide image: red left third, green middle, blue right third; cover to a square keeps the middle.
    pixels = np.zeros((30, 90, 3), dtype=np.uint8)
    pixels[:, :30, 0] = 255
    pixels[:, 30:60, 1] = 255
    pixels[:, 60:, 2] = 255
    tensor = image_to_tensor(Image.fromarray(pixels), 30, 30, fit="cover")
    assert torch.allclose(tensor[0, :, 15, 15], torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    resized = image_to_tensor(Image.fromarray(pixels), 30, 30, fit="resize")
    assert resized[0, 0, 15, 2] > 0.9  # stretched: the red third is still there


def test_bad_fit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="fit: must be one of resize, cover"):
        image_to_tensor(Image.new("RGB", (4, 4)), 4, 4, fit="stretch")


def test_tensor_round_trip_is_exact_for_8_bit_pixels() -> None:
    image = Image.open(DATA / "style2.png").convert("RGB")
    tensor = image_to_tensor(image, *image.size)
    back = tensor_to_image(tensor)
    assert np.array_equal(np.asarray(back), np.asarray(image))
    assert np.array_equal(np.asarray(tensor_to_image(tensor[0])), np.asarray(image))


def test_tensor_to_image_clips_out_of_range_values_and_rejects_batches() -> None:
    image = tensor_to_image(torch.tensor([[[-3.0]], [[0.0]], [[5.0]]]))
    assert image.getpixel((0, 0)) == (0, 128, 255)
    with pytest.raises(ValueError, match="expected one image, got a batch of 2"):
        tensor_to_image(torch.zeros(2, 3, 4, 4))


def test_digest_depends_on_pixels_not_on_encoding() -> None:
    image = Image.open(DATA / "style0.png").convert("RGB")
    as_rgba = image.convert("RGBA")  # fully opaque: same pixels after to_rgb
    assert image_digest(image) == image_digest(as_rgba)
    assert len(image_digest(image)) == 64
    changed = image.copy()
    changed.putpixel((0, 0), (0, 0, 1) if image.getpixel((0, 0)) != (0, 0, 1) else (0, 0, 2))
    assert image_digest(changed) != image_digest(image)
    assert image_digest(image) != image_digest(Image.open(DATA / "style1.png"))
