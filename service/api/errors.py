"""The one error shape of the HTTP API, its catalogue of codes, and the handlers that produce it.

Every non-2xx answer is ``{"error": {"code": ..., "message": ..., "field": ...}}`` (``field``
only when one input is to blame), including FastAPI's own 404/405/validation errors. A fault
of ours is logged with its traceback and answered 500 ``internal_error``; a client's mistake
is always raised as one of the :class:`ApiError` types below and never gets there.

The catalogue: one exception type per code, carrying its HTTP status, a description (which
the OpenAPI ``responses`` of each route are derived from, :func:`error_responses`), its
message template and, where one input is always to blame, its ``field``. A new code is one
more subclass here; ``ham_client.error_codes`` is generated from :data:`CATALOGUE`
(``python -m service.api.errors > ham_client/error_codes.py``) and a test keeps them equal.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

log = logging.getLogger("ham.api")

# Every error code of the API, by code: filled in as the types below are defined.
CATALOGUE: dict[str, type[ApiError]] = {}


class ApiError(Exception):
    """A client-visible error: its type fixes the ``status``, the stable machine ``code`` and the
    message ``template``; an instance carries the human ``message`` and the ``field`` to blame.

    ``ApiError(detail, field=..., headers=..., **values)``: the message is ``template`` filled
    with ``detail``, ``field`` and ``values``.
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    description: ClassVar[str] = "A fault of ours; it is logged with the request id."
    template: ClassVar[str] = "{detail}"
    default_field: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code in CATALOGUE:
            raise TypeError(f"error code {cls.code!r} is already {CATALOGUE[cls.code].__name__}")
        CATALOGUE[cls.code] = cls

    def __init__(
        self,
        detail: str = "",
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        **values: Any,
    ) -> None:
        self.field = field if field is not None else self.default_field
        self.message = self.template.format(detail=detail, field=self.field, **values)
        super().__init__(self.message)
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        """This error as the API answers it."""
        return error_response(self.status, self.code, self.message, self.field, self.headers)


CATALOGUE[ApiError.code] = ApiError


# --- 400 ---------------------------------------------------------------------------------------


class InvalidMultipart(ApiError):
    status, code = 400, "invalid_multipart"
    description = "Malformed multipart body."
    template = "malformed multipart body: {detail}"


class InvalidJson(ApiError):
    status, code = 400, "invalid_json"
    description = "The body is not valid JSON."
    template = "the body is not valid JSON: {detail}"


# --- 401 / 403 / 404 / 405 / 409 --------------------------------------------------------------------


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"
    description = "Missing or invalid API key."


class InvalidSignature(ApiError):
    status, code = 403, "invalid_signature"
    description = "The download URL is invalid or has expired."
    template = "the download URL is invalid or has expired; fetch the job again"


class NotFound(ApiError):
    status, code = 404, "not_found"
    description = "No such resource (for this tenant)."


class StyleNotFound(ApiError):
    status, code = 404, "style_not_found"
    description = "A `style_id` names no style of this tenant."
    template = "no style {style_id!r}"
    default_field = "style_id"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"
    description = "The path does not take this method; `Allow` names those it takes."


class JobFinished(ApiError):
    status, code = 409, "job_finished"
    description = "The job already finished."
    template = "job {job_id} already finished ({status}); nothing to cancel"


class IdempotencyKeyReused(ApiError):
    status, code = 409, "idempotency_key_reused"
    description = ("This `Idempotency-Key` already created a job for a different request (other images, fields or "
                   "parameters): a new request needs a new key.")
    template = ("Idempotency-Key {key!r} was already used for a different request (job {job_id}); send a new key "
                "with a new request, or the same request to get that job back")
    default_field = "Idempotency-Key"


# --- 413 / 415 -----------------------------------------------------------------------------------


class RequestTooLarge(ApiError):
    status, code = 413, "request_too_large"
    description = "The request body is larger than the limit."


