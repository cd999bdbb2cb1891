"""Liveness of workers, and recovery of the jobs a dead worker leaves behind.

Why not RQ's own abandoned-job handling: a ``SimpleWorker`` runs the job in its main
thread and so cannot heartbeat during it; RQ only declares the job abandoned when its
``StartedJobRegistry`` entry expires, i.e. ``job timeout + 60 s`` after the start (16 min
with the default 900 s timeout), and only notices during a maintenance pass (every 10
min). Too slow, and RQ's retry would know nothing of our job record.

Instead, every ``ham worker`` runs a :class:`Maintenance` thread that

- writes its heartbeat key ``ham:worker:{name}:alive`` every ``settings.worker_heartbeat``
  seconds with a TTL of ``HEARTBEAT_MISSES`` beats (a thread, so it keeps beating while
  the main thread is inside the engine; torch releases the GIL). The beat names the job
  the worker is running, so a live worker that lost track of a job (say, Redis went away
  while it tried to record the outcome) does not pin that job as running either;
- on start and after every beat, runs :func:`recover_lost_jobs`: a job marked running
  on a worker whose heartbeat key has expired, or whose latest beat (newer than the
  job's start) names another job, is re-queued (at the front) while
  ``attempts <= settings.job_max_retries``, else failed with ``worker_lost``; a job whose
  cancel was requested is canceled instead (``JobStore.recover``, one transaction);
- re-queues "orphans": jobs still queued in their record but no longer in RQ's list for
  ``HEARTBEAT_MISSES`` beats (a worker died between popping the id and starting it);
- once per sweep interval (one worker at a time, by a Redis lock) deletes stored inputs
  and results older than ``settings.result_ttl``, and keeps the shared feature store
  (``features/``) within ``settings.feature_ttl`` and ``settings.feature_store_bytes``.
  Style library images (``styles/``) live until their style is deleted.

While Redis is away the thread keeps trying every beat (the worker's Redis link logs the
outage once). Once Redis is back it recovers nothing for ``HEARTBEAT_MISSES`` beats: a
restarted Redis has dropped the heartbeat keys whose TTL ran out during the outage, and the
live workers need a beat or two to write theirs again — their jobs are not lost.

So recovery runs wherever a worker runs — and jobs only run where a worker runs. With
every worker dead, nothing is lost: the first worker to start recovers the jobs before
it takes new ones. A SIGKILLed worker's job is settled within about
``(HEARTBEAT_MISSES + 1) * worker_heartbeat`` seconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis import Redis

from ham_core.config import Settings
from ham_core.feature_store import sweep_features
from ham_core.jobs import JOB_FOLDERS, KEY_PREFIX, Job, JobStatus, JobStore
from ham_core.logs import log_context
from ham_core.redis_client import REDIS_UNAVAILABLE
from ham_core.storage import Storage, StorageError
from worker.connectivity import Link
from worker.notify import WebhookSink, notify_webhook

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

log = logging.getLogger("ham.worker")

# A worker is dead once this many heartbeats in a row are missing.
HEARTBEAT_MISSES = 3
# Longest pause between storage expiry sweeps.
MAX_SWEEP_INTERVAL = 3600
_ORPHANS_KEY = f"{KEY_PREFIX}:orphans"
_SWEEP_LOCK_KEY = f"{KEY_PREFIX}:sweep-lock"


def heartbeat_key(worker: str) -> str:
    """Redis key that exists while ``worker`` is alive."""
    return f"{KEY_PREFIX}:worker:{worker}:alive"


def beat_value(current_job: str | None, now: float | None = None) -> str:
    """What a heartbeat stores: when it was written and the job the worker is running."""
    return json.dumps({"t": time.time() if now is None else now, "job": current_job})


def still_running(redis: Redis, job: Job) -> bool:
    """Whether ``job``'s worker is alive and, as far as its latest beat says, still on this job."""
    if job.worker is None:
        return False
    raw = redis.get(heartbeat_key(job.worker))
    if raw is None:
        return False
    try:
        beat = json.loads(raw)
        beat_time, beat_job = float(beat["t"]), beat["job"]
    except (ValueError, KeyError, TypeError):
        return True  # a beat we cannot read still proves the worker is alive
    # A beat from before the start may predate the claim; only a later one can deny it.
    return beat_job == job.id or job.started_at is None or beat_time <= job.started_at


