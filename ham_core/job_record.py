"""The job record: one transfer job as Redis stores it, and its storage keys.

:class:`Job` is the one model. Its Redis hash codec (:meth:`Job.to_fields`,
:meth:`Job.from_fields`) is derived from the dataclass fields and their types — a field added
to the model is stored and read back with no codec to edit — and a missing hash field decodes to
the field's own default, which is imported from where it is owned (the output format and
quality from :mod:`ham_core.output`), never restated here.

How each type is stored: ``str`` raw, ``bool`` as ``"1"``/``"0"``, ``int`` and ``float`` as
numbers the Lua transitions can read, an ``Enum`` by value, a ``tuple`` of words comma-joined,
and ``dict``/``list`` as JSON (sorted keys). ``None`` is left out of the hash.
"""

from __future__ import annotations

import json
import re
import time
import typing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from functools import cache
from types import UnionType
from typing import Any

from ham_core.output import DEFAULT_QUALITY, OUTPUT_SPECS
from ham_core.style_refs import StyleRef, refs_from_record, refs_to_json, upload_key

KEY_PREFIX = "ham"
# Error codes a job can fail with (``Job.error_code``).
ERROR_INVALID_INPUT = "invalid_input"
ERROR_INPUTS_MISSING = "inputs_missing"
ERROR_INTERNAL = "internal_error"
ERROR_NUMERICAL = "numerical_error"
ERROR_TIMEOUT = "timeout"
ERROR_WORKER_LOST = "worker_lost"

# What a running job's worker should do next (:meth:`JobStore.poll`).
POLL_GO = "go"
POLL_CANCEL = "cancel"
POLL_FENCED = "fenced"

# The result format a job gets when it asks for none: the request parameter's own default.
DEFAULT_OUTPUT_FORMAT: str = next(spec.default for spec in OUTPUT_SPECS if spec.name == "output_format")


class JobStatus(str, Enum):
    """Where a job is in its life: queued → running → one of the terminal states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})
# What a webhook may be sent for: the job starting, its progress (at most once a second), its end.
WEBHOOK_EVENTS = ("start", "progress", "completed")
# What a webhook hears about when the submit names no events: the job's end.
DEFAULT_WEBHOOK_EVENTS: tuple[str, ...] = ("completed",)


class JobConflict(Exception):
    """The transition is not allowed from the job's current state (e.g. cancel a finished job: 409)."""

    def __init__(self, job_id: str, status: str, action: str) -> None:
        super().__init__(f"job {job_id} is {status}; cannot {action}")
        self.job_id = job_id
        self.status = status
        self.action = action


