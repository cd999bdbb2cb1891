"""What the HTTP API sends and accepts, as pydantic models (they drive ``/openapi.json``).

Kept apart from the job record (:mod:`service.jobs`): the record is what Redis stores, these
are the public shapes, translated in :mod:`service.routes.transfers`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.jobs import Job, JobStatus

if TYPE_CHECKING:
    from service.storage import Storage

JobStatusName = Literal["queued", "running", "succeeded", "failed", "canceled"]

_EXAMPLE_PARAMS = {
    "steps": 50,
    "seed": 0,
    "size": 512,
    "alpha": 0.75,
    "beta": 0.25,
    "gamma": 0.5,
    "guidance": 7.5,
    "sini": True,
    "gar": True,
    "lat": True,
    "gar_layers": ["up_blocks.*"],
    "lat_layers": ["up_blocks.*"],
    "step_start": 0.0,
    "step_end": 1.0,
    "inversion": "target",
    "teachers": "auto",
}


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, tz=timezone.utc)


class ErrorDetail(BaseModel):
    """Why a request failed."""

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_parameter`.")
    message: str = Field(description="What went wrong and what is allowed.")
    field: str | None = Field(None, description="The input to blame, when there is one.")


class ErrorResponse(BaseModel):
    """Every non-2xx answer has this shape."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "invalid_parameter", "message": "alpha: must be in [0.0, 1.0], got 2.0",
                           "field": "alpha"}}
            ]
        }
    )

    error: ErrorDetail


class JobError(BaseModel):
    """Why a job failed."""

    code: str = Field(
        description="`invalid_input`, `inputs_missing`, `timeout`, `worker_lost`, `storage_unavailable` "
        "or `internal_error`."
    )
    message: str


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
        None, description="Expiring download URL of the result PNG when `succeeded`; fetch the job again for a new one."
    )
    error: JobError | None = Field(None, description="Why the job failed, when `failed`.")
    created_at: datetime = Field(description="ISO 8601, UTC.")
    started_at: datetime | None = Field(None, description="When a worker last started the job (ISO 8601, UTC).")
    finished_at: datetime | None = Field(None, description="When the job reached a terminal state (ISO 8601, UTC).")
    params: dict[str, Any] = Field(description="The engine parameters in effect (defaults filled in).")
    style_prompt: str | None = Field(None, description="The text style reference, if one was given.")
    has_style: bool = Field(description="Whether a style image was given.")

    @classmethod
    def from_job(cls, job: Job, queue_position: int | None = None, result_url: str | None = None) -> TransferJob:
        """The public view of a stored job (the API's responses and the webhook payload share it)."""
        error = JobError(code=job.error_code, message=job.error_message or job.error_code) if job.error_code else None
        return cls(
            id=job.id,
            status=JobStatus(job.status).value,
            progress=min(1.0, max(0.0, float(job.progress))),
            queue_position=queue_position,
            result_url=result_url,
            error=error,
            created_at=_utc(job.created_at),
            started_at=_utc(job.started_at),
            finished_at=_utc(job.finished_at),
            params=job.params,
            style_prompt=job.style_prompt,
            has_style=job.has_style,
        )


def job_resource(job: Job, storage: Storage, url_ttl: int, queue_position: int | None = None) -> TransferJob:
    """The public job resource: the API's responses and the webhook payload are this object.

    A succeeded job gets a freshly signed result URL valid for ``url_ttl`` seconds.
    """
    result_url = None
    if job.status == JobStatus.SUCCEEDED and job.result_key:
        result_url = storage.url(job.result_key, url_ttl)
    return TransferJob.from_job(job, queue_position=queue_position, result_url=result_url)


class TransferList(BaseModel):
    """One page of the caller's jobs, newest first."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"items": [], "next_cursor": None}]},
    )

    items: list[TransferJob]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last page.")


class Health(BaseModel):
    """Liveness / readiness answer."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": "ok", "checks": {"redis": "ok", "storage": "ok"}}]},
    )

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict, description="Each dependency: `ok` or why it failed.")


class TransferForm(BaseModel):
    """The multipart form of `POST /v1/transfers` (documentation only; parsed by hand).

    Every engine parameter is optional and defaults to the paper's value. Unknown fields are
    refused (422) so that a typo never silently runs with a default.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"content": "(binary PNG)", "style": "(binary PNG)", "steps": 30, "alpha": 0.75}],
        }
    )

    content: bytes = Field(
        description="The content image: PNG, JPEG or WebP (sniffed from the bytes). Required.",
        json_schema_extra={"format": "binary"},
    )
    style: bytes | None = Field(
        None,
        description="The style image (PNG, JPEG or WebP). Give `style`, `style_prompt`, or both.",
        json_schema_extra={"format": "binary"},
    )
    style_prompt: str | None = Field(
        None, max_length=1000, description="Text style reference (used alone it drives a text-guided style teacher).",
        examples=["an oil painting in the style of Van Gogh"],
    )
    steps: int | None = Field(None, ge=1, le=1000, description="DDIM steps (default 50).", examples=[30])
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for every random draw (default 0).")
    size: int | None = Field(
        None, ge=64, le=2048, multiple_of=64, description="Output's longer side in pixels (default 512).",
        examples=[512],
    )
    alpha: float | None = Field(None, ge=0, le=1, description="GAR blend (default 0.75).", examples=[0.75])
    beta: float | None = Field(None, ge=0, le=1, description="LAT query blend (default 0.25).")
    gamma: float | None = Field(None, ge=0, le=1, description="SINI blend (default 0.5).")
    guidance: float | None = Field(None, ge=1, le=30, description="CFG scale for a text-only style (default 7.5).")
    sini: bool | None = Field(None, description="Style-injected noise initialisation on/off (default true).")
    gar: bool | None = Field(None, description="Global Attention Regulation on/off (default true).")
    lat: bool | None = Field(None, description="Local Attention Transplantation on/off (default true).")
    guide_student: bool | None = Field(
        None, description="Under CFG (text-only style), guide the student too (default true; our reading)."
    )
    step_start: float | None = Field(None, ge=0, le=1, description="GAR/LAT act from this fraction of the steps.")
    step_end: float | None = Field(None, ge=0, le=1, description="GAR/LAT act until this fraction of the steps.")
    inversion: Literal["target", "source"] | None = Field(
        None, description="DDIM inversion convention: model evaluated at the target (default) or source timestep."
    )
    teachers: Literal["auto", "live", "recorded"] | None = Field(
        None, description="Teachers recorded during a 'source' inversion (auto, default), or always run live."
    )
    webhook_url: str | None = Field(
        None,
        description="POSTed the job resource on a terminal state, signed in `X-HAM-Signature` "
        "(`t=<unix>,v1=<hex HMAC-SHA256(secret, f'{t}.{body}')>`). Needs HAM_WEBHOOK_SECRET on the server; "
        "private/loopback addresses are refused unless HAM_WEBHOOK_ALLOW_PRIVATE.",
        examples=["https://example.com/hooks/ham"],
    )
