"""The asyncio client: ``AsyncClient(base_url, api_key=None)``, the methods of :class:`~ham_client.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from ham_client.errors import Unreachable, WaitTimeout
from ham_client.models import Job, JobPage, ModelList
from ham_client.protocol import (
    Call,
    EventParser,
    ImageInput,
    RetryPolicy,
    job_of,
    job_path,
    models_of,
    page_of,
    result_url,
    submit_call,
)

DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# Each long poll of the polling fallback: the server's cap on Prefer: wait.
POLL_WAIT_SECONDS = 60


class AsyncClient:
    """The HAM API over HTTP, for asyncio. Use as an async context manager, or await :meth:`close`.

    Every call that the server refuses for now (429, 503) or that cannot connect is retried
    per ``retry`` (honouring ``Retry-After``); a submit is retry-safe because it always carries
    an ``Idempotency-Key`` (a fresh one per :meth:`submit` unless given).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No default auth header: result URLs may point at an object store, which must not see the key.
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport, headers={"User-Agent": "ham-client/1"})
        self._sleep = asyncio.sleep

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    # --- the API -----------------------------------------------------------------

    async def submit(
        self,
        content: ImageInput,
        style: ImageInput | None = None,
        style_prompt: str | None = None,
        *,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **params: Any,
    ) -> Job:
        """Queue a transfer and return its job (``queued``, or terminal when ``wait`` seconds sufficed).

        ``content`` and ``style`` are each a path, bytes, a PIL image, or an ``http(s)://`` URL /
        ``data:`` URI that the server fetches. ``params`` are the API's parameters (``steps=30``,
        ``alpha=0.8``, ``output_format="webp"``, ...) and ``model`` (a name from :meth:`models`; default:
        the deployment's default model).
        """
        return job_of(await self._send(submit_call(
            content, style, style_prompt, params, webhook_url=webhook_url, webhook_events=webhook_events,
            idempotency_key=idempotency_key, wait=wait,
        )))

    async def get(self, job_id: str, *, wait: float | None = None) -> Job:
        """The job now (or, with ``wait``, once terminal or after that many seconds, at most 60)."""
        headers = {"Prefer": f"wait={int(wait)}"} if wait else {}
        return job_of(await self._send(Call("GET", job_path(job_id), headers=headers)))

    async def list(self, limit: int = 20, cursor: str | None = None) -> JobPage:
        """One page of your jobs, newest first; pass ``next_cursor`` on for the next."""
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        return page_of(await self._send(Call("GET", "/v1/transfers", {"params": params})))

    async def models(self) -> ModelList:
        """The models the deployment serves, the default first, with live worker counts and queue depths;
        pass one's ``name`` as ``submit(..., model=name)``."""
        return models_of(await self._send(Call("GET", "/v1/models")))

    async def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once, a running one at its next step."""
        return job_of(await self._send(Call("POST", job_path(job_id) + "/cancel")))

    async def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """The job once terminal: followed over server-sent events, by long polls if the stream fails.

        Raises :class:`WaitTimeout` after ``timeout`` seconds (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self._follow_events(job_id, deadline)
        while job is None or not job.terminal:
            left = POLL_WAIT_SECONDS if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(job or await self.get(job_id), timeout or 0)
            job = await self.get(job_id, wait=max(1, min(POLL_WAIT_SECONDS, int(left))))
        return job

    async def download(self, job: Job | str) -> bytes:
        """The result's bytes (in the job's ``output_format``); :class:`JobFailed` unless it succeeded."""
        if isinstance(job, str):
            job = await self.get(job)
        url = result_url(job, self.base_url)
        # A result URL carries its own signature: no API key (an object store would refuse two auths).
        response = await self._send(Call("GET", url), auth=False)
        return response.content

    # --- sending -----------------------------------------------------------------

    async def _send(self, call: Call, auth: bool = True) -> httpx.Response:
        url = call.path if call.path.startswith(("http://", "https://")) else self.base_url + call.path
        headers = {**(self._auth if auth else {}), **call.headers}
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, url, headers=headers, **call.kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                delay = self.retry.delay(attempt, None) if call.retry else None
                if delay is None:
                    where = f"the API at {self.base_url}" if url.startswith(self.base_url) else url
                    raise Unreachable(f"cannot reach {where}: {exc}") from exc
            else:
                delay = self.retry.delay(attempt, response) if call.retry else None
                if delay is None:
                    return response
            await self._sleep(delay)
            attempt += 1

    async def _follow_events(self, job_id: str, deadline: float | None) -> Job | None:
        """The terminal job from the event stream; None when the stream is unavailable or too slow."""
        last_id: str | None = None
        job: Job | None = None
        for _ in range(3):  # reconnects, resuming after the last event seen
            headers = {**self._auth, "Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return job
            try:
                async with self._http.stream("GET", self.base_url + job_path(job_id) + "/events", headers=headers,
                                       timeout=httpx.Timeout(left or 60.0, connect=10.0, read=left or 60.0)) as stream:
                    if stream.status_code == 204:
                        return None  # already terminal before the last id we saw: read it
                    if stream.status_code != 200:
                        if stream.status_code in (401, 404):
                            await stream.aread()
                            job_of(stream)  # raises the API's error
                        return None
                    parser = EventParser()
                    async for line in stream.aiter_lines():
                        for event in parser.feed(line):
                            last_id = event.id or last_id
                            job = Job.model_validate_json(event.data)
                            if job.terminal:
                                return job
                        if deadline is not None and time.monotonic() > deadline:
                            return job
            except httpx.HTTPError:
                continue
        return job