class UploadTooLarge(ApiError):
    status, code = 413, "upload_too_large"
    description = "An image (uploaded or fetched) larger than the byte limit."
    template = "{field}: {detail}"


class ImageTooLarge(ApiError):
    status, code = 413, "image_too_large"
    description = "An image with more pixels than the limit."
    template = "{field}: {detail}"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"
    description = "A body of a type this route does not read, or an image that is not PNG, JPEG or WebP."


# --- 422 -----------------------------------------------------------------------------------------


class InvalidRequest(ApiError):
    status, code = 422, "invalid_request"
    description = "The request does not have the declared shape (`field` names the input when one is to blame)."


class InvalidParameter(ApiError):
    status, code = 422, "invalid_parameter"
    description = "A parameter is out of range or of the wrong type; `field` names it."


class MissingField(ApiError):
    status, code = 422, "missing_field"
    description = "A required field is missing; `field` names it."
    template = "{field}: {detail}"


class UnknownField(ApiError):
    status, code = 422, "unknown_field"
    description = "A field this route does not know (a typo never runs with a default)."
    template = "unknown {where}field {name!r}; known: {known}"


class DuplicateField(ApiError):
    status, code = 422, "duplicate_field"
    description = "A form field given more than once."
    template = "form field {field!r} given more than once"


class InvalidField(ApiError):
    status, code = 422, "invalid_field"
    description = "A form field of the wrong kind (a file for text or text for a file) or too long."


class TooManyStyles(ApiError):
    status, code = 422, "too_many_styles"
    description = "More styles in one job than the server allows."
    template = "at most {limit} styles per job (style files and style_ids), got {count}"
    default_field = "style"


class InvalidIdempotencyKey(ApiError):
    status, code = 422, "invalid_idempotency_key"
    description = "An `Idempotency-Key` that is blank, too long or not printable ASCII."
    template = "Idempotency-Key must be 1..{limit} printable ASCII characters"
    default_field = "Idempotency-Key"


class InvalidCursor(ApiError):
    status, code = 422, "invalid_cursor"
    description = "A `cursor` that is not a `next_cursor` this API handed out."
    default_field = "cursor"


class WebhooksDisabled(ApiError):
    status, code = 422, "webhooks_disabled"
    description = "A webhook asked of a server without `HAM_WEBHOOK_SECRET`."
    template = "webhooks are disabled on this server (the operator must set HAM_WEBHOOK_SECRET)"
    default_field = "webhook_url"


class InvalidWebhookUrl(ApiError):
    status, code = 422, "invalid_webhook_url"
    description = "A `webhook_url` refused by the SSRF guard or too long."
    default_field = "webhook_url"


class InvalidImage(ApiError):
    status, code = 422, "invalid_image"
    description = "An image that is empty, truncated or corrupt."
    template = "{field}: {detail}"


class InvalidUrl(ApiError):
    status, code = 422, "invalid_url"
    description = "A `content_url`/`style_url` that is not an http(s) URL or a data: URI, or names a refused host."
    template = "{field}: {detail}"


class InvalidDataUri(ApiError):
    status, code = 422, "invalid_data_uri"
    description = "A data: URI that does not parse."
    template = "{field}: {detail}"


class FetchFailed(ApiError):
    status, code = 422, "fetch_failed"
    description = "A `content_url`/`style_url` that could not be fetched."
    template = "{field}: {detail}"


class UnknownModel(ApiError):
    status, code = 422, "unknown_model"
    description = "A `model` this deployment does not serve; the message lists the served ones (`GET /v1/models`)."
    default_field = "model"


# --- 429 / 503 -----------------------------------------------------------------------------------


class RateLimited(ApiError):
    status, code = 429, "rate_limited"
    description = "Rate limit reached; see `Retry-After`."
    template = "more than {limit} requests per minute for this API key; retry in {retry_after}s"


