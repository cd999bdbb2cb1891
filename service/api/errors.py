"""The one error shape of the HTTP API and the handlers that produce it.

Every non-2xx answer is ``{"error": {"code": ..., "message": ..., "field": ...}}`` (``field``
only when one input is to blame), including FastAPI's own 404/405/validation errors. A fault
of ours is logged with its traceback and answered 500 ``internal_error``; a client's mistake
is always raised as an :class:`ApiError` (or a Starlette ``HTTPException``) and never gets there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

log = logging.getLogger("ham.api")

# Codes for the errors Starlette/FastAPI raise themselves (routing, methods).
_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


# Redis answering but refusing (service.core.redis_client.refusal's reasons): 503 code, message,
# Retry-After seconds. A full Redis needs an operator (or expiring keys), so clients wait longer.
_REDIS_REFUSALS = {
    "full": ("redis_full", "the job store is full and refuses writes; retry later", 30),
    "readonly": ("redis_readonly", "the job store is read-only (a failover is under way); retry shortly", 5),
    "loading": ("redis_loading", "the job store is loading its data after a restart; retry shortly", 5),
    "master_down": ("redis_master_down", "the job store lost its primary; retry shortly", 5),
    "busy": ("redis_busy", "the job store is busy running a script; retry shortly", 5),
    "writes_stopped": ("redis_writes_stopped", "the job store stopped accepting writes; retry later", 30),
    "no_replicas": ("redis_no_replicas", "the job store has too few replicas to accept writes; retry shortly", 5),
}


def redis_refusal_error(reason: str) -> tuple[str, str, int]:
    """``(code, message, retry_after)`` of the 503 for a Redis refusal named ``reason``."""
    return _REDIS_REFUSALS.get(reason, ("unavailable", "the job queue is unavailable; retry shortly", 5))


class ApiError(Exception):
    """A client-visible error: status, a stable machine ``code``, a human ``message``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})


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
    return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    code = _CODES_BY_STATUS.get(status, "error")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    headers = dict(exc.headers or {})
    if status == 405:
        # Starlette names the methods of the first route on the path only; GET and POST on
        # /v1/transfers are two routes.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(status, code, message, headers=headers)


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
    return error_response(422, "invalid_request", message, field)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error; the fault is logged on our side")


def install_error_handlers(app: FastAPI) -> None:
    """Route every error FastAPI can produce through the one JSON error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unhandled)
