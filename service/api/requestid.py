"""``X-Request-ID``: every request gets an id, echoed in the response and on its log lines.

A well-formed id from the client (see :func:`ham_core.logs.accept_request_id`) is kept, so a
product backend can follow its own trace id through our logs; anything else is replaced by a new
one. The id is also stored with a job the request submits, so the worker's lines carry it too.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ham_core.logs import accept_request_id, log_context

HEADER = "X-Request-ID"
_HEADER_BYTES = HEADER.lower().encode()


class RequestIdMiddleware:
    """Opens the request's log context (outermost, so every line of the request has the id)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        presented = next((v.decode("latin-1") for k, v in scope["headers"] if k == _HEADER_BYTES), None)
        request_id = accept_request_id(presented)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        with log_context(request_id=request_id):
            await self.app(scope, receive, send_with_id)
