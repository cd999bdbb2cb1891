"""The OpenAPI document as this server really behaves, for the settings it runs with.

FastAPI's generated document is close but not exact; :func:`exact_openapi` fixes what it gets
wrong for us, so that a client generated from ``/openapi.json`` (and schemathesis, which the
suite runs against it) can trust every word:

- an optional query or header parameter is declared as its type, not ``anyOf [type, null]``
  (sent as the text ``null`` it would be refused);
- ``/healthz``, ``/readyz`` and ``/metrics`` declare no security (and no 401) while
  ``HAM_PUBLIC_HEALTH`` / ``HAM_PUBLIC_METRICS`` make them public;
- the submission bodies (``TransferForm``, ``TransferRequest``, ``StyleForm``) are built from the
  request parameters and ``HAM_MAX_STYLES_PER_JOB``; without ``HAM_WEBHOOK_SECRET`` they have no
  webhook fields (they would be 422), and their ``model`` is an enum of the served models (``HAM_MODELS``).

Operation ids are the handlers' names (``create_transfer``, ``get_transfer``...), which is what
generated clients call their functions.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from ham_core.config import Settings
from service.api.schemas import (
    style_form_schema,
    transfer_event_schema,
    transfer_form_schema,
    transfer_json_schema,
)

_WEBHOOK_FIELDS = ("webhook_url", "webhook_events")


def operation_id(route: APIRoute) -> str:
    """The operation id of a route: its handler's name."""
    return route.name


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve :func:`exact_openapi` at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = exact_openapi(schema, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def exact_openapi(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``schema`` (FastAPI's document) corrected as the module docstring says."""
    public = {"/healthz": settings.public_health, "/readyz": settings.public_health,
              "/metrics": settings.public_metrics}
    # The submission bodies are parsed by hand (service.api.multipart, service.api.json_body),
    # so FastAPI cannot derive them: they are built from the request parameters.
    styles = settings.max_styles_per_job
    bodies = {"TransferForm": transfer_form_schema(styles), "TransferRequest": transfer_json_schema(styles)}
    if not settings.webhook_secret:
        for body in bodies.values():
            for field in _WEBHOOK_FIELDS:
                body["properties"].pop(field, None)
    for name, body in bodies.items():
        # The deployment's catalogue: any other name is a 422 unknown_model (a blank form field means "left out").
        served = list(settings.served_models) + ([""] if name == "TransferForm" else [])
        model = {k: v for k, v in body["properties"]["model"].items() if k != "minLength"}
        body["properties"]["model"] = {**model, "enum": served, "default": settings.default_model}
    schema.setdefault("components", {}).setdefault("schemas", {}).update(
        bodies, StyleForm=style_form_schema(), TransferEvent=transfer_event_schema()
    )
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                parameter["schema"] = _not_null(parameter["schema"])
            if public.get(path):
                operation.pop("security", None)
                operation.get("responses", {}).pop("401", None)
    return schema


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    options = schema.get("anyOf")
    if not options:
        return schema
    kept = [option for option in options if option != {"type": "null"}]
    if len(kept) != 1:
        return schema
    merged = {key: value for key, value in schema.items() if key != "anyOf"}
    return {**kept[0], **merged}
