"""The job model shared by the API (creates, reads, cancels) and the worker (runs).

One import for everything about jobs; the parts live in their own modules:

- :mod:`ham_core.job_record` — the :class:`Job` record (its Redis codec derived from its
  fields), statuses, error codes and the storage keys of a job's files;
- :mod:`ham_core.job_scripts` — the transitions as Lua scripts;
- :mod:`ham_core.job_reads` — :class:`JobReads`: the Redis layout's keys and every read (a job,
  a tenant's pages, queue positions, the counts the metrics read);
- :mod:`ham_core.job_store` — :class:`JobStore` (a :class:`JobReads`): the transitions, the RQ
  queue, fencing of stale runs;
- :mod:`ham_core.job_recovery` — what becomes of a job whose worker was lost (a pure decision).

Redis layout (everything expires ``settings.result_ttl`` after its last transition):

- ``ham:job:{id}`` — hash, one field per :class:`~ham_core.job_record.Job` attribute
  (its codec). A missing field means the attribute's default. ``cancel`` = ``1`` once a cancel
  was asked for a running job.
- ``ham:idem:{tenant}:{sha256(key)}`` — ``"{job id} {request fingerprint}"`` for an
  ``Idempotency-Key`` (claimed in the submit transaction; a record written before fingerprints
  holds the job id alone, and replays whatever the request).
- ``ham:tenant:{tenant}:jobs`` — sorted set of the tenant's job ids by ``created_at``.
- ``ham:queued`` and ``ham:queued:{tenant}`` — sorted sets of queued job ids (counts
  for backpressure; sets, not counters, so a lost update cannot make them drift).
- ``ham:running`` — sorted set of running job ids by ``started_at`` (for recovery).
- ``rq:queue:{queue}`` — RQ's list, one per model (:func:`ham_core.models.queue_name`;
  the default model's is ``rq:queue:{queue_name}``). The RQ job id *is* the job id, so the queue
  position is ``LPOS``. The RQ job carries only the id; the function is the string
  ``"worker.task.run_transfer"`` so this module never imports the worker or torch.
"""

from __future__ import annotations

from ham_core.job_record import (
    CURSOR_PATTERN,
    DEFAULT_OUTPUT_FORMAT,
    DEFAULT_WEBHOOK_EVENTS,
    ERROR_INPUTS_MISSING,
    ERROR_INTERNAL,
    ERROR_INVALID_INPUT,
    ERROR_NUMERICAL,
    ERROR_TIMEOUT,
    ERROR_WORKER_LOST,
    JOB_FOLDERS,
    KEY_PREFIX,
    POLL_CANCEL,
    POLL_FENCED,
    POLL_GO,
    TERMINAL,
    WEBHOOK_EVENTS,
    IdempotencyConflict,
    Job,
    JobConflict,
    JobFenced,
    JobStatus,
    QueueFull,
    content_key,
    events_channel,
    extra_style_key,
    new_job_id,
    result_key,
    style_key,
)
from ham_core.job_recovery import Recovery, RecoveryAction, decide_recovery
from ham_core.job_store import (
    RQ_TIMEOUT_MARGIN,
    TASK_FUNCTION,
    JobStore,
)

__all__ = [
    "CURSOR_PATTERN",
    "DEFAULT_OUTPUT_FORMAT",
    "DEFAULT_WEBHOOK_EVENTS",
    "ERROR_INPUTS_MISSING",
    "ERROR_INTERNAL",
    "ERROR_INVALID_INPUT",
    "ERROR_NUMERICAL",
    "ERROR_TIMEOUT",
    "ERROR_WORKER_LOST",
    "JOB_FOLDERS",
    "KEY_PREFIX",
    "POLL_CANCEL",
    "POLL_FENCED",
    "POLL_GO",
    "RQ_TIMEOUT_MARGIN",
    "TASK_FUNCTION",
    "TERMINAL",
    "WEBHOOK_EVENTS",
    "IdempotencyConflict",
    "Job",
    "JobConflict",
    "JobFenced",
    "JobStatus",
    "JobStore",
    "QueueFull",
    "Recovery",
    "RecoveryAction",
    "content_key",
    "decide_recovery",
    "events_channel",
    "extra_style_key",
    "new_job_id",
    "result_key",
    "style_key",
]
