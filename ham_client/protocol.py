"""The HTTP conversation with the API, shared by :class:`~ham_client.Client` and
:class:`~ham_client.AsyncClient`: how a call becomes a request, when a request is retried, how
an answer becomes a result. The two clients only send.
"""

from __future__ import annotations

import base64
import email.utils
import io
import os
import random
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from ham_client.error_codes import error_for
from ham_client.errors import ApiError, JobFailed, NotTheApi, Unreachable
from ham_client.models import Job, JobPage, ModelList, Style, StylePage

# What ``submit`` accepts as an image: a path, raw bytes, a PIL image, or a URL / data: URI.
ImageInput = Any
_REFERENCE_PREFIXES = ("http://", "https://", "data:")
RETRY_STATUSES = frozenset({429, 503})
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# Each long poll of the polling fallback: the server's cap on Prefer: wait.
POLL_WAIT_SECONDS = 60


@dataclass(frozen=True)
class Call:
    """One API request, ready to send."""

    method: str
    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    # Retrying is safe: nothing happened (429/503, connection refused) or an idempotency key guards it.
    retry: bool = True


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 429/503 answers and failed connections: ``Retry-After`` when the server sends it,
    else exponential backoff with jitter (``backoff * 2**attempt``, at most ``max_backoff``)."""

    max_retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 120.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retry ``attempt`` (0-based), or None to give up."""
        if attempt >= self.max_retries:
            return None
        if response is not None:
            if response.status_code not in RETRY_STATUSES:
                return None
            after = retry_after(response.headers.get("Retry-After"))
            if after is not None:
                return min(after, self.max_retry_after)
        return min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(1.0, 1.25)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds of a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _is_reference(value: ImageInput) -> bool:
    return isinstance(value, str) and value.startswith(_REFERENCE_PREFIXES)


def _image_bytes(value: ImageInput, field_name: str) -> tuple[str, bytes]:
    """``(filename, bytes)`` of a path, bytes or PIL image."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{field_name}.bin", bytes(value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        return path.name, path.read_bytes()
    if hasattr(value, "save"):  # a PIL image, without importing Pillow here
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return f"{field_name}.png", buffer.getvalue()
    raise TypeError(f"{field_name}: give a path, bytes, a PIL image or a URL, not {type(value).__name__}")


def _data_uri(value: ImageInput, field_name: str) -> str:
    if _is_reference(value):
        return value
    _, data = _image_bytes(value, field_name)
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def _several(value: Any) -> list[Any]:
    """A style argument (None, one, or a list/tuple of them) as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _form_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def submit_call(
    content: ImageInput,
    style: ImageInput | list[ImageInput] | None,
    style_prompt: str | None,
    params: Mapping[str, Any],
    *,
    style_id: str | list[str] | None = None,
    webhook_url: str | None = None,
    webhook_events: list[str] | None = None,
    idempotency_key: str | None = None,
    wait: float | None = None,
) -> Call:
    """``POST /v1/transfers``: JSON with references when an image is a URL, else a multipart upload.

    ``style`` and ``style_id`` may each be a list: the job then has several styles, the images
    first, then the library styles, one result each.
    """
    headers = {"Idempotency-Key": idempotency_key or f"ham-client-{uuid.uuid4().hex}"}
    if wait is not None:
        headers["Prefer"] = f"wait={int(wait)}"
    styles, style_ids = _several(style), _several(style_id)
    fields = {name: value for name, value in params.items() if value is not None}
    if style_prompt is not None:
        fields["style_prompt"] = style_prompt
    if webhook_url is not None:
        fields["webhook_url"] = webhook_url
    if _is_reference(content) or any(_is_reference(s) for s in styles):
        body = dict(fields, content_url=_data_uri(content, "content"))
        if styles:
            urls = [_data_uri(s, "style") for s in styles]
            body["style_url"] = urls[0] if len(urls) == 1 else urls
        if style_ids:
            body["style_id"] = style_ids[0] if len(style_ids) == 1 else style_ids
        if webhook_events is not None:
            body["webhook_events"] = list(webhook_events)
        return Call("POST", "/v1/transfers", {"json": body}, headers)
    files = [("content", _image_bytes(content, "content"))]
    files += [("style", _image_bytes(s, "style")) for s in styles]
    data: dict[str, Any] = {name: _form_value(value) for name, value in fields.items()}
    if style_ids:
        data["style_id"] = style_ids  # a list: one form field each
    if webhook_events is not None:
        data["webhook_events"] = ",".join(webhook_events)
    return Call("POST", "/v1/transfers", {"data": data, "files": files}, headers)


def create_style_call(
    image: ImageInput | None,
    style_prompt: str | None,
    name: str | None,
    warm: bool,
    size: int | None,
    steps: int | None,
) -> Call:
    """``POST /v1/styles``: always multipart (a text-only style too, which has no file part)."""
    parts: list[tuple[str, Any]] = []
    if image is not None:
        parts.append(("image", _image_bytes(image, "image")))
    given = {"style_prompt": style_prompt, "name": name, "warm": warm or None, "size": size, "steps": steps}
    parts += [(field, (None, _form_value(value))) for field, value in given.items() if value is not None]
    return Call("POST", "/v1/styles", {"files": parts})


def style_path(style_id: str) -> str:
    if not style_id or "/" in style_id:
        raise ValueError(f"not a style id: {style_id!r}")
    return f"/v1/styles/{style_id}"


