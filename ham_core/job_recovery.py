"""What becomes of a running job whose run ended without an outcome: a pure decision.

:func:`decide_recovery` looks only at the job as stored and at who asks; it reads and writes
nothing, so every rule is testable without Redis. :meth:`ham_core.job_store.JobStore.recover`
reads the record under ``WATCH``, asks this, and applies the answer in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ham_core.job_record import Job, JobStatus


class RecoveryAction(str, Enum):
    """What to do with the job."""

    LEAVE = "leave"  # not ours to settle: it moved on, or another worker or run owns it
    CANCEL = "cancel"  # a cancel was asked for while it ran
    FAIL = "fail"  # its retries are used up: failed with worker_lost
    REQUEUE = "requeue"  # back to the front of the queue for another run


@dataclass(frozen=True)
class Recovery:
    """The decision: the action, whether the ended run's attempt is taken back, and for a
    failure the message the client reads."""

    action: RecoveryAction
    refund: bool = False
    message: str | None = None


def decide_recovery(
    job: Job | None,
    cancel_requested: bool,
    dead_worker: str | None,
    max_retries: int | None,
    refund: bool = False,
    run: int | None = None,
) -> Recovery:
    """Settle ``job`` (``None``: expired), whose run on ``dead_worker`` ended without an outcome.

    Only a job still running — on ``dead_worker`` and as run ``run`` when those are given — is
    touched. Then: canceled if a cancel was asked for; else failed with ``worker_lost`` once
    ``attempts > max_retries`` (``None``: never); else queued again, taking back the ended run's
    attempt when ``refund`` (the run ended for a reason that was not the job's) and one was counted.
    """
    if (
        job is None
        or job.status != JobStatus.RUNNING
        or (dead_worker is not None and job.worker != dead_worker)
        or (run is not None and job.run != run)
    ):
        return Recovery(RecoveryAction.LEAVE)
    if cancel_requested:
        return Recovery(RecoveryAction.CANCEL)
    if max_retries is not None and job.attempts > max_retries:
        retries = f"{max_retries} retr{'y' if max_retries == 1 else 'ies'}"
        message = (
            f"the worker running this job ({job.worker}) stopped responding "
            f"{job.attempts} time(s); giving up after {retries}"
        )
        return Recovery(RecoveryAction.FAIL, message=message)
    return Recovery(RecoveryAction.REQUEUE, refund=refund and job.attempts > 0)
