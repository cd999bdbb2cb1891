"""``ham worker``: one process per GPU that loads the model once and serves transfer jobs.

Start-up order, and what each step is for:

1. Settings from ``HAM_*``; Redis, storage and the job store.
2. The metrics/probe server on ``settings.worker_metrics_port`` (``/readyz`` answers 503
   until step 5) and the maintenance thread: heartbeat, recovery of jobs left behind by
   dead workers (runs once right away), expiry sweep — see :mod:`worker.recovery`.
3. ``HamEngine.load(settings.model, device=..., dtype=..., record_bytes=...)`` — once,
   with the shared feature store on the job storage (``features/``) unless
   ``HAM_FEATURE_STORE`` is false: a style or content any worker computed is warm on all.
4. The webhook dispatcher (when ``HAM_WEBHOOK_SECRET`` is set).
5. Ready: ``/readyz`` turns 200 and ``--ready-file`` (if given) is written. Kubernetes
   probes either; neither exists before the model is loaded, and both turn false while
   Redis is unreachable (``/healthz`` stays 200: the process is fine, it is waiting).
6. The model is announced to the catalogue (``GET /v1/models``; again on every heartbeat),
   and an RQ ``SimpleWorker`` (JSON serializer) takes jobs from its model's queue only
   (:func:`ham_core.models.queue_name`: ``HAM_QUEUE_NAME`` for the deployment's default
   model, ``<HAM_QUEUE_NAME>-<model>`` for the others), made to outlive
   Redis outages (:mod:`worker.rq_loop`). It runs each job in this process — no fork per
   job, so CUDA state stays valid.

Redis clients come from :func:`ham_core.redis_client.connect_redis` (bounded retries
with backoff and jitter). A worker started while Redis is away waits for it; one that loses
Redis between jobs waits and reconnects with backoff, logging once when Redis is lost and
once when it is back.

Signals: the first SIGTERM/SIGINT is a warm shutdown — the current job finishes, then
the worker exits 0 (Kubernetes: give ``terminationGracePeriodSeconds`` more than
``HAM_JOB_TIMEOUT``). A second one is a cold shutdown: the running job goes straight
back to the queue. SIGKILL leaves it to the other workers' recovery.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from redis import Redis
from rq.serializers import JSONSerializer

from ham_core.config import Settings
from ham_core.feature_store import StorageFeatureStore
from ham_core.jobs import JobStore
from ham_core.logs import configure_logging
from ham_core.models import Announcement, announce, withdraw
from ham_core.redis_client import connect_redis
from ham_core.storage import Storage, open_storage
from ham_core.styles import StyleStore
from worker.connectivity import redis_link_for, storage_link_for
from worker.metrics import MetricsServer, WorkerMetrics
from worker.recovery import Maintenance
from worker.rq_loop import ResilientWorker
from worker.task import TransferRunner, install_runner

if TYPE_CHECKING:
    from ham_engine.engine import HamEngine

log = logging.getLogger("ham.worker")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ham worker",
        description="Serve HAM transfer jobs from the Redis queue (settings come from HAM_* variables).",
    )
    parser.add_argument("--name", help="Worker name (unique among live workers); default host.pid.random.")
    parser.add_argument(
        "--ready-file", type=Path, help="Write this file once the model is loaded; removed on exit (exec probes)."
    )
    parser.add_argument(
        "--metrics-host", default=None,
        help="Address of /metrics, /healthz, /readyz (default HAM_WORKER_METRICS_HOST, 127.0.0.1: a standalone "
        "worker exposes nothing; the container image binds 0.0.0.0 for its probes and scrapes).",
    )
    parser.add_argument("--burst", action="store_true", help="Exit once the queue is empty (batch use, tests).")
    parser.add_argument("--max-jobs", type=int, default=None, help="Exit after this many jobs.")
    return parser


def default_worker_name() -> str:
    return f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"


def main(argv: list[str] | None = None) -> int:
    """Run a worker until SIGTERM (or, with ``--burst``, until the queue is empty). Returns the exit code."""
    args = build_parser().parse_args(argv)
    settings = Settings()
    configure_logging(settings, "worker")
    name = args.name or default_worker_name()
    # RQ's idle BLPOP blocks up to worker_ttl - 15 s (worker_ttl below): this client's replies may take that long.
    # (RQ raises the timeout itself only for connections opened after SimpleWorker(); the webhook and
    # maintenance threads open theirs earlier.)
    worker_ttl = max(60, 6 * settings.worker_heartbeat)
    redis = connect_redis(settings, socket_timeout=worker_ttl + 10)
    storage = open_storage(settings)
    store = JobStore(redis, settings)
    # Per-step progress and cancel polls: one quick reconnect, never a long retry inside the engine.
    progress_store = JobStore(connect_redis(settings, retries=1), settings)
    metrics = WorkerMetrics()
    server = _metrics_server(metrics, args.metrics_host or settings.worker_metrics_host, settings, name)
    readiness = Readiness(server, args.ready_file)
    redis_link = redis_link_for(store, settings, on_change=readiness.set_redis_up)
    storage_link = storage_link_for(storage, settings, on_change=metrics.storage_changed)
    webhooks = _webhook_dispatcher(settings, redis)
    maintenance = Maintenance(store, storage, settings, name, metrics, webhooks, redis_link=redis_link)
    try:
        redis_link.wait_until_up()  # started while Redis is away: wait for it (/healthz answers meanwhile)
        maintenance.start()
        engine = _load_engine(settings, storage, metrics, name)
        runner = TransferRunner(
            engine, store, storage, settings, name, metrics, webhooks, StyleStore(redis),
            progress_store=progress_store, redis_link=redis_link, storage_link=storage_link,
        )
        install_runner(runner)
        maintenance.current_job = lambda: runner.current_job
        queue = store.queue_for(settings.model)
        _announce_model(settings, engine, name, redis, metrics, maintenance)
        worker = ResilientWorker(
            [queue],
            connection=redis,
            name=name,
            serializer=JSONSerializer,
            # RQ's idle BLPOP wakes up this often to refresh its own registration.
            worker_ttl=worker_ttl,
            redis_link=redis_link,
        )
        readiness.set_model_loaded(True)
        log.info("worker %s: ready, serving model %r from queue %r", name, settings.model, queue.name)
        worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level=settings.log_level.upper())
        log.info("worker %s: stopped", name)
        return 0
    finally:
        readiness.set_model_loaded(False)
        install_runner(None)
        maintenance.stop()
        try:
            withdraw(redis, settings.model, name)  # leaves the catalogue's online count at once
        except Exception:
            log.warning("could not withdraw the model announcement of %s", name, exc_info=True)
        if webhooks is not None:
            webhooks.stop()
        if server is not None:
            server.stop()


def _metrics_server(metrics: WorkerMetrics, host: str, settings: Settings, name: str) -> MetricsServer | None:
    """The worker's /metrics, /healthz and /readyz, started; ``None`` when the port setting is 0."""
    if not settings.worker_metrics_port:
        return None
    server = MetricsServer(metrics, host, settings.worker_metrics_port)
    server.start()
    log.info("worker %s: metrics and probes on %s:%d", name, host, server.port)
    return server


