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
4. Write ``results/{id}.png`` (a multi-style job: ``results/{id}-{i}.png`` for style
   ``i`` >= 1, through one ``transfer_batch``), then the terminal state: succeeded; failed with
   ``invalid_input`` (engine ``ValueError``), ``inputs_missing``, ``timeout`` or
   ``internal_error`` (logged with the job id); or canceled.
5. Delete the inputs, fire the webhook (background thread, never blocks).

RQ always sees the call succeed: the outcome lives in the job record, not in RQ.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image
from rq.timeouts import BaseTimeoutException

from ham_engine.params import TransferParams
from service.core.config import Settings
from service.core.jobs import (
    ERROR_INPUTS_MISSING,
    ERROR_INTERNAL,
    ERROR_INVALID_INPUT,
    ERROR_STORAGE,
    ERROR_TIMEOUT,
    Job,
    JobConflict,
    JobStatus,
    JobStore,
    result_key,
)
from service.core.resource import job_resource
from service.core.storage import Storage, StorageError
from service.core.styles import StyleStore

if TYPE_CHECKING:
    from ham_engine.engine import HamEngine
    from worker.metrics import WorkerMetrics

log = logging.getLogger("ham.worker")


class WebhookSink(Protocol):
    """What the runner needs from :class:`service.core.webhooks.WebhookDispatcher`."""

    def submit(self, url: str, payload: dict) -> None: ...


def webhook_payload(job: Job, storage: Storage, settings: Settings) -> dict[str, Any]:
    """The job resource exactly as ``GET /v1/transfers/{id}`` shows it (terminal: no queue position)."""
    return job_resource(job, storage, settings.url_ttl).model_dump(mode="json")