class JobFenced(JobConflict):
    """The run that asked no longer owns the job: another run took it over (after a freeze, the
    job was recovered and started again) or it was handed back. The stale run must stop writing."""

    def __init__(self, job_id: str, status: str, action: str, run: int) -> None:
        super().__init__(job_id, status, action)
        self.args = (f"job {job_id}: run {run} no longer owns it ({status}); cannot {action}",)
        self.run = run


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` already names a job created by a *different* request (409)."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} already names job {job_id}, created by a different request")
        self.key = key
        self.job_id = job_id


class QueueFull(Exception):
    """A queue limit would be exceeded: ``scope`` is ``"tenant"`` or ``"global"`` (429)."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"{scope} queue limit of {limit} queued jobs reached")
        self.scope = scope
        self.limit = limit


def new_job_id() -> str:
    """A fresh, unguessable job id (32 hex chars)."""
    return uuid.uuid4().hex


@dataclass
class Job:
    """One transfer job as stored in Redis. The API builds it with ``id``, ``tenant``,
    ``params`` and its styles; everything else is filled in by transitions."""

    id: str
    tenant: str
    status: JobStatus = JobStatus.QUEUED
    progress: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    # The job's styles, in order: one result each. Stored as JSON; a record of the previous
    # version (``has_style`` / ``style_prompt``) is read as the one style it means.
    styles: list[StyleRef] = field(
        default_factory=list, metadata={"encode": refs_to_json, "decode_record": refs_from_record}
    )
    webhook_url: str | None = None
    # Which transitions the webhook hears about: a subset of WEBHOOK_EVENTS.
    webhook_events: tuple[str, ...] = DEFAULT_WEBHOOK_EVENTS
    output_format: str = DEFAULT_OUTPUT_FORMAT
    output_quality: int = DEFAULT_QUALITY
    result_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    stats: dict[str, Any] | None = None
    # The X-Request-ID of the submission: the worker's log lines for this job carry it too.
    request_id: str | None = None
    result_keys: list[str] | None = None  # one per style once succeeded (the first is result_key)
    # Bumped by every transition and progress write; the id of the job's server-sent events.
    version: int = 0
    # The catalogue model it runs on (its queue's); None: the default model (records from before models).
    model: str | None = None
    # Runs started so far (never refunded, unlike ``attempts``): the current run's fencing token.
    # Every worker write about the job names its run and is refused once another run owns the job.
    run: int = 0

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def style_ids(self) -> list[str]:
        """The library styles this job uses, in order."""
        return [ref.style_id for ref in self.styles if ref.style_id]

    @property
    def has_style(self) -> bool:
        """Whether a style image was given (uploaded or from the library)."""
        return any(ref.has_image for ref in self.styles)

    @property
    def style_prompt(self) -> str | None:
        """The prompt given with the request itself: that of a job's one style not from the library."""
        if len(self.styles) == 1 and self.styles[0].style_id is None:
            return self.styles[0].prompt
        return None

    @property
    def input_keys(self) -> list[str]:
        """Every stored input of this job (never a library style's image: that outlives the job)."""
        keys = [self.content_key]
        for ref in self.styles:
            if ref.key and ref.key.startswith(f"inputs/{self.id}/") and ref.key not in keys:
                keys.append(ref.key)
        return keys

    @property
    def content_key(self) -> str:
        return content_key(self.id)

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields; ``None`` attributes are left out."""
        out = {}
        for name, (encode, _) in _codec().items():
            value = getattr(self, name)
            if value is not None:
                out[name] = encode(value)
        return out

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> Job:
        """Inverse of :meth:`to_fields`; accepts the bytes Redis returns (unknown fields are ignored)."""
        stored = {_text(k): _text(v) for k, v in raw.items()}
        values: dict[str, Any] = {}
        for f in fields(cls):
            if "decode_record" in f.metadata:  # a field read from the whole record
                values[f.name] = f.metadata["decode_record"](stored, stored["id"])
                continue
            decode = _codec()[f.name][1]
            text = stored.get(f.name)
            if text is not None and (text != "" or decode is str):
                values[f.name] = decode(text)
        return cls(**values)


# --- the codec, derived from the fields --------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


_CODECS: dict[type, tuple[Callable[[Any], str], Callable[[str], Any]]] = {
    str: (str, str),
    bool: (lambda v: "1" if v else "0", lambda s: s == "1"),
    int: (lambda v: str(int(v)), int),
    float: (lambda v: repr(float(v)), float),
    tuple: (",".join, lambda s: tuple(filter(None, s.split(",")))),
    dict: (_json, json.loads),
    list: (_json, json.loads),
}


@cache
def _codec() -> dict[str, tuple[Callable[[Any], str], Callable[[str], Any]]]:
    """``{field: (encode, decode)}`` for every field of :class:`Job`, from its type."""
    hints = typing.get_type_hints(Job)
    out = {}
    for f in fields(Job):
        kind = _base_type(hints[f.name])
        if "encode" in f.metadata:  # a field with its own codec (it knows its type best)
            out[f.name] = (f.metadata["encode"], None)
        elif issubclass(kind, Enum):
            out[f.name] = (lambda v: v.value, kind)
        else:
            out[f.name] = _CODECS[kind]
    return out


def _base_type(hint: Any) -> type:
    """``X`` of ``X``, ``X | None``, ``X[...]``."""
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return typing.get_origin(hint) or hint


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


# What list_for_tenant hands out as next_cursor, "<created_at>:<job id>" (the API declares it as the pattern).
CURSOR_PATTERN = r"^(\d{1,12}(?:\.\d{1,9})?):([0-9a-f]{32})$"
_CURSOR = re.compile(CURSOR_PATTERN)


def _parse_cursor(cursor: str) -> tuple[float, str]:
    """``"<created_at>:<job id>"`` as written by ``JobStore.list_for_tenant``."""
    match = _CURSOR.fullmatch(cursor)
    if match is None:
        raise ValueError(f"cursor: not a cursor returned by this API: {cursor[:80]!r}")
    return float(match.group(1)), match.group(2)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _token(run: int | None) -> str:
    """A run as the Lua fence reads it ('' = no fence: the API's and tools' writes)."""
    return "" if run is None else str(int(run))


# --- storage keys ---------------------------------------------------------------------------

# The storage folders a job's own objects live in (the expiry sweep's scope).
JOB_FOLDERS = ("inputs", "results")


def content_key(job_id: str) -> str:
    """Storage key of a job's (normalised PNG) content image."""
    return f"inputs/{job_id}/content.png"


def style_key(job_id: str) -> str:
    """Storage key of a job's (normalised PNG) style image: the first one uploaded with it."""
    return upload_key(job_id, 0, first=True)


def result_key(job_id: str, extension: str = "png", index: int = 0, run: int = 0) -> str:
    """Storage key of a job's result (``extension``: that of its output format; ``index``: the
    style's place in a multi-style job; ``run``: the run that made it, see :attr:`Job.run`).

    Named per run, so a stale run (fenced after a freeze) can never overwrite the owner's file.
    """
    stem = f"results/{job_id}" if run == 0 else f"results/{job_id}/run-{run}"
    return f"{stem}.{extension}" if index == 0 else f"{stem}-{index}.{extension}"


def extra_style_key(job_id: str, index: int) -> str:
    """Storage key of the (normalised PNG) style image number ``index`` >= 1 uploaded with a job."""
    return upload_key(job_id, index, first=False)


def events_channel(job_id: str) -> str:
    """The Redis pub/sub channel on which every change of the job is announced (its new version)."""
    return f"{KEY_PREFIX}:events:{job_id}"
