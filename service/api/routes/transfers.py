"""``/v1/transfers``: submit, read, list and cancel transfer jobs.

The handlers translate HTTP to the job store and back. A submission is refused as cheaply as
possible first (auth, rate limit, queue capacity: before the body is read), then validated in
full — a multipart form (:mod:`service.api.multipart`) or a JSON body
(:mod:`service.api.json_body`): shape, parameters, style reference, idempotency key, webhook URL,
both images, fetched if given by URL — before anything is written; then the normalised inputs go
to storage and the job to the queue. The live view of a job is in :mod:`service.api.routes.events`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from ham_core.config import Settings
from ham_core.jobs import (
    CURSOR_PATTERN,
    IdempotencyConflict,
    Job,
    JobConflict,
    JobStatus,
    QueueFull,
    content_key,
    new_job_id,
)
from ham_core.logs import bind, current_context
from service.api.deps import Services, ServicesDep, TenantDep
from service.api.errors import (
    REDIS_REFUSALS,
    ApiError,
    DuplicateField,
    FetchFailed,
    IdempotencyKeyReused,
    ImageTooLarge,
    InvalidCursor,
    InvalidDataUri,
    InvalidField,
    InvalidIdempotencyKey,
    InvalidImage,
    InvalidJson,
    InvalidMultipart,
    InvalidParameter,
    InvalidRequest,
    InvalidUrl,
    InvalidWebhookUrl,
    JobFinished,
    MissingField,
    ModelUnavailable,
    NotFound,
    RateLimited,
    RequestTooLarge,
    ServiceQueueFull,
    StyleNotFound,
    TenantQueueFull,
    TooManyStyles,
    Unauthorized,
    Unavailable,
    UnknownField,
    UnknownModel,
    UnsupportedMediaType,
    UploadTooLarge,
    WebhooksDisabled,
    error_responses,
)
from service.api.job_access import job_resource, owned_job
from service.api.json_body import json_body_fingerprint, read_json
from service.api.live import preferred_wait, wait_until_terminal
from service.api.multipart import multipart_fingerprint, read_multipart
from service.api.schemas import TransferJob, TransferList
from service.api.submission import Submission, resolve_library_styles

log = logging.getLogger("ham.api")

router = APIRouter(prefix="/v1/transfers", tags=["transfers"])

MAX_IDEMPOTENCY_KEY_CHARS = 200
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]+")

# What every route of a tenant's jobs may answer with, besides its own errors.
ERRORS = (Unauthorized, RateLimited, InvalidRequest, Unavailable, *REDIS_REFUSALS)

_SUBMIT_ERRORS = {
    **error_responses(
        *ERRORS, TenantQueueFull, ServiceQueueFull, InvalidMultipart, InvalidJson, RequestTooLarge, UploadTooLarge,
        ImageTooLarge, UnsupportedMediaType, StyleNotFound, InvalidParameter, MissingField, UnknownField,
        DuplicateField, InvalidField, TooManyStyles, InvalidIdempotencyKey, WebhooksDisabled, InvalidWebhookUrl,
        InvalidImage, InvalidUrl, InvalidDataUri, FetchFailed, UnknownModel, ModelUnavailable, IdempotencyKeyReused,
    ),
    200: {"model": TransferJob, "description": "Idempotent replay: the job this `Idempotency-Key` already created "
          "for the same request; or, with `Prefer: wait`, the job finished within the wait."},
}


IdempotencyKeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key",
    description="Retry-safe submission: the same key (per tenant) with the same request returns the same job, "
    "enqueued once; with a different request it is a 409 `idempotency_key_reused`.",
    examples=["order-1234-attempt"],
    # Declared, checked by _check_idempotency_key (its 422 is `invalid_idempotency_key`).
    json_schema_extra={"pattern": r"^[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*$", "maxLength": MAX_IDEMPOTENCY_KEY_CHARS},
)]
PreferHeader = Annotated[str | None, Header(
    description="`wait=N` (N ≤ 60): answer when the job is terminal or after N seconds (RFC 7240).",
    examples=["wait=5"],
)]


# --- the submission --------------------------------------------------------------------------------

@dataclass(frozen=True)
class BodyReader:
    """How one media type of submission is read: its idempotency fingerprint, and the submission."""

    fingerprint: Callable[[Request, Services], Awaitable[str]]
    read: Callable[[Request, Services], Awaitable[Submission]]


# Media type → the reader of that body; each turns its body into the same Submission.
BODY_READERS: dict[str, BodyReader] = {
    "multipart/form-data": BodyReader(multipart_fingerprint, read_multipart),
    "application/json": BodyReader(json_body_fingerprint, read_json),
}


def _body_reader(request: Request) -> BodyReader:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    reader = BODY_READERS.get(media_type)
    if reader is None:
        raise UnsupportedMediaType("send the transfer as multipart/form-data or application/json")
    return reader


def _key_reused(exc: IdempotencyConflict) -> ApiError:
    return IdempotencyKeyReused(key=exc.key, job_id=exc.job_id)


def _check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidIdempotencyKey(limit=MAX_IDEMPOTENCY_KEY_CHARS)
    return key


def _queue_full(settings: Settings, scope: str) -> ApiError:
    if scope == "tenant":
        return TenantQueueFull(limit=settings.max_queued_per_tenant, headers={"Retry-After": "10"})
    return ServiceQueueFull(headers={"Retry-After": "30"})


def _check_backpressure(services: Services, tenant: str) -> None:
    """Refuse a submit to a full queue before its body is read (two ZCARDs, no parsing, no decoding).

    A flood of refused uploads then costs the API almost nothing; ``JobStore.submit`` checks the
    limits again, atomically, when the job is enqueued.
    """
    settings = services.settings
    if services.jobs.queued_count(tenant) >= settings.max_queued_per_tenant:
        raise _queue_full(settings, "tenant")
    if services.jobs.queued_count() >= settings.max_queue_length:
        raise _queue_full(settings, "global")


def _store_and_submit(
    services: Services, job: Job, submission: Submission, idempotency_key: str | None, fingerprint: str | None
) -> tuple[Job, bool]:
    written: list[str] = []
    try:
        services.storage.put(content_key(job.id), submission.content_png, "image/png")
        written.append(content_key(job.id))
        for key, png in submission.uploads(job.id):
            services.storage.put(key, png, "image/png")
            written.append(key)
        settings = services.settings
        stored, created = services.jobs.submit(
            job, idempotency_key, settings.max_queued_per_tenant, settings.max_queue_length, fingerprint
        )
    except QueueFull as exc:
        _delete_quietly(services, written)
        raise _queue_full(services.settings, exc.scope) from None
    except IdempotencyConflict as exc:
        # A concurrent submit of another request claimed the key first.
        _delete_quietly(services, written)
        raise _key_reused(exc) from None
    except BaseException:
        _delete_quietly(services, written)
        raise
    if not created:
        # Idempotent replay: the existing job has its own inputs; ours are orphans.
        _delete_quietly(services, written)
    # HAM_REDIS_MIN_REPLICAS_ACK: answer 202 only once replicas hold the job (else 503; the job
    # stays stored and a retry with the same Idempotency-Key gets it back).
    services.jobs.confirm_replicated()
    return stored, created


def _delete_quietly(services: Services, keys: list[str]) -> None:
    # Cleanup of inputs nobody will read; a failure leaves them to the TTL sweep.
    for key in keys:
        try:
            services.storage.delete(key)
        except Exception as exc:
            log.warning("could not delete orphaned input %s: %s", key, exc)


# --- routes -------------------------------------------------------------------------------------


@router.post(
    "",
    status_code=202,
    response_model=TransferJob,
    summary="Submit a style transfer",
    responses=_SUBMIT_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            # Named schemas (components), so generated clients get a model for each body.
            "content": {
                "multipart/form-data": {"schema": {"$ref": "#/components/schemas/TransferForm"}},
                "application/json": {"schema": {"$ref": "#/components/schemas/TransferRequest"}},
            },
        }
    },
)
async def create_transfer(
    request: Request, response: Response, tenant: TenantDep, services: ServicesDep,
    idempotency_key: IdempotencyKeyHeader = None, prefer: PreferHeader = None,
) -> TransferJob:
    """Queue a HAM transfer of the content image into the style of a style image and/or `style_prompt`.

    The images come as multipart file parts (`content`, `style`) or, in a JSON body, by
    reference (`content_url`, `style_url`: an http(s) URL or a data: URI). Answers 202 with the
    job resource and its `Location`; follow it with `GET /v1/transfers/{id}/events`, poll it,
    or send `Prefer: wait=N` to have this answer wait up to N seconds for the job to finish.
    """
    idempotency_key = _check_idempotency_key(idempotency_key)
    wait = preferred_wait(prefer)
    body = _body_reader(request)  # 415 for a body of no known type, replay or not
    fingerprint = None
    if idempotency_key is not None:
        # A retry of a submit that went through gets its job back before limits are looked at or
        # images decoded; only its fields and its files' digests are compared with the first request.
        fingerprint = await body.fingerprint(request, services)
        try:
            existing = await run_in_threadpool(
                services.jobs.find_by_idempotency_key, tenant, idempotency_key, fingerprint
            )
        except IdempotencyConflict as exc:
            raise _key_reused(exc) from None
        if existing is not None:
            return await _answer(services, response, existing, 200, wait)
    # Auth and the rate limit ran as dependencies; capacity is the last check that needs no body.
    await run_in_threadpool(_check_backpressure, services, tenant)
    submission = await body.read(request, services)
    submission = await run_in_threadpool(resolve_library_styles, services, tenant, submission)
    job = submission.job(new_job_id(), tenant)
    context = current_context()
    job.request_id = context.request_id if context else None
    stored, created = await run_in_threadpool(
        _store_and_submit, services, job, submission, idempotency_key, fingerprint
    )
    bind(job_id=stored.id)
    if created:
        services.metrics.jobs_submitted.inc()
        log.info("job %s queued for tenant %s", stored.id, tenant)
    return await _answer(services, response, stored, 202 if created else 200, wait)


async def _answer(services: Services, response: Response, job: Job, status: int, wait: int | None) -> TransferJob:
    response.headers["Location"] = f"/v1/transfers/{job.id}"
    if wait is not None:
        job = await wait_until_terminal(services, job, wait)
        response.headers["Preference-Applied"] = f"wait={wait}"
        if job.terminal:
            status = 200  # the answer is the finished job, not an acceptance for later (RFC 7240 wait)
    response.status_code = status
    return await run_in_threadpool(job_resource, job, services)


@router.get(
    "",
    response_model=TransferList,
    summary="List your transfer jobs",
    responses=error_responses(*ERRORS, InvalidCursor),
)
def list_transfers(
    tenant: TenantDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size.")] = 20,
    # The pattern is declared, not enforced by FastAPI: the store's own check answers with `invalid_cursor`.
    cursor: Annotated[str | None, Query(
        max_length=200, json_schema_extra={"pattern": CURSOR_PATTERN}, description="`next_cursor` of the previous page."
    )] = None,
) -> TransferList:
    """The caller's jobs, newest first, one page at a time."""
    try:
        jobs, next_cursor = services.jobs.list_for_tenant(tenant, limit, cursor)
    except ValueError as exc:
        # The store's message already starts with "cursor: ".
        raise InvalidCursor(str(exc), field="cursor") from None
    return TransferList(items=[job_resource(job, services) for job in jobs], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=TransferJob,
    summary="Get a transfer job",
    responses=error_responses(*ERRORS, NotFound),
)
async def get_transfer(
    job_id: str, response: Response, tenant: TenantDep, services: ServicesDep, prefer: PreferHeader = None
) -> TransferJob:
    """Status, progress, queue position, and the result URL once succeeded.

    With `Prefer: wait=N` (N ≤ 60) the answer waits until the job is terminal or N seconds pass.
    """
    job = await run_in_threadpool(owned_job, services, tenant, job_id)
    wait = preferred_wait(prefer)
    if wait is not None:
        job = await wait_until_terminal(services, job, wait)
        response.headers["Preference-Applied"] = f"wait={wait}"
    return await run_in_threadpool(job_resource, job, services)


@router.post(
    "/{job_id}/cancel",
    response_model=TransferJob,
    summary="Cancel a transfer job",
    responses=error_responses(*ERRORS, NotFound, JobFinished),
)
def cancel_transfer(job_id: str, tenant: TenantDep, services: ServicesDep) -> TransferJob:
    """A queued job is canceled at once and never runs; a running job stops at its next step."""
    job = owned_job(services, tenant, job_id)
    try:
        job = services.jobs.request_cancel(job.id)
    except JobConflict as exc:
        raise JobFinished(job_id=job_id, status=exc.status) from None
    except KeyError:
        raise NotFound(f"no transfer job {job_id!r}") from None
    resource = job_resource(job, services)
    if job.status == JobStatus.CANCELED and job.webhook_url and "completed" in job.webhook_events:
        # Canceled while queued: no worker will ever see it, so the terminal webhook leaves from here.
        services.webhooks.submit(job.webhook_url, resource.model_dump(mode="json"), event="completed")
    return resource
