"""The API's resources as typed pydantic models.

They mirror the server's OpenAPI schema (``TransferJob``, ``TransferList``, the error shape);
``tests/client/test_models.py`` checks every field here against the live ``/openapi.json``, so
a server change that breaks them fails a test rather than a customer. Fields the server adds
later are kept (``extra="allow"``), so an older client keeps working against a newer server.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "canceled"})


class JobError(BaseModel):
    """Why a job failed."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class Job(BaseModel):
    """A transfer job as the API shows it (``GET /v1/transfers/{id}``, webhooks, events)."""

    model_config = ConfigDict(extra="allow")

    id: str
    status: JobStatus
    progress: float = Field(ge=0.0, le=1.0)
    queue_position: int | None = None
    result_url: str | None = None
    result_urls: list[str] | None = None  # one per style of a multi-style job, in order
    error: JobError | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    params: dict[str, Any]
    style_prompt: str | None = None
    has_style: bool
    style_ids: list[str] = Field(default_factory=list)  # library styles the job uses
    style_count: int = 1
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_quality: int = 90
    model: str | None = None  # the model it runs on (GET /v1/models)
    attempt: int = 0  # the job's run: progress rises within one and restarts from 0 when this grows

    @property
    def terminal(self) -> bool:
        """True once the job is succeeded, failed or canceled."""
        return self.status in TERMINAL_STATUSES


class ModelInfo(BaseModel):
    """One model the deployment serves (``GET /v1/models``), with its live state."""

    model_config = ConfigDict(extra="allow")

    name: str
    default: bool
    family: str
    default_size: int
    random_preset: bool
    note: str | None = None
    workers_online: int
    status: str
    queue_depth: int


class ModelList(BaseModel):
    """``GET /v1/models``: the default model's name and every served model, the default first."""

    model_config = ConfigDict(extra="allow")

    default: str
    items: list[ModelInfo]


class JobPage(BaseModel):
    """One page of ``GET /v1/transfers``, newest first."""

    model_config = ConfigDict(extra="allow")

    items: list[Job]
    next_cursor: str | None = None
