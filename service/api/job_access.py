"""A tenant's job as the routes read it: the lookup that never confirms another tenant's job,
and the public resource with its live queue position.

Shared by the route modules (:mod:`service.api.routes.transfers`, :mod:`service.api.routes.events`),
which import helpers from here, never from one another.
"""

from __future__ import annotations

import re

from ham_core.jobs import Job, JobStatus
from ham_core.logs import bind
from ham_core.resource import TransferJob
from ham_core.resource import job_resource as public_job
from service.api.deps import Services
from service.api.errors import NotFound

# Job ids are what JobStore issues; anything else cannot exist, so it is a 404 without a lookup.
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def job_resource(job: Job, services: Services) -> TransferJob:
    """The public view of a job record, with its live queue position and a fresh result URL."""
    queue_position = services.jobs.queue_position(job.id) if job.status == JobStatus.QUEUED else None
    settings = services.settings
    return public_job(job, services.storage, settings.url_ttl, queue_position, settings.result_ttl)


def owned_job(services: Services, tenant: str, job_id: str) -> Job:
    """The tenant's job ``job_id``; :class:`NotFound` for a missing job and for another tenant's alike."""
    if _JOB_ID.fullmatch(job_id):
        bind(job_id=job_id)
    job = services.jobs.get(job_id) if _JOB_ID.fullmatch(job_id) else None
    if job is None or job.tenant != tenant:
        # Truncated: the id is client input, and a 5000-character path should not come back in full.
        raise NotFound(f"no transfer job {job_id[:80]!r}")
    return job
