"""``GET /v1/transfers/{id}/events``: a job's changes as server-sent events.

Each event's ``data`` is the job resource as JSON and its ``id`` the job's version: ``event:
progress`` while the job is queued or running, then one ``event: succeeded|failed|canceled``,
after which the stream ends. A client reconnecting with ``Last-Event-ID`` gets only what changed
after that version; one that already saw the terminal event gets ``204`` (which tells an
``EventSource`` to stop reconnecting). Driven by Redis pub/sub (:mod:`service.api.live`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated

from fastapi import APIRouter, Header, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from service.api.deps import ServicesDep, TenantDep
from service.api.errors import (
    REDIS_REFUSALS,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
    error_responses,
)
from service.api.job_access import job_resource, owned_job
from service.api.live import job_versions

router = APIRouter(prefix="/v1/transfers", tags=["transfers"])

KEEPALIVE_SECONDS = 15
_EXAMPLE = (
    'event: progress\nid: 7\ndata: {"id": "3f2b…", "status": "running", "progress": 0.42, …}\n\n'
    'event: succeeded\nid: 31\ndata: {"id": "3f2b…", "status": "succeeded", "result_url": "…", …}\n\n'
)


@router.get(
    "/{job_id}/events",
    summary="Follow a transfer job (server-sent events)",
    response_class=EventSourceResponse,
    responses={
        **error_responses(Unauthorized, RateLimited, InvalidRequest, Unavailable, *REDIS_REFUSALS, NotFound),
        200: {"description": "`text/event-stream`: `progress` events, then one terminal event "
              "(`succeeded`, `failed` or `canceled`), after which the server closes the stream. Each event is a "
              "`TransferEvent`: `event` its name, `id` the job's version, `data` the job resource as JSON. "
              "Comment lines (`: ping`) keep an idle connection open every 15 s.",
              "content": {"text/event-stream": {
                  # `itemSchema` (OpenAPI 3.2's field for sequential media types) names the schema of each
                  # event. No `schema`: beside `itemSchema` it types the whole stream, which 3.2 reads as the
                  # array of events, so `{"type": "string"}` there was wrong (schemathesis: ST108), and an
                  # array would tell 3.1 readers the body is JSON. 3.1 allows a media type without one.
                  "itemSchema": {"$ref": "#/components/schemas/TransferEvent"},
                  "example": _EXAMPLE}}},
        204: {"description": "`Last-Event-ID` is the terminal event already: nothing more will come."},
    },
)
async def transfer_events(
    job_id: str,
    tenant: TenantDep,
    services: ServicesDep,
    last_event_id: Annotated[str | None, Header(
        alias="Last-Event-ID",
        description="The `id` of the last event received (an `EventSource` sends it when it reconnects): the "
        "stream then starts with the first change after that version, skipping what was seen; if that event was "
        "the terminal one, the answer is `204` and nothing more will come. Ids only grow within a job; without "
        "this header the stream starts with the job as it is now.",
        pattern=r"^[0-9]{1,18}$",
    )] = None,
) -> Response:
    """The job now, then each change, until (and including) its terminal event."""
    job = await run_in_threadpool(owned_job, services, tenant, job_id)
    seen = int(last_event_id) if last_event_id is not None else -1
    if job.terminal and job.version <= seen:
        return Response(status_code=204)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async with aclosing(job_versions(services, job.id)) as versions:
            async for current in versions:
                if current is None:  # the record expired
                    return
                if current.version <= seen:
                    continue
                resource = await run_in_threadpool(job_resource, current, services)
                name = current.status.value if current.terminal else "progress"
                yield ServerSentEvent(data=resource.model_dump_json(), event=name, id=str(current.version))
                if current.terminal:
                    return

    return EventSourceResponse(stream(), ping=KEEPALIVE_SECONDS, headers={"Cache-Control": "no-store"})