class TenantQueueFull(ApiError):
    status, code = 429, "tenant_queue_full"
    description = "You have as many queued jobs as allowed; see `Retry-After`."
    template = "you already have {limit} queued jobs; wait for some to start"


class ServiceQueueFull(ApiError):
    status, code = 429, "queue_full"
    description = "The service queue is full; see `Retry-After`."
    template = "the service queue is full; retry later"


class Unavailable(ApiError):
    status, code = 503, "unavailable"
    description = "Redis or storage unreachable; see `Retry-After`."


# Redis answers but refuses (ham_core.redis_client.refusal names why): an outage, not a bug.
# ``retry_after``: the Retry-After seconds; a full Redis needs an operator, so clients wait longer.


class _RedisRefusal:
    """What the refusals share (a mixin, so it adds no code of its own to the catalogue)."""

    status: ClassVar[int] = 503
    reason: ClassVar[str] = ""
    retry_after: ClassVar[int] = 5


class RedisFull(_RedisRefusal, ApiError):
    code, reason, retry_after = "redis_full", "full", 30
    description = "Redis is full (maxmemory) and refuses writes; reads still answer. See `Retry-After`."
    template = "the job store is full and refuses writes; retry later"


class RedisReadOnly(_RedisRefusal, ApiError):
    code, reason = "redis_readonly", "readonly"
    description = "Redis is a read-only replica (a failover is under way); see `Retry-After`."
    template = "the job store is read-only (a failover is under way); retry shortly"


class RedisLoading(_RedisRefusal, ApiError):
    code, reason = "redis_loading", "loading"
    description = "Redis is loading its data after a restart; see `Retry-After`."
    template = "the job store is loading its data after a restart; retry shortly"


class RedisMasterDown(_RedisRefusal, ApiError):
    code, reason = "redis_master_down", "master_down"
    description = "The Redis replica lost its primary; see `Retry-After`."
    template = "the job store lost its primary; retry shortly"


class RedisBusy(_RedisRefusal, ApiError):
    code, reason = "redis_busy", "busy"
    description = "Redis is busy running a script; see `Retry-After`."
    template = "the job store is busy running a script; retry shortly"


class RedisWritesStopped(_RedisRefusal, ApiError):
    code, reason, retry_after = "redis_writes_stopped", "writes_stopped", 30
    description = "Redis stopped accepting writes (it could not persist); see `Retry-After`."
    template = "the job store stopped accepting writes; retry later"


class RedisNoReplicas(_RedisRefusal, ApiError):
    code, reason = "redis_no_replicas", "no_replicas"
    description = ("Too few Redis replicas to acknowledge the write (the job may be stored: retry with the same "
                   "`Idempotency-Key`); see `Retry-After`.")  # fmt: skip
    template = "the job store has too few replicas to accept writes; retry shortly"


class ModelUnavailable(ApiError):
    status, code = 503, "model_unavailable"
    description = ("With `HAM_MODELS_REQUIRE_WORKER`: no worker of the `model` announced itself recently; "
                   "see `Retry-After`.")
    template = ("model: no worker of {model!r} announced itself recently; retry once its pool is up "
                "(GET /v1/models shows workers_online)")
    default_field = "model"


class NotReady(ApiError):
    status, code = 503, "not_ready"
    description = "`/readyz`: a dependency is unreachable; `checks` says which."


# Routing errors Starlette raises itself, by status (anything else it raises is a fault of ours).
_STARLETTE_ERRORS: dict[int, type[ApiError]] = {404: NotFound, 405: MethodNotAllowed}

# Every refusal: what any route that touches Redis may answer besides `unavailable`.
REDIS_REFUSALS = (RedisFull, RedisReadOnly, RedisLoading, RedisMasterDown, RedisBusy, RedisWritesStopped,
                  RedisNoReplicas)  # fmt: skip


