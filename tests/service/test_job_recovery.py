"""The recovery decision is a pure function of the stored job: every rule without Redis."""

from __future__ import annotations

import pytest

from ham_core.job_recovery import RecoveryAction, decide_recovery
from ham_core.jobs import Job, JobStatus


def running(attempts: int = 1, worker: str = "w1", run: int = 1) -> Job:
    return Job(id="j" * 32, tenant="t", status=JobStatus.RUNNING, attempts=attempts, worker=worker, run=run)


def test_a_job_that_moved_on_or_expired_is_left_alone() -> None:
    assert decide_recovery(None, False, "w1", 2).action is RecoveryAction.LEAVE
    for status in (JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        job = Job(id="j" * 32, tenant="t", status=status, worker="w1")
        assert decide_recovery(job, False, "w1", 2).action is RecoveryAction.LEAVE


def test_only_the_named_worker_and_run_may_be_recovered() -> None:
    assert decide_recovery(running(worker="alive"), False, "dead", 2).action is RecoveryAction.LEAVE
    assert decide_recovery(running(run=2), False, "w1", 2, run=1).action is RecoveryAction.LEAVE
    assert decide_recovery(running(run=2), False, None, 2, run=2).action is RecoveryAction.REQUEUE
    assert decide_recovery(running(worker="anyone"), False, None, 2).action is RecoveryAction.REQUEUE


def test_a_requested_cancel_wins_over_a_retry_and_over_a_failure() -> None:
    assert decide_recovery(running(), True, "w1", 2).action is RecoveryAction.CANCEL
    assert decide_recovery(running(attempts=9), True, "w1", 2).action is RecoveryAction.CANCEL


@pytest.mark.parametrize(("attempts", "action"), [(1, "requeue"), (2, "requeue"), (3, "fail"), (4, "fail")])
def test_requeued_while_attempts_are_within_the_retries_then_failed_worker_lost(attempts, action) -> None:
    decision = decide_recovery(running(attempts=attempts), False, "w1", max_retries=2)
    assert decision.action.value == action
    if action == "fail":
        assert decision.message == (
            f"the worker running this job (w1) stopped responding {attempts} time(s); giving up after 2 retries"
        )


def test_one_retry_is_singular_and_no_limit_never_fails() -> None:
    assert decide_recovery(running(attempts=2), False, "w1", 1).message.endswith("after 1 retry")
    assert decide_recovery(running(attempts=99), False, "w1", None).action is RecoveryAction.REQUEUE


def test_a_refund_takes_back_a_counted_attempt_only() -> None:
    assert decide_recovery(running(attempts=1), False, "w1", None, refund=True).refund is True
    assert decide_recovery(running(attempts=0), False, "w1", None, refund=True).refund is False
    assert decide_recovery(running(attempts=1), False, "w1", None).refund is False