def recover_lost_jobs(
    store: JobStore,
    storage: Storage | None = None,
    webhooks: WebhookSink | None = None,
    metrics: WorkerMetrics | None = None,
) -> dict[str, str]:
    """Settle every running job whose worker is dead; returns ``{job_id: new status}``."""
    settings = store.settings
    settled: dict[str, str] = {}
    for job in store.running_jobs():
        if still_running(store.redis, job):
            continue
        after = store.recover(job.id, job.worker, settings.job_max_retries)
        if after is None:
            continue  # it moved on meanwhile
        settled[job.id] = after.status.value
        action = "requeued" if after.status == JobStatus.QUEUED else after.status.value
        with log_context(request_id=job.request_id, job_id=job.id, tenant=job.tenant):
            log.warning(
                "job %s: worker %s is gone (attempt %d of %d); %s",
                job.id,
                job.worker,
                job.attempts,
                settings.job_max_retries + 1,
                action,
            )
        if metrics:
            metrics.jobs_recovered.labels(action=action).inc()
        if after.terminal and storage is not None:
            for key in after.input_keys:
                storage.delete(key)
            notify_webhook(after, storage, settings, webhooks)
    return settled


def requeue_orphans(store: JobStore, grace: float, now: float | None = None) -> list[str]:
    """Re-enqueue queued jobs missing from RQ's list for longer than ``grace`` seconds."""
    now = time.time() if now is None else now
    redis = store.redis
    queued = {m.decode() if isinstance(m, bytes) else m for m in redis.zrange(store.queued_key(), 0, -1)}
    if not queued:
        redis.delete(_ORPHANS_KEY)
        return []
    # Each model's jobs wait in that model's list: look in every list a queued job belongs to.
    with redis.pipeline(transaction=False) as pipe:
        for job_id in queued:
            pipe.hget(store.job_key(job_id), "model")
        models = {m.decode() if isinstance(m, bytes) else m for m in pipe.execute()}
    in_queue: set[str] = set()
    for key in {store.queue_for(model or None).key for model in models} | {store.queue.key}:
        in_queue |= {m.decode() if isinstance(m, bytes) else m for m in redis.lrange(key, 0, -1)}
    missing = queued - in_queue
    seen = {k.decode(): float(v) for k, v in redis.hgetall(_ORPHANS_KEY).items()}
    requeued = []
    for job_id in missing:
        first = seen.get(job_id)
        if first is None:
            redis.hsetnx(_ORPHANS_KEY, job_id, repr(now))
        elif now - first > grace and store.requeue_queued(job_id):
            log.warning("job %s: queued but absent from the queue for %.0fs; re-enqueued", job_id, now - first)
            requeued.append(job_id)
    stale = set(seen) - missing
    if stale or requeued:
        redis.hdel(_ORPHANS_KEY, *(stale | set(requeued)))
    return requeued