def job_path(job_id: str) -> str:
    if not job_id or "/" in job_id:
        raise ValueError(f"not a job id: {job_id!r}")
    return f"/v1/transfers/{job_id}"


def check(response: httpx.Response) -> httpx.Response:
    """``response`` if 2xx; :class:`ApiError` with the body's error otherwise."""
    if response.is_success:
        return response
    try:
        error = response.json()["error"]
        raise error_for(response.status_code, str(error["code"]), str(error["message"]), error.get("field"))
    except (ValueError, KeyError, TypeError):
        raise ApiError(response.status_code, "http_error", response.text[:200] or response.reason_phrase) from None


def job_of(response: httpx.Response) -> Job:
    return _parsed(Job, response, "a transfer job")


def models_of(response: httpx.Response) -> ModelList:
    return _parsed(ModelList, response, "the model catalogue")


def page_of(response: httpx.Response) -> JobPage:
    return _parsed(JobPage, response, "a page of jobs")


def style_of(response: httpx.Response) -> Style:
    return _parsed(Style, response, "a style")


def style_page_of(response: httpx.Response) -> StylePage:
    return _parsed(StylePage, response, "a page of styles")


def deleted(response: httpx.Response) -> None:
    """Nothing, once a DELETE answered 2xx; :class:`ApiError` otherwise."""
    check(response)


def _parsed(model: type[Any], response: httpx.Response, what: str) -> Any:
    try:
        return model.model_validate_json(check(response).content)
    except ValidationError:
        origin = f"{response.request.url.scheme}://{response.request.url.netloc.decode()}"
        raise NotTheApi(f"{origin} answered HTTP {response.status_code} without {what}; is it the HAM API?") from None


def result_url(job: Job, base_url: str) -> str:
    """The absolute download URL of a succeeded job; :class:`JobFailed` otherwise."""
    if job.status != "succeeded" or not job.result_url:
        detail = f"{job.error.code}: {job.error.message}" if job.error else ""
        raise JobFailed(job.id, job.status, detail)
    return str(httpx.URL(base_url).join(job.result_url))


@dataclass
class Event:
    """One server-sent event."""

    event: str = "message"
    data: str = ""
    id: str | None = None


class EventParser:
    """Server-sent events from the stream's lines (the WHATWG event-stream format)."""

    def __init__(self) -> None:
        self._event = Event()
        self._data: list[str] = []

    def feed(self, line: str) -> Iterator[Event]:
        if line == "":
            if self._data:
                self._event.data = "\n".join(self._data)
                yield self._event
            self._event, self._data = Event(), []
            return
        if line.startswith(":"):
            return  # a comment (keep-alive ping)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event.event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            self._event.id = value


# --- sending and following: the decisions both clients make, without I/O ---------------------------


def target_of(call: Call, base_url: str, auth: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The absolute URL and the headers of ``call`` (``auth``: the authorization header, or none)."""
    url = call.path if call.path.startswith(("http://", "https://")) else base_url + call.path
    return url, {**auth, **call.headers}


def retry_delay(
    policy: RetryPolicy, call: Call, attempt: int, outcome: httpx.Response | httpx.TransportError, base_url: str,
    url: str,
) -> float | None:
    """Seconds to wait before sending ``call`` again after ``outcome`` (an answer, or a failed connection);
    ``None``: the answer is final. A failed connection that is not retried raises :class:`Unreachable`."""
    if isinstance(outcome, httpx.Response):
        return policy.delay(attempt, outcome) if call.retry else None
    delay = policy.delay(attempt, None) if call.retry else None
    if delay is None:
        where = f"the API at {base_url}" if url.startswith(base_url) else url
        raise Unreachable(f"cannot reach {where}: {outcome}") from outcome
    return delay


# Connection failures a call may be retried after (nothing reached the server).
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
# Statuses of the event stream whose body is the API's error (raised), not a reason to fall back to polling.
EVENT_ERRORS = frozenset({401, 404})


class EventFollower:
    """Following one job's event stream until it ends: the requests to make (resuming after the
    last event seen, within the deadline) and what each line means. The clients do the I/O."""

    reconnects = 3

    def __init__(self, base_url: str, auth: Mapping[str, str], job_id: str, deadline: float | None) -> None:
        self.url = base_url + job_path(job_id) + "/events"
        self.auth = dict(auth)
        self.deadline = deadline
        self.last_id: str | None = None
        self.job: Job | None = None
        self._parser = EventParser()

    def connections(self) -> Iterator[tuple[dict[str, str], httpx.Timeout]]:
        """Headers and timeout of each (re)connection, resuming after the last event seen; stops after
        :attr:`reconnects` or once the deadline has passed."""
        for _ in range(self.reconnects):
            headers = {**self.auth, "Accept": "text/event-stream"}
            if self.last_id is not None:
                headers["Last-Event-ID"] = self.last_id
            left = None if self.deadline is None else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            self._parser = EventParser()
            yield headers, httpx.Timeout(left or 60.0, connect=10.0, read=left or 60.0)

    def feed(self, line: str) -> bool:
        """Take one line of the stream; true once following is over (the job ended, or the deadline passed)."""
        for event in self._parser.feed(line):
            self.last_id = event.id or self.last_id
            self.job = Job.model_validate_json(event.data)
            if self.job.terminal:
                return True
        return self.deadline is not None and time.monotonic() > self.deadline
