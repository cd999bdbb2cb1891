"""Upload validation: sniffed formats, size and pixel limits, corrupt data, RGB normalisation."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from ham_core.config import Settings
from service.api.errors import ApiError
from service.api.uploads import ImageInfo, read_image, sniff_format

DATA = Path(__file__).resolve().parents[1] / "data"
SETTINGS = Settings()


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _decoded(info: ImageInfo) -> Image.Image:
    image = Image.open(io.BytesIO(info.normalized_png))
    assert image.format == "PNG"
    return image


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` RGB pixels but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(DATA / "content0.png").convert("RGB")


def _refused(data: bytes, settings: Settings = SETTINGS, field: str = "content") -> ApiError:
    with pytest.raises(ApiError) as caught:
        read_image(field, data, settings)
    assert caught.value.field == field
    assert field in caught.value.message
    return caught.value


# --- accepted formats ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_webp_are_accepted_and_reencoded_as_rgb_png(photo: Image.Image, fmt: str) -> None:
    info = read_image("content", _encode(photo, fmt), SETTINGS)
    assert info.format == fmt.lower()
    assert (info.width, info.height) == (128, 128)
    decoded = _decoded(info)
    assert decoded.mode == "RGB"
    assert decoded.size == (128, 128)


def test_a_plain_rgb_png_is_stored_as_sent_and_anything_else_is_reencoded(photo: Image.Image) -> None:
    plain = _encode(photo, "PNG")
    info = read_image("content", plain, SETTINGS)
    assert info.kept_as_sent and info.normalized_png == plain
    rotated = photo.copy()
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    for data in (_encode(photo.convert("RGBA"), "PNG"), _encode(photo.convert("L"), "PNG"),
                 _encode(rotated, "PNG", exif=exif.tobytes()), _encode(photo, "PNG", transparency=(0, 0, 0))):
        info = read_image("content", data, SETTINGS)
        assert not info.kept_as_sent and info.normalized_png != data
        assert _decoded(info).mode == "RGB"
    # A truncated plain PNG is still refused: it is kept only once it decoded completely.
    error = _refused(plain[: len(plain) // 2])
    assert (error.status, error.code) == (422, "invalid_image")


def test_png_pixels_survive_normalisation_exactly(photo: Image.Image) -> None:
    info = read_image("style", (DATA / "style1.png").read_bytes(), SETTINGS)
    original = Image.open(DATA / "style1.png").convert("RGB")
    assert _decoded(info).tobytes() == original.tobytes()


def test_sniffing_ignores_what_the_client_claims(photo: Image.Image) -> None:
    # A JPEG is a JPEG whatever its name; the function never sees filenames or content types.
    assert sniff_format(_encode(photo, "JPEG")) == "jpeg"
    assert sniff_format(b"RIFF\0\0\0\0WAVEfmt ") is None


# --- unsupported formats → 415 ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_415(photo: Image.Image, fmt: str) -> None:
    error = _refused(_encode(photo, fmt))
    assert (error.status, error.code) == (415, "unsupported_media_type")


def test_html_named_png_is_415() -> None:
    error = _refused(b"<!doctype html><html><script>alert(1)</script></html>", field="style")
    assert (error.status, error.code) == (415, "unsupported_media_type")


def test_plain_text_is_415() -> None:
    error = _refused(b"just some text, not an image\n")
    assert error.status == 415


# --- limits → 413 -------------------------------------------------------------------------------


def test_upload_over_byte_limit_is_413(photo: Image.Image) -> None:
    data = _encode(photo, "PNG")
    error = _refused(data, Settings(max_upload_bytes=len(data) - 1))
    assert (error.status, error.code) == (413, "upload_too_large")
    assert str(len(data)) in error.message
    assert read_image("content", data, Settings(max_upload_bytes=len(data))).width == 128


def test_header_claiming_huge_dimensions_is_413_without_decoding() -> None:
    data = _png_header_only(100_000, 100_000)
    assert len(data) < 200
    started = time.perf_counter()
    error = _refused(data)
    assert time.perf_counter() - started < 0.5
    assert (error.status, error.code) == (413, "image_too_large")


def test_pixel_limit_is_checked_from_the_header(photo: Image.Image) -> None:
    data = _png_header_only(5000, 5000)  # 25 Mpx claimed, below Pillow's own bomb threshold
    error = _refused(data, Settings(max_image_pixels=24_999_999))
    assert (error.status, error.code) == (413, "image_too_large")
    assert "5000x5000" in error.message


def test_image_at_the_pixel_limit_is_accepted(photo: Image.Image) -> None:
    assert read_image("content", _encode(photo, "PNG"), Settings(max_image_pixels=128 * 128)).width == 128
    error = _refused(_encode(photo, "JPEG"), Settings(max_image_pixels=128 * 128 - 1))
    assert error.code == "image_too_large"


# --- broken data → 422 --------------------------------------------------------------------------


def test_truncated_png_is_422(photo: Image.Image) -> None:
    data = _encode(photo, "PNG")
    error = _refused(data[: len(data) // 2])
    assert (error.status, error.code) == (422, "invalid_image")


def test_truncated_jpeg_is_422(photo: Image.Image) -> None:
    data = _encode(photo, "JPEG")
    error = _refused(data[: len(data) // 2])
    assert (error.status, error.code) == (422, "invalid_image")


def test_corrupt_jpeg_is_422() -> None:
    error = _refused(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    assert (error.status, error.code) == (422, "invalid_image")


def test_png_with_bad_checksum_is_422(photo: Image.Image) -> None:
    data = bytearray(_encode(photo, "PNG"))
    data[40] ^= 0xFF  # inside the first IDAT: its CRC no longer matches
    error = _refused(bytes(data))
    assert error.status == 422


def test_webp_header_with_garbage_body_is_422() -> None:
    error = _refused(b"RIFF\x20\0\0\0WEBPVP8 " + b"\x13" * 40)
    assert (error.status, error.code) == (422, "invalid_image")


def test_empty_upload_is_422() -> None:
    error = _refused(b"")
    assert (error.status, error.code) == (422, "invalid_image")


def test_zero_width_png_is_refused_not_crashing() -> None:
    error = _refused(_png_header_only(0, 10))
    assert error.status in (413, 422)


# --- normalisation -------------------------------------------------------------------------------


def test_rgba_transparency_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    decoded = _decoded(read_image("style", _encode(image, "PNG"), SETTINGS))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((3, 3)) == (255, 255, 255)
    assert decoded.getpixel((0, 0)) == (0, 0, 255)
    assert decoded.getpixel((1, 0)) == pytest.approx((127, 127, 127), abs=1)


def test_palette_with_transparent_index_becomes_rgb_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 1)
    data = _encode(image, "PNG", transparency=0)
    decoded = _decoded(read_image("style", data, SETTINGS))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (200, 100, 50)
    assert decoded.getpixel((2, 2)) == (255, 255, 255)


def test_greyscale_becomes_rgb() -> None:
    image = Image.new("L", (3, 3), 77)
    decoded = _decoded(read_image("content", _encode(image, "PNG"), SETTINGS))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((1, 1)) == (77, 77, 77)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    image = Image.new("I;16", (2, 2), 32768)
    decoded = _decoded(read_image("content", _encode(image, "PNG"), SETTINGS))
    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    info = read_image("content", _encode(image, "JPEG", quality=95), SETTINGS)
    decoded = _decoded(info)
    assert info.format == "jpeg"
    assert decoded.mode == "RGB"
    red, green, blue = decoded.getpixel((4, 4))
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(photo: Image.Image) -> None:
    wide = photo.crop((0, 0, 128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    info = read_image("content", _encode(wide, "JPEG", exif=exif), SETTINGS)
    assert (info.width, info.height) == (64, 128)


def test_normalised_png_is_a_fresh_file_without_metadata(photo: Image.Image) -> None:
    data = _encode(photo, "PNG", pnginfo=_text_chunk("Comment", "<script>x</script>"))
    decoded = _decoded(read_image("content", data, SETTINGS))
    assert "Comment" not in decoded.info


def _text_chunk(key: str, value: str):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, value)
    return info


@pytest.mark.parametrize(("rows", "reason"), [
    (b"\x00" + b"\x10" * 6 + b"\x09" + b"\x10" * 6, "row filter"),       # filter type 9 does not exist
    (b"\x00" + b"\x10" * 6, "bytes of rows"),                            # one row of two
    (b"\x00" + b"\x10" * 6 + b"\x00" + b"\x10" * 7, "more image data"),  # a byte too many
])
def test_a_plain_png_whose_data_does_not_fit_its_header_is_422_though_every_crc_matches(rows: bytes, reason: str):
    ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))
    error = _refused(data)
    assert (error.status, error.code) == (422, "invalid_image") and reason in error.message
