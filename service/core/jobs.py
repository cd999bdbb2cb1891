"""The job model shared by the API (creates, reads, cancels) and the worker (runs).

Redis layout (everything expires ``settings.result_ttl`` after its last transition):

- ``ham:job:{id}`` — hash, one field per :class:`Job` attribute. Scalars are stored
  raw so the Lua transitions can read and write them; ``params``, ``styles`` (a list
  of :class:`~service.core.style_refs.StyleRef`) and ``stats`` are JSON. A missing field
  means ``None``. ``cancel`` = ``1`` once a cancel was asked for a running job.
- ``ham:idem:{tenant}:{sha256(key)}`` — ``"{job id} {request fingerprint}"`` for an
  ``Idempotency-Key`` (claimed in the submit transaction; a record written before fingerprints
  holds the job id alone, and replays whatever the request).
- ``ham:tenant:{tenant}:jobs`` — sorted set of the tenant's job ids by ``created_at``.
- ``ham:queued`` and ``ham:queued:{tenant}`` — sorted sets of queued job ids (counts
  for backpressure; sets, not counters, so a lost update cannot make them drift).
- ``ham:running`` — sorted set of running job ids by ``started_at`` (for recovery).
- ``rq:queue:{queue_name}`` — RQ's list. The RQ job id *is* the job id, so the queue
  position is ``LPOS``. The RQ job carries only the id; the function is the string
  ``"worker.task.run_transfer"`` so this module never imports the worker or torch.

Every transition is one Lua script (or a WATCH/MULTI transaction where RQ's own
enqueue must join it), so the API and any number of workers can race safely.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from redis import Redis, WatchError
from rq import Queue
from rq.serializers import JSONSerializer

from service.core.config import Settings
from service.core.style_refs import StyleRef, refs_from_record, refs_to_json, upload_key

TASK_FUNCTION = "worker.task.run_transfer"
KEY_PREFIX = "ham"
# Error codes a job can fail with (``Job.error_code``).
ERROR_INVALID_INPUT = "invalid_input"
ERROR_INPUTS_MISSING = "inputs_missing"
ERROR_INTERNAL = "internal_error"
ERROR_NUMERICAL = "numerical_error"
ERROR_TIMEOUT = "timeout"
ERROR_WORKER_LOST = "worker_lost"
# RQ's hard time limit is a backstop behind the worker's own cooperative timeout.
RQ_TIMEOUT_MARGIN = 120


# What a running job's worker should do next (:meth:`JobStore.poll`).
POLL_GO = "go"
POLL_CANCEL = "cancel"
POLL_FENCED = "fenced"


class JobStatus(str, Enum):
    """Where a job is in its life: queued → running → one of the terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
# What a webhook may be sent for: the job starting, its progress (at most once a second), its end.
WEBHOOK_EVENTS = ("start", "progress", "completed")


class JobConflict(Exception):
    """The transition is not allowed from the job's current state (e.g. cancel a finished job: 409)."""

    def __init__(self, job_id: str, status: str, action: str) -> None:
        super().__init__(f"job {job_id} is {status}; cannot {action}")
        self.job_id = job_id
        self.status = status
        self.action = action


