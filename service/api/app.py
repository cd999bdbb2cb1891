"""The FastAPI application: ``create_app(settings)`` wires clients, middleware, errors and routes.

Run it with ``ham api`` (uvicorn, factory mode). This process never imports torch: it only
validates requests, writes inputs to storage and queues jobs for the workers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ham_core.config import Settings, get_settings
from ham_core.jobs import JobStore
from ham_core.models import catalogue
from ham_core.redis_client import (
    REDIS_UNAVAILABLE,
    UNREACHABLE,
    connect_async_redis,
    connect_redis,
    memory_usage,
    refusal,
)
from ham_core.storage import StorageError, open_storage
from ham_core.styles import StyleStore
from ham_core.webhooks import WebhookDispatcher
from service.api.deps import Services
from service.api.errors import RequestTooLarge, Unavailable, install_error_handlers, redis_refusal_error
from service.api.metrics import ApiMetrics, MetricsMiddleware, QueueCollector
from service.api.openapi import install_openapi, operation_id
from service.api.ratelimit import RateLimiter, RateLimitHeaders
from service.api.requestid import RequestIdMiddleware
from service.api.routes import api_router
from service.api.routes.docs import install_docs
from service.api.routes.playground import install_playground

log = logging.getLogger("ham.api")

# Room for the multipart framing and the text fields around the (at most two) image uploads.
_FORM_OVERHEAD_BYTES = 1024 * 1024

DESCRIPTION = """
HAM (CVPR 2026) training-free style transfer as a service.

1. `POST /v1/transfers` a `content` image with a `style` image and/or a `style_prompt` → `202` and a job
   (multipart uploads, or JSON with `content_url`/`style_url`: http(s) URLs or data: URIs).
2. Follow it: `GET /v1/transfers/{id}/events` (server-sent events), `GET /v1/transfers/{id}` with
   `Prefer: wait=N`, a webhook, or plain polls (`queued` → `running` with `progress` → `succeeded`).
3. Download `result_url` (in `output_format`; expiring: fetch the job again for a fresh one).

Authenticate with `Authorization: Bearer <API key>`. Every error is
`{"error": {"code": ..., "message": ..., "field": ...}}`.
"""


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was being read."""


class BodySizeLimit:
    """Refuses request bodies above ``limit`` bytes: by ``Content-Length`` before reading, else while reading.

    Without it a client could stream an unbounded body into the multipart parser's spool files.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    response = RequestTooLarge(self._message()).response()
                    await response(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"request body larger than {self.limit} bytes"


def _install_backend_handlers(app: FastAPI) -> None:
    """Redis or storage unreachable mid-request: 503, not a 500 (our dependency, not our bug)."""

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        reason = refusal(exc)
        request.app.state.services.metrics.redis_unavailable.labels(reason=reason).inc()
        if reason == UNREACHABLE:
            log.error("redis unreachable on %s %s: %s", request.method, request.url.path, exc)
            return Unavailable("the job queue is unreachable; retry shortly", headers={"Retry-After": "5"}).response()
        # Redis answers but refuses (full, read-only after a failover, loading, ...): an outage too.
        log.error("redis refused %s %s (%s): %s", request.method, request.url.path, reason, exc)
        return redis_refusal_error(reason).response()

    async def storage_down(request: Request, exc: Exception) -> JSONResponse:
        log.error("storage unreachable on %s %s: %s", request.method, request.url.path, exc)
        request.app.state.services.metrics.storage_errors.inc()
        return Unavailable("object storage is unreachable; retry shortly", headers={"Retry-After": "5"}).response()

    async def body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return RequestTooLarge(str(exc)).response()

    for error in REDIS_UNAVAILABLE:
        app.add_exception_handler(error, redis_down)
    app.add_exception_handler(StorageError, storage_down)
    app.add_exception_handler(BodyTooLarge, body_too_large)


def _queue_collector(jobs: JobStore) -> QueueCollector:
    return QueueCollector(
        queue_depth=jobs.queued_count,
        oldest_queued_age=jobs.oldest_queued_age,
        # Outcomes are counted by the job store's transitions (the worker finishes jobs, not the API).
        finished_by_outcome=jobs.finished_counts,
        redis_memory=lambda: memory_usage(jobs.redis),
        per_model=lambda: catalogue(jobs.redis, jobs.settings),
    )


def build_services(settings: Settings) -> Services:
    """The clients one app uses (connections open lazily, so an unreachable Redis shows in /readyz)."""
    redis = connect_redis(settings)
    jobs = JobStore(redis, settings)
    return Services(
        settings=settings,
        redis=redis,
        storage=open_storage(settings),
        jobs=jobs,
        styles=StyleStore(redis),
        # Its own client without retries: the limiter fails open at once when Redis refuses (deps.py).
        limiter=RateLimiter(connect_redis(settings, retries=0), settings.rate_limit_per_minute),
        metrics=ApiMetrics(_queue_collector(jobs)),
        webhooks=WebhookDispatcher(settings, redis),
        aredis=connect_async_redis(settings),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The HTTP API for ``settings`` (read from ``HAM_*`` environment variables when omitted)."""
    settings = settings or get_settings()
    services = build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_enabled:
            log.warning("HAM_API_KEYS is empty: authentication is OFF, every caller is the local tenant")
        yield
        await services.aredis.aclose()
        services.redis.close()

    app = FastAPI(
        title="HAM style transfer",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from bundled assets below, not from a CDN
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    app.state.services = services
    install_error_handlers(app)
    _install_backend_handlers(app)
    app.add_middleware(BodySizeLimit, limit=2 * settings.max_upload_bytes + _FORM_OVERHEAD_BYTES)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    app.add_middleware(RateLimitHeaders)  # every counted answer, errors included, says what is left
    app.add_middleware(RequestIdMiddleware)  # outermost: every line of a request carries its id
    app.include_router(api_router())
    install_openapi(app, settings)
    install_docs(app)
    install_playground(app)
    return app
