"""The asyncio client: ``AsyncClient(base_url, api_key=None)``, the methods of :class:`~ham_client.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import httpx

from ham_client.errors import WaitTimeout
from ham_client.models import Job, JobPage, ModelList, Style, StylePage
from ham_client.protocol import (
    CONNECT_ERRORS,
    DEFAULT_TIMEOUT,
    EVENT_ERRORS,
    POLL_WAIT_SECONDS,
    Call,
    EventFollower,
    ImageInput,
    RetryPolicy,
    create_style_call,
    deleted,
    job_of,
    job_path,
    models_of,
    page_of,
    result_url,
    retry_delay,
    style_of,
    style_page_of,
    style_path,
    submit_call,
    target_of,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ham_client.params import TransferOptions



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
        style: ImageInput | list[ImageInput] | None = None,
        style_prompt: str | None = None,
        *,
        style_id: str | list[str] | None = None,
        model: str | None = None,
        webhook_url: str | None = None,
        webhook_events: list[str] | None = None,
        idempotency_key: str | None = None,
        wait: float | None = None,
        **params: Unpack[TransferOptions],
    ) -> Job:
        """Queue a transfer and return its job (``queued``, or terminal when ``wait`` seconds sufficed).

        ``content`` and ``style`` are each a path, bytes, a PIL image, or an ``http(s)://`` URL /
        ``data:`` URI that the server fetches; ``style_id`` names a style of your library. Several
        styles (a list of ``style``, of ``style_id``, or both) make one job with a result per style.
        ``params`` are the API's parameters (:class:`~ham_client.params.TransferOptions`: ``steps=30``,
        ``alpha=0.8``, ``output_format="webp"``, ...) and ``model`` (a name from :meth:`models`; default:
        the deployment's default model).
        """
        return job_of(await self._send(submit_call(
            content, style, style_prompt, {**params, **({"model": model} if model else {})}, style_id=style_id,
            webhook_url=webhook_url, webhook_events=webhook_events, idempotency_key=idempotency_key, wait=wait,
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

    # --- the style library -----------------------------------------------------------

    async def create_style(
        self,
        image: ImageInput | None = None,
        style_prompt: str | None = None,
        *,
        name: str | None = None,
        warm: bool = False,
        size: int | None = None,
        steps: int | None = None,
    ) -> Style:
        """Store a style (an image, a prompt, or both) to name as ``style_id`` in later submits.

        ``warm=True`` queues a job that computes its features now (for ``size``/``steps``, the
        engine's defaults unless given), so the first transfer with it is warm.
        """
        return style_of(await self._send(create_style_call(image, style_prompt, name, warm, size, steps)))

    async def get_style(self, style_id: str) -> Style:
        """One style of your library."""
        return style_of(await self._send(Call("GET", style_path(style_id))))

    async def list_styles(self, limit: int = 20, cursor: str | None = None) -> StylePage:
        """One page of your styles, newest first; pass ``next_cursor`` on for the next."""
        params: dict[str, Any] = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        return style_page_of(await self._send(Call("GET", "/v1/styles", {"params": params})))

    async def delete_style(self, style_id: str) -> None:
        """Delete a style (jobs already submitted with it keep their own copy and run)."""
        deleted(await self._send(Call("DELETE", style_path(style_id))))

    # --- sending -----------------------------------------------------------------

    async def _send(self, call: Call, auth: bool = True) -> httpx.Response:
        url, headers = target_of(call, self.base_url, self._auth if auth else {})
        attempt = 0
        while True:
            try:
                outcome = await self._http.request(call.method, url, headers=headers, **call.kwargs)
            except CONNECT_ERRORS as exc:
                outcome = exc
            delay = retry_delay(self.retry, call, attempt, outcome, self.base_url, url)
            if delay is None:
                return outcome
            await self._sleep(delay)
            attempt += 1

    async def _follow_events(self, job_id: str, deadline: float | None) -> Job | None:
        """The terminal job from the event stream; None when the stream is unavailable or too slow."""
        follower = EventFollower(self.base_url, self._auth, job_id, deadline)
        for headers, timeout in follower.connections():
            try:
                async with self._http.stream("GET", follower.url, headers=headers, timeout=timeout) as stream:
                    if stream.status_code != 200:  # 204: ended before the last id seen; read the job instead
                        if stream.status_code in EVENT_ERRORS:
                            await stream.aread()
                            job_of(stream)  # raises the API's error
                        return None
                    async for line in stream.aiter_lines():
                        if follower.feed(line):
                            return follower.job
            except httpx.HTTPError:
                continue
        return follower.job
