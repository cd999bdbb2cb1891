"""The worker's Prometheus metrics and its small HTTP endpoint (metrics + probes).

``ham worker`` serves, on ``settings.worker_metrics_port`` (0 turns it off):

- ``GET /metrics`` — Prometheus text format (the families below).
- ``GET /healthz`` — 200 while the process runs.
- ``GET /readyz`` — 200 once the model is loaded and the worker takes jobs, 503 before
  (and again while it shuts down). Kubernetes' readiness probe points here; ``--ready-file``
  offers the same signal as a file for exec probes.

Each :class:`WorkerMetrics` owns its registry, so tests can build several in one process.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ham_core.jobs import (
    ERROR_INPUTS_MISSING,
    ERROR_INTERNAL,
    ERROR_INVALID_INPUT,
    ERROR_NUMERICAL,
    ERROR_TIMEOUT,
)
from ham_engine.results import TransferStats

log = logging.getLogger("ham.worker")

# What TransferRunner.run reports ("lost": the job stopped being ours mid-run) and what recovery does.
JOB_OUTCOMES = ("succeeded", "failed", "canceled", "lost")
RECOVERY_ACTIONS = ("requeued", "failed", "canceled")
# The error codes a job run can end with (worker_lost is recovery's, counted by ham_worker_recovered_jobs).
RUN_ERROR_CODES = (ERROR_INVALID_INPUT, ERROR_INPUTS_MISSING, ERROR_TIMEOUT, ERROR_NUMERICAL, ERROR_INTERNAL)
# Jobs take from well under a second (tiny model, CPU) to minutes (SD at 1024 px).
_JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
# UNet batch rows of one job: about (2 inversions + 3..5 sampling rows) x steps, so 50 steps ≈ 300-350.
_ROW_BUCKETS = (10, 25, 50, 100, 200, 300, 400, 500, 750, 1000, 2000, 5000)


class WorkerMetrics:
    """Counters, gauges and histograms one worker process exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._define_job_metrics(self.registry)
        self._define_feature_metrics(self.registry)
        self._define_health_metrics(self.registry)
        self.feature_store: Any = None  # the worker's StorageFeatureStore, read when a job finishes
        self._bytes_written_seen = 0
        # Export every labelled series from the start at 0: rate() and increase() cannot see the
        # first event of a series that appears with it (the first recovery would never alert).
        for outcome in JOB_OUTCOMES:
            self.job_seconds.labels(outcome=outcome)
        for action in RECOVERY_ACTIONS:
            self.jobs_recovered.labels(action=action)
        for code in RUN_ERROR_CODES:
            self.job_failures.labels(code=code)

    def _define_job_metrics(self, r: CollectorRegistry) -> None:
        """Jobs: time by outcome, steps, UNet rows."""
        self.job_seconds = Histogram(
            "ham_worker_job_seconds",
            "Wall time of one job attempt on this worker, by outcome.",
            ["outcome"],
            buckets=_JOB_BUCKETS,
            registry=r,
        )
        self.steps = Counter("ham_worker_steps", "Sampling steps computed.", registry=r)
        self.steps_per_second = Gauge(
            "ham_worker_steps_per_second", "Sampling steps per second of the last finished job.", registry=r
        )
        self.unet_rows = Histogram(
            "ham_worker_unet_rows_per_job",
            "UNet batch rows one finished job computed (summed over its UNet calls).",
            buckets=_ROW_BUCKETS,
            registry=r,
        )

    def _define_feature_metrics(self, r: CollectorRegistry) -> None:
        """Re-used and computed features: caches, recorded teachers, the shared feature store."""
        self.style_cache_hits = Counter(
            "ham_worker_style_cache_hits", "Jobs whose style statistics came from the cache.", registry=r
        )
        self.style_cache_misses = Counter(
            "ham_worker_style_cache_misses", "Jobs that computed their style statistics.", registry=r
        )
        self.content_cache_hits = Counter(
            "ham_worker_content_cache_hits", "Jobs whose content trajectory came from the cache.", registry=r
        )
        self.content_cache_misses = Counter(
            "ham_worker_content_cache_misses", "Jobs that inverted their content image.", registry=r
        )
        self.teachers = Counter(
            "ham_worker_teachers",
            "Jobs by how each teacher served the student: live, recorded (during inversion) or cached.",
            ["teacher", "served"],
            registry=r,
        )
        self.record_fallbacks = Counter(
            "ham_worker_record_fallbacks",
            "Jobs whose teachers ran live because recording them would exceed HAM_RECORD_BYTES.",
            registry=r,
        )
        self.feature_hits = Counter(
            "ham_worker_feature_hits",
            "Inputs whose features were re-used, by kind (style, content) and tier (memory, store).",
            ["kind", "tier"],
            registry=r,
        )
        self.feature_misses = Counter(
            "ham_worker_feature_misses", "Inputs whose features were computed, by kind.", ["kind"], registry=r
        )
        self.feature_store_bytes = Gauge(
            "ham_worker_feature_store_bytes", "Bytes in the shared feature store at the last sweep.", registry=r
        )
        self.feature_store_bytes_written = Counter(
            "ham_worker_feature_store_written_bytes", "Bytes this worker wrote to the shared feature store.", registry=r
        )

    def _define_health_metrics(self, r: CollectorRegistry) -> None:
        """The worker itself: storage outages, device memory, jobs in progress and settled, readiness, model."""
        self.storage_errors = Counter(
            "ham_worker_storage_errors", "Outages of object storage this worker noticed (one per outage).",
            registry=r,
        )
        self.device_memory = Gauge(
            "ham_worker_device_memory_bytes",
            "Accelerator memory: 'allocated' now, 'peak' during the last job (0 on CPU).",
            ["kind"],
            registry=r,
        )
        self.jobs_in_progress = Gauge("ham_worker_jobs_in_progress", "Jobs running on this worker.", registry=r)
        self.jobs_recovered = Counter(
            "ham_worker_recovered_jobs",
            "Jobs of dead workers this worker settled, by action (requeued, failed, canceled).",
            ["action"],
            registry=r,
        )
        self.job_failures = Counter(
            "ham_worker_job_failures",
            "Jobs this worker failed, by error code (the job resource's error.code).",
            ["code"],
            registry=r,
        )
        self.ready = Gauge("ham_worker_ready", "1 once the model is loaded and jobs are taken.", registry=r)
        # 1 for the model this worker serves: join it to split any worker series by model, e.g.
        # `sum by (model) (rate(ham_worker_job_seconds_count[5m]) * on(instance) group_left(model) ham_worker_model)`.
        self.model = Gauge("ham_worker_model", "1, labelled with the model this worker serves and its family.",
                           ["model", "family"], registry=r)

    def observe_job(self, outcome: str, seconds: float, stats: TransferStats | None) -> None:
        """Record one finished job attempt and what its engine stats say (None: the engine did not finish)."""
        self.job_seconds.labels(outcome=outcome).observe(seconds)
        if stats is None:
            return
        sample_seconds = stats.seconds.get("sample")
        if stats.steps > 0:
            self.steps.inc(stats.steps)
            if sample_seconds is not None and sample_seconds > 0:
                self.steps_per_second.set(stats.steps / sample_seconds)
        if stats.unet_rows > 0:
            self.unet_rows.observe(stats.unet_rows)
        for style in stats.styles:
            if style.style_cache_hit is True:
                self.style_cache_hits.inc()
                self.feature_hits.labels(kind="style", tier=style.style_cache_tier or "memory").inc()
            elif style.style_cache_hit is False:
                self.style_cache_misses.inc()
                self.feature_misses.labels(kind="style").inc()
        if stats.content_cache_hit:
            self.content_cache_hits.inc()
            self.feature_hits.labels(kind="content", tier=stats.content_cache_tier or "memory").inc()
        else:
            self.content_cache_misses.inc()
            self.feature_misses.labels(kind="content").inc()
        for teacher, served in stats.teachers.items():
            if served is not None:
                self.teachers.labels(teacher=teacher, served=served).inc()
        if stats.record_fallback:
            self.record_fallbacks.inc()
        written = getattr(self.feature_store, "bytes_written", 0)
        if written > self._bytes_written_seen:
            self.feature_store_bytes_written.inc(written - self._bytes_written_seen)
            self._bytes_written_seen = written
        # The engine reports no accelerator peak on a CPU (None): the gauge says 0, as its help text does.
        self.device_memory.labels(kind="peak").set(stats.peak_memory_bytes or 0)

    def storage_changed(self, up: bool) -> None:
        """Count an outage of object storage when the worker's storage link first sees it."""
        if not up:
            self.storage_errors.inc()

    def set_allocated_memory(self, nbytes: int) -> None:
        self.device_memory.labels(kind="allocated").set(nbytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a background thread."""

    def __init__(self, metrics: WorkerMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self._ready = threading.Event()
        handler = _handler_for(self)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="worker-metrics", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def set_ready(self, ready: bool) -> None:
        (self._ready.set if ready else self._ready.clear)()
        self.metrics.ready.set(1 if ready else 0)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(server: MetricsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, server.metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                if server.ready:
                    self._send(200, b"ready\n")
                else:
                    self._send(503, b"loading\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Probes hit this every few seconds; access logs would drown the job logs.
            log.debug("metrics http: " + format, *args)

    return Handler
