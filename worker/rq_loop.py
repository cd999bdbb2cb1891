"""RQ's ``SimpleWorker``, made to outlive Redis.

How RQ 2.x (``rq<3``) itself reacts to Redis going away, and why that is not enough:

- ``BaseWorker.work()`` breaks out of its loop — the worker exits — on a
  ``redis.TimeoutError`` anywhere, and on *any* unexpected exception outside the dequeue:
  its suspension check, registry maintenance, the heartbeat after a job, ``execute_job``
  (RQ's own bookkeeping around the job: its registries, its job hash), and ``teardown``
  raises again from ``finally``.
- ``dequeue_job_and_maintain_ttl()`` retries only ``ConnectionError``, logging an error on
  every try and sleeping up to ``max_connection_wait_time`` (60 s) between tries, so a
  worker notices Redis is back up to a minute late.
- The pubsub thread (``rq`` commands) logs an error every 2 s while Redis is away.

:class:`ResilientWorker` keeps RQ's ``work()`` loop and overrides the steps that talk to
Redis, deliberately:

- the dequeue is our own: on a connection error or timeout it reports the outage to the
  worker's Redis :class:`~worker.connectivity.Link` (one log line, ``/readyz`` false) and waits
  for Redis with backoff (capped at ``settings.worker_reconnect_max``), then listens again;
  a stop request (SIGTERM) ends the wait;
- ``execute_job`` survives a failure of RQ's bookkeeping around a job: the outcome lives in
  our job record, which the runner has already settled or retried (:mod:`worker.task`); a
  job popped but never started is re-enqueued by the orphan check (:mod:`worker.recovery`);
- the start-up steps that need Redis (``CLIENT SETNAME`` in the constructor, the birth
  registration, the pubsub subscription) wait for it;
- a fenced run (see :mod:`worker.task`) leaves RQ's job to the run that owns it now;
- RQ's own registration heartbeat, state mirror, registry maintenance, suspension check,
  shutdown timestamp and death registration are best-effort (liveness that matters is our
  heartbeat key, written by the maintenance thread).
"""

from __future__ import annotations

import time
from typing import Any

from rq import SimpleWorker
from rq.exceptions import DequeueTimeout, StopRequested
from rq.worker.base import WorkerStatus

from ham_core.logs import log_context
from ham_core.redis_client import REDIS_UNAVAILABLE
from worker.connectivity import Link

# What ``worker.task.run_transfer`` returns for a run that lost its job to another run.
FENCED = "fenced"
# Seconds between the pubsub thread's reconnect tries (RQ's own value).
PUBSUB_RETRY = 2.0


class ResilientWorker(SimpleWorker):
    """A ``SimpleWorker`` that waits out Redis outages instead of exiting. ``redis_link`` is required."""

    def __init__(self, *args: Any, redis_link: Link, **kwargs: Any) -> None:
        self.redis_link = redis_link  # before RQ's constructor: it already talks to Redis
        super().__init__(*args, **kwargs)

    # --- waiting --------------------------------------------------------------------------

    def _outage(self, exc: BaseException) -> None:
        """Redis failed us between jobs: wait for it (interruptible by a stop request)."""
        self.redis_link.failed(exc)
        stopping = lambda: getattr(self, "_stop_requested", False)  # noqa: E731
        self.redis_link.wait_until_up(should_stop=stopping)
        if stopping():
            raise StopRequested()

    def _until_redis(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """``call`` once it gets through to Redis (start-up steps: no job can run without them)."""
        while True:
            try:
                result = call(*args, **kwargs)
            except REDIS_UNAVAILABLE as exc:
                self._outage(exc)
                continue
            self.redis_link.recovered()
            return result

    def _set_ip_address(self, connection: Any) -> None:
        self._until_redis(super()._set_ip_address, connection)

    def register_birth(self) -> None:
        self._until_redis(super().register_birth)

    def subscribe(self) -> None:
        self._until_redis(super().subscribe)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        """The next ``(job, queue)``; ``None`` only in burst mode with an empty queue.

        ``max_idle_time`` is not supported (``ham worker`` never passes it).
        """
        qnames = ",".join(self.queue_names())
        while True:
            try:
                self.set_state(WorkerStatus.IDLE)
                self.procline(f"Listening on {qnames}")
                self.heartbeat()
                if self.should_run_maintenance_tasks:
                    self.run_maintenance_tasks()
                result = self.queue_class.dequeue_any(
                    self._ordered_queues,
                    timeout,
                    connection=self.connection,
                    job_class=self.job_class,
                    serializer=self.serializer,
                    death_penalty_class=self.death_penalty_class,
                )
                if result is not None:
                    job, queue = result
                    job.redis_server_version = self.get_redis_server_version()
                    self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
            except DequeueTimeout:  # an idle wait ended: beat and listen again
                continue
            except REDIS_UNAVAILABLE as exc:
                self._outage(exc)
                continue
            self.redis_link.recovered()
            self.heartbeat()
            return result

    def execute_job(self, job: Any, queue: Any) -> None:
        # RQ's own lines about the job carry its ids (the task fills in request id and tenant).
        with log_context(job_id=job.id):
            self._execute_job(job, queue)

    def _execute_job(self, job: Any, queue: Any) -> None:
        try:
            super().execute_job(job, queue)
        except REDIS_UNAVAILABLE as exc:
            self.log.warning("Worker %s: RQ could not record the end of job %s in Redis", self.name, job.id)
            self._outage(exc)

    def handle_job_success(self, job: Any, queue: Any, started_job_registry: Any) -> None:
        """RQ's success bookkeeping, except for a fenced run (``run_transfer`` returned ``"fenced"``).

        The RQ job (its hash, keyed by our job id) then belongs to the run that took the job over:
        RQ's own handling would delete it (``result_ttl=0``) under that run's feet. A fenced run only
        removes its own execution, so RQ's registries keep agreeing with the job record.
        """
        if getattr(job, "_result", None) != FENCED:
            super().handle_job_success(job, queue, started_job_registry)
            return
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe)
            pipe.execute()
        self.log.info("Worker %s: job %s: fenced run dropped; RQ's job left to its owner", self.name, job.id)

    # --- best-effort RQ bookkeeping ---------------------------------------------------------

    def _best_effort(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except REDIS_UNAVAILABLE as exc:
            self.redis_link.failed(exc)
            return None

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        self._best_effort(super().heartbeat, timeout, pipeline)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        # RQ keeps the state locally first (what its shutdown logic reads); Redis only mirrors it.
        self._best_effort(super().set_state, state, pipeline)

    def run_maintenance_tasks(self) -> None:
        self._best_effort(super().run_maintenance_tasks)

    def check_for_suspension(self, burst: bool) -> None:
        self._best_effort(super().check_for_suspension, burst)

    def set_shutdown_requested_date(self) -> None:
        # Called from the SIGTERM handler: an exception here would land inside the running job.
        self._best_effort(super().set_shutdown_requested_date)

    def teardown(self) -> None:
        self._best_effort(super().teardown)

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        if isinstance(exc, REDIS_UNAVAILABLE):
            self.redis_link.failed(exc)  # logged once by the link, not every 2 s
            time.sleep(PUBSUB_RETRY)
            # Probe until Redis answers, so readiness returns even while the main loop sits in BLPOP.
            self.redis_link.wait_until_up(should_stop=lambda: self._stop_requested)
            return
        super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)