@dataclass
class _Watch:
    """The per-job callbacks the engine calls between steps."""

    store: JobStore
    job_id: str
    deadline: float
    timed_out: bool = False
    last_progress: float = field(default=-1.0)

    def progress(self, step: int, total: int) -> None:
        # Keep 1.0 for "succeeded": the decode and upload still follow the last step.
        fraction = 0.99 * step / max(total, 1)
        if fraction > self.last_progress:
            self.last_progress = fraction
            self.store.set_progress(self.job_id, fraction)

    def cancelled(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
            return True
        return self.store.cancel_requested(self.job_id)


STORAGE_RETRY_BASE = 2.0
STORAGE_RETRY_MAX = 30.0


class TransferRunner:
    """Runs jobs by id on a preloaded engine. One per worker process."""

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
    ) -> None:
        self.engine = engine
        self.styles = styles
        self.store = store
        self.storage = storage
        self.settings = settings
        self.worker_name = worker_name
        self.metrics = metrics
        self.webhooks = webhooks
        self.current_job: str | None = None
        # Seconds before a job hit by a storage outage goes back to the queue (doubles per attempt).
        self.storage_retry_base = STORAGE_RETRY_BASE

    def run(self, job_id: str) -> str:
        """Run one job; returns its outcome (``succeeded``, ``failed``, ``canceled``, ``skipped``)."""
        # Claimed before the start, so no heartbeat after the start can deny running it.
        self.current_job = job_id
        job: Job | None = None
        try:
            job = self.store.start(job_id, self.worker_name)
        finally:
            if job is None:  # skipped, or Redis failed: not ours to run
                self.current_job = None
        if job is None:
            log.info("job %s: not runnable any more (canceled, finished or taken); skipped", job_id)
            return "skipped"
        began = time.monotonic()
        if self.metrics:
            self.metrics.jobs_in_progress.inc()
        stats: dict[str, Any] | None = None
        try:
            log.info("job %s: started (attempt %d, tenant %s)", job_id, job.attempts, job.tenant)
            final, stats = self._execute(job, began)
        except BaseException:
            # Cold shutdown (second SIGTERM, Ctrl-C) mid-job: hand the job back now
            # instead of waiting for the heartbeat to expire.
            self.store.requeue(job_id, expected_worker=self.worker_name)
            raise
        finally:
            self.current_job = None
            if self.metrics:
                self.metrics.jobs_in_progress.dec()
        outcome = final.status.value if final is not None else "lost"
        if self.metrics:
            self.metrics.observe_job(outcome, time.monotonic() - began, stats)
            self.metrics.set_allocated_memory(_device_allocated_bytes(self.engine))
        if final is not None and final.terminal:
            self._after_terminal(final)
        log.info("job %s: %s in %.2fs", job_id, outcome, time.monotonic() - began)
        return outcome

    def _execute(self, job: Job, began: float) -> tuple[Job | None, dict[str, Any] | None]:
        from ham_engine.engine import TransferCancelled  # torch: only ever imported in a worker

        watch = _Watch(self.store, job.id, deadline=began + self.settings.job_timeout)
        try:
            params = TransferParams.from_dict(job.params)
            content = _open_png(self.storage.get(job.content_key))
            styles = self._load_styles(job)
        except KeyError as exc:
            return self._finish_fail(job, ERROR_INPUTS_MISSING, f"input {exc.args[0]} is gone (expired?)"), None
        except StorageError as exc:
            return self._retry_or_fail(job, exc), None
        except (ValueError, OSError) as exc:  # bad params in the record, or an unreadable input PNG
            return self._finish_fail(job, ERROR_INVALID_INPUT, str(exc)), None
        except Exception as exc:
            return self._internal_error(job, exc), None
        try:
            if len(styles) == 1:
                style, prompt = styles[0]
                single = self.engine.transfer(
                    content, style=style, style_prompt=prompt, params=params,
                    progress=watch.progress, cancelled=watch.cancelled,
                )  # fmt: skip
                pictures, stats = [single.image], single.stats
            else:
                from ham_engine.engine import Style

                batch = self.engine.transfer_batch(
                    content, [Style(image, prompt) for image, prompt in styles], params=params,
                    progress=watch.progress, cancelled=watch.cancelled,
                )  # fmt: skip
                pictures, stats = batch.images, batch.stats
            self._record_style_digests(job, styles)
            keys = [result_key(job.id, i) for i in range(len(pictures))]
            for key, picture in zip(keys, pictures, strict=True):
                buffer = io.BytesIO()
                picture.save(buffer, format="PNG")
                self.storage.put(key, buffer.getvalue(), "image/png")
            many = keys if job.styles else None
            return self._transition(job.id, lambda: self.store.succeed(job.id, keys[0], stats, many)), stats
        except TransferCancelled:
            if watch.timed_out:
                message = f"the job ran longer than the limit of {self.settings.job_timeout}s"
                return self._finish_fail(job, ERROR_TIMEOUT, message), None
            return self._transition(job.id, lambda: self._cancel_if_still_ours(job.id)), None
        except StorageError as exc:  # the result could not be written
            return self._retry_or_fail(job, exc), None
        except ValueError as exc:
            return self._finish_fail(job, ERROR_INVALID_INPUT, str(exc)), None
        except BaseTimeoutException:
            # RQ's hard limit (job_timeout + margin) fired inside a step that never returned.
            message = f"the job ran longer than the limit of {self.settings.job_timeout}s"
            return self._finish_fail(job, ERROR_TIMEOUT, message), None
        except Exception as exc:
            return self._internal_error(job, exc), None

    def _load_styles(self, job: Job) -> list[tuple[Image.Image | None, str | None]]:
        """(image, prompt) per style, in order; ``KeyError`` names a missing input or deleted library style."""
        if not job.styles:
            return [(_open_png(self.storage.get(job.style_key)) if job.style_key else None, job.style_prompt)]
        out = []
        for style in job.styles:
            key = style.get("key")
            try:
                image = _open_png(self.storage.get(key)) if key else None
            except KeyError:
                raise KeyError(f"style {style['style_id']} (deleted?)" if style.get("style_id") else key) from None
            out.append((image, style.get("prompt")))
        return out

    def _record_style_digests(self, job: Job, styles: list[tuple[Image.Image | None, str | None]]) -> None:
        """Tell each library style where its features live, so deleting the style can remove them."""
        if self.styles is None:
            return
        from ham_engine.images import image_digest

        for style, (image, _) in zip(job.styles or [], styles, strict=False):
            if style.get("style_id") and image is not None:
                try:
                    self.styles.set_field(style["style_id"], "image_digest", image_digest(image))
                except Exception:  # bookkeeping only: the feature TTL still bounds what is left behind
                    log.warning("job %s: could not record the digest of style %s", job.id, style["style_id"])

    def _retry_or_fail(self, job: Job, exc: StorageError) -> Job | None:
        """A storage outage is transient: back to the queue after a pause, up to the retry limit."""
        if job.attempts > self.settings.job_max_retries:
            message = f"object storage unavailable on all {job.attempts} attempts: {exc}"
            return self._finish_fail(job, ERROR_STORAGE, message)
        delay = min(STORAGE_RETRY_MAX, self.storage_retry_base * 2 ** (job.attempts - 1))
        log.warning("job %s: storage unavailable (%s); back to the queue in %.1fs", job.id, exc, delay)
        time.sleep(delay)  # the outage blocks every job alike; pausing this worker is no loss
        return self.store.requeue(job.id, expected_worker=self.worker_name, at_front=False)

    def _internal_error(self, job: Job, exc: Exception) -> Job | None:
        log.error("job %s: internal error", job.id, exc_info=exc)
        message = f"internal error ({type(exc).__name__}); reference job id {job.id}"
        return self._finish_fail(job, ERROR_INTERNAL, message)

    def _cancel_if_still_ours(self, job_id: str) -> Job | None:
        # cancelled() also answers True when the job stopped being ours (recovered by
        # another worker after a missed heartbeat): then leave it to its new owner.
        current = self.store.get(job_id)
        if current is None or current.status != JobStatus.RUNNING or current.worker != self.worker_name:
            log.warning("job %s: no longer ours (%s); dropping this run", job_id, current and current.status.value)
            return None
        return self.store.mark_canceled(job_id)

    def _finish_fail(self, job: Job, code: str, message: str) -> Job | None:
        log.info("job %s: failed with %s: %s", job.id, code, message)
        return self._transition(job.id, lambda: self.store.fail(job.id, code, message))

    def _transition(self, job_id: str, action: Any) -> Job | None:
        try:
            return action()
        except (JobConflict, KeyError) as exc:
            # Finished elsewhere meanwhile (recovered and re-run, or expired): nothing to do.
            log.warning("job %s: terminal transition refused: %s", job_id, exc)
            return None

    def _after_terminal(self, job: Job) -> None:
        for key in job.input_keys:
            if key:
                try:
                    self.storage.delete(key)
                except Exception:  # the expiry sweep deletes it later
                    log.warning("job %s: could not delete input %s", job.id, key, exc_info=True)
        notify_webhook(job, self.storage, self.settings, self.webhooks)


def notify_webhook(job: Job, storage: Storage, settings: Settings, webhooks: WebhookSink | None) -> None:
    """Hand the job resource to the webhook dispatcher, if the job asked for one."""
    if not job.webhook_url or webhooks is None:
        return
    try:
        webhooks.submit(job.webhook_url, webhook_payload(job, storage, settings))
    except Exception:  # a webhook must never fail the job
        log.warning("job %s: webhook not queued", job.id, exc_info=True)


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
