"""``POST /v1/transfers`` as ``application/json``: the images by reference.

The same parameters and text fields as the multipart form, as JSON values of their own type,
with ``content_url`` / ``style_url`` (an ``http(s)://`` URL or a ``data:`` URI, see
:mod:`service.api.fetch`) instead of file parts and ``webhook_events`` as an array. Both images
are fetched, concurrently, before the job exists.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request

from ham_engine.params import ParamSpec
from service.api.catalogue import choose_model
from service.api.deps import Services
from service.api.errors import InvalidJson, InvalidParameter, InvalidRequest, MissingField, UnknownField
from service.api.fetch import fetch_reference
from service.api.submission import (
    REQUEST_SPECS,
    Submission,
    build_params,
    check_webhook,
    normalise_image,
    one_style,
    webhook_events,
)

REFERENCE_FIELDS = ("content_url", "style_url")
TEXT_FIELDS = ("style_prompt", "webhook_url", "model")
_SPECS = {spec.name: spec for spec in REQUEST_SPECS}
KNOWN_FIELDS = frozenset(_SPECS) | frozenset(REFERENCE_FIELDS) | frozenset(TEXT_FIELDS) | {"webhook_events"}
_JSON_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


async def read_json(request: Request, services: Services) -> Submission:
    """The submission in a JSON body; 4xx naming the field otherwise."""
    body = await _object(request)
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise UnknownField(where="", name=unknown[0][:80], known=", ".join(sorted(KNOWN_FIELDS)),
                           field=unknown[0][:80])
    given = {name: _typed(_SPECS[name], value) for name, value in body.items() if name in _SPECS}
    texts = {name: _string(name, body[name]) if name in body else None for name in (*REFERENCE_FIELDS, *TEXT_FIELDS)}
    model = await choose_model(services, texts["model"])
    params, output = build_params(given, model.family)
    style = one_style(texts["style_url"] is not None, texts["style_prompt"])
    if not texts["content_url"]:
        raise MissingField("the content image's URL or data: URI is required", field="content_url")
    events = body.get("webhook_events")
    if "webhook_events" in body and (not isinstance(events, list) or not all(isinstance(e, str) for e in events)):
        raise InvalidParameter("webhook_events: must be an array of event names",
                               field="webhook_events")
    chosen_events = webhook_events(events)
    webhook_url = await check_webhook(services, texts["webhook_url"])
    references = [(name, texts[name]) for name in REFERENCE_FIELDS if texts[name] is not None]
    fetched = await asyncio.gather(
        *(fetch_reference(name, reference, services.settings) for name, reference in references)
    )
    images = dict(zip((name for name, _ in references), fetched, strict=True))
    content = await normalise_image(services, "content_url", images["content_url"])
    pngs = (await normalise_image(services, "style_url", images["style_url"]),) if "style_url" in images else ()
    return Submission(params, output, webhook_url, chosen_events, content, (style,), pngs, model=model.name)


async def _object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJson(str(exc)) from None
    if not isinstance(body, dict):
        raise InvalidRequest("the JSON body must be an object")
    return body


def _typed(spec: ParamSpec, value: Any) -> Any:
    """``value`` if it is a JSON value of the parameter's type (ranges are checked by the parameters)."""
    if spec.kind is int and isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)  # JSON has one number type: 30.0 is the integer 30 (as JSON Schema says)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[spec.kind]
    if not ok:
        raise InvalidParameter(f"{spec.name}: must be {_JSON_TYPES[spec.kind]}, got "
                               f"{json.dumps(value)[:40]}", field=spec.name)
    return float(value) if spec.kind is float else value


def _string(name: str, value: Any) -> str | None:
    # null is refused like any other non-string: leave the field out to mean "not given".
    if not isinstance(value, str):
        raise InvalidParameter(f"{name}: must be a string", field=name)
    return value
