"""The result's file format: what a client may ask for, and the encoder the worker uses.

A job carries an :class:`OutputSpec` (``output_format`` png | jpeg | webp, ``output_quality``
1..100 for the lossy two); the API validates it at submit, the worker encodes the engine's image
with :func:`encode`, and the stored object (``results/{id}.{ext}``) has the matching content type,
so the result URL serves it as such.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ham_engine.params import ParamError, ParamSpec

if TYPE_CHECKING:
    from PIL import Image

# format → (content type, file extension, Pillow format name)
FORMATS: dict[str, tuple[str, str, str]] = {
    "png": ("image/png", "png", "PNG"),
    "jpeg": ("image/jpeg", "jpg", "JPEG"),
    "webp": ("image/webp", "webp", "WEBP"),
}
LOSSY = frozenset({"jpeg", "webp"})
DEFAULT_QUALITY = 90

# The request parameters beside the engine's (PARAM_SPECS): form fields, JSON properties and flags alike.
OUTPUT_SPECS: tuple[ParamSpec, ...] = (
    ParamSpec("output_format", str, "png", "file format of the result", choices=tuple(FORMATS), example="webp"),
    ParamSpec("output_quality", int, DEFAULT_QUALITY, "encoder quality of jpeg and webp results (png ignores it)",
              1, 100, example=85),
)


FORMAT_SPEC, QUALITY_SPEC = OUTPUT_SPECS


@dataclass(frozen=True)
class OutputSpec:
    """How a job's result is encoded; validated on construction against :data:`OUTPUT_SPECS`
    (:class:`ParamError` names the field)."""

    format: str = FORMAT_SPEC.default
    quality: int = QUALITY_SPEC.default

    def __post_init__(self) -> None:
        choices = FORMAT_SPEC.choices or ()
        if self.format not in choices:
            raise ParamError(FORMAT_SPEC.name, f"must be one of {', '.join(choices)}, got {self.format!r}")
        low, high = int(QUALITY_SPEC.minimum or 0), int(QUALITY_SPEC.maximum or 0)
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not low <= self.quality <= high:
            raise ParamError(QUALITY_SPEC.name, f"must be an integer in [{low}, {high}], got {self.quality!r}")

    @property
    def content_type(self) -> str:
        return FORMATS[self.format][0]

    @property
    def extension(self) -> str:
        return FORMATS[self.format][1]


def encode(image: Image.Image, spec: OutputSpec) -> bytes:
    """``image`` as the bytes of a ``spec.format`` file."""
    buffer = io.BytesIO()
    pillow_format = FORMATS[spec.format][2]
    if spec.format in LOSSY:
        image.save(buffer, format=pillow_format, quality=spec.quality)
    else:
        image.save(buffer, format=pillow_format)
    return buffer.getvalue()