def _load_engine(settings: Settings, storage: Storage, metrics: WorkerMetrics, name: str) -> HamEngine:
    """The worker's engine, loaded once; the shared feature store behind it when enabled."""
    log.info("worker %s: loading model %r on %s", name, settings.model, settings.device or "auto")
    from ham_engine.engine import HamEngine  # torch: imported once the cheap checks passed

    # The fleet-wide second tier behind each engine's in-process caches: features/ on the job storage.
    features = StorageFeatureStore(storage) if settings.feature_store else None
    engine = HamEngine.load(
        settings.model,
        device=settings.device,
        dtype=settings.dtype,
        record_bytes=settings.record_bytes,
        feature_store=features,
        max_styles=settings.max_styles_per_job,
    )
    metrics.feature_store = features
    if features is not None:
        log.info("worker %s: model fingerprint %s (checked on every stored feature)", name, engine.fingerprint())
    model = engine.model
    log.info("worker %s: model loaded (%s, %s)", name, model.device, str(model.dtype).removeprefix("torch."))
    return engine


def _announce_model(settings: Settings, engine: HamEngine, name: str, redis: Redis, metrics: WorkerMetrics,
                    maintenance: Maintenance) -> None:
    """Tell the catalogue (now and on every heartbeat) and the metrics which model this worker serves."""
    if settings.model not in settings.served_models:
        log.warning("worker %s: model %r is not in HAM_MODELS (%s): the API sends it no jobs",
                    name, settings.model, ",".join(settings.served_models))
    info = _announcement(settings, engine, name, with_fingerprint=bool(settings.feature_store))
    metrics.model.labels(model=settings.model, family=info.family).set(1)
    maintenance.announce = lambda: announce(redis, settings, info)
    announce(redis, settings, info)


def _announcement(settings: Settings, engine, worker: str, with_fingerprint: bool) -> Announcement:  # engine: HamEngine
    """What this worker tells the catalogue about its model."""
    from ham_engine.params import MAX_SIZE
    from ham_engine.tiny import PRESETS

    model = engine.model
    return Announcement(
        model=settings.model,
        family=model.family.name,
        default_size=model.family.default_size,
        max_size=MAX_SIZE,
        dtype=str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        random_preset=settings.model in PRESETS,
        # Already computed when the feature store is on (it reads every weight: not worth it otherwise).
        fingerprint=engine.fingerprint() if with_fingerprint else None,
        worker=worker,
    )


class Readiness:
    """``/readyz`` and ``--ready-file``: true while the model is loaded and Redis answers."""

    def __init__(self, server: MetricsServer | None, ready_file: Path | None) -> None:
        self.server = server
        self.ready_file = ready_file
        self.model_loaded = False
        self.redis_up = True
        self._lock = threading.Lock()

    def set_model_loaded(self, loaded: bool) -> None:
        with self._lock:
            self.model_loaded = loaded
            self._apply()

    def set_redis_up(self, up: bool) -> None:
        with self._lock:
            self.redis_up = up
            self._apply()

    def _apply(self) -> None:
        ready = self.model_loaded and self.redis_up
        if self.server is not None:
            self.server.set_ready(ready)
        if self.ready_file is None:
            return
        if ready:
            self.ready_file.parent.mkdir(parents=True, exist_ok=True)
            self.ready_file.write_text(f"{os.getpid()}\n")
        else:
            self.ready_file.unlink(missing_ok=True)


def _webhook_dispatcher(settings: Settings, redis: Redis):  # -> WebhookDispatcher | None
    if not settings.webhook_secret:
        log.info("webhooks off (HAM_WEBHOOK_SECRET is empty)")
        return None
    from ham_core.webhooks import WebhookDispatcher

    dispatcher = WebhookDispatcher(settings, redis)
    dispatcher.start()
    return dispatcher


if __name__ == "__main__":
    sys.exit(main())
