"""The per-step callbacks a running job gives the engine: progress writes and the cancel poll.

:class:`StepWatch` is what :class:`~worker.task.TransferRunner` hands the engine as
``progress=`` and ``cancelled=``. Both calls are best-effort while Redis is away, both name the
job's run (the fencing token), and ``cancelled`` also enforces the job's deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ham_core.jobs import POLL_FENCED, POLL_GO, JobStore
from ham_core.redis_client import REDIS_UNAVAILABLE
from worker.connectivity import Link

# While Redis is away, the per-step progress write and cancel poll are skipped for this long
# after a failure, so the engine keeps its pace instead of paying a timeout every step.
BEST_EFFORT_PAUSE = 1.0


@dataclass
class StepWatch:
    """The per-job callbacks the engine calls between steps. Both are best-effort: a Redis
    outage never stops the engine (the deadline still applies; a cancel is seen once Redis is back).

    Both name the run (``run``, the fencing token): once another run owns the job (this worker
    was frozen long enough to be declared dead), ``fenced`` turns true at the next progress
    write or poll and the engine stops before its next step."""

    store: JobStore
    link: Link
    job_id: str
    deadline: float
    run: int | None = None
    timed_out: bool = False
    fenced: bool = False
    last_progress: float = field(default=-1.0)
    quiet_until: float = 0.0
    on_progress: Callable[[], None] | None = None

    def progress(self, step: int, total: int) -> None:
        # Keep 1.0 for "succeeded": the decode and upload still follow the last step.
        fraction = 0.99 * step / max(total, 1)
        if fraction > self.last_progress and not self.fenced:
            self.last_progress = fraction
            owned = self._best_effort(lambda: self.store.set_progress(self.job_id, fraction, self.run))
            if owned is False:
                self.fenced = True
                return
            if self.on_progress is not None:
                self.on_progress()

    def cancelled(self) -> bool:
        if self.fenced:
            return True
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        verdict = self._best_effort(lambda: self.store.poll(self.job_id, self.run))
        if verdict == POLL_FENCED:
            self.fenced = True
        return verdict not in (None, POLL_GO)

    def _best_effort(self, call: Callable[[], Any]) -> Any:
        if time.monotonic() < self.quiet_until:
            return None
        try:
            result = call()
        except REDIS_UNAVAILABLE as exc:
            self.link.failed(exc)
            self.quiet_until = time.monotonic() + BEST_EFFORT_PAUSE
            return None
        self.link.recovered()
        return result
