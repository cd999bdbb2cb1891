"""Where serialised features outlive a process: the ``FeatureStore`` protocol and a directory store.

The engine's in-process LRU is tier 1 (:mod:`ham_engine.feature_cache`); a feature store is
tier 2, shared by every engine pointed at it — processes on one machine through a
directory, a fleet through object storage (the worker adapts its job storage to this
protocol; the engine never imports a storage client). A store holds opaque blobs
(:mod:`ham_engine.features` checks them on reading), so a store is never trusted: a
missing, stale or damaged blob is a miss.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

from ham_engine.files import write_bytes_atomically

_KEY = re.compile(r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*")


@runtime_checkable
class FeatureStore(Protocol):
    """Bytes by key. Keys are relative, slash-separated, lower-case ``[a-z0-9._-]`` names."""

    def get(self, key: str) -> bytes | None:
        """The blob stored under ``key``, or None."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key``, replacing what was there."""
        ...


def style_prefix(image_digest: str) -> str:
    """The folder every feature blob of one style image lives in (``style/{digest}/``)."""
    return check_key(f"style/{image_digest}") + "/"


def content_prefix(image_digest: str) -> str:
    """The folder every trajectory blob of one content image lives in (``content/{digest}/``)."""
    return check_key(f"content/{image_digest}") + "/"


def check_key(key: str) -> str:
    """``key`` if it is a well-formed store key (no absolute paths, no ``..``), else ValueError."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or ".." in key.split("/"):
        raise ValueError(f"feature store key {key!r} is not a relative [a-z0-9._-] path")
    return key


class DirectoryFeatureStore:
    """A :class:`FeatureStore` in a directory: one file per key, written atomically.

    Safe for several processes: a writer renames a complete temporary file into place,
    so a reader sees the old blob or the new one, never half of one.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"DirectoryFeatureStore({str(self.root)!r})"

    def get(self, key: str) -> bytes | None:
        try:
            return (self.root / check_key(key)).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        path = self.root / check_key(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomically(path, data)


def open_feature_store(store: str | os.PathLike[str] | FeatureStore | None) -> FeatureStore | None:
    """A directory path becomes a :class:`DirectoryFeatureStore`; a store object is used as is."""
    if store is None:
        return None
    if isinstance(store, (str, os.PathLike)):
        return DirectoryFeatureStore(store)
    if isinstance(store, FeatureStore):
        return store
    raise ValueError(f"feature_store: expected a directory path or an object with get/put, got {type(store).__name__}")
