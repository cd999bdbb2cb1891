"""Operator endpoints: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ham_core.models import catalogue
from ham_core.redis_client import UNREACHABLE, probe_writable, refusal
from service.api.deps import ServicesDep, operator_access
from service.api.errors import NotReady, error_body
from service.api.schemas import ErrorResponse, Health

log = logging.getLogger("ham.api")

router = APIRouter(tags=["operations"])

_health_access = operator_access("public_health")
_metrics_access = operator_access("public_metrics")


# HEAD too (load balancers and `curl -I` probe with it), kept out of the schema as GET's twin.
@router.head("/healthz", include_in_schema=False, dependencies=[Depends(_health_access)])
@router.get("/healthz", response_model=Health, summary="Liveness", dependencies=[Depends(_health_access)],
            responses={401: {"model": ErrorResponse}})
def healthz() -> Health:
    """200 whenever the process serves requests; checks nothing else."""
    return Health(status="ok")


@router.head("/readyz", include_in_schema=False, dependencies=[Depends(_health_access)])
@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness",
    dependencies=[Depends(_health_access)],
    responses={
        401: {"model": ErrorResponse},
        503: {"description": "Redis or storage unavailable; `checks` says which (and, for a Redis that refuses "
              "writes, why: `full`, `readonly`, `loading`, ...).", "content": {
            "application/json": {"example": {
                "status": "unavailable",
                "checks": {"redis": "ConnectionError: Error 111 connecting to 127.0.0.1:6379.", "storage": "ok"},
                "error": {"code": "not_ready", "message": "unavailable: redis"},
            }}}},
    },
)
def readyz(services: ServicesDep) -> Response:
    """200 when Redis accepts a write and the storage answers; else 503 naming the failed dependency.

    A Redis that answers but refuses writes is named by why: ``full``, ``readonly``, ``loading``,
    ``master_down``, ``busy``, ``writes_stopped`` or ``no_replicas``. A 200 also says which models
    answer: `models` maps each served model to its live worker count.
    """
    checks: dict[str, str] = {}
    for name, probe in (("redis", lambda: probe_writable(services.redis)), ("storage", services.storage.ping)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # any failure means "not ready"; the probe reports it rather than raising
            log.warning("readiness: %s unavailable: %s", name, exc)
            reason = refusal(exc) if name == "redis" else UNREACHABLE
            checks[name] = reason if reason != UNREACHABLE else f"{type(exc).__name__}: {exc}"[:300]
    failed = [name for name, state in checks.items() if state != "ok"]
    if failed:
        body = {"status": "unavailable", "checks": checks,
                **error_body(NotReady.code, f"unavailable: {', '.join(failed)}")}
        return JSONResponse(body, status_code=503)
    body = Health(status="ok", checks=checks).model_dump()
    # Which models answer (informational: the API is ready whether or not a pool is up).
    body["models"] = {entry["name"]: {"default": entry["default"], "workers_online": entry["workers_online"]}
                      for entry in catalogue(services.redis, services.settings)}
    return JSONResponse(body)


@router.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(_metrics_access)],
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(services: ServicesDep) -> Response:
    """Prometheus text exposition: requests, latency, jobs, queue depth, oldest queued age."""
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
