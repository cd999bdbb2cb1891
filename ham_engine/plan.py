"""What a transfer must compute and what repeat inputs let it skip (docs/method.md §7).

:func:`plan_transfer` looks each image style and the content up in the feature tiers:
a cached style stands in for its style teacher, a cached content for its inversion; what
is not cached is inverted in one batch [content?, cold image styles...].
:func:`plan_recording` says what of the teachers that inversion records, and
:func:`teacher_sources` how each teacher finally served its student.
"""

from __future__ import annotations

from dataclasses import dataclass

from ham_engine import images
from ham_engine.attention import CONTENT_TEACHER, style_teacher_of
from ham_engine.feature_cache import ContentKey, ContentTrajectory, StyleFeatures, StyleKey
from ham_engine.feature_tiers import FeatureTiers, latent_shape
from ham_engine.loading import DiffusionModel
from ham_engine.recording import TeacherRecording
from ham_engine.request import StyleRequest, TransferRequest


@dataclass(frozen=True)
class TransferPlan:
    """Per style and for the content: its cache key, what the tiers held, and whether it is inverted now."""

    style_keys: tuple[StyleKey | None, ...]  # None: no image style teacher is read
    cached: tuple[StyleFeatures | None, ...]
    style_tiers: tuple[str | None, ...]  # memory, store or None
    content_key: ContentKey
    content_cached: ContentTrajectory | None
    content_tier: str | None

    @property
    def invert_styles(self) -> tuple[bool, ...]:
        """Per style: an image style teacher is read and nothing stands in for it."""
        return tuple(key is not None and hit is None for key, hit in zip(self.style_keys, self.cached, strict=True))

    @property
    def invert_content(self) -> bool:
        return self.content_cached is None

    @property
    def inverting(self) -> bool:
        """Whether the transfer has an inversion pass at all."""
        return self.invert_content or any(self.invert_styles)


def style_key(model: DiffusionModel, request: TransferRequest, style: StyleRequest) -> StyleKey:
    """Everything ``style``'s teacher features depend on in ``request``."""
    return StyleKey(
        model=model.name,
        image_digest=images.image_digest(style.image),
        size=request.size,
        steps=request.params.steps,
        gar_layers=request.gar_layers,
        lat_layers=request.lat_layers,
        step_window=(request.params.step_start, request.params.step_end),
        style_prompt=style.prompt,
        dtype=str(model.dtype),
        device=str(model.device),
        inversion=request.params.inversion,
    )


def content_key(model: DiffusionModel, request: TransferRequest) -> ContentKey:
    """Everything the content's inversion depends on in ``request``."""
    return ContentKey(
        model=model.name,
        image_digest=images.image_digest(request.content, field="content"),
        size=request.size,
        steps=request.params.steps,
        dtype=str(model.dtype),
        device=str(model.device),
        inversion=request.params.inversion,
    )


def plan_transfer(request: TransferRequest, model: DiffusionModel, features: FeatureTiers) -> TransferPlan:
    """Look the request's image styles and its content up in ``features``; a text style is never cached."""
    modulated = request.modulated_steps
    # What every modulated step reads of a style teacher.
    gar_entries = {(k, layer) for k in modulated for layer in request.gar_layers}
    lat_layers = set(request.lat_layers) if modulated else set()
    keys, found = [], []
    for style in request.styles:
        key = style_key(model, request, style) if style.image is not None and request.uses_style else None
        keys.append(key)
        found.append(features.style(key, gar_entries, lat_layers) if key is not None else (None, None))
    key = content_key(model, request)
    content_cached, content_tier = features.content(key, latent_shape(model, request.size))
    return TransferPlan(
        style_keys=tuple(keys),
        cached=tuple(hit for hit, _ in found),
        style_tiers=tuple(tier for _, tier in found),
        content_key=key,
        content_cached=content_cached,
        content_tier=content_tier,
    )


def plan_recording(request: TransferRequest, plan: TransferPlan, budget: int) -> TeacherRecording | None:
    """What to record of the teachers during inversion, or None when nothing will be.

    The inversion batch is [content?, cold image styles...]. The content teacher is
    recorded at every recordable step when its content is inverted now (a content from
    the cache has no inversion pass: its teacher runs live); an image style teacher
    only when inverted now (not cached) and without a style prompt (its sampling calls
    would be conditioned on the prompt, the inversion's are not).
    """
    steps = request.recordable_steps
    if not steps:
        return None
    style_rows = []
    row = int(plan.invert_content)
    for style, inverted in zip(request.styles, plan.invert_styles, strict=True):
        if inverted and style.prompt is None:
            style_rows.append(row)
        row += int(inverted)
    if not plan.invert_content and not style_rows:
        return None
    return TeacherRecording(
        steps,
        request.gar_layers,
        request.lat_layers,
        budget=budget,
        content_row=0 if plan.invert_content else None,
        style_rows=tuple(style_rows),
    )


def teacher_sources(
    request: TransferRequest,
    plan: TransferPlan,
    stand_ins: tuple[StyleFeatures | None, ...],
    recorded: TeacherRecording | None,
) -> dict[str, str | None]:
    """How each teacher served its student: "live", "recorded", "cached", or None (not read).

    Keyed by branch: ``content_teacher``, then each style's teacher (``style_teacher``,
    ``style_teacher.1``, ...). ``stand_ins`` is per style what stood in for its teacher.
    """
    content = None
    if request.modulated_steps:
        content = "recorded" if recorded is not None and recorded.content_row is not None else "live"
    sources: dict[str, str | None] = {CONTENT_TEACHER: content}
    for i, style in enumerate(request.styles):
        source = None
        if request.uses_style:
            if plan.cached[i] is not None:
                source = "cached"
            elif not style.text_guided and stand_ins[i] is not None:
                source = "recorded"
            else:
                source = "live"
        sources[style_teacher_of(i)] = source
    return sources
