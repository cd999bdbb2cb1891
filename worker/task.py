"""One transfer job, start to finish, inside a worker process.

RQ calls :func:`run_transfer` with nothing but a job id (the queue carries no pickles and
no images). The heavy objects — the loaded engine, storage, the job store — live in one
:class:`TransferRunner` that ``ham worker`` builds at start and installs with
:func:`install_runner`; RQ's ``SimpleWorker`` runs jobs in that same process.

A job's life here:

1. ``JobStore.start`` (queued → running). ``None`` means canceled, finished or claimed
   by someone else: skip silently.
2. Read the normalised input PNGs from storage.
3. Run the engine; every step writes progress and polls the cancel flag and the
   deadline (``settings.job_timeout``), which the engine honours between steps.
4. Run ``transfer_batch`` over the job's styles (one or several) and write
   ``results/{id}/run-{run}.png`` (``…/run-{run}-{i}.png`` for style ``i`` >= 1), then the
   terminal state: succeeded; failed with
   ``invalid_input`` (the engine's own input errors, :class:`~ham_engine.params.ParamError`),
   ``numerical_error`` (the engine's ``NumericalError``: an overflow), ``inputs_missing``,
   ``timeout`` or ``internal_error`` (anything else, a library's ``ValueError`` included;
   logged with the job id); or canceled. Each transition is logged
   once it is recorded.
5. Delete the inputs, fire the webhook (background thread, never blocks).

Outages are not the job's fault. Progress and cancel polls are best-effort while Redis is
away. Reading the inputs, uploading the result and recording the terminal state are retried
(backoff with jitter) for ``settings.worker_outage_deadline`` seconds; past that the job goes
back to the queue with its attempt refunded (:meth:`TransferRunner._hand_back`). Only the
job's own faults fail it; only repeated worker deaths use up its retries (``worker.recovery``).

Fencing: every write about the job — progress, cancel poll, result upload, terminal state,
hand-back — names the run (``Job.run``, bumped by every start) and the store applies it only
while that run owns the job. A worker frozen long enough to be declared dead (a GC pause, CPU
throttling, a partition) whose job was recovered and started elsewhere learns it at its next
progress write or poll — within one diffusion step — and drops the run without writing anything
more (outcome ``fenced``); its result files, were it to get that far, are named per run.

RQ always sees the call succeed: the outcome lives in the job record, not in RQ.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image
from rq.timeouts import BaseTimeoutException

from ham_core.config import Settings
from ham_core.jobs import (
    ERROR_INPUTS_MISSING,
    ERROR_INTERNAL,
    ERROR_INVALID_INPUT,
    ERROR_NUMERICAL,
    ERROR_TIMEOUT,
    POLL_FENCED,
    Job,
    JobConflict,
    JobFenced,
    JobStatus,
    JobStore,
    result_key,
)
from ham_core.logs import bind, log_context
from ham_core.output import OutputSpec, encode
from ham_core.redis_client import REDIS_UNAVAILABLE
from ham_core.speed import record_speed
from ham_core.storage import Storage, StorageError
from ham_core.styles import StyleStore
from ham_engine.params import ParamError, TransferParams
from ham_engine.results import TransferStats
from worker.connectivity import Link, OutageTooLong, outlast, redis_link_for, storage_link_for
from worker.notify import PROGRESS_WEBHOOK_INTERVAL, WebhookSink, notify_webhook
from worker.watch import StepWatch

if TYPE_CHECKING:
    from ham_engine.engine import HamEngine, Style
    from worker.metrics import WorkerMetrics

log = logging.getLogger("ham.worker")


@dataclass
class _Inputs:
    """What a job's run reads before the engine starts."""

    params: TransferParams
    content: Image.Image
    styles: list[Style]


