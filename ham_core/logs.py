"""Logging for the API and the worker: text by default, one JSON object per line on request.

``HAM_LOG_FORMAT=json`` switches both processes to JSON lines (``text`` stays the default)::

    {"ts": "2026-01-01T12:00:00.123Z", "level": "INFO", "logger": "ham.api", "message": "job 3f2b… queued",
     "process": "api", "request_id": "5d0c…", "job_id": "3f2b…", "tenant": "acme"}

Every line written while a request or a job is handled carries ``request_id``, ``job_id`` and
``tenant`` (``null`` until known). They live in one :class:`LogContext` per request or job, held in
a context variable: the API's request middleware opens it, authentication fills in the tenant,
the transfer routes the job id; the worker opens one per job with the id of the request that
submitted it, so a job's lines can be found from the client's ``X-Request-ID``. The worker's RQ
loop opens the job's context around RQ's own handling of the job, and the task's context for the
same job is that same object (:func:`log_context`), so RQ's lines after the task ("Job OK")
carry the request id and tenant the task learnt from the job record.

Secrets never reach a log line: the configured API keys, signing keys and S3 secret are replaced
by ``[redacted]`` in every message, and nothing here logs request bodies or image bytes.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ham_core.config import Settings

LOG_FORMATS = ("text", "json")
CONTEXT_FIELDS = ("request_id", "job_id", "tenant")
REDACTED = "[redacted]"
# What a client may send as X-Request-ID: a UUID, a ULID, a trace id, "order-42/retry-1"… but no
# spaces, quotes or control characters that would forge a log field or split a line.
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
# Secrets shorter than this are not redacted: replacing "a" everywhere would garble every line.
_MIN_SECRET_CHARS = 6


@dataclass
class LogContext:
    """The ids every log line of one request or job carries; mutable so later steps can fill them in."""

    request_id: str | None = None
    job_id: str | None = None
    tenant: str | None = None


_current: ContextVar[LogContext | None] = ContextVar("ham_log_context", default=None)


def current_context() -> LogContext | None:
    """The context of the request or job being handled here, if any."""
    return _current.get()


@contextmanager
def log_context(request_id: str | None = None, job_id: str | None = None,
                tenant: str | None = None) -> Iterator[LogContext]:
    """Open a fresh context for one request or job; lines logged inside carry its ids.

    Inside a context already open for the same ``job_id`` (RQ's handling of the job around
    the task), that context is used and filled in, not shadowed: what the task binds is then
    on the lines RQ writes after it returns.
    """
    outer = _current.get()
    if job_id is not None and outer is not None and outer.job_id == job_id:
        for name, value in (("request_id", request_id), ("tenant", tenant)):
            if value is not None:
                setattr(outer, name, value)
        yield outer
        return
    context = LogContext(request_id=request_id, job_id=job_id, tenant=tenant)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def bind(**fields: str | None) -> None:
    """Fill in ids of the current context (``tenant=…``, ``job_id=…``); nothing happens outside one.

    The context object is shared, not copied, so a value set in a thread-pool dependency is seen by
    the lines the event loop writes afterwards.
    """
    context = _current.get()
    if context is None:
        return
    for name, value in fields.items():
        if name not in CONTEXT_FIELDS:
            raise ValueError(f"unknown log context field {name!r}; known: {', '.join(CONTEXT_FIELDS)}")
        setattr(context, name, value)


def accept_request_id(presented: str | None) -> str:
    """The client's ``X-Request-ID`` when well-formed (1..128 of ``A-Za-z0-9._:/+=-``), else a new id."""
    if presented is not None and _REQUEST_ID.fullmatch(presented):
        return presented
    return uuid.uuid4().hex


class ContextFilter(logging.Filter):
    """Puts the current context's ids on every record (``record.request_id`` …) and redacts secrets."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= _MIN_SECRET_CHARS}, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        context = _current.get()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):  # an explicit extra={"job_id": …} wins
                setattr(record, name, getattr(context, name) if context else None)
        if self._secrets:
            message = record.getMessage()
            redacted = message
            for secret in self._secrets:
                redacted = redacted.replace(secret, REDACTED)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the known ids appended as ``[request_id=… tenant=…]``."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        known = [f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if getattr(record, name, None)]
        record.context = f" [{' '.join(known)}]" if known else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, ``process``, the ids,
    ``exc_info`` when an exception is attached."""

    def __init__(self, process: str = "ham") -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=timezone.utc)
        entry: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": self.process,
        }
        for name in CONTEXT_FIELDS:
            entry[name] = getattr(record, name, None)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """Values that must never appear in a log line: API keys, signing keys, the S3 secret."""
    values = [*settings.tenants_by_key, settings.webhook_secret, settings.url_signing_key,
              os.environ.get("AWS_SECRET_ACCESS_KEY", "")]
    return tuple(v for v in values if v)


def logging_config(settings: Settings, process: str) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` for ``process`` (``api`` or ``worker``).

    uvicorn applies it in each of its worker processes too (``log_config=``), and its own loggers
    (``uvicorn.error``, ``uvicorn.access``) go through the same handler, so they are JSON as well.
    """
    if settings.log_format not in LOG_FORMATS:  # Settings validates; this guards hand-built ones
        raise ValueError(f"log_format must be one of {LOG_FORMATS}, got {settings.log_format!r}")
    formatter: dict[str, Any] = (
        {"()": JsonFormatter, "process": process} if settings.log_format == "json" else {"()": TextFormatter}
    )
    level = settings.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter, "secrets": secrets_of(settings)}},
        "formatters": {"ham": formatter},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "ham",
                       "filters": ["context"]},
        },
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {
            # uvicorn's own config gives these handlers and propagate=False; here they use ours.
            name: {"level": level, "handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(settings: Settings, process: str) -> None:
    """Install :func:`logging_config` for this process (Python warnings go through it too)."""
    logging.config.dictConfig(logging_config(settings, process))
    logging.captureWarnings(True)
