"""Job records, their transitions and the RQ queue in Redis: :class:`JobStore`.

The Redis layout is described in :mod:`ham_core.jobs`.

Every transition is one Lua script (:mod:`ham_core.job_scripts`) or a WATCH/MULTI
transaction where RQ's own enqueue must join it, so the API and any number of workers can race
safely. A worker's writes carry its run (:attr:`Job.run`) and are refused once another run owns
the job (:class:`JobFenced`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from redis import Redis, WatchError

from ham_core import job_scripts as scripts
from ham_core.config import Settings
from ham_core.idempotency import fingerprints_differ, idempotency_record
from ham_core.job_reads import JobReads
from ham_core.job_record import (
    ERROR_WORKER_LOST,
    POLL_CANCEL,
    POLL_FENCED,
    POLL_GO,
    IdempotencyConflict,
    Job,
    JobConflict,
    JobFenced,
    JobStatus,
    QueueFull,
    _pairs,
    _text,
    _token,
    events_channel,
)
from ham_core.job_recovery import Recovery, RecoveryAction, decide_recovery
from ham_core.redis_client import raise_outage_behind, wait_for_replicas

TASK_FUNCTION = "worker.task.run_transfer"
# RQ's hard time limit is a backstop behind the worker's own cooperative timeout.
RQ_TIMEOUT_MARGIN = 120


class JobStore(JobReads):
    """Job records, their transitions and the RQ queue, on one Redis connection (reads: :class:`JobReads`).

    The Redis client must be created with ``decode_responses=False`` (RQ needs bytes).
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        super().__init__(redis, settings)
        self._start = redis.register_script(scripts.START)
        self._progress = redis.register_script(scripts.PROGRESS)
        self._finish = redis.register_script(scripts.FINISH)
        self._cancel = redis.register_script(scripts.CANCEL)

    def _transition_keys(self, job_id: str, tenant: str, model: str | None = None) -> list[str]:
        return [
            self.job_key(job_id),
            self.queued_key(),
            self.queued_key(tenant),
            self.running_key,
            self.queue_for(model).key,
            self.finished_key,
        ]

    # --- creating --------------------------------------------------------------
    def submit(
        self,
        job: Job,
        idempotency_key: str | None = None,
        max_queued_per_tenant: int | None = None,
        max_queued: int | None = None,
        fingerprint: str | None = None,
    ) -> tuple[Job, bool]:
        """Store ``job`` and enqueue it, atomically. Returns ``(job, created)``.

        With limits, the queued counts are checked in the same transaction, so concurrent
        submits cannot overshoot them; over a limit raises :class:`QueueFull`.

        With an ``idempotency_key``, the first submit for ``(job.tenant, key)`` wins and
        every later one with the same ``fingerprint`` (the request's digest, see
        :mod:`ham_core.idempotency`) gets that first job back with ``created=False`` and
        nothing is enqueued again; a later one with another fingerprint raises
        :class:`IdempotencyConflict` (a key reused for a different request is a client bug, not
        a retry). The key expires ``settings.result_ttl`` after the first submit. The caller
        then owns the inputs it stored under the losing job id and should delete them.
        """
        if job.status != JobStatus.QUEUED:
            raise ValueError(f"a new job must be queued, got {job.status}")
        idem = None if idempotency_key is None else self.idempotency_key(job.tenant, idempotency_key)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if idem is not None:
                        # Claiming the key and storing the job are one transaction, so a
                        # key never points at a job that is not stored yet.
                        pipe.watch(idem)
                        existing_id, existing_print = idempotency_record(pipe.get(idem))
                        existing = self.get(existing_id) if existing_id else None
                        if existing is not None:
                            pipe.unwatch()
                            if fingerprints_differ(existing_print, fingerprint):
                                raise IdempotencyConflict(idempotency_key or "", existing.id)
                            return existing, False
                    self._check_limits(pipe, job.tenant, max_queued_per_tenant, max_queued)
                    pipe.multi()
                    if idem is not None:
                        value = job.id if fingerprint is None else f"{job.id} {fingerprint}"
                        pipe.set(idem, value, ex=self.settings.result_ttl)
                    self._store_new(pipe, job)
                    pipe.execute()
                    return job, True
                except WatchError as exc:
                    raise_outage_behind(exc)
                    continue  # another submit with this key won; the next pass returns its job

    def confirm_replicated(self) -> None:
        """Wait for ``settings.redis_min_replicas_ack`` replicas to hold what was stored (see
        :func:`~ham_core.redis_client.wait_for_replicas`): a submitted job survives a failover."""
        wait_for_replicas(self.redis, self.settings)

    def _check_limits(self, pipe: Any, tenant: str, per_tenant: int | None, total: int | None) -> None:
        """Watch the queued sets and refuse a submit that would exceed a limit."""
        limits = (("tenant", self.queued_key(tenant), per_tenant), ("global", self.queued_key(), total))
        for scope, key, limit in limits:
            if limit is None:
                continue
            pipe.watch(key)
            if pipe.zcard(key) >= limit:
                pipe.unwatch()
                raise QueueFull(scope, limit)

    def _store_new(self, pipe: Any, job: Job) -> None:
        ttl = self.settings.result_ttl
        pipe.hset(self.job_key(job.id), mapping=job.to_fields())
        pipe.expire(self.job_key(job.id), ttl)
        pipe.zadd(self.tenant_key(job.tenant), {job.id: job.created_at})
        pipe.expire(self.tenant_key(job.tenant), ttl)
        pipe.zadd(self.queued_key(), {job.id: job.created_at})
        pipe.zadd(self.queued_key(job.tenant), {job.id: job.created_at})
        self._enqueue(pipe, job.id, model=job.model)

    def _enqueue(self, pipe: Any, job_id: str, at_front: bool = False, model: str | None = None) -> None:
        self.queue_for(model).enqueue_call(
            TASK_FUNCTION,
            args=(job_id,),
            job_id=job_id,
            timeout=self.settings.job_timeout + RQ_TIMEOUT_MARGIN,
            result_ttl=0,  # our job record holds the outcome; RQ's copy is noise
            ttl=self.settings.result_ttl,
            failure_ttl=self.settings.result_ttl,
            description=f"ham transfer {job_id}",
            at_front=at_front,
            pipeline=pipe,
        )

    # --- cancelling ------------------------------------------------------------
    def request_cancel(self, job_id: str) -> Job:
        """Cancel: a queued job becomes ``canceled`` now and never runs; a running job gets
        a flag its worker honours at the next step (status stays ``running`` until then).
        Raises :class:`JobConflict` for a finished job, ``KeyError`` for an unknown one."""
        job = self._require(job_id)
        out = self._cancel(
            keys=self._transition_keys(job_id, job.tenant, job.model),
            args=[job_id, repr(time.time()), self.settings.result_ttl, events_channel(job_id)],
        )
        return self._result(job_id, out, "cancel")

    def cancel_requested(self, job_id: str, run: int | None = None) -> bool:
        """Whether the worker running ``job_id`` should stop (cancel asked, job gone/finished, or
        with ``run``: that run no longer owns the job)."""
        return self.poll(job_id, run) != POLL_GO

    def poll(self, job_id: str, run: int | None = None) -> str:
        """What run ``run`` of ``job_id`` should do now: :data:`POLL_GO` on, :data:`POLL_CANCEL`
        (a cancel was asked, or the job is gone) or :data:`POLL_FENCED` (another run owns it)."""
        status, flag, owner = self.redis.hmget(self.job_key(job_id), ["status", "cancel", "run"])
        if status is None:
            return POLL_CANCEL
        if run is not None and (_text(status) != JobStatus.RUNNING.value or int(owner or 0) != run):
            return POLL_FENCED
        if _text(status) != JobStatus.RUNNING.value or flag is not None:
            return POLL_CANCEL
        return POLL_GO

    # --- the worker's transitions ----------------------------------------------
    def start(self, job_id: str, worker: str) -> Job | None:
        """queued → running, attempts + 1. ``None``: do not run it (canceled, finished or gone)."""
        job = self.get(job_id)
        if job is None:
            return None
        out = self._start(
            keys=self._transition_keys(job_id, job.tenant, job.model),
            args=[job_id, worker, repr(time.time()), self.settings.result_ttl, events_channel(job_id)],
        )
        if _text(out[0]) != "ok":
            return None
        return Job.from_fields(_pairs(out[1]))

    def set_progress(self, job_id: str, progress: float, run: int | None = None) -> bool:
        """Record progress in [0, 1] of a running job; it only ever rises within a run.

        Ignored once the job is not running. With ``run``, returns False when that run no
        longer owns the job (fenced: stop computing, write nothing more); else True.
        """
        value = repr(min(1.0, max(0.0, float(progress))))
        out = self._progress(keys=[self.job_key(job_id)], args=[value, events_channel(job_id), _token(run)])
        return int(out) != -1

    def succeed(
        self,
        job_id: str,
        result_key: str,
        stats: dict[str, Any],
        result_keys: list[str] | None = None,
        run: int | None = None,
    ) -> Job:
        """→ succeeded with the stored result(s). :class:`JobConflict` if already terminal,
        :class:`JobFenced` if ``run`` no longer owns the job."""
        fields = {"result_key": result_key, "stats": json.dumps(stats, sort_keys=True, default=str), "progress": "1.0"}
        if result_keys is not None:
            fields["result_keys"] = json.dumps(result_keys)
        return self._terminal(job_id, JobStatus.SUCCEEDED, fields, run)

    def fail(self, job_id: str, code: str, message: str, run: int | None = None) -> Job:
        """→ failed with an error code and a message for the client (fenced by ``run`` as :meth:`succeed`)."""
        return self._terminal(job_id, JobStatus.FAILED, {"error_code": code, "error_message": message}, run)

    def mark_canceled(self, job_id: str, run: int | None = None) -> Job:
        """→ canceled (the worker stopped a running job on request; fenced by ``run`` as :meth:`succeed`)."""
        return self._terminal(job_id, JobStatus.CANCELED, {}, run)

    def _terminal(self, job_id: str, status: JobStatus, fields: dict[str, str], run: int | None) -> Job:
        job = self._require(job_id)
        args: list[Any] = [
            job_id, status.value, repr(time.time()), self.settings.result_ttl, events_channel(job_id), _token(run)
        ]  # fmt: skip
        for name, value in fields.items():
            args += [name, value]
        out = self._finish(keys=self._transition_keys(job_id, job.tenant, job.model), args=args)
        return self._result(job_id, out, f"mark it {status.value}", run)

    # --- recovery --------------------------------------------------------------
    def requeue(
        self,
        job_id: str,
        expected_worker: str | None = None,
        at_front: bool = True,
        refund_attempt: bool = False,
        run: int | None = None,
    ) -> Job | None:
        """running → queued and back into RQ's list (front by default: it has waited already).

        Only if the job is still running (on ``expected_worker`` and as run ``run`` when given);
        otherwise returns ``None`` and changes nothing. Progress resets; ``attempts`` is kept so
        the retry limit holds across re-runs, unless ``refund_attempt``: the run ended for a
        reason that was not the job's (an outage, a shutdown), so it does not count.
        """
        return self.recover(
            job_id, expected_worker, max_retries=None, at_front=at_front, refund=refund_attempt, run=run
        )

    def requeue_queued(self, job_id: str) -> bool:
        """Put a queued job whose id is missing from RQ's list back at its front.

        For a worker that died between popping the id and starting the job. A duplicate
        id is harmless: ``start`` lets only one run happen. Returns whether it enqueued.
        """
        jkey = self.job_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    model = _text(self.redis.hget(jkey, "model")) or None  # set at submit, never changed
                    queue = self.queue_for(model)
                    pipe.watch(jkey, queue.key)
                    status = pipe.hget(jkey, "status")
                    if _text(status) != JobStatus.QUEUED.value or pipe.lpos(queue.key, job_id) is not None:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    self._enqueue(pipe, job_id, at_front=True, model=model)
                    pipe.execute()
                    return True
                except WatchError as exc:
                    raise_outage_behind(exc)
                    continue

    def recover(
        self,
        job_id: str,
        dead_worker: str | None,
        max_retries: int | None,
        at_front: bool = True,
        refund: bool = False,
        run: int | None = None,
    ) -> Job | None:
        """Settle a job whose worker died mid-run, in one transaction.

        Still running on ``dead_worker`` (and as run ``run`` when given): canceled if a cancel was
        requested; else queued again while ``attempts <= max_retries`` (``None``: always; ``refund``
        takes back the attempt of the run that ended); else failed with ``worker_lost`` — see
        :func:`~ham_core.job_recovery.decide_recovery`. Returns the new job, or ``None`` if the
        job moved on meanwhile.
        """
        jkey = self.job_key(job_id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(jkey)
                    raw = {_text(k): _text(v) for k, v in pipe.hgetall(jkey).items()}
                    job = Job.from_fields(raw) if raw.get("status") else None
                    decision = decide_recovery(job, raw.get("cancel") == "1", dead_worker, max_retries, refund, run)
                    if job is None or decision.action is RecoveryAction.LEAVE:
                        pipe.unwatch()
                        return None
                    # RQ's own record of the dead execution: drop it so RQ's registry
                    # cleanup does not later report the job failed behind our back.
                    wip_key = self.queue_for(job.model).started_job_registry.key
                    stale = [m for m in pipe.zrange(wip_key, 0, -1) if _text(m).startswith(f"{job_id}:")]
                    pipe.multi()
                    if stale:
                        pipe.zrem(wip_key, *stale)
                    self._apply_recovery(pipe, job, decision, at_front)
                    pipe.execute()
                    return self.get(job_id)
                except WatchError as exc:
                    raise_outage_behind(exc)
                    continue

    def _apply_recovery(self, pipe: Any, job: Job, decision: Recovery, at_front: bool) -> None:
        """Queue the writes of ``decision`` for ``job`` on a pipeline inside MULTI."""
        jkey = self.job_key(job.id)
        now = repr(time.time())
        pipe.zrem(self.running_key, job.id)
        if decision.action is RecoveryAction.CANCEL:
            pipe.hset(jkey, mapping={"status": JobStatus.CANCELED.value, "finished_at": now})
            pipe.hincrby(self.finished_key, JobStatus.CANCELED.value, 1)
            pipe.hdel(jkey, "cancel")
        elif decision.action is RecoveryAction.FAIL:
            failed = {"status": JobStatus.FAILED.value, "finished_at": now, "error_code": ERROR_WORKER_LOST,
                      "error_message": decision.message or ERROR_WORKER_LOST}  # fmt: skip
            pipe.hset(jkey, mapping=failed)
            pipe.hincrby(self.finished_key, JobStatus.FAILED.value, 1)
            pipe.hdel(jkey, "cancel")
        else:
            pipe.hset(jkey, mapping={"status": JobStatus.QUEUED.value, "progress": "0.0"})
            pipe.hdel(jkey, "started_at", "worker", "cancel")
            if decision.refund:
                pipe.hincrby(jkey, "attempts", -1)
            pipe.zadd(self.queued_key(), {job.id: job.created_at})
            pipe.zadd(self.queued_key(job.tenant), {job.id: job.created_at})
            self._enqueue(pipe, job.id, at_front=at_front, model=job.model)
        pipe.expire(jkey, self.settings.result_ttl)
        pipe.hincrby(jkey, "version", 1)
        pipe.publish(events_channel(job.id), job.version + 1)

    # --- helpers ---------------------------------------------------------------
    def _result(self, job_id: str, out: list[Any], action: str, run: int | None = None) -> Job:
        tag = _text(out[0])
        if tag == "missing":
            raise KeyError(job_id)
        if tag == "conflict":
            raise JobConflict(job_id, _text(out[1]), action)
        if tag == "fenced":
            raise JobFenced(job_id, _text(out[1]), action, run or 0)
        return Job.from_fields(_pairs(out[1]))

