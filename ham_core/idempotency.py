"""The fingerprint of a request, so that an ``Idempotency-Key`` replays only the request it was made for.

A retry sends the same request again; a client that reuses a key for another request has a bug,
and answering it with the first job would hand it the wrong picture without a signal. The job
store keeps, next to the job id a key names, the digest of the request that created it
(:meth:`ham_core.jobs.JobStore.submit`): the same digest replays the job, another one is a
``409 idempotency_key_reused``.

The digest is of the request's *canonical fields*, not of its bytes, so that what does not change
the request does not change the digest: a multipart boundary, the order of the fields, a file's
name; an image counts by the SHA-256 of its bytes as sent. The order of the styles does count
(it is the order of the results).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

# Bumped if the canonical form ever changes, so that old and new digests never compare equal by accident.
_VERSION = "v1"


def file_digest(data: bytes) -> str:
    """How a file part enters a fingerprint: the SHA-256 of its bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def form_fingerprint(items: Iterable[tuple[str, str]], ordered: Iterable[str]) -> str:
    """The digest of a form's ``(name, value)`` items (files already as :func:`file_digest`).

    Fields in ``ordered`` (the styles) keep their order among themselves; every other field is
    sorted by name. Empty values count as not given, as the form reader treats them.
    """
    keep_order = frozenset(ordered)
    kept = [(name, value) for name, value in items if value != ""]
    # A stable sort on one shared key for the ordered fields keeps their relative order.
    kept.sort(key=lambda item: "\x00" if item[0] in keep_order else item[0])
    return _digest(["form", kept])


def json_fingerprint(body: dict[str, Any]) -> str:
    """The digest of a JSON body: its members sorted, numbers as JSON writes them."""
    return _digest(["json", body])


def _digest(canonical: Any) -> str:
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return f"{_VERSION}:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def idempotency_record(raw: Any) -> tuple[str | None, str | None]:
    """``(job id, fingerprint)`` of an idempotency record; the fingerprint is None in a record without one."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    if not text:
        return None, None
    job_id, _, fingerprint = text.partition(" ")
    return job_id, fingerprint or None


def fingerprints_differ(stored: str | None, given: str | None) -> bool:
    # Either side without a fingerprint (a record from before them, a caller that has none) replays.
    return stored is not None and given is not None and stored != given
