"""The playground: a page for people to try HAM in a browser, served from files in the package.

``/`` redirects to ``/playground/``. The page, its script and its stylesheet live in
``service/api/playground/`` (no CDN, no build step: it works offline, like ``/docs``) and talk to
the public API (``/v1/transfers``) with the visitor's API key, like any other client.

The page hard-codes no parameter: ``/playground/config.json`` lists every client parameter with
its default (from :class:`~ham_engine.params.TransferParams`) and its bounds and description (from
the request schema this server publishes in ``/openapi.json``), whether the server wants an API
key, and which optional endpoints (the job event stream, the style library) this server has.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from ham_engine.params import CLIENT_PARAMS, TransferParams
from service.api.deps import get_services

ASSETS_DIR = Path(__file__).resolve().parent.parent / "playground"
PREFIX = "/playground"
# The controls shown first, in this order; the other client parameters sit under "More parameters".
MAIN_PARAMS = ("alpha", "beta", "gamma", "steps", "size", "seed")
LABELS = {
    "alpha": "α — GAR blend",
    "beta": "β — LAT query blend",
    "gamma": "γ — SINI blend",
    "steps": "Steps",
    "size": "Size (longer side, px)",
    "seed": "Seed",
    "guidance": "Guidance (text-only style)",
    "sini": "SINI (style-injected noise init)",
    "gar": "GAR (global attention regulation)",
    "lat": "LAT (local attention transplantation)",
    "guide_student": "Guide the student under CFG",
    "step_start": "Modulation from (fraction of steps)",
    "step_end": "Modulation until (fraction of steps)",
}
EVENTS_PATH = "/v1/transfers/{job_id}/events"
STYLES_PATH = "/v1/styles"
_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
# Same-origin scripts and styles only; result images may come from an S3 endpoint elsewhere.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: http: https:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


def _request_properties(openapi: dict[str, Any]) -> dict[str, Any]:
    """The field schemas of ``POST /v1/transfers``' multipart body, ``$ref`` resolved."""
    body = openapi.get("paths", {}).get("/v1/transfers", {}).get("post", {}).get("requestBody", {})
    schema = body.get("content", {}).get("multipart/form-data", {}).get("schema", {})
    return {name: _resolve(openapi, prop) for name, prop in _resolve(openapi, schema).get("properties", {}).items()}


def _resolve(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return schema
    node: Any = openapi
    for part in ref[2:].split("/"):
        node = node.get(part, {})
    return _resolve(openapi, node)


def _bounds(schema: dict[str, Any]) -> dict[str, Any]:
    """minimum/maximum/multipleOf (or the enum of a choice) of a field, looking inside ``anyOf``."""
    out: dict[str, Any] = {}
    for candidate in [schema, *schema.get("anyOf", [])]:
        for key in ("minimum", "maximum", "multipleOf", "enum"):
            if key in candidate:
                out.setdefault(key, candidate[key])
    return out


def playground_config(app: FastAPI, auth_required: bool, max_upload_bytes: int) -> dict[str, Any]:
    """What the page needs to build its form (``GET /playground/config.json``)."""
    defaults = {f.name: getattr(TransferParams(), f.name) for f in fields(TransferParams)}
    openapi = app.openapi()
    properties = _request_properties(openapi)
    params = []
    for name, kind in CLIENT_PARAMS.items():
        schema = properties.get(name, {})
        params.append({
            "name": name,
            "label": LABELS.get(name, name),
            "type": _JSON_TYPES[kind],
            "default": defaults[name],
            "description": schema.get("description", ""),
            "main": name in MAIN_PARAMS,
            **_bounds(schema),
        })
    params.sort(key=lambda p: MAIN_PARAMS.index(p["name"]) if p["main"] else len(MAIN_PARAMS))
    paths = set(openapi.get("paths", {}))
    return {
        "auth_required": auth_required,
        "max_upload_bytes": max_upload_bytes,
        "params": params,
        "features": {"events": EVENTS_PATH in paths, "styles": STYLES_PATH in paths},
    }


def install_playground(app: FastAPI) -> None:
    """Serve the playground under ``/playground/`` and send ``/`` there."""
    app.mount(f"{PREFIX}/static", StaticFiles(directory=ASSETS_DIR), name="playground-static")

    @app.get("/", include_in_schema=False)
    @app.get(PREFIX, include_in_schema=False)
    def to_playground() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @app.get(f"{PREFIX}/", include_in_schema=False)
    def playground_page() -> FileResponse:
        return FileResponse(ASSETS_DIR / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache",
                                     "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    config_cache: dict[str, Any] = {}

    @app.get(f"{PREFIX}/config.json", include_in_schema=False)
    def config(request: Request) -> JSONResponse:
        if not config_cache:  # the routes and the schema are fixed once the app serves
            settings = get_services(request).settings
            config_cache.update(playground_config(app, settings.auth_enabled, settings.max_upload_bytes))
        return JSONResponse(config_cache, headers={"Cache-Control": "no-cache"})
