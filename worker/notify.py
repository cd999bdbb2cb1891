"""Webhooks from the worker: the job resource handed to the dispatcher for the events a job asked for.

Used by the runner (``start``, ``progress``, ``completed``) and by recovery (a lost job that
ends failed). Sending is the dispatcher's (:class:`ham_core.webhooks.WebhookDispatcher`, a
background thread): nothing here blocks or fails a job.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from ham_core.config import Settings
from ham_core.jobs import Job
from ham_core.resource import job_resource
from ham_core.storage import Storage

log = logging.getLogger("ham.worker")

# Seconds between two `progress` webhooks of one job (at most one per second per job).
PROGRESS_WEBHOOK_INTERVAL = 1.0


class WebhookSink(Protocol):
    """What the runner needs from :class:`ham_core.webhooks.WebhookDispatcher`."""

    def submit(self, url: str, payload: dict, event: str = "completed") -> None: ...


def webhook_payload(job: Job, storage: Storage, settings: Settings) -> dict[str, Any]:
    """The job resource exactly as ``GET /v1/transfers/{id}`` shows it (terminal: no queue position)."""
    return job_resource(job, storage, settings.url_ttl, result_ttl=settings.result_ttl).model_dump(mode="json")


def notify_webhook(
    job: Job, storage: Storage, settings: Settings, webhooks: WebhookSink | None, event: str = "completed"
) -> None:
    """Hand the job resource to the webhook dispatcher, if the job asked for one and for this ``event``."""
    if not job.webhook_url or webhooks is None or event not in job.webhook_events:
        return
    try:
        webhooks.submit(job.webhook_url, webhook_payload(job, storage, settings), event=event)
    except Exception:  # a webhook must never fail the job
        log.warning("job %s: webhook not queued", job.id, exc_info=True)
