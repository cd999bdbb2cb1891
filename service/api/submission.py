"""What a ``POST /v1/transfers`` asks for, whichever body carried it.

The multipart reader (:mod:`service.api.multipart`) and the JSON reader (:mod:`service.api.json_body`)
each turn their body into the same :class:`Submission`, through the checks here: the request
parameters (:data:`REQUEST_SPECS`, derived from ``TransferParams`` and the output format), the
style reference, the webhook, and the images, normalised to PNG. Nothing is stored until a
whole submission stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from ham_engine.params import PARAM_SPECS, ParamError, ParamSpec, TransferParams, check_style_reference
from service.api.deps import Services
from service.api.errors import ApiError
from service.api.uploads import UploadError, read_image
from service.core.jobs import WEBHOOK_EVENTS, Job, extra_style_key, style_key
from service.core.output import OUTPUT_SPECS, OutputSpec
from service.core.styles import StyleRecord
from service.core.webhooks import check_webhook_url

# Every per-request parameter a client may send: the engine's, then the result's format.
REQUEST_SPECS: tuple[ParamSpec, ...] = PARAM_SPECS + OUTPUT_SPECS
_ENGINE_NAMES = frozenset(spec.name for spec in PARAM_SPECS)
MAX_WEBHOOK_URL_CHARS = 2048
DEFAULT_WEBHOOK_EVENTS = ("completed",)


@dataclass(frozen=True)
class Submission:
    """A validated transfer request: the normalised images and everything the job record needs."""

    params: TransferParams
    output: OutputSpec
    style_prompt: str | None
    webhook_url: str | None
    webhook_events: tuple[str, ...]
    content_png: bytes
    style_png: bytes | None
    # A job naming library styles or several styles: each {"png": uploaded PNG or None,
    # "key": a library style's image key or None, "prompt", "style_id"}, in order. None: the one
    # style of style_png / style_prompt.
    styles: tuple[dict[str, Any], ...] | None = None

    def uploads(self, job_id: str) -> list[tuple[str, bytes]]:
        """The style images to store with the job: (storage key, PNG)."""
        if self.styles is None:
            return [(style_key(job_id), self.style_png)] if self.style_png is not None else []
        return [(key, ref["png"]) for key, ref in zip(self._keys(job_id), self.styles, strict=True) if ref["png"]]

    def _keys(self, job_id: str) -> list[str | None]:
        keys: list[str | None] = []
        uploaded = 0
        for index, ref in enumerate(self.styles or ()):
            if ref["png"] is None:
                keys.append(ref["key"])
                continue
            keys.append(style_key(job_id) if uploaded == 0 else extra_style_key(job_id, index))
            uploaded += 1
        return keys

    def job(self, job_id: str, tenant: str) -> Job:
        """The job record this submission becomes."""
        styles = None
        if self.styles is not None:
            styles = [
                {"key": key, "prompt": ref["prompt"], "style_id": ref["style_id"]}
                for key, ref in zip(self._keys(job_id), self.styles, strict=True)
            ]
        return Job(
            id=job_id,
            tenant=tenant,
            params=self.params.to_dict(),
            style_prompt=self.style_prompt,
            has_style=self.style_png is not None or any(s["key"] for s in styles or []),
            webhook_url=self.webhook_url,
            webhook_events=self.webhook_events,
            output_format=self.output.format,
            output_quality=self.output.quality,
            styles=styles,
        )


def invalid(exc: ParamError) -> ApiError:
    """The 422 for a parameter out of range."""
    return ApiError(422, "invalid_parameter", str(exc), field=exc.field)


def build_params(given: Mapping[str, Any]) -> tuple[TransferParams, OutputSpec]:
    """The engine parameters and the output spec from the request parameters that were given."""
    engine = {name: value for name, value in given.items() if name in _ENGINE_NAMES}
    output = {name.removeprefix("output_"): value for name, value in given.items() if name not in _ENGINE_NAMES}
    try:
        return TransferParams(**engine), OutputSpec(**output)
    except ParamError as exc:
        raise invalid(exc) from None


def style_reference(has_style_image: bool, style_prompt: str | None) -> str | None:
    """The normalised prompt; 422 when there is no style at all, or a prompt of blanks only."""
    if style_prompt is not None and not style_prompt.strip():
        raise ApiError(422, "invalid_parameter", "style_prompt: blank; leave it out or describe a style",
                       field="style_prompt")
    try:
        return check_style_reference(has_style_image, style_prompt)
    except ParamError as exc:
        raise invalid(exc) from None


def webhook_events(events: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The validated subset of :data:`WEBHOOK_EVENTS` a webhook wants (default: ``completed``)."""
    if events is None:
        return DEFAULT_WEBHOOK_EVENTS
    chosen = []
    for event in events:
        if event not in WEBHOOK_EVENTS:
            raise ApiError(422, "invalid_parameter",
                           f"webhook_events: each must be one of {', '.join(WEBHOOK_EVENTS)}, got {str(event)[:40]!r}",
                           field="webhook_events")
        if event not in chosen:
            chosen.append(event)
    if not chosen:
        raise ApiError(422, "invalid_parameter", "webhook_events: name at least one event", field="webhook_events")
    return tuple(event for event in WEBHOOK_EVENTS if event in chosen)


async def check_webhook(services: Services, url: str | None) -> str | None:
    """The webhook URL, vetted by the SSRF guard; 422 naming ``webhook_url`` otherwise."""
    if url is None:
        return None
    if not services.settings.webhook_secret:
        raise ApiError(
            422, "webhooks_disabled",
            "webhooks are disabled on this server (the operator must set HAM_WEBHOOK_SECRET)", field="webhook_url",
        )
    url = url.strip()
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise ApiError(422, "invalid_webhook_url", f"at most {MAX_WEBHOOK_URL_CHARS} characters", field="webhook_url")
    try:
        # Resolves DNS: off the event loop.
        await run_in_threadpool(check_webhook_url, url, services.settings.webhook_allow_private)
    except ValueError as exc:
        raise ApiError(422, "invalid_webhook_url", str(exc), field="webhook_url") from None
    return url


async def normalise_image(services: Services, field: str, data: bytes) -> bytes:
    """The image's RGB PNG (the only form workers read); 413/415/422 naming ``field``."""
    try:
        info = await run_in_threadpool(read_image, field, data, services.settings)
    except UploadError as exc:
        raise ApiError(exc.status, exc.code, str(exc.message), field=exc.field or field) from None
    return info.normalized_png


def resolve_library_styles(services: Services, tenant: str, submission: Submission) -> Submission:
    """``submission`` with each ``style_id`` resolved to the tenant's library style; 404 naming it otherwise.

    The job keeps its own copy of a library style's image (stored with its other inputs): deleting
    the style while the job is queued cannot take the image from under it.
    """
    if submission.styles is None:
        return submission
    resolved = []
    for ref in submission.styles:
        if ref["style_id"] is not None:
            record = services.styles.get(tenant, ref["style_id"])
            png = _library_image(services, record) if record is not None else None
            if record is None or (record.has_image and png is None):
                raise ApiError(404, "style_not_found", f"no style {ref['style_id'][:80]!r}", field="style_id")
            ref = {**ref, "png": png, "key": None, "prompt": record.style_prompt, "style_id": record.id}
        resolved.append(ref)
    return replace(submission, styles=tuple(resolved))


def _library_image(services: Services, record: StyleRecord) -> bytes | None:
    """The library style's stored PNG; None when it has none or it was deleted a moment ago."""
    if record.image_key is None:
        return None
    try:
        return services.storage.get(record.image_key)
    except KeyError:
        return None
