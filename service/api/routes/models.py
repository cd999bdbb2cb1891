"""``GET /v1/models``: the models this deployment serves, live.

One entry per name in ``HAM_MODELS`` (the default first): what its workers announced on their
last heartbeats (family, sizes, dtype, device, random preset or not, weights fingerprint), how
many are online, and its queue (depth, age of the job next in line). A model with no worker
online still takes transfers — they wait in its queue until its pool starts — unless the
operator set ``HAM_MODELS_REQUIRE_WORKER``.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field

from ham_core.models import catalogue
from service.api.deps import ServicesDep, TenantDep
from service.api.schemas import ErrorResponse

router = APIRouter(prefix="/v1/models", tags=["models"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
    429: {"model": ErrorResponse, "description": "Rate limit reached; see `Retry-After`."},
    503: {"model": ErrorResponse, "description": "Redis unreachable; see `Retry-After`."},
}


class ModelInfo(BaseModel):
    """One served model and its live state."""

    name: str = Field(description="What a transfer's `model` names.")
    default: bool = Field(description="Whether a transfer naming no model runs on it.")
    queue: str = Field(description="Its RQ queue (the Redis list `rq:queue:<queue>`), which its worker pool serves.")
    family: str = Field(description="`sd` (SD 1.x/2.x), `sdxl`, `sd3` or `flux`; it picks the parameter defaults.")
    family_source: Literal["worker", "name"] = Field(
        description="`worker`: announced by a worker; `name`: guessed from the name (no worker announced yet)."
    )
    default_size: int = Field(description="`size` of a transfer that leaves it out (the family's training size).")
    max_size: int = Field(description="The largest `size` accepted.")
    defaults: dict[str, Any] = Field(
        description="The parameter defaults this model's family sets (e.g. `size`); the others are the schema's."
    )
    dtype: str | None = Field(None, description="Compute dtype of its workers (null until one announced).")
    device: str | None = Field(None, description="Device of its newest worker (null until one announced).")
    random_preset: bool = Field(description="A random-weight preset (tiny, tiny-xl): its pictures are noise.")
    note: str | None = Field(None, description="What a user should know, e.g. that a random preset draws noise.")
    fingerprint: str | None = Field(
        None, description="Hash of the weights its features are stored under (null unless the feature store is on)."
    )
    workers_online: int = Field(description="Workers that announced it within the last three heartbeats.")
    last_announced_at: float | None = Field(None, description="Unix time of its newest announcement.")
    status: Literal["online", "no_workers"] = Field(
        description="`no_workers`: transfers are queued until a worker of this model starts."
    )
    queue_depth: int = Field(description="Jobs waiting in its queue.")
    oldest_queued_age: float | None = Field(None, description="Seconds the job next in line has waited.")


class ModelList(BaseModel):
    """The deployment's catalogue, the default model first."""

    model_config = {"json_schema_extra": {"examples": [{"default": "tiny", "items": [{
        "name": "tiny", "default": True, "queue": "ham", "family": "sd", "family_source": "worker",
        "default_size": 512, "max_size": 2048, "defaults": {"size": 512}, "dtype": "float32", "device": "cpu",
        "random_preset": True,
        "note": "tiny is a random preset: its weights are random, so its pictures are noise, not art. ...",
        "fingerprint": None, "workers_online": 1, "last_announced_at": 1767225600.0, "status": "online",
        "queue_depth": 0, "oldest_queued_age": None}]}]}}

    default: str = Field(description="The model of a transfer that names none.")
    items: list[ModelInfo]


@router.get("", response_model=ModelList, summary="List the models this deployment serves", responses=_ERRORS)
def list_models(tenant: TenantDep, services: ServicesDep) -> ModelList:
    """Each served model with its live worker count and queue; name one as `model` in `POST /v1/transfers`."""
    settings = services.settings
    items = [ModelInfo(**entry) for entry in catalogue(services.redis, settings)]
    return ModelList(default=settings.default_model, items=items)