class Maintenance:
    """The worker's background thread: heartbeat, recovery, orphan re-enqueue, expiry sweep."""

    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        settings: Settings,
        worker_name: str,
        metrics: WorkerMetrics | None = None,
        webhooks: WebhookSink | None = None,
        redis_link: Link | None = None,
    ) -> None:
        self.store = store
        self.storage = storage
        self.settings = settings
        self.worker_name = worker_name
        self.metrics = metrics
        self.webhooks = webhooks
        # Set by ``ham worker`` to the runner's current job; beats carry it.
        self.current_job: Callable[[], str | None] = lambda: None
        # Set by ``ham worker`` once the model is loaded: announce it on every beat.
        self.announce: Callable[[], None] | None = None
        self.sweep_interval = max(settings.worker_heartbeat, min(MAX_SWEEP_INTERVAL, settings.result_ttl // 10))
        self.redis_link = redis_link
        # After an outage, other live workers' heartbeat keys may have expired meanwhile (a restarted
        # Redis drops keys whose TTL ran out while it was down): no job is declared lost until they
        # had HEARTBEAT_MISSES beats to write them again.
        self._recover_after = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-maintenance", daemon=True)

    def beat(self) -> None:
        ttl = HEARTBEAT_MISSES * self.settings.worker_heartbeat
        self.store.redis.set(heartbeat_key(self.worker_name), beat_value(self.current_job()), ex=ttl)
        if self.announce is not None:  # the catalogue's live view (ham_core.models)
            self.announce()

    def run_once(self) -> None:
        """One pass: beat, recover, orphans, and the sweep when it is due."""
        self.beat()
        if time.monotonic() >= self._recover_after:
            recover_lost_jobs(self.store, self.storage, self.webhooks, self.metrics)
            requeue_orphans(self.store, grace=HEARTBEAT_MISSES * self.settings.worker_heartbeat)
        if self.store.redis.set(_SWEEP_LOCK_KEY, self.worker_name, nx=True, ex=self.sweep_interval):
            settings = self.settings
            # Job inputs and results expire with the job; the style library stays until deleted;
            # feature blobs have their own TTL and byte budget.
            try:
                deleted = self.storage.delete_expired(settings.result_ttl, prefixes=JOB_FOLDERS)
            except StorageError as exc:  # storage away: the next sweep (any worker's) catches up
                log.warning("expiry sweep skipped: %s", exc)
                return
            if deleted:
                log.info("expiry sweep deleted %d stored object(s) older than %ds", deleted, settings.result_ttl)
            try:
                swept = sweep_features(self.storage, settings.feature_ttl, settings.feature_store_bytes, time.time())
            except StorageError as exc:
                log.warning("feature sweep skipped: %s", exc)
                return
            if swept.expired or swept.evicted:
                log.info(
                    "feature sweep: %d expired, %d evicted over the %d-byte budget; %d bytes kept",
                    swept.expired,
                    swept.evicted,
                    settings.feature_store_bytes,
                    swept.bytes_kept,
                )
            if self.metrics:
                self.metrics.feature_store_bytes.set(swept.bytes_kept)

    def start(self) -> None:
        """Beat and recover once synchronously (before any job is taken), then keep going in the background."""
        try:
            self.run_once()
        except REDIS_UNAVAILABLE as exc:  # lost again already: the background loop carries on
            if self.redis_link is not None:
                self.redis_link.failed(exc)
        self._thread.start()

    def _loop(self) -> None:
        grace = HEARTBEAT_MISSES * self.settings.worker_heartbeat
        failed = False
        while not self._stop.wait(self.settings.worker_heartbeat):
            if failed:
                self._recover_after = time.monotonic() + grace
            try:
                self.run_once()
            except REDIS_UNAVAILABLE as exc:  # an outage: keep beating; the link logs it once
                failed = True
                if self.redis_link is not None:
                    self.redis_link.failed(exc)
                else:
                    log.warning("worker maintenance pass failed: Redis unreachable (%s)", exc)
                continue
            except Exception:
                log.warning("worker maintenance pass failed", exc_info=True)
            failed = False
            if self.redis_link is not None:
                self.redis_link.recovered()

    def stop(self) -> None:
        """Stop beating and remove the heartbeat (a clean exit leaves no job behind)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        try:
            self.store.redis.delete(heartbeat_key(self.worker_name))
        except Exception:
            log.warning("could not remove heartbeat key of %s", self.worker_name, exc_info=True)
