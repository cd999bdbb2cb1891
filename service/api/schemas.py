"""What the HTTP API sends and accepts, as pydantic models (they drive ``/openapi.json``).

Kept apart from the job record (:mod:`service.core.jobs`): the record is what Redis stores, these
are the public shapes, translated in :mod:`service.api.routes.transfers`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.resource import TransferJob


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
    style_id: str | None = Field(
        None,
        description="A style of your library (`POST /v1/styles`) instead of an upload. `style` and `style_id` "
        "may be repeated, up to HAM_MAX_STYLES_PER_JOB in all: one result per style, in the order given.",
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
    webhook_url: str | None = Field(
        None,
        description="POSTed the job resource on a terminal state, signed in `X-HAM-Signature` "
        "(`t=<unix>,v1=<hex HMAC-SHA256(secret, f'{t}.{body}')>`). Needs HAM_WEBHOOK_SECRET on the server; "
        "private/loopback addresses are refused unless HAM_WEBHOOK_ALLOW_PRIVATE.",
        examples=["https://example.com/hooks/ham"],
    )


class StyleResource(BaseModel):
    """A style of your library: refer to it as `style_id` in `POST /v1/transfers`."""

    id: str = Field(description="Style id; the resource lives at `/v1/styles/{id}`.")
    name: str | None = Field(None, description="Your label for it.")
    style_prompt: str | None = Field(None, description="The text style reference, if one was given.")
    has_image: bool = Field(description="Whether it has a style image.")
    created_at: datetime = Field(description="ISO 8601, UTC.")
    warm_job_id: str | None = Field(
        None, description="The feature-building job `warm` queued (a transfer job: poll `/v1/transfers/{id}`)."
    )


class StyleList(BaseModel):
    """One page of your styles, newest first."""

    items: list[StyleResource]
    next_cursor: str | None = Field(None, description="Pass as `cursor` for the next page; null on the last page.")
