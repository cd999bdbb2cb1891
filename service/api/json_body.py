"""``POST /v1/transfers`` as ``application/json``: the images by reference.

The same parameters and text fields as the multipart form, as JSON values of their own type,
with ``content_url`` / ``style_url`` (an ``http(s)://`` URL or a ``data:`` URI, see
:mod:`service.api.fetch`) instead of file parts, ``style_id`` for library styles, and
``webhook_events`` as an array. ``style_url`` and ``style_id`` take one string or an array (several
styles: the URLs first, then the ids, one result each). Every image is fetched, concurrently,
before the job exists.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request

from ham_core.idempotency import json_fingerprint
from ham_core.style_refs import StyleRef
from ham_engine.params import ParamSpec
from service.api.catalogue import choose_model
from service.api.deps import Services
from service.api.errors import (
    InvalidJson,
    InvalidParameter,
    InvalidRequest,
    MissingField,
    TooManyStyles,
    UnknownField,
)
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
# One string or an array of them: several styles, in order (the style_urls first, then the style_ids).
STYLE_LIST_FIELDS = ("style_url", "style_id")
_SPECS = {spec.name: spec for spec in REQUEST_SPECS}
KNOWN_FIELDS = (frozenset(_SPECS) | frozenset(REFERENCE_FIELDS) | frozenset(TEXT_FIELDS) | frozenset(STYLE_LIST_FIELDS)
                | {"webhook_events"})
# How deep a JSON body may nest: a submission needs 2 (the object, an array in it); a margin for clients.
MAX_DEPTH = 32
_JSON_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


async def read_json(request: Request, services: Services) -> Submission:
    """The submission in a JSON body; 4xx naming the field otherwise."""
    body = await _object(request)
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise UnknownField(where="", name=unknown[0][:80], known=", ".join(sorted(KNOWN_FIELDS)),
                           field=unknown[0][:80])
    given = {name: _typed(_SPECS[name], value) for name, value in body.items() if name in _SPECS}
    texts = {name: _string(name, body[name]) if name in body else None for name in ("content_url", *TEXT_FIELDS)}
    model = await choose_model(services, texts["model"])
    params, output = build_params(given, model.family)
    style_urls = _strings("style_url", body)
    style_ids = _strings("style_id", body)
    limit = services.settings.max_styles_per_job
    if len(style_urls) + len(style_ids) > limit:
        raise TooManyStyles(limit=limit, count=len(style_urls) + len(style_ids),
                            field="style_url" if style_urls else "style_id")
    # One style_url (or none) is the single-style job of style image and/or prompt; otherwise a style list.
    single = len(style_urls) <= 1 and not style_ids
    if single:
        styles: tuple[StyleRef, ...] = (one_style(bool(style_urls), texts["style_prompt"]),)
    elif texts["style_prompt"] is not None:
        raise InvalidParameter("style_prompt: with a style_id or several styles, give each its prompt through the "
                               "style library", field="style_prompt")
    else:
        styles = tuple(StyleRef.uploaded() for _ in style_urls) + tuple(StyleRef.library(i) for i in style_ids)
    if not texts["content_url"]:
        raise MissingField("the content image's URL or data: URI is required", field="content_url")
    events = body.get("webhook_events")
    if "webhook_events" in body and (not isinstance(events, list) or not all(isinstance(e, str) for e in events)):
        raise InvalidParameter("webhook_events: must be an array of event names",
                               field="webhook_events")
    chosen_events = webhook_events(events)
    webhook_url = await check_webhook(services, texts["webhook_url"])
    references = [("content_url", texts["content_url"])] + [("style_url", url) for url in style_urls]
    fetched = await asyncio.gather(
        *(fetch_reference(name, reference, services.settings) for name, reference in references)
    )
    content = await normalise_image(services, "content_url", fetched[0])
    pngs = tuple([await normalise_image(services, "style_url", data) for data in fetched[1:]])
    return Submission(params, output, webhook_url, chosen_events, content, styles, pngs, model=model.name)


def _strings(name: str, body: dict[str, Any]) -> list[str]:
    """A field that is one string or a non-empty array of strings, as a list ([] when absent)."""
    if name not in body:
        return []
    value = body[name]
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(item, str) and item.strip() for item in values):
        raise InvalidParameter(f"{name}: must be a non-empty string or a non-empty array of them", field=name)
    return [item.strip() for item in values]


async def json_body_fingerprint(request: Request, services: Services) -> str:
    """The idempotency fingerprint of a JSON submission: its members, canonically ordered."""
    return json_fingerprint(await _object(request))


async def _object(request: Request) -> dict[str, Any]:
    cached = getattr(request.state, "json_body", None)
    if cached is not None:
        return cached
    body = parse_object(await request.body())
    request.state.json_body = body  # the fingerprint and the reader parse it once
    return body


def parse_object(raw: bytes) -> dict[str, Any]:
    """The JSON object in ``raw``; 400 ``invalid_json`` (also nested over :data:`MAX_DEPTH`), 422 if no object."""
    try:
        body = json.loads(raw)
    except RecursionError:
        # The parser gives up about 1000 levels down (a 200 kB body of brackets): a client's
        # mistake, not a 500 with a traceback per request.
        raise InvalidJson(f"it nests too deep; at most {MAX_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJson(str(exc)[:200]) from None
    if _too_deep(body):
        # Within the parser's reach but not ours: canonical re-encoding (the idempotency
        # fingerprint) recurses too, and a submission needs two levels.
        raise InvalidJson(f"it nests too deep; at most {MAX_DEPTH} levels")
    if not isinstance(body, dict):
        raise InvalidRequest("the JSON body must be an object")
    return body


def _too_deep(value: Any) -> bool:
    """Whether arrays/objects nest deeper than :data:`MAX_DEPTH` (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    return True
                stack.append((child, depth + 1))
    return False


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
