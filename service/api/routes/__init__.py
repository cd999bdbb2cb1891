"""The API's routers, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import events, files, models, ops, styles, transfers


def api_router() -> APIRouter:
    """Every route of the HTTP API."""
    router = APIRouter()
    router.include_router(transfers.router)
    router.include_router(styles.router)
    router.include_router(models.router)
    router.include_router(events.router)
    router.include_router(files.router)
    router.include_router(ops.router)
    return router
