"""What the HTTP API sends and accepts, as pydantic models (they drive ``/openapi.json``).

Kept apart from the job record (:mod:`ham_core.jobs`): the record is what Redis stores, these
are the public shapes, translated in :mod:`service.api.routes.transfers`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ham_core.jobs import WEBHOOK_EVENTS
from ham_core.resource import TransferJob
from ham_engine.params import MAX_PROMPT_CHARS
from service.api.catalogue import MODEL_FIELD_SCHEMA
from service.api.errors import ErrorDetail, ErrorResponse
from service.api.submission import MAX_WEBHOOK_URL_CHARS, REQUEST_SPECS

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


# The style rule, one sentence for every body (the schemas carry what JSON Schema can: counts, shapes).
STYLE_RULE = (
    "Styles: give one style image, a `style_prompt`, or both; or up to {limit} styles as style images and/or "
    "library `style_id`s (one result per style, in the order given), each with the prompt it was stored with "
    "(a `style_prompt` is then refused)."
)
# No example value: a tool combining the examples of every field (schemathesis) would pair it with a
# style_prompt's, which the style rule refuses.
_STYLE_ID = {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "A style of your library (`/v1/styles`)."}


STYLE_RULE_KEY = "x-style-rule"


def style_rule(images: str, blanks_are_absent: bool) -> dict[str, Any]:
    """The style rule's "at least one style" as a JSON Schema for the body, under :data:`STYLE_RULE_KEY`.

    An extension, not the body schema's own ``anyOf``: generators (openapi-python-client) build no body
    model for an object with an ``anyOf``, and they ignore ``x-`` keys, while a validator can apply this
    one to a body as it stands. ``blanks_are_absent``: a form, where an empty field means "not given".
    """
    blank_free = {"minItems": 1, "contains": {"minLength": 1}} if blanks_are_absent else {}
    return {
        "description": "At least one style: a body is valid under the style rule only if it is valid against this "
        "schema too. The rest of the rule (the count, no `style_prompt` beside library or several styles) is the "
        "server's: see the body's description.",
        "anyOf": [
            {"required": [images], **({"properties": {images: {"minItems": 1}}} if blanks_are_absent else {})},
            {"required": ["style_id"], **({"properties": {"style_id": blank_free}} if blanks_are_absent else {})},
            {"required": ["style_prompt"], "properties": {"style_prompt": {"pattern": r"\S"}}},
        ],
    }


def _several(item: dict[str, Any], limit: int, what: str, least: int = 1) -> dict[str, Any]:
    """A repeated field: an array of ``item``, ``least`` to ``limit`` of them."""
    return {"type": "array", "items": item, "minItems": least, "maxItems": limit, "description": what}


def transfer_form_schema(max_styles: int = 4) -> dict[str, Any]:
    """The multipart form of ``POST /v1/transfers``. Optional fields are left out (never sent as null);
    an empty text field counts as left out, as HTML forms send blanks. ``style`` and ``style_id`` are
    repeated fields (an array in the schema: each item one form field of that name)."""
    events = "|".join(WEBHOOK_EVENTS)
    prompt = {**_STYLE_PROMPT, "pattern": r"^$|\S"}
    webhook_url = {**_WEBHOOK_URL, "pattern": "^$|^https?://"}
    return {
        "type": "object",
        "required": ["content"],
        # The cross-field style rule is in words, and its "at least one style" in an extension (see
        # style_rule): an object-level anyOf would say it, but standard client generators
        # (openapi-python-client) then build no model for the body. The counts are in the arrays'
        # maxItems; the sum of both is checked by the server (422 too_many_styles).
        "description": "A transfer as a multipart form. " + STYLE_RULE.format(limit=max_styles),
        STYLE_RULE_KEY: style_rule("style", blanks_are_absent=True),
        "additionalProperties": False,
        "properties": {
            "content": {"type": "string", "format": "binary",
                        "description": "The content image: PNG, JPEG or WebP (sniffed from the bytes). Required."},
            # minItems 0: in a form, no field of the name is the empty list (and means "not given").
            "style": _several({"type": "string", "format": "binary"}, max_styles,
                              "Style images (PNG, JPEG or WebP), one form field each; with `style_id`s, at most "
                              f"{max_styles} styles in all.", least=0),
            "style_id": _several({**_STYLE_ID, "pattern": "^$|^[0-9a-f]{32}$"}, max_styles,
                                 "Library styles (`/v1/styles`), one form field each, after any `style` files.",
                                 least=0),
            "style_prompt": prompt,
            "model": MODEL_FIELD_SCHEMA,
            **_param_properties(),
            "webhook_url": webhook_url,
            "webhook_events": {"type": "string", "pattern": f"^(({events})(,({events}))*)?$",
                               "description": f"{_EVENTS_HELP} Comma-separated.", "examples": ["start,completed"]},
        },
    }


def transfer_json_schema(max_styles: int = 4) -> dict[str, Any]:
    """The JSON body of ``POST /v1/transfers``: the form's fields, with the images by reference."""
    reference = {"type": "string", "minLength": 1, "description": f"A style image: {_REFERENCE_HELP}"}
    return {
        "type": "object",
        "required": ["content_url"],
        "description": "A transfer as JSON, the images by reference. " + STYLE_RULE.format(limit=max_styles)
        + " Several styles: `style_url` and/or `style_id` as arrays (the `style_url`s first, then the `style_id`s).",
        STYLE_RULE_KEY: style_rule("style_url", blanks_are_absent=False),
        "additionalProperties": False,
        "properties": {
            "content_url": {"type": "string", "minLength": 1, "description": f"The content image: {_REFERENCE_HELP}",
                            "examples": ["https://example.com/photos/42.jpg"]},
            "style_url": {
                "anyOf": [reference, _several(reference, max_styles, "Several style images, in order.")],
                "description": f"The style image, or several: {_REFERENCE_HELP}",
                "examples": ["data:image/png;base64,iVBORw0KGgo..."],
            },
            "style_id": {
                "anyOf": [_STYLE_ID, _several(_STYLE_ID, max_styles, "Several library styles, in order.")],
                "description": "A style of your library (`/v1/styles`), or several.",
            },
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


def transfer_event_schema() -> dict[str, Any]:
    """One server-sent event of ``GET /v1/transfers/{id}/events`` (OpenAPI 3.2's shape for an SSE item)."""
    return {
        "type": "object",
        "description": "One server-sent event: `event: progress` while the job is queued or running, then one "
        "terminal event named as the job's final status; `id` is the job's version (resume with `Last-Event-ID`).",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"type": "string", "enum": ["progress", "succeeded", "failed", "canceled"]},
            "id": {"type": "string", "pattern": "^[0-9]{1,18}$", "description": "The job's version: grows with each "
                   "change; send it back as `Last-Event-ID` to resume after it."},
            "data": {"type": "string", "contentMediaType": "application/json",
                     "contentSchema": {"$ref": "#/components/schemas/TransferJob"},
                     "description": "The job resource, as JSON (the same object `GET /v1/transfers/{id}` answers)."},
        },
    }


def style_form_schema() -> dict[str, Any]:
    """The multipart form of ``POST /v1/styles`` (parsed by hand in :mod:`service.api.routes.styles`)."""
    specs = {spec.name: spec.json_schema() for spec in REQUEST_SPECS if spec.name in ("size", "steps")}
    return {
        "type": "object",
        "description": "A library style: an `image`, a `style_prompt`, or both; `warm=true` (with optional `size` "
        "and `steps`, ignored without warm) queues a job that computes its features.",
        "additionalProperties": False,
        "properties": {
            "image": {"type": "string", "format": "binary", "description": "The style image (PNG, JPEG or WebP)."},
            "style_prompt": {**_STYLE_PROMPT, "pattern": r"^$|\S"},
            "name": {"type": "string", "maxLength": 200, "description": "Your label for it.",
                     "examples": ["house style"]},
            "warm": {"type": "boolean", "default": False,
                     "description": "Queue a feature-building job now, so the first transfer with it is warm."},
            # Without default or examples: they describe the warm job, and are ignored without warm=true.
            **{name: {**{k: v for k, v in schema.items() if k not in ("examples", "default")},
                      "description": f"{schema['description']} (the warm job's; ignored unless warm=true)"}
               for name, schema in specs.items()},
        },
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
