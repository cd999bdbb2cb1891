"""Pictures in and out of the engine: any PIL image → RGB → a [-1, 1] tensor, and back.

Every image a user hands in passes :func:`to_rgb` first, so alpha, palettes, 16-bit
greyscale, CMYK and EXIF rotation are handled in one place; an image that cannot be
used raises :class:`~ham_engine.params.ParamError` (a ``ValueError``) naming the field
("content" or "style").
"""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ham_engine.params import ParamError

FITS = ("resize", "cover")

# PIL's own decompression-bomb limit (twice MAX_IMAGE_PIXELS): an image handed in as an
# object is held to what :func:`open_image` accepts from a file, before any copy is made.
MAX_PIXELS = 2 * 89_478_485


def open_image(source: str | Path | bytes, field: str = "content") -> Image.Image:
    """Open an image file (path or bytes) fully into memory; ``ValueError`` naming ``field`` if unreadable."""
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else Path(source).expanduser().open("rb")
    except OSError as exc:
        raise ParamError(field, f"cannot read {str(source)!r}: {exc.strerror or exc}") from exc
    with handle:
        try:
            image = Image.open(handle)
            image.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as exc:
            raise ParamError(field, f"not a readable image ({type(exc).__name__}: {exc})") from exc
    return image


def _flatten_alpha(image: Image.Image) -> Image.Image:
    # Transparent pixels carry arbitrary colour; white is what a viewer shows behind them.
    if image.mode == "La":
        image = image.convert("LA")  # PIL converts premultiplied La only to LA
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    # PIL's own I;16 → RGB conversion clips at 255 (almost everything turns white); scale instead.
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and not (low >= 0.0 and high <= 1.0):
        values, top = values - low, (high - low) or 1.0  # float data of unknown range: stretch it
    elif image.mode == "F":
        top = 1.0
    elif image.mode.startswith("I;16"):
        top = 65535.0
    else:
        top = 65535.0 if high > 255 else 255.0  # 32-bit "I": 16-bit PNGs open so, as do converted 8-bit images
    return Image.fromarray(np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8))


def to_rgb(image: Image.Image, field: str = "content") -> Image.Image:
    """An 8-bit RGB copy of ``image``, upright (EXIF orientation applied).

    RGBA/LA/P-with-transparency are composited on white; L, 1, P, CMYK, YCbCr convert;
    16-bit and float greyscale are rescaled to 8 bits. Raises ``ValueError("<field>: ...")``
    for an empty, unconvertible or too large (over ``MAX_PIXELS``) image.
    """
    if not isinstance(image, Image.Image):
        raise ParamError(field, f"expected an image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ParamError(field, f"the image is empty ({image.width}x{image.height} pixels)")
    if image.width * image.height > MAX_PIXELS:
        raise ParamError(
            field,
            f"{image.width}x{image.height} is too large ({image.width * image.height} pixels, "
            f"at most {MAX_PIXELS}); downscale it first"
        )
    try:
        image = ImageOps.exif_transpose(image) or image
        if image.mode == "RGB":
            return image.copy()
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
            return _flatten_alpha(image)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            return _high_bit_depth_to_l(image).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ParamError(field, f"cannot convert a {image.mode} image to RGB ({exc})") from exc


def _readable_rgb(image: Image.Image, field: str) -> Image.Image:
    """``image`` itself when it is already upright 8-bit RGB (for reading only), else :func:`to_rgb` of it.

    The engine hands in images :func:`to_rgb` has already normalised; a copy per reader
    would cost ~30 ms each on a 12-megapixel photo.
    """
    if image.mode == "RGB" and image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return image
    return to_rgb(image, field=field)


def output_size(width: int, height: int, size: int, multiple: int = 64) -> tuple[int, int]:
    """The output ``(width, height)``: the longer side ``size``, the aspect ratio kept, sides multiples of ``multiple``.

    The shorter side is rounded to the nearest multiple (at least one ``multiple``), so
    the aspect ratio is kept up to that rounding.
    """
    if width < 1 or height < 1:
        raise ParamError("content", f"the image is empty ({width}x{height} pixels)")
    if size < multiple or size % multiple:
        raise ParamError("size", f"must be a positive multiple of {multiple}, got {size}")
    longer, shorter = max(width, height), min(width, height)
    # Half up (not Python's round-half-even): 16:9 at 512 gives 512x320, not 512x256.
    short_side = max(multiple, math.floor(size * shorter / longer / multiple + 0.5) * multiple)
    return (size, short_side) if width >= height else (short_side, size)


def image_to_tensor(image: Image.Image, width: int, height: int, fit: str = "resize") -> torch.Tensor:
    """``[1, 3, height, width]`` float32 in [-1, 1].

    ``fit="resize"`` stretches to the size (the content: its aspect is already that of the
    size, up to rounding); ``fit="cover"`` scales to cover the size and crops the centre
    (the style: any aspect ratio, nothing distorted).
    """
    if fit not in FITS:
        raise ParamError("fit", f"must be one of {', '.join(FITS)}, got {fit!r}")
    if width < 1 or height < 1:
        raise ParamError("size", f"width and height must be positive, got {width}x{height}")
    rgb = _readable_rgb(image, field="content")
    if fit == "cover":
        rgb = ImageOps.fit(rgb, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
    elif rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """An RGB image from ``[1, 3, H, W]`` or ``[3, H, W]`` pixels in [-1, 1] (values outside are clipped)."""
    if pixels.dim() == 4:
        if pixels.shape[0] != 1:
            raise ParamError("pixels", f"expected one image, got a batch of {pixels.shape[0]}")
        pixels = pixels[0]
    if pixels.dim() != 3 or pixels.shape[0] != 3:
        raise ParamError("pixels", f"expected shape [3, H, W] or [1, 3, H, W], got {list(pixels.shape)}")
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def image_digest(image: Image.Image, field: str = "style") -> str:
    """SHA-256 hex of the image's RGB pixels and size: equal digests mean the engine sees equal pictures."""
    rgb = _readable_rgb(image, field=field)
    digest = hashlib.sha256()
    digest.update(f"{rgb.mode}:{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()
