"""The ``model`` of a transfer: checked against the deployment's catalogue, its family's defaults.

A transfer names one of ``HAM_MODELS`` (or none: the default model). An unknown name is a 422
``unknown_model`` listing the served ones. A served model no worker announced recently is
queued (its pool may be scaled to zero, KEDA starts it) unless ``HAM_MODELS_REQUIRE_WORKER``,
which refuses it with a 503 ``model_unavailable``. The family (announced by the model's
workers, else guessed from the name) picks the defaults that depend on it, such as ``size``.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from ham_core.models import UnknownModel, model_entry, resolve_model
from service.api.deps import Services
from service.api.errors import ApiError, ModelUnavailable
from service.api.errors import UnknownModel as UnknownModelError

MODEL_FIELD_SCHEMA = {
    "type": "string", "minLength": 1, "maxLength": 200,
    "description": "The model to run on: a name from `GET /v1/models`; default: the deployment's default model. "
    "Parameters left out get that model family's defaults (`size`: 512 for SD 1.x/2.x, 1024 for SDXL, SD3 and FLUX).",
    "examples": ["tiny"],
}


@dataclass(frozen=True)
class ModelChoice:
    """The model a submission runs on and the family whose defaults fill its parameters."""

    name: str
    family: str


def unknown_model(exc: UnknownModel) -> ApiError:
    """The 422 for a model the deployment does not serve; the message names the served ones."""
    return UnknownModelError(str(exc))


async def choose_model(services: Services, requested: str | None) -> ModelChoice:
    """The served model ``requested`` names (the default when ``None``); 422 / 503 otherwise."""
    settings = services.settings
    try:
        name = resolve_model(settings, requested)
    except UnknownModel as exc:
        raise unknown_model(exc) from None
    entry = await run_in_threadpool(model_entry, services.redis, settings, name)
    if settings.models_require_worker and not entry["workers_online"]:
        raise ModelUnavailable(model=name, headers={"Retry-After": "30"})
    return ModelChoice(name, entry["family"])
