"""Prometheus metrics of the API process, on a registry per app (so tests can build many apps).

Request counters and latency are counted here by an ASGI middleware, labelled by the route
*template* (``/v1/transfers/{job_id}``, never the raw path: bounded cardinality; the
playground's static files are ``/playground/static/{path}``).

Latency is two histograms, so that a percentile of one cannot mislead: requests that are
*meant* to last — a long poll (``Prefer: wait=N``, N > 0) and an event stream (a
``text/event-stream`` answer) — go to ``ham_http_long_request_duration_seconds`` with a
``kind`` label (``wait``, ``stream``); every other request to
``ham_http_request_duration_seconds``, whose p95 is then the latency a short request sees. The queue
gauges and the finished-jobs counter describe shared state in Redis, so they are read from
Redis at scrape time by :class:`QueueCollector` and agree across API replicas.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.live import preferred_wait

log = logging.getLogger("ham.api")

UNMATCHED_ROUTE = "<unmatched>"
# Latency buckets for an API whose slow path is a multipart upload plus image decode.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Long polls wait up to 60 s; event streams last as long as the job (minutes on a CPU).
_LONG_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
SHORT, WAIT, STREAM = "short", "wait", "stream"


class QueueCollector(Collector):
    """Queue depth, oldest queued job's age and jobs finished by outcome, read from Redis per scrape.

    A scrape while Redis is down still succeeds: it reports ``ham_redis_up 0`` and omits the rest.
    """

    def __init__(
        self,
        queue_depth: Callable[[], int],
        oldest_queued_age: Callable[[], float | None],
        finished_by_outcome: Callable[[], Mapping[str, int]],
        redis_memory: Callable[[], tuple[int, int]] | None = None,
        per_model: Callable[[], list[Mapping[str, object]]] | None = None,
    ) -> None:
        # The catalogue (ham_core.models.catalogue): each served model's queue and live workers.
        self._per_model = per_model
        self._queue_depth = queue_depth
        self._oldest_queued_age = oldest_queued_age
        self._finished_by_outcome = finished_by_outcome
        self._redis_memory = redis_memory

    def describe(self) -> list[Metric]:
        # Registering must not touch Redis (the app is built before Redis may be up).
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ham_redis_up", "1 when the API reached Redis during this scrape.")
        try:
            depth = self._queue_depth()
            oldest = self._oldest_queued_age()
            finished = dict(self._finished_by_outcome())
            memory = self._redis_memory() if self._redis_memory is not None else None
            models = list(self._per_model()) if self._per_model is not None else []
        except Exception as exc:  # a scrape must not fail because Redis is down
            log.warning("metrics scrape could not read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        if memory is not None:
            # A full Redis (maxmemory, noeviction) refuses every write: alert before it gets there.
            yield GaugeMetricFamily("ham_redis_memory_used_bytes", "Memory Redis uses (INFO used_memory).",
                                    value=memory[0])
            yield GaugeMetricFamily("ham_redis_memory_max_bytes", "Redis maxmemory (0: no limit).", value=memory[1])
        yield GaugeMetricFamily("ham_queue_depth", "Jobs waiting in the queue.", value=depth)
        yield GaugeMetricFamily(
            "ham_oldest_queued_job_age_seconds",
            "Age of the oldest queued job (0 when the queue is empty).",
            value=oldest or 0.0,
        )
        counter = CounterMetricFamily(
            "ham_jobs_finished", "Jobs that reached a terminal state, by outcome.", labels=["outcome"]
        )
        for outcome in ("succeeded", "failed", "canceled"):
            counter.add_metric([outcome], finished.get(outcome, 0))
        yield counter
        yield from _model_families(models)


def _model_families(models: list[Mapping[str, object]]) -> Iterator[Metric]:
    """Per served model (label ``model``): its queue depth, its oldest queued job's age, its live workers."""
    depth = GaugeMetricFamily("ham_model_queue_depth", "Jobs waiting in the model's queue.", labels=["model"])
    oldest = GaugeMetricFamily(
        "ham_model_oldest_queued_job_age_seconds",
        "Age of the job next in line in the model's queue (0 when empty).", labels=["model"],
    )
    workers = GaugeMetricFamily(
        "ham_model_workers_online", "Workers that announced the model within three heartbeats.", labels=["model"]
    )
    for entry in models:
        name = str(entry["name"])
        depth.add_metric([name], float(entry["queue_depth"]))  # type: ignore[arg-type]
        oldest.add_metric([name], float(entry["oldest_queued_age"] or 0.0))  # type: ignore[arg-type]
        workers.add_metric([name], float(entry["workers_online"]))  # type: ignore[arg-type]
    yield from (depth, oldest, workers)


