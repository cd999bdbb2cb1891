"""The engine's shared feature store on the job storage: ``features/`` under ``HAM_STORAGE_URL``.

Workers hand :class:`StorageFeatureStore` to ``HamEngine.load(feature_store=...)``: it
implements the engine's ``FeatureStore`` protocol (``get``/``put`` of bytes) on any
:class:`~ham_core.storage.Storage`, file or S3, so every worker of a fleet sees what
any of them computed. The engine checks each blob it reads (format version, weights
fingerprint, request, checksum), so the store holds opaque bytes.

The engine lays out its keys as ``{kind}/{image digest}/{hash}.safetensors``
(:func:`ham_engine.feature_store.style_prefix`); deleting a style removes its folder.
:func:`sweep_features` keeps the folder within ``HAM_FEATURE_TTL`` and the byte budget
``HAM_FEATURE_STORE_BYTES``. This module is torch-free: the API imports it to delete a
style's features.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from ham_core.storage import Storage
from ham_engine.feature_store import style_prefix

log = logging.getLogger("ham.features")

FEATURES_FOLDER = "features"


class StorageFeatureStore:
    """``FeatureStore`` (engine protocol) over job storage; counts what it reads and writes."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.bytes_written = 0
        self.bytes_read = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"StorageFeatureStore({type(self.storage).__name__}, {FEATURES_FOLDER}/)"

    def get(self, key: str) -> bytes | None:
        """The blob, or None when there is none (a storage outage raises; the engine then computes)."""
        try:
            data = self.storage.get(f"{FEATURES_FOLDER}/{key}")
        except KeyError:
            return None
        with self._lock:
            self.bytes_read += len(data)
        return data

    def put(self, key: str, data: bytes) -> None:
        """Store a blob (the engine logs and carries on when this raises)."""
        self.storage.put(f"{FEATURES_FOLDER}/{key}", data, "application/octet-stream")
        with self._lock:
            self.bytes_written += len(data)


@dataclass(frozen=True)
class SweepResult:
    """What one pass of :func:`sweep_features` did, and what is left."""

    expired: int
    evicted: int
    bytes_kept: int
    objects_kept: int


def sweep_features(storage: Storage, ttl: int, max_bytes: int, now: float) -> SweepResult:
    """Delete blobs older than ``ttl`` seconds, then the oldest ones until ``max_bytes`` are left."""
    objects = storage.list_objects(FEATURES_FOLDER)
    expired = [o for o in objects if now - o.modified > ttl]
    alive = sorted((o for o in objects if now - o.modified <= ttl), key=lambda o: o.modified)
    total = sum(o.size for o in alive)
    evicted = []
    while alive and total > max_bytes:
        oldest = alive.pop(0)
        evicted.append(oldest)
        total -= oldest.size
    for obj in expired + evicted:
        storage.delete(obj.key)
    return SweepResult(len(expired), len(evicted), total, len(alive))


def delete_style_features(storage: Storage, image_digest: str) -> int:
    """Delete every stored feature blob of the style image with ``image_digest``; returns how many."""
    folder = f"{FEATURES_FOLDER}/{style_prefix(image_digest)}".rstrip("/")
    objects = storage.list_objects(folder)
    for obj in objects:
        storage.delete(obj.key)
    return len(objects)
