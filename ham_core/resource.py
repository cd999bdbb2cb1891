"""The public job resource: what a client sees of a job, shared by the API and the worker.

The API's responses and the webhook payload are the same object, so both the HTTP layer
(:mod:`service.api.routes.transfers`) and the worker (:mod:`worker.task`) build it here, from the
job record that Redis stores (:mod:`ham_core.jobs`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ham_core.jobs import Job, JobStatus
from ham_core.output import FORMAT_SPEC, QUALITY_SPEC
from ham_engine.params import TransferParams

if TYPE_CHECKING:
    from ham_core.storage import Storage

JobStatusName = Literal["queued", "running", "succeeded", "failed", "canceled"]

# The parameters in effect when a client sets none: what a job resource shows.
_EXAMPLE_PARAMS = TransferParams().to_dict()


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc)


class JobError(BaseModel):
    """Why a job failed."""

    code: str = Field(
        description="`invalid_input`, `inputs_missing`, `timeout`, `worker_lost`, `numerical_error` "
        "or `internal_error`."
    )
    message: str


class JobUrls(BaseModel):
    """Where to go next with a job: paths on this API (like `Location`)."""

    # `self` on the wire, `self_` in Python (where `self` would read as the instance); every dump uses `self`.
    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    self_: str = Field(alias="self", description="The job resource: `GET` it (with `Prefer: wait=N` to long-poll).")
    cancel: str = Field(description="`POST` here to cancel the job.")
    events: str = Field(description="`GET` here to follow the job as server-sent events.")

    @classmethod
    def of(cls, job_id: str) -> JobUrls:
        """The links of job ``job_id``."""
        base = f"/v1/transfers/{job_id}"
        return cls(self_=base, cancel=f"{base}/cancel", events=f"{base}/events")


class TransferJob(BaseModel):
    """A transfer job as a client sees it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f2b9c0e6a8d4e51a7c1d2e3f4a5b6c7",
                    "status": "succeeded",
                    "progress": 1.0,
                    "queue_position": None,
                    "result_url": "http://127.0.0.1:8000/v1/files/results/3f2b9c0e6a8d4e51a7c1d2e3f4a5b6c7.png"
                    "?expires=1767225600&sig=9c1e...",
                    "error": None,
                    "created_at": "2026-01-01T12:00:00.000Z",
                    "started_at": "2026-01-01T12:00:01.250Z",
                    "finished_at": "2026-01-01T12:00:09.900Z",
                    "params": _EXAMPLE_PARAMS,
                    "style_prompt": None,
                    "has_style": True,
                    "output_format": "png",
                    "output_quality": 90,
                    "urls": {"self": "/v1/transfers/3f2b9c0e6a8d4e51a7c1d2e3f4a5b6c7",
                             "cancel": "/v1/transfers/3f2b9c0e6a8d4e51a7c1d2e3f4a5b6c7/cancel",
                             "events": "/v1/transfers/3f2b9c0e6a8d4e51a7c1d2e3f4a5b6c7/events"},
                    "result_expires_at": "2026-01-02T12:00:09.900Z",
                },
                {
                    "id": "a1b2c3d4e5f60718293a4b5c6d7e8f90",
                    "status": "queued",
                    "progress": 0.0,
                    "queue_position": 3,
                    "result_url": None,
                    "error": None,
                    "created_at": "2026-01-01T12:00:00.000Z",
                    "started_at": None,
                    "finished_at": None,
                    "params": _EXAMPLE_PARAMS,
                    "style_prompt": "an ukiyo-e woodblock print",
                    "has_style": False,
                    "output_format": "webp",
                    "output_quality": 85,
                },
            ]
        }
    )

    id: str = Field(description="Job id; the resource lives at `/v1/transfers/{id}`.")
    status: JobStatusName
    progress: float = Field(ge=0.0, le=1.0, description="Fraction of sampling steps done, updated every step.")
    queue_position: int | None = Field(
        None, description="0-based position in the queue while `queued` (0: next to run); null otherwise."
    )
    result_url: str | None = Field(
        None,
        description="Expiring download URL of the result (in `output_format`) when `succeeded`; fetch the job again "
        "for a new one.",
    )
    result_urls: list[str] | None = Field(
        None,
        description="Expiring download URLs, one per style in the order given, when `succeeded` "
        "(`result_url` is the first).",
    )
    error: JobError | None = Field(None, description="Why the job failed, when `failed`.")
    created_at: datetime = Field(description="ISO 8601, UTC.")
    started_at: datetime | None = Field(None, description="When a worker last started the job (ISO 8601, UTC).")
    finished_at: datetime | None = Field(None, description="When the job reached a terminal state (ISO 8601, UTC).")
    params: dict[str, Any] = Field(description="The engine parameters in effect (defaults filled in).")
    style_prompt: str | None = Field(None, description="The text style reference, if one was given.")
    has_style: bool = Field(description="Whether a style image was given.")
    style_ids: list[str] = Field(default_factory=list, description="The library styles used (`/v1/styles`).")
    style_count: int = Field(1, description="How many styles the job carries (one result per style).")
    output_format: Literal[FORMAT_SPEC.choices] = Field(description="The result's file format.")
    output_quality: int = Field(ge=QUALITY_SPEC.minimum, le=QUALITY_SPEC.maximum,
                                description="Encoder quality of a jpeg or webp result.")
    model: str | None = Field(
        None, description="The model it runs on (`GET /v1/models`); null: the default model (jobs from before models)."
    )
    attempt: int = Field(
        0,
        ge=0,
        description="Which run of the job this is: 0 until a worker starts it, then 1, 2, ... each time a worker "
        "starts it (again, after a worker was lost or an outage). `progress` only rises within one run and starts "
        "again from 0 when this grows.",
    )
    urls: JobUrls = Field(description="Links to this job, its cancel action and its event stream.")
    result_expires_at: datetime | None = Field(
        None,
        description="When the result (and this job's record) will be deleted, once `succeeded` (ISO 8601, UTC); "
        "each `result_url` expires sooner, so fetch the job again for a fresh one until then.",
    )

    @classmethod
    def from_job(
        cls,
        job: Job,
        queue_position: int | None = None,
        result_url: str | None = None,
        result_urls: list[str] | None = None,
        result_ttl: int | None = None,
    ) -> TransferJob:
        """The public view of a stored job (the API's responses and the webhook payload share it)."""
        error = JobError(code=job.error_code, message=job.error_message or job.error_code) if job.error_code else None
        return cls(
            id=job.id,
            status=JobStatus(job.status).value,
            progress=min(1.0, max(0.0, float(job.progress))),
            queue_position=queue_position,
            result_url=result_url,
            result_urls=result_urls,
            error=error,
            created_at=_utc(job.created_at),
            started_at=_utc(job.started_at),
            finished_at=_utc(job.finished_at),
            params=job.params,
            style_prompt=job.style_prompt,
            has_style=job.has_style,
            style_ids=job.style_ids,
            style_count=len(job.styles) or 1,
            output_format=job.output_format,
            output_quality=job.output_quality,
            model=job.model,
            attempt=job.run,
            urls=JobUrls.of(job.id),
            result_expires_at=_utc(job.finished_at + result_ttl)
            if result_ttl is not None and job.finished_at is not None and job.status == JobStatus.SUCCEEDED
            else None,
        )


def job_resource(
    job: Job, storage: Storage, url_ttl: int, queue_position: int | None = None, result_ttl: int | None = None
) -> TransferJob:
    """The public job resource: the API's responses and the webhook payload are this object.

    A succeeded job gets a freshly signed result URL valid for ``url_ttl`` seconds, and, given the
    ``result_ttl`` the results are kept for, when they will be deleted.
    """
    result_url = result_urls = None
    if job.status == JobStatus.SUCCEEDED and job.result_key:
        result_url = storage.url(job.result_key, url_ttl)
        result_urls = [storage.url(key, url_ttl) for key in job.result_keys or [job.result_key]]
    return TransferJob.from_job(job, queue_position=queue_position, result_url=result_url, result_urls=result_urls,
                                result_ttl=result_ttl)
