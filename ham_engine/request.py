"""A transfer request: what a caller may pass (:class:`Style`) and the validated form the engine runs.

:func:`build_request` turns a content image, K styles and :class:`~ham_engine.params.TransferParams`
into a :class:`TransferRequest`: RGB images, normalised prompts, the output size and the
resolved GAR/LAT layer names. Every check of the caller's input happens here, before the
engine touches the model, so a bad request costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ham_engine import images
from ham_engine.attention import CROSS_ATTENTION, SELF_ATTENTION, resolve_layers
from ham_engine.loading import DiffusionModel
from ham_engine.params import DEFAULT_LAYERS, ParamError, TransferParams, check_style_reference


@dataclass(frozen=True)
class Style:
    """One style of a batch: an image, a prompt, or both (see :meth:`HamEngine.transfer_batch`)."""

    image: Image.Image | None = None
    prompt: str | None = None


StyleSpec = Image.Image | str | Style


@dataclass(frozen=True)
class StyleRequest:
    """One validated style of a request."""

    image: Image.Image | None  # RGB
    prompt: str | None
    guidance: float

    @property
    def text_guided(self) -> bool:
        """The style teacher is sampled from noise with the style prompt (no style image)."""
        return self.image is None

    @property
    def cfg(self) -> bool:
        """Classifier-free guidance on the style teacher (text-guided only; 1.0 is a no-op)."""
        return self.text_guided and self.guidance > 1.0

    @property
    def mode(self) -> str:
        return "text" if self.text_guided else ("image+text" if self.prompt else "image")


@dataclass(frozen=True)
class TransferRequest:
    """A validated transfer request: one content, K styles."""

    content: Image.Image  # RGB
    styles: tuple[StyleRequest, ...]
    params: TransferParams
    size: tuple[int, int]  # (width, height) of the output
    gar_layers: tuple[str, ...]  # resolved module names, () when GAR is off
    lat_layers: tuple[str, ...]

    @property
    def modulated_steps(self) -> frozenset[int]:
        """Sampling steps where GAR or LAT act."""
        if not (self.gar_layers or self.lat_layers):
            return frozenset()
        return frozenset(k for k in range(self.params.steps) if self.params.modulates_step(k))

    @property
    def uses_style(self) -> bool:
        """Whether anything reads the style teacher (SINI, or GAR/LAT at some step)."""
        return self.params.sini or bool(self.modulated_steps)

    @property
    def recordable_steps(self) -> frozenset[int]:
        """Modulated steps whose teacher calls a "source" inversion makes: all but the first."""
        if self.params.inversion != "source" or self.params.teachers == "live":
            return frozenset()
        return frozenset(k for k in self.modulated_steps if k > 0)


def check_style_image(style: Any, field_name: str = "style") -> None:
    """Refuse a style that is given but is not an image."""
    if style is not None and not isinstance(style, Image.Image):
        raise ParamError(field_name, f"expected an image, got {type(style).__name__}")


def as_styles(styles: Sequence[StyleSpec], max_styles: int) -> list[Style]:
    """``transfer_batch``'s styles (images, prompts or :class:`Style`) as a checked list of :class:`Style`."""
    if not isinstance(styles, (list, tuple)) or not styles:
        raise ParamError("styles", "give a non-empty list of style images and/or prompts")
    if len(styles) > max_styles:
        raise ParamError("styles", f"at most {max_styles} styles per batch, got {len(styles)}")
    out = []
    for i, spec in enumerate(styles):
        if isinstance(spec, Style):
            out.append(spec)
        elif isinstance(spec, Image.Image):
            out.append(Style(image=spec))
        elif isinstance(spec, str):
            out.append(Style(prompt=spec))
        else:
            raise ParamError(f"styles[{i}]", f"expected an image, a prompt or a Style, got {type(spec).__name__}")
        check_style_image(out[-1].image, f"styles[{i}]")
        try:
            check_style_reference(out[-1].image is not None, out[-1].prompt)
        except ParamError as exc:
            raise ParamError(f"styles[{i}]", exc.reason) from exc
    return out


def build_request(
    model: DiffusionModel,
    content: Image.Image,
    styles: list[Style],
    params: TransferParams | None,
    progress: Any = None,
    cancelled: Any = None,
) -> TransferRequest:
    """Validate a request for ``model``; a :class:`~ham_engine.params.ParamError` names what is wrong."""
    if params is None:
        params = TransferParams()
    if not isinstance(params, TransferParams):
        raise ParamError("params", f"expected TransferParams, got {type(params).__name__}")
    for name, callback in (("progress", progress), ("cancelled", cancelled)):
        if callback is not None and not callable(callback):
            raise ParamError(name, f"must be a callable or None, got {type(callback).__name__}")
    validated = []
    for i, spec in enumerate(styles):
        prompt = check_style_reference(spec.image is not None, spec.prompt)
        field_name = "style" if len(styles) == 1 else f"styles[{i}]"
        image = images.to_rgb(spec.image, field=field_name) if spec.image is not None else None
        # A guidance-distilled family (FLUX) runs its text style teacher without CFG rows.
        guidance = params.guidance if model.family.classifier_free_guidance else 1.0
        validated.append(StyleRequest(image=image, prompt=prompt, guidance=guidance))
    content_rgb = images.to_rgb(content, field="content")
    unet, family = model.unet, model.family
    gar_patterns = family.default_layers if params.gar_layers == DEFAULT_LAYERS else params.gar_layers
    lat_patterns = family.default_layers if params.lat_layers == DEFAULT_LAYERS else params.lat_layers
    return TransferRequest(
        content=content_rgb,
        styles=tuple(validated),
        params=params,
        size=images.output_size(content_rgb.width, content_rgb.height, params.size),
        gar_layers=resolve_layers(unet, gar_patterns, SELF_ATTENTION, "gar_layers") if params.gar else (),
        lat_layers=resolve_layers(unet, lat_patterns, CROSS_ATTENTION, "lat_layers") if params.lat else (),
    )
