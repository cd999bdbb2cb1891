"""Reading job records and the queues in Redis: :class:`JobReads`, the base of :class:`~ham_core.job_store.JobStore`.

The keys of the Redis layout (described in :mod:`ham_core.jobs`), a job by id or by idempotency
key, a tenant's pages of jobs, queue positions and the counts the metrics read. Nothing here
changes a job's state (the transitions are :class:`~ham_core.job_store.JobStore`'s); what it
deletes is bookkeeping of records that already expired.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from ham_core.config import Settings
from ham_core.idempotency import fingerprints_differ, idempotency_record
from ham_core.job_record import (
    KEY_PREFIX,
    TERMINAL,
    IdempotencyConflict,
    Job,
    JobStatus,
    _parse_cursor,
    _text,
)
from ham_core.models import queue_name


class JobReads:
    """Job records and the RQ queues as read from one Redis connection (``decode_responses=False``)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._queues: dict[str, Queue] = {}
        # The default model's queue (a worker takes queue_for(its model)).
        self.queue = self.queue_for(None)

    def queue_for(self, model: str | None) -> Queue:
        """The RQ queue of ``model``'s jobs (``None``: the default model)."""
        name = queue_name(self.settings, model)
        if name not in self._queues:
            self._queues[name] = Queue(name, connection=self.redis, serializer=JSONSerializer)
        return self._queues[name]

    # --- keys ------------------------------------------------------------------
    @staticmethod
    def job_key(job_id: str) -> str:
        return f"{KEY_PREFIX}:job:{job_id}"

    @staticmethod
    def tenant_key(tenant: str) -> str:
        return f"{KEY_PREFIX}:tenant:{tenant}:jobs"

    @staticmethod
    def queued_key(tenant: str | None = None) -> str:
        return f"{KEY_PREFIX}:queued" if tenant is None else f"{KEY_PREFIX}:queued:{tenant}"

    running_key = f"{KEY_PREFIX}:running"
    # Hash outcome → count of jobs that reached it, ever (a Prometheus counter kept in Redis).
    finished_key = f"{KEY_PREFIX}:finished"

    @staticmethod
    def idempotency_key(tenant: str, key: str) -> str:
        # Hashed: the client's key is arbitrary text and must not shape our key space.
        digest = hashlib.sha256(key.encode()).hexdigest()
        return f"{KEY_PREFIX}:idem:{tenant}:{digest}"

    # --- reading ---------------------------------------------------------------
    def find_by_idempotency_key(self, tenant: str, key: str, fingerprint: str | None = None) -> Job | None:
        """The job an earlier submit with ``(tenant, key)`` created, if it is still on record.

        With a ``fingerprint``, an earlier submit of a different request raises
        :class:`IdempotencyConflict` instead.
        """
        job_id, existing_print = idempotency_record(self.redis.get(self.idempotency_key(tenant, key)))
        job = self.get(job_id) if job_id else None
        if job is not None and fingerprints_differ(existing_print, fingerprint):
            raise IdempotencyConflict(key, job.id)
        return job

    def get(self, job_id: str) -> Job | None:
        """The job, or ``None`` if unknown or expired."""
        fields = self.redis.hgetall(self.job_key(job_id))
        if not fields or (b"status" not in fields and "status" not in fields):
            return None
        return Job.from_fields(fields)

    def list_for_tenant(self, tenant: str, limit: int, cursor: str | None = None) -> tuple[list[Job], str | None]:
        """The tenant's jobs, newest first, ``limit`` per page.

        ``cursor`` is the opaque ``next_cursor`` of the previous page (``None`` for the
        first); a malformed cursor raises ``ValueError``. Returns ``(jobs, next_cursor)``,
        ``next_cursor`` being ``None`` on the last page. Jobs created in the same instant are
        ordered by id, so none is skipped or repeated across pages.
        """
        if limit < 1:
            raise ValueError(f"limit: must be at least 1, got {limit}")
        after = _parse_cursor(cursor) if cursor is not None else None
        key = self.tenant_key(tenant)
        self.redis.zremrangebyscore(key, "-inf", time.time() - self.settings.result_ttl)
        high = "+inf" if after is None else repr(after[0])
        jobs: list[Job] = []
        last_score = 0.0
        expired: list[Any] = []
        offset = 0
        try:
            while True:
                # Redis orders equal scores by member, descending; the cursor is (score, id).
                rows = self.redis.zrevrangebyscore(key, high, "-inf", start=offset, num=limit + 1, withscores=True)
                offset += len(rows)
                for member, score in rows:
                    job_id = _text(member)
                    if after is not None and score == after[0] and job_id >= after[1]:
                        continue  # on or before the previous page's last job
                    job = self.get(job_id)
                    if job is None:
                        expired.append(member)  # its record expired
                        continue
                    if len(jobs) == limit:
                        return jobs, f"{last_score!r}:{jobs[-1].id}"
                    jobs.append(job)
                    last_score = score
                if len(rows) < limit + 1:
                    return jobs, None
        finally:
            if expired:
                self.redis.zrem(key, *expired)

    def queue_position(self, job_id: str) -> int | None:
        """0-based place in its model's RQ queue (0 = next to run); ``None`` if not waiting there."""
        model = _text(self.redis.hget(self.job_key(job_id), "model"))
        pos = self.redis.lpos(self.queue_for(model or None).key, job_id)
        return None if pos is None else int(pos)

    def queued_count(self, tenant: str | None = None) -> int:
        """Queued jobs of ``tenant``, or of everyone."""
        key = self.queued_key(tenant)
        self.redis.zremrangebyscore(key, "-inf", time.time() - self.settings.result_ttl)
        return int(self.redis.zcard(key))

    def running_jobs(self) -> list[Job]:
        """Jobs currently marked running (for dead-worker recovery)."""
        jobs = []
        for member in self.redis.zrange(self.running_key, 0, -1):
            job = self.get(_text(member))
            if job is None:
                self.redis.zrem(self.running_key, member)
            elif job.status == JobStatus.RUNNING:
                jobs.append(job)
        return jobs

    def oldest_queued_age(self) -> float | None:
        """Seconds the oldest queued job has waited (for metrics), ``None`` if none."""
        rows = self.redis.zrange(self.queued_key(), 0, 0, withscores=True)
        return max(0.0, time.time() - rows[0][1]) if rows else None

    def finished_counts(self) -> dict[str, int]:
        """Jobs that reached each terminal status since Redis was created (monotonic counters)."""
        raw = self.redis.hgetall(self.finished_key)
        counts = {status.value: 0 for status in TERMINAL}
        counts.update({_text(k): int(v) for k, v in raw.items()})
        return counts

    def _require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