def redis_refusal_error(reason: str) -> ApiError:
    """The 503 for a Redis refusal named ``reason`` (with its ``Retry-After``)."""
    for error in REDIS_REFUSALS:
        if error.reason == reason:
            return error(headers={"Retry-After": str(error.retry_after)})
    return Unavailable("the job queue is unavailable; retry shortly", headers={"Retry-After": "5"})


def error_responses(*errors: type[ApiError]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries of a route that may answer with ``errors``: one per
    status, its description naming each code."""
    by_status: dict[int, list[type[ApiError]]] = {}
    for error in errors:
        by_status.setdefault(error.status, []).append(error)
    return {
        status: {
            "model": ErrorResponse,
            "description": " ".join(f"`{error.code}`: {error.description}" for error in group),
        }
        for status, group in sorted(by_status.items())
    }


class ErrorDetail(BaseModel):
    """Why a request failed."""

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_parameter`.")
    message: str = Field(description="What went wrong and what is allowed.")
    field: str | None = Field(None, description="The input to blame, when there is one.")


class ErrorResponse(BaseModel):
    """Every non-2xx answer has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "invalid_parameter", "message": "alpha: must be in [0.0, 1.0], got 2.0",
                           "field": "alpha"}}
            ]
        }
    )

    error: ErrorDetail


def error_body(code: str, message: str, field: str | None = None) -> dict:
    """The JSON body of an error answer."""
    error: dict = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"error": error}


def error_response(
    status: int, code: str, message: str, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error answer in the API's one shape."""
    return JSONResponse(error_body(code, message, field), status_code=status, headers=dict(headers or {}))


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    error = _STARLETTE_ERRORS.get(status)
    if error is None:
        return await _unhandled(request, exc)
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    headers = dict(exc.headers or {})
    if status == 405:
        # Starlette names the methods of the first route on the path only; GET and POST on
        # /v1/transfers are two routes.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error(message, headers=headers).response()


def _allowed_methods(request: Request) -> list[str]:
    """The methods the API documents for this path (its OpenAPI document is exact)."""
    methods: set[str] = set()
    for path, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(path)[0].match(request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = loc[-1] if loc else None
    message = first.get("msg", "invalid request")
    if field:
        message = f"{field}: {message}"
    return InvalidRequest(message, field=field).response()


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError("internal server error; the fault is logged on our side").response()


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI can produce through the one JSON error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)


def client_codes_module() -> str:
    """The source of ``ham_client/error_codes.py``: one client exception type per code of :data:`CATALOGUE`."""
    errors = [error for _, error in sorted(CATALOGUE.items()) if error is not ApiError]
    lines = [
        '"""The API\'s error codes, one exception type each, which the client raises for an error answer.',
        "",
        "Generated from ``service.api.errors.CATALOGUE`` (``python -m service.api.errors >",
        "ham_client/error_codes.py``); a test keeps the two equal. ``internal_error`` is the plain",
        ":class:`~ham_client.errors.ApiError`.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from ham_client.errors import ApiError",
    ]
    for error in errors:
        doc = textwrap.wrap(f"{error.status} ``{error.code}``: {error.description}", 110)
        docstring = [f'    """{doc[0]}'] + [f"    {line}" for line in doc[1:]]
        docstring[-1] += '"""'
        lines += ["", "", f"class {error.__name__}(ApiError):", *docstring, "",
                  f"    status_code = {error.status}", f'    error_code = "{error.code}"']
    lines += ["", "", "# Every code the API answers with, to its type.",
              "ERRORS_BY_CODE: dict[str, type[ApiError]] = {"]
    lines += [f'    "{error.code}": {error.__name__},' for error in errors]
    lines += ["}", "", "", "def error_for(status: int, code: str, message: str, field: str | None = None) -> ApiError:",
              '    """The typed error of an error answer (the plain ApiError for a code this client does not know)."""',
              "    return ERRORS_BY_CODE.get(code, ApiError)(status, code, message, field)", ""]
    return "\n".join(lines)

