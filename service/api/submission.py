"""What a ``POST /v1/transfers`` asks for, whichever body carried it.

The multipart reader (:mod:`service.api.multipart`) and the JSON reader (:mod:`service.api.json_body`)
each turn their body into the same :class:`Submission`, through the checks here: the request
parameters (:data:`REQUEST_SPECS`, derived from ``TransferParams`` and the output format), the
styles (:class:`~ham_core.style_refs.StyleRef`), the webhook, and the images, normalised to
PNG. Nothing is stored until a whole submission stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from starlette.concurrency import run_in_threadpool

from ham_core.jobs import DEFAULT_WEBHOOK_EVENTS, WEBHOOK_EVENTS, Job
from ham_core.output import OUTPUT_SPECS, OutputSpec
from ham_core.style_refs import PENDING_UPLOAD, StyleRef, assign_upload_keys
from ham_core.styles import StyleRecord
from ham_core.webhooks import check_webhook_url
from ham_engine.params import (
    PARAM_SPECS,
    ParamError,
    ParamSpec,
    TransferParams,
    check_style_reference,
    family_params,
)
from service.api.deps import Services
from service.api.errors import ApiError, InvalidParameter, InvalidWebhookUrl, StyleNotFound, WebhooksDisabled
from service.api.uploads import read_image

# Every per-request parameter a client may send: the engine's, then the result's format.
REQUEST_SPECS: tuple[ParamSpec, ...] = PARAM_SPECS + OUTPUT_SPECS
_ENGINE_NAMES = frozenset(spec.name for spec in PARAM_SPECS)
MAX_WEBHOOK_URL_CHARS = 2048


@dataclass(frozen=True)
class Submission:
    """A validated transfer request: the normalised images and everything the job record needs."""

    params: TransferParams
    output: OutputSpec
    webhook_url: str | None
    webhook_events: tuple[str, ...]
    content_png: bytes
    # The job's styles, in order; an uploaded one is pending (its key comes with the job id).
    styles: tuple[StyleRef, ...]
    # The normalised PNG of each pending upload among ``styles``, in the same order.
    style_pngs: tuple[bytes, ...] = ()
    # The catalogue model it runs on (service.api.catalogue); None: the default model.
    model: str | None = None

    def uploads(self, job_id: str) -> list[tuple[str, bytes]]:
        """The style images to store with the job: (storage key, PNG)."""
        keyed = assign_upload_keys(self.styles, job_id)
        keys = [str(ref.key) for ref, given in zip(keyed, self.styles, strict=True) if given.pending_upload]
        return list(zip(keys, self.style_pngs, strict=True))

    def job(self, job_id: str, tenant: str) -> Job:
        """The job record this submission becomes."""
        return Job(
            id=job_id,
            tenant=tenant,
            params=self.params.to_dict(),
            styles=assign_upload_keys(self.styles, job_id),
            webhook_url=self.webhook_url,
            webhook_events=self.webhook_events,
            output_format=self.output.format,
            output_quality=self.output.quality,
            model=self.model,
        )


def invalid(exc: ParamError) -> ApiError:
    """The 422 for a parameter out of range."""
    return InvalidParameter(str(exc), field=exc.field)


def build_params(given: Mapping[str, Any], family: str = "sd") -> tuple[TransferParams, OutputSpec]:
    """The engine parameters and the output spec from the request parameters that were given;
    what was left out gets the model ``family``'s default (``FAMILY_DEFAULTS``), else the field's."""
    engine = family_params(family, {name: value for name, value in given.items() if name in _ENGINE_NAMES})
    output = {name.removeprefix("output_"): value for name, value in given.items() if name not in _ENGINE_NAMES}
    try:
        return TransferParams(**engine), OutputSpec(**output)
    except ParamError as exc:
        raise invalid(exc) from None


def one_style(has_style_image: bool, style_prompt: str | None) -> StyleRef:
    """The one style of a request giving a style image and/or ``style_prompt``; 422 when there is
    no style at all, or a prompt of blanks only."""
    if style_prompt is not None and not style_prompt.strip():
        raise InvalidParameter("style_prompt: blank; leave it out or describe a style",
                               field="style_prompt")
    try:
        prompt = check_style_reference(has_style_image, style_prompt)
    except ParamError as exc:
        raise invalid(exc) from None
    if has_style_image:
        return StyleRef.uploaded(prompt)
    assert prompt is not None  # check_style_reference refuses a style with neither
    return StyleRef.text(prompt)


def webhook_events(events: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The validated subset of :data:`WEBHOOK_EVENTS` a webhook wants (default: ``completed``)."""
    if events is None:
        return DEFAULT_WEBHOOK_EVENTS
    chosen = []
    for event in events:
        if event not in WEBHOOK_EVENTS:
            raise InvalidParameter(
                f"webhook_events: each must be one of {', '.join(WEBHOOK_EVENTS)}, got {str(event)[:40]!r}",
                field="webhook_events",
            )
        if event not in chosen:
            chosen.append(event)
    if not chosen:
        raise InvalidParameter("webhook_events: name at least one event", field="webhook_events")
    return tuple(event for event in WEBHOOK_EVENTS if event in chosen)


async def check_webhook(services: Services, url: str | None) -> str | None:
    """The webhook URL, vetted by the SSRF guard; 422 naming ``webhook_url`` otherwise."""
    if url is None:
        return None
    if not services.settings.webhook_secret:
        raise WebhooksDisabled()
    url = url.strip()
    if len(url) > MAX_WEBHOOK_URL_CHARS:
        raise InvalidWebhookUrl(f"at most {MAX_WEBHOOK_URL_CHARS} characters", field="webhook_url")
    try:
        # Resolves DNS: off the event loop.
        await run_in_threadpool(check_webhook_url, url, services.settings.webhook_allow_private)
    except ValueError as exc:
        raise InvalidWebhookUrl(str(exc), field="webhook_url") from None
    return url


async def normalise_image(services: Services, field: str, data: bytes) -> bytes:
    """The image's RGB PNG (the only form workers read); 413/415/422 naming ``field``."""
    info = await run_in_threadpool(read_image, field, data, services.settings)
    return info.normalized_png


def resolve_library_styles(services: Services, tenant: str, submission: Submission) -> Submission:
    """``submission`` with each ``style_id`` resolved to the tenant's library style; 404 naming it otherwise.

    The job keeps its own copy of a library style's image (stored with its other inputs, as an
    upload is): deleting the style while the job is queued cannot take the image from under it.
    """
    if not any(ref.style_id for ref in submission.styles):
        return submission
    resolved: list[StyleRef] = []
    pngs: list[bytes] = []
    uploads = iter(submission.style_pngs)
    for ref in submission.styles:
        if ref.pending_upload:
            pngs.append(next(uploads))
        elif ref.style_id is not None:
            record = services.styles.get(tenant, ref.style_id)
            png = _library_image(services, record) if record is not None else None
            if record is None or (record.has_image and png is None):
                raise StyleNotFound(style_id=ref.style_id[:80])
            ref = record.ref()
            if png is not None:
                ref = replace(ref, key=PENDING_UPLOAD)  # stored with the job, as an upload
                pngs.append(png)
        resolved.append(ref)
    return replace(submission, styles=tuple(resolved), style_pngs=tuple(pngs))


def _library_image(services: Services, record: StyleRecord) -> bytes | None:
    """The library style's stored PNG; None when it has none or it was deleted a moment ago."""
    if record.image_key is None:
        return None
    try:
        return services.storage.get(record.image_key)
    except KeyError:
        return None
