"""The playground: a page for people to try HAM in a browser, served from files in the package.

``/`` redirects to ``/playground/``. The page, its script and its stylesheet live in
``service/api/playground/`` (no CDN, no build step: it works offline, like ``/docs``) and talk to
the public API (``/v1/transfers``) with the visitor's API key, like any other client.

The page hard-codes no parameter. ``/playground/config.json`` lists every client parameter from
:data:`~ham_engine.params.PARAM_SPECS` — default, bounds, its label and plain-words explanation,
and its group (main or advanced) — plus whether the server wants an API key, which optional
endpoints (the job event stream, the style library) this server has, which parameters set a job's
cost and what the fast setting is. ``/playground/speed.json`` publishes the seconds per step the
workers measured, per model and size (:mod:`ham_core.speed`), for the time estimates.
``/playground/method`` explains α, β, γ, SINI, GAR and LAT in plain words, from the same specs.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ham_core.speed import measured_speeds
from ham_engine.params import PARAM_SPECS, ParamSpec
from service.api.deps import get_services

ASSETS_DIR = Path(__file__).resolve().parent.parent / "playground"
PREFIX = "/playground"
METHOD_PATH = f"{PREFIX}/method"
EVENTS_PATH = "/v1/transfers/{job_id}/events"
STYLES_PATH = "/v1/styles"
# The parameters a job's time grows with, and the setting the page offers when a run would be long:
# time ∝ steps × pixels (docs/performance.md), so fewer steps at a smaller size is the fast one.
COST = {"step_count": "steps", "image_size": "size"}
FAST = {"steps": 20, "size": 256}
# An estimate above this many seconds is "long": the page says so and offers FAST.
LONG_SECONDS = 60
_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
# Same-origin scripts and styles only; result images may come from an S3 endpoint elsewhere.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: http: https:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
_PAGE_HEADERS = {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
                 "Referrer-Policy": "no-referrer"}


def _param_config(spec: ParamSpec) -> dict[str, Any]:
    schema = spec.json_schema()
    entry: dict[str, Any] = {
        "name": spec.name,
        "label": spec.label or spec.name,
        "explain": spec.explain,
        "group": spec.group,
        "main": spec.group == "main",
        "type": _JSON_TYPES[spec.kind],
        "default": spec.default,
        # The schema's words (for `size` they name each model family's default).
        "description": schema["description"],
    }
    # The same bounds the API schema publishes (ParamSpec.json_schema), under the schema's names.
    for key in ("minimum", "maximum", "multipleOf", "enum"):
        if key in schema:
            entry[key] = schema[key]
    return entry


def _route_paths(routes: list[Any]) -> Iterator[str]:
    """Every route path of the app, including those of included routers (FastAPI may keep those nested)."""
    for route in routes:
        path = getattr(route, "path", None)
        if path:
            yield path
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _route_paths(inner.routes)


def playground_config(app: FastAPI, auth_required: bool, max_upload_bytes: int, model: str) -> dict[str, Any]:
    """What the page needs to build its form (``GET /playground/config.json``)."""
    params = [_param_config(spec) for spec in PARAM_SPECS]
    params.sort(key=lambda p: not p["main"])  # main first, each group in the specs' order
    paths = set(_route_paths(app.routes))
    return {
        "auth_required": auth_required,
        "max_upload_bytes": max_upload_bytes,
        "params": params,
        "features": {"events": EVENTS_PATH in paths, "styles": STYLES_PATH in paths},
        "model": model,
        "cost": COST,
        "fast": FAST,
        "long_seconds": LONG_SECONDS,
        "method_url": METHOD_PATH,
        "speed_url": f"{PREFIX}/speed.json",
    }


def method_page() -> str:
    """``/playground/method``: what each parameter does to the picture, in the specs' own words."""
    def section(spec: ParamSpec) -> str:
        allowed = html.escape(spec.allowed())
        return (f'<section id="{spec.name}"><h2>{html.escape(spec.label or spec.name)}</h2>'
                f"<p>{html.escape(spec.explain)}</p>"
                f'<p class="hint">Parameter <code>{spec.name}</code>, {allowed}, default '
                f"<code>{html.escape(str(spec.default))}</code>.</p></section>")

    main = "".join(section(s) for s in PARAM_SPECS if s.group == "main")
    advanced = "".join(section(s) for s in PARAM_SPECS if s.group != "main")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>How HAM restyles a picture</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="{PREFIX}/static/playground.css"></head>
<body><header class="bar"><h1>How HAM restyles a picture</h1>
<nav><a href="{PREFIX}/">Back to the playground</a></nav></header>
<main class="method">
<p class="intro">HAM makes a new picture from noise, step by step, with a diffusion model that is not retrained.
Three helpers steer it. <strong>SINI</strong> chooses what it starts from: the content photo, recoloured with the
style's palette. <strong>GAR</strong> gives every part of the picture the style's overall colours and textures.
<strong>LAT</strong> keeps shapes and local detail where the content photo has them. α, β and γ set how strongly
each acts; each can be switched off.</p>
{main}<h2 class="group">Advanced</h2>{advanced}
</main></body></html>
"""


def install_playground(app: FastAPI) -> None:
    """Serve the playground under ``/playground/`` and send ``/`` there."""
    app.mount(f"{PREFIX}/static", StaticFiles(directory=ASSETS_DIR), name="playground-static")

    @app.get("/", include_in_schema=False)
    @app.get(PREFIX, include_in_schema=False)
    def to_playground() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @app.get(f"{PREFIX}/", include_in_schema=False)
    def playground_page() -> FileResponse:
        return FileResponse(ASSETS_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)

    @app.get(METHOD_PATH, include_in_schema=False)
    def method() -> HTMLResponse:
        return HTMLResponse(method_page(), headers=_PAGE_HEADERS)

    config_cache: dict[str, Any] = {}

    @app.get(f"{PREFIX}/config.json", include_in_schema=False)
    def config(request: Request) -> JSONResponse:
        if not config_cache:  # the routes and the settings are fixed once the app serves
            settings = get_services(request).settings
            config_cache.update(
                playground_config(app, settings.auth_enabled, settings.max_upload_bytes, settings.model)
            )
        return JSONResponse(config_cache, headers={"Cache-Control": "no-cache"})

    @app.get(f"{PREFIX}/speed.json", include_in_schema=False)
    async def speed(request: Request) -> JSONResponse:
        redis = get_services(request).redis
        try:
            speeds = await run_in_threadpool(measured_speeds, redis)
        except Exception:  # no Redis, no estimate: the page says it has none
            speeds = []
        return JSONResponse({"speeds": speeds}, headers={"Cache-Control": "no-store"})
