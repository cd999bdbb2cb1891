"""``ham worker``: one process per GPU that loads the model once and serves transfer jobs.

Start-up order, and what each step is for:

1. Settings from ``HAM_*``; Redis, storage and the job store.
2. The metrics/probe server on ``settings.worker_metrics_port`` (``/readyz`` answers 503
   until step 5) and the maintenance thread: heartbeat, recovery of jobs left behind by
   dead workers (runs once right away), expiry sweep — see :mod:`worker.recovery`.
3. ``HamEngine.load(settings.model, device=settings.device, dtype=settings.dtype)`` — once,
   with the shared feature store on the job storage (``features/``) unless
   ``HAM_FEATURE_STORE`` is false: a style or content any worker computed is warm on all.
4. The webhook dispatcher (when ``HAM_WEBHOOK_SECRET`` is set).
5. Ready: ``/readyz`` turns 200 and ``--ready-file`` (if given) is written. Kubernetes
   probes either; neither exists before the model is loaded.
6. An RQ ``SimpleWorker`` (JSON serializer) on ``settings.queue_name``. It runs each job
   in this process — no fork per job, so CUDA state stays valid.

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
import uuid
from pathlib import Path

from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from service.core.config import Settings
from service.core.feature_store import StorageFeatureStore
from service.core.jobs import JobStore
from service.core.storage import open_storage
from service.core.styles import StyleStore
from worker.metrics import MetricsServer, WorkerMetrics
from worker.recovery import Maintenance
from worker.task import TransferRunner, install_runner

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
        "--metrics-host", default="0.0.0.0", help="Address of /metrics, /healthz, /readyz (default 0.0.0.0)."
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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    name = args.name or default_worker_name()
    # RQ's idle BLPOP blocks up to worker_ttl - 15 s (worker_ttl below). redis-py's default socket timeout is
    # 5 s and RQ raises it only for connections opened after SimpleWorker() (the webhook and maintenance
    # threads open theirs earlier), so without this the worker quits idle after 5 s on "Redis connection timeout".
    redis = Redis.from_url(settings.redis_url, socket_timeout=max(60, 6 * settings.worker_heartbeat) + 10)
    storage = open_storage(settings)
    store = JobStore(redis, settings)
    metrics = WorkerMetrics()
    server = None
    if settings.worker_metrics_port:
        server = MetricsServer(metrics, args.metrics_host, settings.worker_metrics_port)
        server.start()
        log.info("worker %s: metrics and probes on %s:%d", name, args.metrics_host, server.port)
    webhooks = _webhook_dispatcher(settings, redis)
    maintenance = Maintenance(store, storage, settings, name, metrics, webhooks)
    try:
        maintenance.start()
        log.info("worker %s: loading model %r on %s", name, settings.model, settings.device or "auto")
        from ham_engine.engine import HamEngine  # torch: imported once the cheap checks passed

        # The fleet-wide second tier behind each engine's in-process caches: features/ on the job storage.
        features = StorageFeatureStore(storage) if settings.feature_store else None
        engine = HamEngine.load(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            feature_store=features,
            max_styles=settings.max_styles_per_job,
        )
        metrics.feature_store = features
        if features is not None:
            log.info("worker %s: model fingerprint %s (checked on every stored feature)", name, engine.fingerprint())
        model = engine.model
        log.info("worker %s: model loaded (%s, %s)", name, model.device, str(model.dtype).removeprefix("torch."))
        runner = TransferRunner(engine, store, storage, settings, name, metrics, webhooks, StyleStore(redis))
        install_runner(runner)
        maintenance.current_job = lambda: runner.current_job
        worker = SimpleWorker(
            [store.queue],
            connection=redis,
            name=name,
            serializer=JSONSerializer,
            # RQ's idle BLPOP wakes up this often to refresh its own registration.
            worker_ttl=max(60, 6 * settings.worker_heartbeat),
        )
        _set_ready(server, args.ready_file, True)
        log.info("worker %s: ready, serving queue %r", name, settings.queue_name)
        worker.work(burst=args.burst, max_jobs=args.max_jobs, logging_level=settings.log_level.upper())
        log.info("worker %s: stopped", name)
        return 0
    finally:
        _set_ready(server, args.ready_file, False)
        install_runner(None)
        maintenance.stop()
        if webhooks is not None:
            webhooks.stop()
        if server is not None:
            server.stop()


def _webhook_dispatcher(settings: Settings, redis: Redis):  # -> WebhookDispatcher | None
    if not settings.webhook_secret:
        log.info("webhooks off (HAM_WEBHOOK_SECRET is empty)")
        return None
    from service.core.webhooks import WebhookDispatcher

    dispatcher = WebhookDispatcher(settings, redis)
    dispatcher.start()
    return dispatcher


def _set_ready(server: MetricsServer | None, ready_file: Path | None, ready: bool) -> None:
    if server is not None:
        server.set_ready(ready)
    if ready_file is None:
        return
    if ready:
        ready_file.parent.mkdir(parents=True, exist_ok=True)
        ready_file.write_text(f"{os.getpid()}\n")
    else:
        ready_file.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
