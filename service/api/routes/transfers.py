"""``/v1/transfers``: submit, read, list and cancel transfer jobs.

The handlers translate HTTP to the job store and back. A submission is refused as cheaply as
possible first (auth, rate limit, queue capacity: before the body is read), then validated in
full (form shape, parameters, style reference, idempotency key, webhook URL, both images)
before anything is written; then the normalised inputs go to storage and the job to the queue.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ham_engine.params import CLIENT_PARAMS, ParamError, TransferParams, check_style_reference
from service.api.deps import Services, current_tenant, get_services
from service.api.errors import ApiError
from service.api.schemas import ErrorResponse, TransferForm, TransferJob, TransferList
from service.api.uploads import read_upload
from service.core.config import Settings
from service.core.jobs import (
    Job,
    JobConflict,
    JobStatus,
    QueueFull,
    content_key,
    extra_style_key,
    new_job_id,
    style_key,
)
from service.core.resource import job_resource as public_job
from service.core.webhooks import check_webhook_url

log = logging.getLogger("ham.api")

router = APIRouter(prefix="/v1/transfers", tags=["transfers"])

PARAM_FIELDS = CLIENT_PARAMS
FILE_FIELDS = ("content", "style")
TEXT_FIELDS = ("style_prompt", "style_id", "webhook_url")
# May be given several times: the job then carries several styles, in the order given.
STYLE_FIELDS = ("style", "style_id")
KNOWN_FIELDS = frozenset(PARAM_FIELDS) | frozenset(FILE_FIELDS) | frozenset(TEXT_FIELDS)

MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_WEBHOOK_URL_CHARS = 2048
_IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]+")
# ASCII only: Python's int()/float() also accept other scripts' digits ("٤", fullwidth "４") and
# underscores ("1_0" is 10.0), none of which a client means as a number.
_INT = re.compile(r"[+-]?[0-9]{1,20}")
_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
# Job ids are what JobStore issues; anything else cannot exist, so it is a 404 without a lookup.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    429: {"model": ErrorResponse, "description": "Rate limit or queue limit reached; see `Retry-After`."},
    422: {"model": ErrorResponse, "description": "A parameter is invalid; `field` names it."},
    503: {"model": ErrorResponse, "description": "Redis or storage unreachable; see `Retry-After`."},
}

_SUBMIT_ERRORS = {
    **_ERRORS,
    200: {"model": TransferJob, "description": "Idempotent replay: the job this `Idempotency-Key` already created."},
    400: {"model": ErrorResponse, "description": "Malformed multipart body."},
    413: {"model": ErrorResponse, "description": "Upload larger than the limit, or image with too many pixels."},
    404: {"model": ErrorResponse, "description": "A `style_id` names no style of yours."},
    415: {"model": ErrorResponse, "description": "Not multipart/form-data, or an image that is not PNG/JPEG/WebP."},
    422: {
        "model": ErrorResponse,
        "description": "A field is missing, unknown or out of range (`field` names it), or an image is corrupt.",
    },
}


def job_resource(job: Job, services: Services) -> TransferJob:
    """The public view of a job record, with its live queue position and a fresh result URL."""
    queue_position = services.jobs.queue_position(job.id) if job.status == JobStatus.QUEUED else None
    return public_job(job, services.storage, services.settings.url_ttl, queue_position)


def _owned_job(services: Services, tenant: str, job_id: str) -> Job:
    # Another tenant's job is indistinguishable from a missing one: never confirm existence.
    job = services.jobs.get(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or job.tenant != tenant:
        # Truncated: the id is client input, and a 5000-character path should not come back in full.
        raise ApiError(404, "not_found", f"no transfer job {job_id[:80]!r}")
    return job


# --- parsing the multipart form ---------------------------------------------------------------


def _coerce(name: str, kind: type, raw: str) -> Any:
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ParamError(name, f"must be true or false, got {raw[:40]!r}")
    if kind is int:
        if not _INT.fullmatch(text):
            raise ParamError(name, f"must be an integer, got {raw[:40]!r}")
        return int(text)
    # nan/inf parse here so that the range check names them ("must be in [0.0, 1.0], got nan").
    if not _FLOAT.fullmatch(text):
        raise ParamError(name, f"must be a number, got {raw[:40]!r}")
    return float(text)


def _form_fields(form: FormData) -> dict[str, str | UploadFile]:
    """One value per known field; unknown and repeated fields are refused."""
    values: dict[str, str | UploadFile] = {}
    for name, value in form.multi_items():
        if name not in KNOWN_FIELDS:
            raise ApiError(
                422, "unknown_field", f"unknown form field {name[:80]!r}; known: {', '.join(sorted(KNOWN_FIELDS))}",
                field=name[:80],
            )
        if name in values and name not in STYLE_FIELDS:
            raise ApiError(422, "duplicate_field", f"form field {name!r} given more than once", field=name)
        # An empty text value means "not given" (what HTML forms and Swagger UI send for blanks).
        if isinstance(value, str) and value.strip() == "":
            continue
        if isinstance(value, UploadFile) and name in FILE_FIELDS and not value.filename and value.size == 0:
            continue
        values.setdefault(name, value)
    return values


def _style_fields(form: FormData, limit: int) -> list[tuple[str, str | UploadFile]]:
    """The ``style`` files and ``style_id``s, in the order given (blanks skipped); 422 above ``limit``."""
    refs: list[tuple[str, str | UploadFile]] = []
    for name, value in form.multi_items():
        if name not in STYLE_FIELDS:
            continue
        if isinstance(value, str) and value.strip() == "":
            continue
        if isinstance(value, UploadFile) and not value.filename and value.size == 0:
            continue
        refs.append((name, value))
    if len(refs) > limit:
        raise ApiError(
            422, "too_many_styles", f"at most {limit} styles per job (style files and style_ids), got {len(refs)}",
            field="style",
        )
    return refs


def _text(values: dict[str, str | UploadFile], name: str) -> str | None:
    value = values.get(name)
    if value is None or isinstance(value, str):
        return value
    raise ApiError(422, "invalid_field", f"{name} must be a text field, not a file", field=name)


def _parse_params(values: dict[str, str | UploadFile]) -> TransferParams:
    given: dict[str, Any] = {}
    for name, kind in PARAM_FIELDS.items():
        raw = _text(values, name)
        if raw is not None:
            given[name] = _coerce(name, kind, raw)
    return TransferParams(**given)


def _check_idempotency_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not key.strip() or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ApiError(
            422,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters",
            field="Idempotency-Key",
        )
    return key


async def _check_webhook(services: Services, url: str | None) -> str | None:
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


async def _read_upload(services: Services, values: dict[str, str | UploadFile], name: str) -> bytes | None:
    """The normalised PNG of an uploaded image, or None when the field is absent."""
    upload = values.get(name)
    return None if upload is None else await read_upload(upload, name, services.settings)


async def _parse_form(request: Request, settings: Settings) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send the transfer as multipart/form-data")
    styles = settings.max_styles_per_job
    try:
        return await request.form(max_files=len(FILE_FIELDS) + styles + 2, max_fields=len(KNOWN_FIELDS) + styles + 8,
                                  max_part_size=MAX_TEXT_FIELD_BYTES)
    except StarletteHTTPException as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc.detail}") from None


def _queue_full(settings: Settings, scope: str) -> ApiError:
    if scope == "tenant":
        return ApiError(
            429, "tenant_queue_full",
            f"you already have {settings.max_queued_per_tenant} queued jobs; wait for some to start",
            headers={"Retry-After": "10"},
        )
    return ApiError(429, "queue_full", "the service queue is full; retry later", headers={"Retry-After": "30"})


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


async def _library_and_uploaded_styles(
    services: Services, tenant: str, job_id: str, refs: list[tuple[str, str | UploadFile]]
) -> tuple[list[tuple[str, bytes]], list[dict[str, Any]]]:
    """Uploads to store and the job's ``styles`` for a job naming library styles or several images."""
    uploads: list[tuple[str, bytes]] = []
    styles: list[dict[str, Any]] = []
    for index, (name, value) in enumerate(refs):
        if name == "style_id":
            if not isinstance(value, str):
                raise ApiError(422, "invalid_field", "style_id must be a text field, not a file", field="style_id")
            record = await run_in_threadpool(services.styles.get, tenant, value.strip())
            if record is None:
                raise ApiError(404, "style_not_found", f"no style {value.strip()[:80]!r}", field="style_id")
            styles.append({"key": record.image_key, "prompt": record.style_prompt, "style_id": record.id})
            continue
        png = await _read_upload(services, {"style": value}, "style")
        key = style_key(job_id) if not uploads else extra_style_key(job_id, index)
        uploads.append((key, png))
        styles.append({"key": key, "prompt": None, "style_id": None})
    return uploads, styles