class ApiMetrics:
    """The API's own series plus the queue collector, on one registry."""

    def __init__(self, queue_collector: Collector | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "ham_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ham_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.long_latency = Histogram(
            "ham_http_long_request_duration_seconds",
            "Duration of requests meant to last: long polls (kind=wait) and event streams (kind=stream).",
            ["route", "method", "kind"],
            buckets=_LONG_BUCKETS,
            registry=self.registry,
        )
        self.jobs_submitted = Counter(
            "ham_jobs_submitted", "Transfer jobs accepted by this API process (idempotent replays excluded).",
            registry=self.registry,
        )
        self.storage_errors = Counter(
            "ham_storage_errors", "Requests answered 503 because object storage was unreachable.",
            registry=self.registry,
        )
        self.redis_unavailable = Counter(
            "ham_redis_unavailable",
            "Requests answered 503 because Redis was unreachable or refused, by reason (unreachable, full, "
            "readonly, loading, master_down, busy, writes_stopped, no_replicas).",
            ["reason"],
            registry=self.registry,
        )
        self.ratelimit_fail_open = Counter(
            "ham_ratelimit_fail_open",
            "Requests let through uncounted because Redis refused or missed the rate-limit write, by reason.",
            ["reason"],
            registry=self.registry,
        )
        if queue_collector is not None:
            self.registry.register(queue_collector)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float, kind: str = SHORT) -> None:
        """Count one finished request; ``kind`` (short, wait, stream) picks its latency histogram."""
        self.requests.labels(route, method, str(status)).inc()
        if kind == SHORT:
            self.latency.labels(route, method).observe(seconds)
        else:
            self.long_latency.labels(route, method, kind).observe(seconds)


class MetricsMiddleware:
    """Times every HTTP request and counts it by route template and final status."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before answering, the server answers 500
        # Matched before the app runs: a mount rewrites the scope's paths on the way in.
        route = _route_template(scope)
        kind = WAIT if _asks_to_wait(scope) else SHORT

        async def send_wrapper(message: Message) -> None:
            nonlocal status, kind
            if message["type"] == "http.response.start":
                status = message["status"]
                if _is_event_stream(message):
                    kind = STREAM
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The route the router settled on when it sets one (the pre-match is the same otherwise).
            matched = _template_of(scope.get("route")) or route
            self.metrics.observe(matched, scope["method"], status, time.perf_counter() - started, kind)


def _header(scope: Scope | Message, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _asks_to_wait(scope: Scope) -> bool:
    """A long poll: ``Prefer: wait=N`` with N > 0 (the routes that honour it wait up to N seconds)."""
    return bool(preferred_wait(_header(scope, b"prefer")))


def _is_event_stream(start: Message) -> bool:
    content_type = _header(start, b"content-type") or ""
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def _template_of(route: object) -> str | None:
    path = getattr(route, "path", None)
    if isinstance(route, Mount) and path:
        return f"{path}/{{path}}"
    return path


def _route_template(scope: Scope) -> str:
    """The matched route's path template. FastAPI's own routes (/docs, /openapi.json) leave no
    route in the scope and are matched here; unknown paths, and requests a middleware answers
    before routing (a 413 for an oversized body), share one label to bound cardinality."""
    route = scope.get("route")
    if route is None:
        for candidate in getattr(scope.get("app"), "routes", ()):
            if candidate.matches(scope)[0] != Match.NONE:
                route = candidate
                break
    return _template_of(route) or UNMATCHED_ROUTE
