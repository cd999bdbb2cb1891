"""Following a job as it changes: the server-sent events stream and ``Prefer: wait=N``.

Every change of a job record (a transition or a progress write) bumps its ``version`` and
publishes it on the job's Redis channel in the same Lua script (:mod:`ham_core.jobs`).
A follower subscribes first, then reads the job, then reads it again only when a message
arrives — so it cannot miss a change, and an idle follower costs Redis nothing. A re-read every
:data:`RESYNC_SECONDS` without a message covers a message lost while Redis reconnected.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress

from starlette.concurrency import run_in_threadpool

from ham_core.jobs import Job, events_channel
from service.api.deps import Services

MAX_WAIT_SECONDS = 60
RESYNC_SECONDS = 15.0
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,6})\"?", re.IGNORECASE)


async def job_versions(services: Services, job_id: str) -> AsyncIterator[Job | None]:
    """The job now, then again each time it changes; ``None`` once its record is gone."""
    pubsub = services.aredis.pubsub()
    try:
        await pubsub.subscribe(events_channel(job_id))
        seen = -1
        while True:
            job = await run_in_threadpool(services.jobs.get, job_id)
            if job is None:
                yield None
                return
            if job.version != seen:
                seen = job.version
                yield job
            await _next_message(pubsub, RESYNC_SECONDS)
    finally:
        await pubsub.aclose()


async def _next_message(pubsub, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
        if message is not None:
            # Several changes may be queued already: one re-read covers them all.
            while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0) is not None:
                pass
            return


def preferred_wait(prefer: str | None) -> int | None:
    """Seconds from a ``Prefer: wait=N`` header (RFC 7240), capped at :data:`MAX_WAIT_SECONDS`."""
    match = _PREFER_WAIT.search(prefer or "")
    return None if match is None else min(int(match.group(1)), MAX_WAIT_SECONDS)


async def wait_until_terminal(services: Services, job: Job, seconds: int) -> Job:
    """``job`` once terminal, or as it stands after ``seconds``."""
    if job.terminal or seconds <= 0:
        return job
    latest = job

    async def follow() -> None:
        nonlocal latest
        async with aclosing(job_versions(services, job.id)) as versions:
            async for current in versions:
                if current is None:
                    return
                latest = current
                if current.terminal:
                    return

    with suppress(asyncio.TimeoutError):
        await asyncio.wait_for(follow(), timeout=seconds)
    return latest
