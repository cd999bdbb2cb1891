"""Validation of an uploaded image before anything is stored or enqueued.

``read_image`` is the only door through which client bytes become an image. It answers every
client mistake with one of the API's errors (:mod:`service.api.errors`), which carries its HTTP status:

- 415 ``unsupported_media_type``: not PNG, JPEG or WebP by its magic bytes (the filename and
  the declared content type are never trusted);
- 413 ``upload_too_large``: more bytes than ``settings.max_upload_bytes``;
- 413 ``image_too_large``: width*height above ``settings.max_image_pixels``, read from the
  header *before* any pixel is decoded (decompression-bomb guard);
- 422 ``invalid_image``: empty, truncated or corrupt — the image is fully decoded to find out.

The result carries the image as an RGB PNG without metadata, so workers never parse a hostile
file format, only PNGs this module wrote or fully decoded: a plain 8-bit RGB PNG (no
transparency, no EXIF rotation) is kept as sent, its ancillary chunks dropped, once it decoded
completely — re-encoding it would change no pixel and cost the request several times the decode
(see ``bench/service.py --submit-cpu``); anything else is re-encoded.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from service.api.errors import ImageTooLarge, InvalidField, InvalidImage, UnsupportedMediaType, UploadTooLarge

if TYPE_CHECKING:
    from ham_core.config import Settings

# Magic bytes → Pillow format name. WebP is a RIFF container whose form type sits at bytes 8..12.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Errors Pillow raises on malformed data; none of them may escape as a 500.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)


@dataclass(frozen=True)
class ImageInfo:
    """An accepted upload: what it was, and its pixels as an RGB PNG."""

    format: str  # "png" | "jpeg" | "webp" — the sniffed format of the upload
    width: int
    height: int
    normalized_png: bytes  # the RGB PNG to store: the upload itself when it already was one
    kept_as_sent: bool = False


def sniff_format(data: bytes) -> str | None:
    """``"png"``, ``"jpeg"`` or ``"webp"`` from the leading bytes; None for anything else."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def read_image(field: str, data: bytes, settings: Settings) -> ImageInfo:
    """Validate one uploaded image and return it normalised to an RGB PNG.

    ``field`` is the form field name (``content`` or ``style``), used in error messages.
    Raises :class:`UploadTooLarge`, :class:`ImageTooLarge` (413), :class:`UnsupportedMediaType` (415)
    or :class:`InvalidImage` (422) for anything the service will not process.
    """
    if len(data) > settings.max_upload_bytes:
        raise UploadTooLarge(
            f"{len(data)} bytes exceeds the limit of {settings.max_upload_bytes} bytes",
            field=field,
        )
    if not data:
        raise InvalidImage("the file is empty", field=field)
    kind = sniff_format(data)
    if kind is None:
        raise UnsupportedMediaType(f"{field}: not a PNG, JPEG or WebP image (judged by its content)", field=field)
    try:
        image = Image.open(io.BytesIO(data), formats=[kind.upper()])
    except Image.DecompressionBombError as exc:
        raise _too_large(field, settings, detail=str(exc)) from exc
    except (UnidentifiedImageError, *_DECODE_ERRORS) as exc:
        raise InvalidImage(f"unreadable {kind.upper()} header", field=field) from exc
    with image:
        width, height = image.size  # from the header: nothing decoded yet
        if width <= 0 or height <= 0:
            raise InvalidImage(f"image has no pixels ({width}x{height})", field=field)
        if width * height > settings.max_image_pixels:
            raise _too_large(field, settings, detail=f"{width}x{height} = {width * height} pixels")
        # A plain RGB PNG is checked without decoding its pixels: every chunk's CRC, and the zlib
        # stream inflates to exactly the rows the header promises, with valid filter bytes (the
        # decode's work is the inflate; unfiltering cannot fail). Stored as sent, without metadata.
        plain = _checked_plain_png(field, data, width, height) if kind == "png" and _plain_rgb(image) else None
        if plain is not None:
            return ImageInfo(format=kind, width=width, height=height, normalized_png=plain, kept_as_sent=True)
        try:
            image.load()  # full decode: truncation and corrupt data surface here, not in the worker
            rgb = _to_rgb(image)
            out = io.BytesIO()
            # Low compression: this runs on the request path and the PNG only lives until the job ends.
            rgb.save(out, format="PNG", compress_level=1)
        except Image.DecompressionBombError as exc:
            raise _too_large(field, settings, detail=str(exc)) from exc
        except _DECODE_ERRORS as exc:
            raise InvalidImage(f"corrupt or truncated {kind.upper()} data ({exc})", field=field) from exc
    return ImageInfo(format=kind, width=rgb.width, height=rgb.height, normalized_png=out.getvalue())