class JobFenced(JobConflict):
    """The run that asked no longer owns the job: another run took it over (after a freeze, the
    job was recovered and started again) or it was handed back. The stale run must stop writing."""

    def __init__(self, job_id: str, status: str, action: str, run: int) -> None:
        super().__init__(job_id, status, action)
        self.args = (f"job {job_id}: run {run} no longer owns it ({status}); cannot {action}",)
        self.run = run


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` already names a job created by a *different* request (409)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} already names job {job_id}, created by a different request")
        self.key = key
        self.job_id = job_id


class QueueFull(Exception):
    """A queue limit would be exceeded: ``scope`` is ``"tenant"`` or ``"global"`` (429)."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} queue limit of {limit} queued jobs reached")
        self.scope = scope
        self.limit = limit


def new_job_id() -> str:
    """A fresh, unguessable job id (32 hex chars)."""
    return uuid.uuid4().hex


@dataclass
class Job:
    """One transfer job as stored in Redis. The API builds it with ``id``, ``tenant``,
    ``params`` and its styles; everything else is filled in by transitions."""

    id: str
    tenant: str
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    # The job's styles, in order: one result each.
    styles: list[StyleRef] = field(default_factory=list)
    webhook_url: str | None = None
    # Which transitions the webhook hears about: a subset of WEBHOOK_EVENTS.
    webhook_events: tuple[str, ...] = ("completed",)
    output_format: str = "png"
    output_quality: int = 90
    result_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    stats: dict[str, Any] | None = None
    # The X-Request-ID of the submission: the worker's log lines for this job carry it too.
    request_id: str | None = None
    result_keys: list[str] | None = None  # one per style once succeeded (the first is result_key)
    # Bumped by every transition and progress write; the id of the job's server-sent events.
    version: int = 0
    # Runs started so far (never refunded, unlike ``attempts``): the current run's fencing token.
    # Every worker write about the job names its run and is refused once another run owns the job.
    run: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def style_ids(self) -> list[str]:
        """The library styles this job uses, in order."""
        return [ref.style_id for ref in self.styles if ref.style_id]

    @property
    def has_style(self) -> bool:
        """Whether a style image was given (uploaded or from the library)."""
        return any(ref.has_image for ref in self.styles)

    @property
    def style_prompt(self) -> str | None:
        """The prompt given with the request itself: that of a job's one style not from the library."""
        if len(self.styles) == 1 and self.styles[0].style_id is None:
            return self.styles[0].prompt
        return None

    @property
    def input_keys(self) -> list[str]:
        """Every stored input of this job (never a library style's image: that outlives the job)."""
        keys = [self.content_key]
        for ref in self.styles:
            if ref.key and ref.key.startswith(f"inputs/{self.id}/") and ref.key not in keys:
                keys.append(ref.key)
        return keys

    @property
    def content_key(self) -> str:
        return content_key(self.id)

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields; ``None`` attributes are left out."""
        raw: dict[str, Any] = {
            "id": self.id,
            "tenant": self.tenant,
            "status": JobStatus(self.status).value,
            "progress": repr(float(self.progress)),
            "params": json.dumps(self.params, sort_keys=True),
            "styles": refs_to_json(self.styles),
            "webhook_url": self.webhook_url,
            "webhook_events": ",".join(self.webhook_events),
            "output_format": self.output_format,
            "output_quality": str(int(self.output_quality)),
            "result_key": self.result_key,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "attempts": str(int(self.attempts)),
            "created_at": repr(float(self.created_at)),
            "started_at": None if self.started_at is None else repr(float(self.started_at)),
            "finished_at": None if self.finished_at is None else repr(float(self.finished_at)),
            "worker": self.worker,
            "stats": None if self.stats is None else json.dumps(self.stats, sort_keys=True),
            "request_id": self.request_id,
            "result_keys": None if self.result_keys is None else json.dumps(self.result_keys),
            "version": str(int(self.version)),
            "run": str(int(self.run)),
        }
        return {k: v for k, v in raw.items() if v is not None}

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> Job:
        """Inverse of :meth:`to_fields`; accepts the bytes Redis returns."""
        f = {_text(k): _text(v) for k, v in fields.items()}

        def opt_float(name: str) -> float | None:
            return float(f[name]) if f.get(name) not in (None, "") else None

        return cls(
            id=f["id"],
            tenant=f["tenant"],
            status=JobStatus(f["status"]),
            progress=float(f.get("progress") or 0.0),
            params=json.loads(f.get("params") or "{}"),
            styles=refs_from_record(f, f["id"]),
            webhook_url=f.get("webhook_url"),
            webhook_events=tuple(filter(None, (f.get("webhook_events") or "completed").split(","))),
            output_format=f.get("output_format") or "png",
            output_quality=int(f.get("output_quality") or 90),
            result_key=f.get("result_key"),
            error_code=f.get("error_code"),
            error_message=f.get("error_message"),
            attempts=int(f.get("attempts") or 0),
            created_at=float(f["created_at"]),
            started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"),
            worker=f.get("worker"),
            stats=json.loads(f["stats"]) if f.get("stats") else None,
            request_id=f.get("request_id"),
            result_keys=json.loads(f["result_keys"]) if f.get("result_keys") else None,
            version=int(f.get("version") or 0),
            run=int(f.get("run") or 0),
        )


# The storage folders a job's own objects live in (the expiry sweep's scope).
JOB_FOLDERS = ("inputs", "results")


def content_key(job_id: str) -> str:
    """Storage key of a job's (normalised PNG) content image."""
    return f"inputs/{job_id}/content.png"


def style_key(job_id: str) -> str:
    """Storage key of a job's (normalised PNG) style image: the first one uploaded with it."""
    return upload_key(job_id, 0, first=True)


def result_key(job_id: str, extension: str = "png", index: int = 0, run: int = 0) -> str:
    """Storage key of a job's result (``extension``: that of its output format; ``index``: the
    style's place in a multi-style job; ``run``: the run that made it, see :attr:`Job.run`).

    Named per run, so a stale run (fenced after a freeze) can never overwrite the owner's file.
    """
    stem = f"results/{job_id}" if run == 0 else f"results/{job_id}/run-{run}"
    return f"{stem}.{extension}" if index == 0 else f"{stem}-{index}.{extension}"


def extra_style_key(job_id: str, index: int) -> str:
    """Storage key of the (normalised PNG) style image number ``index`` >= 1 uploaded with a job."""
    return upload_key(job_id, index, first=False)


def events_channel(job_id: str) -> str:
    """The Redis pub/sub channel on which every change of the job is announced (its new version)."""
    return f"{KEY_PREFIX}:events:{job_id}"


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _token(run: int | None) -> str:
    """A run as the Lua fence reads it ('' = no fence: the API's and tools' writes)."""
    return "" if run is None else str(int(run))


# What list_for_tenant hands out as next_cursor, "<created_at>:<job id>" (the API declares it as the pattern).
CURSOR_PATTERN = r"^(\d{1,12}(?:\.\d{1,9})?):([0-9a-f]{32})$"
_CURSOR = re.compile(CURSOR_PATTERN)


def _parse_cursor(cursor: str) -> tuple[float, str]:
    """``"<created_at>:<job id>"`` as written by :meth:`JobStore.list_for_tenant`."""
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise ValueError(f"cursor: not a cursor returned by this API: {cursor[:80]!r}")
    return float(match.group(1)), match.group(2)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


# --- Lua transitions -------------------------------------------------------------
# KEYS and ARGV are documented at the top of each script. All of them refuse to touch
# a job hash that does not exist (expired) and answer {"missing"}. Each change bumps the job's
# `version` and PUBLISHes it on the job's events channel (the last ARGV), in the same script,
# so a subscriber never misses a change it could have read.

_ANNOUNCE = """
local function announce(job, channel)
  local version = redis.call('HINCRBY', job, 'version', 1)
  redis.call('PUBLISH', channel, version)
end
"""

# KEYS: job, queued, queued_tenant, running, rq_queue   ARGV: job_id, worker, now, ttl
_START = _ANNOUNCE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
-- Already running on this worker: a retry of this very call whose first reply was lost.
if st == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then
  return {'ok', redis.call('HGETALL', KEYS[1])}
end
if st ~= 'queued' then return {'skip', st} end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[2], 'started_at', ARGV[3], 'progress', '0.0')
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HINCRBY', KEYS[1], 'run', 1)
redis.call('HDEL', KEYS[1], 'finished_at', 'cancel')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('LREM', KEYS[5], 0, ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
announce(KEYS[1], ARGV[5])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# A fenced write: the run named by the caller (ARGV run; '' = no fence) no longer owns the job.
_FENCE = """
local function fenced(job, run)
  if run == '' then return false end
  return redis.call('HGET', job, 'status') ~= 'running' or redis.call('HGET', job, 'run') ~= run
end
"""

# Progress of the running job, only ever forward within one run (a new run starts at 0).
# KEYS: job   ARGV: progress, channel, run   →  1 recorded (or no change), 0 not running, -1 fenced
_PROGRESS = _ANNOUNCE + _FENCE + """
if not redis.call('HGET', KEYS[1], 'status') then return 0 end
if fenced(KEYS[1], ARGV[3]) then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
if tonumber(redis.call('HGET', KEYS[1], 'progress') or '0') >= tonumber(ARGV[1]) then return 1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1])
announce(KEYS[1], ARGV[2])
return 1
"""

# Any non-terminal state → a terminal one, setting the given fields; with a run, only while
# that run owns the job.
# KEYS: job, queued, queued_tenant, running, rq_queue, finished
# ARGV: job_id, new_status, now, ttl, channel, run, field1, value1, ...
_FINISH = _ANNOUNCE + _FENCE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if st == 'succeeded' or st == 'failed' or st == 'canceled' then return {'conflict', st} end
if fenced(KEYS[1], ARGV[6]) then return {'fenced', st} end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('HDEL', KEYS[1], 'cancel')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('LREM', KEYS[5], 0, ARGV[1])
redis.call('HINCRBY', KEYS[6], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
announce(KEYS[1], ARGV[5])
return {'ok', redis.call('HGETALL', KEYS[1])}
"""

# Queued → canceled at once (the id leaves RQ's list so it never runs);
# running → the cancel flag, honoured by the worker between steps.
# KEYS: job, queued, queued_tenant, running, rq_queue, finished   ARGV: job_id, now, ttl, channel
_CANCEL = _ANNOUNCE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return {'missing'} end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('LREM', KEYS[5], 0, ARGV[1])
  redis.call('HINCRBY', KEYS[6], 'canceled', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  announce(KEYS[1], ARGV[4])
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
else
  return {'conflict', st}
end
return {'ok', redis.call('HGETALL', KEYS[1])}
"""


class JobStore:
    """Job records, their transitions and the RQ queue, on one Redis connection.

    The Redis client must be created with ``decode_responses=False`` (RQ needs bytes).
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.queue = Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)
        self._start = redis.register_script(_START)
        self._progress = redis.register_script(_PROGRESS)
        self._finish = redis.register_script(_FINISH)
        self._cancel = redis.register_script(_CANCEL)

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

    def _transition_keys(self, job_id: str, tenant: str) -> list[str]:
        return [
            self.job_key(job_id),
            self.queued_key(),
            self.queued_key(tenant),
            self.running_key,
            self.queue.key,
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
        :mod:`service.core.idempotency`) gets that first job back with ``created=False`` and
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
                        existing_id, existing_print = _idempotency_value(pipe.get(idem))
                        existing = self.get(existing_id) if existing_id else None
                        if existing is not None:
                            pipe.unwatch()
                            if _differs(existing_print, fingerprint):
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
                except WatchError:
                    continue  # another submit with this key won; the next pass returns its job

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
        self._enqueue(pipe, job.id)

    def _enqueue(self, pipe: Any, job_id: str, at_front: bool = False) -> None:
        self.queue.enqueue_call(
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

    # --- reading ---------------------------------------------------------------
    def find_by_idempotency_key(self, tenant: str, key: str, fingerprint: str | None = None) -> Job | None:
        """The job an earlier submit with ``(tenant, key)`` created, if it is still on record.

        With a ``fingerprint``, an earlier submit of a different request raises
        :class:`IdempotencyConflict` instead.
        """
        job_id, existing_print = _idempotency_value(self.redis.get(self.idempotency_key(tenant, key)))
        job = self.get(job_id) if job_id else None
        if job is not None and _differs(existing_print, fingerprint):
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
        """0-based place in the RQ queue (0 = next to run); ``None`` if not waiting there."""
        pos = self.redis.lpos(self.queue.key, job_id)
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

    # --- cancelling ------------------------------------------------------------
    def request_cancel(self, job_id: str) -> Job:
        """Cancel: a queued job becomes ``canceled`` now and never runs; a running job gets
        a flag its worker honours at the next step (status stays ``running`` until then).
        Raises :class:`JobConflict` for a finished job, ``KeyError`` for an unknown one."""
        job = self._require(job_id)
        out = self._cancel(
            keys=self._transition_keys(job_id, job.tenant),
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
            keys=self._transition_keys(job_id, job.tenant),
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
        out = self._finish(keys=self._transition_keys(job_id, job.tenant), args=args)
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
                    pipe.watch(jkey, self.queue.key)
                    status = pipe.hget(jkey, "status")
                    if _text(status) != JobStatus.QUEUED.value or pipe.lpos(self.queue.key, job_id) is not None:
                        pipe.unwatch()
                        return False
                    pipe.multi()
                    self._enqueue(pipe, job_id, at_front=True)
                    pipe.execute()
                    return True
                except WatchError:
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

        Still running on ``dead_worker``: canceled if a cancel was requested; else queued
        again while ``attempts <= max_retries`` (``None``: always; ``refund`` takes back the
        attempt of the run that ended); else failed with ``worker_lost``. Returns the new job,
        or ``None`` if the job moved on meanwhile.
        """
        jkey = self.job_key(job_id)
        wip_key = self.queue.started_job_registry.key
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(jkey)
                    raw = pipe.hgetall(jkey)
                    if not raw:
                        pipe.unwatch()
                        return None
                    fields = {_text(k): _text(v) for k, v in raw.items()}
                    if (
                        fields.get("status") != JobStatus.RUNNING.value
                        or (dead_worker is not None and fields.get("worker") != dead_worker)
                        or (run is not None and int(fields.get("run") or 0) != run)
                    ):
                        pipe.unwatch()
                        return None
                    job = Job.from_fields(fields)
                    # RQ's own record of the dead execution: drop it so RQ's registry
                    # cleanup does not later report the job failed behind our back.
                    stale = [m for m in pipe.zrange(wip_key, 0, -1) if _text(m).startswith(f"{job_id}:")]
                    now = repr(time.time())
                    pipe.multi()
                    if stale:
                        pipe.zrem(wip_key, *stale)
                    pipe.zrem(self.running_key, job_id)
                    if fields.get("cancel") == "1" or (max_retries is not None and job.attempts > max_retries):
                        if fields.get("cancel") == "1":
                            pipe.hset(jkey, mapping={"status": JobStatus.CANCELED.value, "finished_at": now})
                            pipe.hincrby(self.finished_key, JobStatus.CANCELED.value, 1)
                        else:
                            message = (
                                f"the worker running this job ({job.worker}) stopped responding "
                                f"{job.attempts} time(s); giving up after {max_retries} retr"
                                f"{'y' if max_retries == 1 else 'ies'}"
                            )
                            pipe.hset(
                                jkey,
                                mapping={
                                    "status": JobStatus.FAILED.value,
                                    "finished_at": now,
                                    "error_code": ERROR_WORKER_LOST,
                                    "error_message": message,
                                },
                            )
                            pipe.hincrby(self.finished_key, JobStatus.FAILED.value, 1)
                        pipe.hdel(jkey, "cancel")
                    else:
                        pipe.hset(jkey, mapping={"status": JobStatus.QUEUED.value, "progress": "0.0"})
                        pipe.hdel(jkey, "started_at", "worker", "cancel")
                        if refund and job.attempts > 0:
                            pipe.hincrby(jkey, "attempts", -1)
                        pipe.zadd(self.queued_key(), {job_id: job.created_at})
                        pipe.zadd(self.queued_key(job.tenant), {job_id: job.created_at})
                        self._enqueue(pipe, job_id, at_front=at_front)
                    pipe.expire(jkey, self.settings.result_ttl)
                    pipe.hincrby(jkey, "version", 1)
                    pipe.publish(events_channel(job_id), int(fields.get("version") or 0) + 1)
                    pipe.execute()
                    return self.get(job_id)
                except WatchError:
                    continue

    # --- helpers ---------------------------------------------------------------
    def _require(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job is None:
            raise KeyError(job_id)
        return job

    def _result(self, job_id: str, out: list[Any], action: str, run: int | None = None) -> Job:
        tag = _text(out[0])
        if tag == "missing":
            raise KeyError(job_id)
        if tag == "conflict":
            raise JobConflict(job_id, _text(out[1]), action)
        if tag == "fenced":
            raise JobFenced(job_id, _text(out[1]), action, run or 0)
        return Job.from_fields(_pairs(out[1]))


def _idempotency_value(raw: Any) -> tuple[str | None, str | None]:
    """``(job id, fingerprint)`` of an idempotency record; the fingerprint is None in a record without one."""
    text = _text(raw)
    if not text:
        return None, None
    job_id, _, fingerprint = text.partition(" ")
    return job_id, fingerprint or None


def _differs(stored: str | None, given: str | None) -> bool:
    # Either side without a fingerprint (a record from before them, a caller that has none) replays.
    return stored is not None and given is not None and stored != given