def _store_and_submit(
    services: Services, job: Job, content_png: bytes, uploads: list[tuple[str, bytes]], idempotency_key: str | None
) -> tuple[Job, bool]:
    written: list[str] = []
    try:
        services.storage.put(content_key(job.id), content_png, "image/png")
        written.append(content_key(job.id))
        for key, png in uploads:
            services.storage.put(key, png, "image/png")
            written.append(key)
        settings = services.settings
        stored, created = services.jobs.submit(
            job, idempotency_key, settings.max_queued_per_tenant, settings.max_queue_length
        )
    except QueueFull as exc:
        _delete_quietly(services, written)
        raise _queue_full(services.settings, exc.scope) from None
    except BaseException:
        _delete_quietly(services, written)
        raise
    if not created:
        # Idempotent replay: the existing job has its own inputs; ours are orphans.
        _delete_quietly(services, written)
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
            "content": {"multipart/form-data": {"schema": TransferForm.model_json_schema()}},
        }
    },
)
async def create_transfer(
    request: Request,
    response: Response,
    tenant: str = Depends(current_tenant),
    services: Services = Depends(get_services),
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        description="Retry-safe submission: the same key (per tenant) returns the same job, enqueued once.",
        examples=["order-1234-attempt"],
    ),
) -> TransferJob:
    """Queue a HAM transfer of `content` into the style of `style` and/or `style_prompt`.

    Answers 202 with the job resource and its `Location`; poll it until `status` is terminal.
    """
    idempotency_key = _check_idempotency_key(idempotency_key)
    if idempotency_key is not None:
        # A retry of a submit that went through gets its job back before limits or uploads are looked at.
        existing = await run_in_threadpool(services.jobs.find_by_idempotency_key, tenant, idempotency_key)
        if existing is not None:
            response.status_code = 200
            response.headers["Location"] = f"/v1/transfers/{existing.id}"
            return await run_in_threadpool(job_resource, existing, services)
    # Auth and the rate limit ran as dependencies; capacity is the last check that needs no body.
    await run_in_threadpool(_check_backpressure, services, tenant)
    form = await _parse_form(request, services.settings)
    job_id = new_job_id()
    try:
        values = _form_fields(form)
        refs = _style_fields(form, services.settings.max_styles_per_job)
        one_upload = len(refs) <= 1 and all(name == "style" for name, _ in refs)
        try:
            params = _parse_params(values)
            if one_upload:
                style_prompt = check_style_reference(values.get("style") is not None, _text(values, "style_prompt"))
            elif _text(values, "style_prompt") is not None:
                raise ParamError(
                    "style_prompt",
                    "with a style_id or several styles, give each its prompt through the style library",
                )
        except ParamError as exc:
            raise ApiError(422, "invalid_parameter", str(exc), field=exc.field) from None
        if values.get("content") is None:
            raise ApiError(422, "missing_field", "content: the content image is required", field="content")
        webhook_url = await _check_webhook(services, _text(values, "webhook_url"))
        content_png = await _read_upload(services, values, "content")
        if one_upload:
            style_png = await _read_upload(services, values, "style")
            uploads = [(style_key(job_id), style_png)] if style_png is not None else []
            styles = None
        else:
            style_prompt = None
            uploads, styles = await _library_and_uploaded_styles(services, tenant, job_id, refs)
    finally:
        await form.close()

    job = Job(
        id=job_id,
        tenant=tenant,
        params=params.to_dict(),
        style_prompt=style_prompt,
        has_style=bool(uploads) or any(s["key"] for s in styles or []),
        webhook_url=webhook_url,
        styles=styles,
    )
    stored, created = await run_in_threadpool(
        _store_and_submit, services, job, content_png, uploads, idempotency_key
    )
    if created:
        services.metrics.jobs_submitted.inc()
        log.info("job %s queued for tenant %s", stored.id, tenant)
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/transfers/{stored.id}"
    return await run_in_threadpool(job_resource, stored, services)