def _plain_rgb(image: Image.Image) -> bool:
    """Whether the PNG ``image`` (opened, not decoded) is 8-bit RGB, opaque and not interlaced.

    (Its EXIF is not read here: Pillow decodes a whole PNG to look for it. An ``eXIf`` chunk sends
    the file down the re-encoding path instead, see :func:`_checked_plain_png`.)
    """
    return image.mode == "RGB" and "transparency" not in image.info and not image.info.get("interlace")


def _checked_plain_png(field: str, png: bytes, width: int, height: int) -> bytes | None:
    """``png`` (8-bit RGB, not interlaced) with only its IHDR, IDAT and IEND chunks, once its data is sound;
    None when it carries EXIF (its orientation must be applied: the re-encoding path does it).

    Sound: every chunk complete with a matching CRC up to IEND, and the IDAT stream inflating to
    exactly ``height`` rows of ``1 + 3 * width`` bytes, each starting with a filter type 0..4 —
    what a full decode checks, at the cost of the inflate alone (bounded: never more than the
    rows the header promises). 422 ``invalid_image`` otherwise.
    """

    def corrupt(why: str) -> InvalidImage:
        return InvalidImage(f"corrupt or truncated PNG data ({why})", field=field)

    kept = [png[:8]]
    stream = zlib.decompressobj()
    stride = 1 + 3 * width
    expected = stride * height
    rows = bytearray()
    offset = 8
    while True:
        if offset + 12 > len(png):
            raise corrupt("no IEND chunk")
        (length,) = struct.unpack(">I", png[offset:offset + 4])
        end = offset + 12 + length
        if end > len(png):
            raise corrupt("a chunk runs past the end of the file")
        kind = png[offset + 4:offset + 8]
        (crc,) = struct.unpack(">I", png[end - 4:end])
        if zlib.crc32(png[offset + 4:end - 4]) != crc:
            raise corrupt(f"{kind.decode('latin-1')} chunk CRC mismatch")
        if kind == b"eXIf":
            return None
        if kind == b"IDAT":
            try:
                rows += stream.decompress(png[offset + 8:end - 4], expected + 1 - len(rows))
            except zlib.error as exc:
                raise corrupt(str(exc)) from None
            if len(rows) > expected:
                raise corrupt("more image data than the header's size")
        if kind in (b"IHDR", b"IDAT", b"IEND"):
            kept.append(png[offset:end])
        if kind == b"IEND":
            break
        offset = end
    if len(rows) != expected or not stream.eof:
        raise corrupt(f"{len(rows)} bytes of rows, the header's {width}x{height} needs {expected}")
    if max(rows[::stride]) > 4:
        raise corrupt("an invalid row filter")
    return b"".join(kept)


def _too_large(field: str, settings: Settings, detail: str) -> ImageTooLarge:
    return ImageTooLarge(f"image too large ({detail}); the limit is {settings.max_image_pixels} pixels", field=field)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white; EXIF rotation applied (phone photos)."""
    # A broken EXIF block only costs the orientation, not the upload.
    with contextlib.suppress(*_DECODE_ERRORS):
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        # 16-bit and float greyscale: scale to 8 bits instead of letting convert() clip at 255.
        image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


async def read_upload(upload: object, name: str, settings: Settings) -> bytes:
    """The normalised PNG of the multipart file ``upload`` of field ``name``; an API error otherwise."""
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    if not isinstance(upload, UploadFile):
        raise InvalidField(f"{name} must be an image file upload, not text", field=name)
    limit = settings.max_upload_bytes
    data = await upload.read(limit + 1)  # never more than the limit (+1 to detect "over")
    if len(data) > limit:
        raise UploadTooLarge(f"larger than {limit} bytes", field=name)
    info = await run_in_threadpool(read_image, name, data, settings)
    return info.normalized_png