class TransferRunner:
    """Runs jobs by id on a preloaded engine. One per worker process.

    ``progress_store`` (default ``store``) carries the per-step writes; ``ham worker`` gives it
    a client that fails fast instead of retrying. ``redis_link`` and ``storage_link`` are
    shared with the rest of the worker, so an outage seen here shows in ``/readyz``.
    """

    def __init__(
        self,
        engine: HamEngine,
        store: JobStore,
        storage: Storage,
        settings: Settings,
        worker_name: str,
        metrics: WorkerMetrics | None = None,
        webhooks: WebhookSink | None = None,
        styles: StyleStore | None = None,
        *,
        progress_store: JobStore | None = None,
        redis_link: Link | None = None,
        storage_link: Link | None = None,
    ) -> None:
        self.engine = engine
        self.styles = styles
        self.store = store
        self.storage = storage
        self.settings = settings
        self.worker_name = worker_name
        self.metrics = metrics
        self.webhooks = webhooks
        self.progress_store = progress_store or store
        self.redis_link = redis_link or redis_link_for(store, settings)
        self.storage_link = storage_link or storage_link_for(
            storage, settings, metrics.storage_changed if metrics else None
        )
        self.current_job: str | None = None
        # Set once the current run learns another run owns its job (see StepWatch): it writes nothing more.
        self.fenced = False

    def run(self, job_id: str) -> str:
        """Run one job; returns its outcome (``succeeded``, ``failed``, ``canceled``, ``queued``,
        ``skipped``, or ``fenced``: another run took the job over while this one was frozen)."""
        with log_context(job_id=job_id):
            return self._run(job_id)

    def _run(self, job_id: str) -> str:
        # Claimed before the start, so no heartbeat after the start can deny running it.
        self.current_job = job_id
        self.fenced = False
        job: Job | None = None
        try:
            job = self._start(job_id)
        finally:
            if job is None:  # skipped, or Redis stayed away: not ours to run
                self.current_job = None
        if job is None:
            return "skipped"
        bind(tenant=job.tenant, request_id=job.request_id)
        began = time.monotonic()
        if self.metrics:
            self.metrics.jobs_in_progress.inc()
        stats: TransferStats | None = None
        try:
            log.info("job %s: started (attempt %d, run %d, tenant %s)", job_id, job.attempts, job.run, job.tenant)
            final, stats = self._execute(job, began)
        except BaseException:
            # Cold shutdown (second SIGTERM, Ctrl-C) mid-job: hand the job back now instead of
            # waiting for the heartbeat to expire. Not the job's doing: the attempt is not charged.
            try:
                self.store.requeue(job_id, expected_worker=self.worker_name, refund_attempt=True, run=job.run)
                log.warning("job %s: interrupted; back in the queue, attempt not charged", job_id)
            except REDIS_UNAVAILABLE:  # the other workers' recovery settles it
                log.warning("job %s: interrupted and Redis unreachable; left to recovery", job_id)
            raise
        finally:
            self.current_job = None
            if self.metrics:
                self.metrics.jobs_in_progress.dec()
        outcome = "fenced" if self.fenced else final.status.value if final is not None else "lost"
        if self.metrics:
            self.metrics.observe_job(outcome, time.monotonic() - began, stats)
            self.metrics.set_allocated_memory(_device_allocated_bytes(self.engine))
        if outcome == "succeeded":  # what the playground's estimates are made of
            record_speed(self.store.redis, self.engine.model.name, job.params.get("size", 0),
                         job.params.get("steps", 0), time.monotonic() - began)
        if final is not None and final.terminal:
            self._after_terminal(final)
        log.info("job %s: %s in %.2fs", job_id, outcome, time.monotonic() - began)
        return outcome

    def _start(self, job_id: str) -> Job | None:
        deadline = time.monotonic() + self.settings.worker_outage_deadline
        try:
            job = outlast(f"job {job_id}: start", lambda: self.store.start(job_id, self.worker_name),
                          self.redis_link, deadline)
        except OutageTooLong as exc:
            # Still queued in its record: the orphan check puts it back in RQ's list.
            log.warning("job %s: not started, %s; left queued", job_id, exc)
            return None
        if job is None:
            log.info("job %s: not runnable any more (canceled, finished or taken); skipped", job_id)
        return job

    def _execute(self, job: Job, began: float) -> tuple[Job | None, TransferStats | None]:
        from ham_engine.engine import NumericalError, TransferCancelled  # torch: only ever imported in a worker

        watch = StepWatch(self.progress_store, self.redis_link, job.id, deadline=began + self.settings.job_timeout,
                          run=job.run, on_progress=self._progress_webhook(job))
        self._event_webhook(job, "start")
        inputs = self._read_inputs(job)
        if not isinstance(inputs, _Inputs):
            return inputs, None  # the job ended (failed, handed back) before the engine ran
        try:
            output = OutputSpec(job.output_format, job.output_quality)
            batch = self.engine.transfer_batch(
                inputs.content, inputs.styles, params=inputs.params, progress=watch.progress, cancelled=watch.cancelled
            )
            encoded = [encode(picture, output) for picture in batch.images]
        except TransferCancelled:
            if watch.fenced:
                return self._fenced(job, "at a progress write"), None
            if watch.timed_out:
                return self._finish_fail(job, ERROR_TIMEOUT, self._timeout_message()), None
            return self._record(job, "canceled", lambda: self.store.mark_canceled(job.id, run=job.run)), None
        except ParamError as exc:  # the engine refused the inputs; a library's ValueError is a bug
            return self._finish_fail(job, ERROR_INVALID_INPUT, str(exc)), None
        except NumericalError as exc:
            log.warning("job %s: numerical error: %s", job.id, exc)
            return self._finish_fail(job, ERROR_NUMERICAL, str(exc)), None
        except BaseTimeoutException:
            # RQ's hard limit (job_timeout + margin) fired inside a step that never returned.
            return self._finish_fail(job, ERROR_TIMEOUT, self._timeout_message()), None
        except (*REDIS_UNAVAILABLE, StorageError) as exc:  # an outage is never the job's fault
            return self._hand_back(job, exc), None
        except Exception as exc:
            return self._internal_error(job, exc), None
        return self._deliver(job, inputs.styles, encoded, output, batch.stats), batch.stats

    def _timeout_message(self) -> str:
        return f"the job ran longer than the limit of {self.settings.job_timeout}s"

    def _read_inputs(self, job: Job) -> _Inputs | Job | None:
        """The job's parameters and images, or the job as it ended when they cannot be had."""
        outage_deadline = time.monotonic() + self.settings.worker_outage_deadline
        try:
            params = TransferParams.from_dict(job.params)
            content = _open_png(self._read(job.content_key, outage_deadline))
            return _Inputs(params, content, self._load_styles(job, outage_deadline))
        except KeyError as exc:
            message = f"input {exc.args[0]} is gone (expired?)"
            return self._finish_fail(job, ERROR_INPUTS_MISSING, message)
        except OutageTooLong as exc:
            return self._hand_back(job, exc)
        except (ValueError, OSError) as exc:  # bad params or output format in the record, or an unreadable PNG
            return self._finish_fail(job, ERROR_INVALID_INPUT, str(exc))
        except Exception as exc:
            return self._internal_error(job, exc)

    def _deliver(self, job: Job, styles: list[Style], encoded: list[bytes], output: OutputSpec,
                 stats: TransferStats) -> Job | None:
        """Upload the results and record success; the engine's work is done, so an outage is waited out."""
        outage_deadline = time.monotonic() + self.settings.worker_outage_deadline
        if self._quietly(lambda: self.store.poll(job.id, job.run)) == POLL_FENCED:
            return self._fenced(job, "before the result upload")
        # Named per run: a stale run that got this far still cannot touch the owner's files.
        keys = [result_key(job.id, output.extension, index, job.run) for index in range(len(encoded))]
        try:
            for key, data in zip(keys, encoded, strict=True):
                outlast(f"job {job.id}: result upload",
                        lambda key=key, data=data: self.storage.put(key, data, output.content_type),
                        self.storage_link, outage_deadline)
        except OutageTooLong as exc:
            return self._hand_back(job, exc)
        self._record_style_digests(job, styles)
        record = stats.to_dict()
        final = self._record(job, "succeeded", lambda: self.store.succeed(job.id, keys[0], record, keys, run=job.run),
                             outage_deadline)  # fmt: skip
        if self.fenced:
            self._delete_quietly(job, keys)  # this run's own files: nobody will ever point at them
        return final

    def _fenced(self, job: Job, where: str) -> None:
        """Another run owns the job now: stop, write nothing more about it, serve the next job."""
        self.fenced = True
        log.warning("job %s: fenced %s: run %d no longer owns the job (recovered while this worker was "
                    "unresponsive); dropping this run without writing anything", job.id, where, job.run)
        return None

    def _delete_quietly(self, job: Job, keys: list[str]) -> None:
        for key in keys:
            try:
                self.storage.delete(key)
            except Exception:  # the expiry sweep deletes it later
                log.warning("job %s: could not delete %s", job.id, key, exc_info=True)

    def _load_styles(self, job: Job, deadline: float) -> list[Style]:
        """The engine's style per :class:`StyleRef` of the job, in order; ``KeyError`` names a
        missing input or a deleted library style."""
        from ham_engine.engine import Style  # torch: only ever imported in a worker

        out = []
        for ref in job.styles:
            try:
                image = _open_png(self._read(ref.key, deadline)) if ref.key else None
            except KeyError:
                raise KeyError(f"style {ref.style_id} (deleted?)" if ref.style_id else ref.key) from None
            out.append(Style(image, ref.prompt))
        return out

    def _record_style_digests(self, job: Job, styles: list[Style]) -> None:
        """Tell each library style where its features live, so deleting the style can remove them."""
        if self.styles is None:
            return
        from ham_engine.images import image_digest

        for ref, style in zip(job.styles, styles, strict=True):
            if ref.style_id and ref.digest is None and style.image is not None:
                try:
                    self.styles.set_field(ref.style_id, "image_digest", image_digest(style.image))
                except Exception:  # bookkeeping only: the feature TTL still bounds what is left behind
                    log.warning("job %s: could not record the digest of style %s", job.id, ref.style_id)

    def _event_webhook(self, job: Job, event: str) -> None:
        """A ``start`` or ``progress`` webhook with the job as it stands, if the job asked for that event."""
        if not job.webhook_url or event not in job.webhook_events:
            return
        current = self._quietly(lambda: self.store.get(job.id)) or job
        notify_webhook(current, self.storage, self.settings, self.webhooks, event)

    def _progress_webhook(self, job: Job) -> Callable[[], None] | None:
        """The per-step hook that sends ``progress`` webhooks, at most one per ``PROGRESS_WEBHOOK_INTERVAL``."""
        if "progress" not in job.webhook_events or not job.webhook_url:
            return None
        last_sent = -PROGRESS_WEBHOOK_INTERVAL

        def on_progress() -> None:
            nonlocal last_sent
            now = time.monotonic()
            if now - last_sent >= PROGRESS_WEBHOOK_INTERVAL:
                last_sent = now
                self._event_webhook(job, "progress")

        return on_progress

    def _read(self, key: str, deadline: float) -> bytes:
        return outlast(f"reading {key}", lambda: self.storage.get(key), self.storage_link, deadline)

    def _hand_back(self, job: Job, cause: BaseException) -> Job | None:
        """An outage outlasted the deadline: the job goes back to the queue, its attempt refunded.

        The requeue needs Redis; while Redis is away it waits (the worker can do nothing else).
        """
        log.warning("job %s: %s; handing it back to the queue", job.id, cause)
        while True:
            try:
                back = self.store.requeue(job.id, expected_worker=self.worker_name, refund_attempt=True, run=job.run)
            except REDIS_UNAVAILABLE as exc:
                self.redis_link.failed(exc)
                self.redis_link.wait_until_up()
                continue
            self.redis_link.recovered()
            if back is not None:
                log.info("job %s: back in the queue (attempt not charged)", job.id)
            return back

    def _internal_error(self, job: Job, exc: Exception) -> Job | None:
        log.error("job %s: internal error", job.id, exc_info=exc)
        message = f"internal error ({type(exc).__name__}); reference job id {job.id}"
        return self._finish_fail(job, ERROR_INTERNAL, message)

    def _finish_fail(self, job: Job, code: str, message: str) -> Job | None:
        final = self._record(job, "failed", lambda: self.store.fail(job.id, code, message, run=job.run))
        if final is not None and final.status == JobStatus.FAILED:
            log.info("job %s: failed with %s: %s", job.id, code, message)
            if self.metrics:
                self.metrics.job_failures.labels(code=code).inc()
        return final

    def _record(self, job: Job, status: str, action: Callable[[], Job | None],
                deadline: float | None = None) -> Job | None:
        """Record a terminal state, retrying through a Redis outage until the deadline.

        Past it the job is handed back (its attempt refunded). A refusal because the job is
        already in that state *on this worker* is a retry whose first reply was lost: done.
        """
        if deadline is None:
            deadline = time.monotonic() + self.settings.worker_outage_deadline
        try:
            return outlast(f"job {job.id}: recording {status}", action, self.redis_link, deadline)
        except OutageTooLong as exc:
            return self._hand_back(job, exc)
        except JobFenced:
            return self._fenced(job, f"recording {status}")
        except (JobConflict, KeyError) as exc:
            current = self._quietly(lambda: self.store.get(job.id))
            if current is not None and current.status.value == status and current.run == job.run:
                return current
            # Finished elsewhere meanwhile (recovered and re-run, or expired): nothing to do.
            log.warning("job %s: terminal transition refused: %s", job.id, exc)
            return None

    def _quietly(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except REDIS_UNAVAILABLE:
            return None

    def _after_terminal(self, job: Job) -> None:
        for key in job.input_keys:
            if key:
                try:
                    self.storage.delete(key)
                except Exception:  # the expiry sweep deletes it later
                    log.warning("job %s: could not delete input %s", job.id, key, exc_info=True)
        notify_webhook(job, self.storage, self.settings, self.webhooks)


def _open_png(data: bytes) -> Image.Image:
    # Inputs were re-encoded as RGB PNG by the API, so this parses only our own output.
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def _device_allocated_bytes(engine: HamEngine) -> int:
    import torch

    device = engine.model.device
    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0


_runner: TransferRunner | None = None


def install_runner(runner: TransferRunner | None) -> None:
    """Make ``runner`` the one :func:`run_transfer` uses in this process (``ham worker`` does this)."""
    global _runner
    _runner = runner


def run_transfer(job_id: str) -> str:
    """RQ entry point (``"worker.task.run_transfer"``): run job ``job_id`` on this process's runner."""
    if _runner is None:
        raise RuntimeError("run_transfer needs the runner of a worker started with `ham worker`")
    return _runner.run(job_id)