@router.get(
    "",
    response_model=TransferList,
    summary="List your transfer jobs",
    responses={**_ERRORS, 422: {"model": ErrorResponse, "description": "`limit` out of 1..100 or a bad `cursor`."}},
)
def list_transfers(
    limit: int = Query(20, ge=1, le=100, description="Page size."),
    cursor: str | None = Query(None, max_length=200, description="`next_cursor` of the previous page."),
    tenant: str = Depends(current_tenant),
    services: Services = Depends(get_services),
) -> TransferList:
    """The caller's jobs, newest first, one page at a time."""
    try:
        jobs, next_cursor = services.jobs.list_for_tenant(tenant, limit, cursor)
    except ValueError as exc:
        # The store's message already starts with "cursor: ".
        raise ApiError(422, "invalid_cursor", str(exc), field="cursor") from None
    return TransferList(items=[job_resource(job, services) for job in jobs], next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=TransferJob,
    summary="Get a transfer job",
    responses={**_ERRORS, 404: {"model": ErrorResponse, "description": "No such job for this tenant."}},
)
def get_transfer(
    job_id: str, tenant: str = Depends(current_tenant), services: Services = Depends(get_services)
) -> TransferJob:
    """Status, progress, queue position, and the result URL once succeeded."""
    return job_resource(_owned_job(services, tenant, job_id), services)


@router.post(
    "/{job_id}/cancel",
    response_model=TransferJob,
    summary="Cancel a transfer job",
    responses={
        **_ERRORS,
        404: {"model": ErrorResponse, "description": "No such job for this tenant."},
        409: {"model": ErrorResponse, "description": "The job already finished."},
    },
)
def cancel_transfer(
    job_id: str, tenant: str = Depends(current_tenant), services: Services = Depends(get_services)
) -> TransferJob:
    """A queued job is canceled at once and never runs; a running job stops at its next step."""
    job = _owned_job(services, tenant, job_id)
    try:
        job = services.jobs.request_cancel(job.id)
    except JobConflict as exc:
        message = f"job {job_id} already finished ({exc.status}); nothing to cancel"
        raise ApiError(409, "job_finished", message) from None
    except KeyError:
        raise ApiError(404, "not_found", f"no transfer job {job_id!r}") from None
    resource = job_resource(job, services)
    if job.status == JobStatus.CANCELED and job.webhook_url:
        # Canceled while queued: no worker will ever see it, so the terminal webhook leaves from here.
        services.webhooks.submit(job.webhook_url, resource.model_dump(mode="json"))
    return resource
