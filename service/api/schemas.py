"""What the HTTP API sends and accepts, as pydantic models (they drive ``/openapi.json``).

Kept apart from the job record (:mod:`service.core.jobs`): the record is what Redis stores, these
are the public shapes, translated in :mod:`service.api.routes.transfers`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ham_engine.params import MAX_PROMPT_CHARS
from service.api.catalogue import MODEL_FIELD_SCHEMA
from service.api.errors import ErrorDetail, ErrorResponse
from service.api.submission import MAX_WEBHOOK_URL_CHARS, REQUEST_SPECS
from service.core.jobs import WEBHOOK_EVENTS
from service.core.resource import TransferJob

# The error shape lives with the error catalogue; named here too, with the other public shapes.
__all__ = ["ErrorDetail", "ErrorResponse"]


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


# --- the request body of POST /v1/transfers, built from the request parameters -------------------

_STYLE_PROMPT = {
    "type": "string", "maxLength": MAX_PROMPT_CHARS, "pattern": r"\S",
    "description": "Text style reference (used alone it drives a text-guided style teacher). "
    "Give a style image, `style_prompt`, or both.",
    "examples": ["an oil painting in the style of Van Gogh"],
}
_WEBHOOK_URL = {
    "type": "string", "maxLength": MAX_WEBHOOK_URL_CHARS, "pattern": "^https?://",
    "description": "POSTed the job resource (see `webhook_events`), signed in `X-HAM-Signature` "
    "(`t=<unix>,v1=<hex HMAC-SHA256(secret, f'{t}.{body}')>`). Needs HAM_WEBHOOK_SECRET on the server; "
    "private/loopback addresses are refused unless HAM_WEBHOOK_ALLOW_PRIVATE.",
    "examples": ["https://example.com/hooks/ham"],
}
_EVENTS_HELP = (f"Which changes the webhook hears about: {', '.join(WEBHOOK_EVENTS)} (progress at most once a "
                "second); default `completed`.")
_REFERENCE_HELP = ("an `http(s)://` URL (fetched by the server: public addresses only unless "
                   "HAM_FETCH_ALLOW_PRIVATE, at most 3 redirects, HAM_FETCH_TIMEOUT, HAM_MAX_UPLOAD_BYTES) or a "
                   "`data:image/png;base64,...` URI. PNG, JPEG or WebP.")


def _param_properties() -> dict[str, Any]:
    return {spec.name: spec.json_schema() for spec in REQUEST_SPECS}


def transfer_form_schema() -> dict[str, Any]:
    """The multipart form of ``POST /v1/transfers``. Optional fields are left out (never sent as null);
    an empty text field counts as left out, as HTML forms send blanks."""
    events = "|".join(WEBHOOK_EVENTS)
    prompt = {**_STYLE_PROMPT, "pattern": r"^$|\S"}
    webhook_url = {**_WEBHOOK_URL, "pattern": "^$|^https?://"}
    return {
        "type": "object",
        "required": ["content"],
        # "A style image, a style_prompt or both" stays in words: an object-level anyOf would say it,
        # but standard client generators (openapi-python-client) then build no model for the body.
        "description": "A transfer as a multipart form. Give `style`, `style_prompt`, or both.",
        "additionalProperties": False,
        "properties": {
            "content": {"type": "string", "format": "binary",
                        "description": "The content image: PNG, JPEG or WebP (sniffed from the bytes). Required."},
            "style": {"type": "string", "format": "binary",
                      "description": "The style image (PNG, JPEG or WebP). Give `style`, `style_prompt`, or both."},
            "style_prompt": prompt,
            "model": MODEL_FIELD_SCHEMA,
            **_param_properties(),
            "webhook_url": webhook_url,
            "webhook_events": {"type": "string", "pattern": f"^(({events})(,({events}))*)?$",
                               "description": f"{_EVENTS_HELP} Comma-separated.", "examples": ["start,completed"]},
        },
    }


def transfer_json_schema() -> dict[str, Any]:
    """The JSON body of ``POST /v1/transfers``: the form's fields, with the images by reference."""
    return {
        "type": "object",
        "required": ["content_url"],
        "description": "A transfer as JSON, the images by reference. Give `style_url`, `style_prompt`, or both.",
        "additionalProperties": False,
        "properties": {
            "content_url": {"type": "string", "description": f"The content image: {_REFERENCE_HELP}",
                            "examples": ["https://example.com/photos/42.jpg"]},
            "style_url": {"type": "string", "description": f"The style image: {_REFERENCE_HELP}",
                          "examples": ["data:image/png;base64,iVBORw0KGgo..."]},
            "style_prompt": _STYLE_PROMPT,
            "model": MODEL_FIELD_SCHEMA,
            **_param_properties(),
            "webhook_url": _WEBHOOK_URL,
            "webhook_events": {"type": "array", "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                               "minItems": 1, "uniqueItems": True, "description": _EVENTS_HELP},
        },
        "examples": [{"content_url": "https://example.com/photos/42.jpg", "style_prompt": "ukiyo-e woodblock print",
                      "steps": 30, "output_format": "webp", "output_quality": 85}],
    }


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
