"""The engine's feature store on job storage (file and a real S3 server): blobs, listing, TTL, budget."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from ham_core.config import Settings
from ham_core.feature_store import StorageFeatureStore, delete_style_features, sweep_features
from ham_core.storage import FileStorage, Storage, open_storage
from ham_engine.feature_store import FeatureStore, style_prefix
from tests.fixtures.waiting import wait_until

DIGEST = "ab" * 32
OTHER = "cd" * 32


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Storage:
    if request.param == "file":
        return FileStorage(tmp_path / "store", "http://api.example:8000/", b"k" * 32)
    s3_server = request.getfixturevalue("s3_server")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    storage = open_storage(Settings(storage_url=s3_server.storage_url(f"ham-{uuid.uuid4().hex[:12]}")))
    storage.ping()  # creates the bucket, as a worker's start-up check does
    return storage


def test_the_adapter_is_an_engine_feature_store_under_features(storage: Storage) -> None:
    store = StorageFeatureStore(storage)
    assert isinstance(store, FeatureStore)
    key = f"{style_prefix(DIGEST)}1.safetensors"
    assert store.get(key) is None
    store.put(key, b"blob")
    assert store.get(key) == b"blob"
    assert storage.get(f"features/{key}") == b"blob"
    assert (store.bytes_written, store.bytes_read) == (4, 4)


def test_listing_sees_only_its_folder(storage: Storage) -> None:
    storage.put("features/style/x/1.safetensors", b"12345")
    storage.put("results/job.png", b"png")
    listed = storage.list_objects("features")
    assert [(o.key, o.size) for o in listed] == [("features/style/x/1.safetensors", 5)]
    assert abs(listed[0].modified - time.time()) < 120
    assert storage.list_objects("styles") == []


def test_deleting_a_style_removes_its_features_and_nothing_else(storage: Storage) -> None:
    store = StorageFeatureStore(storage)
    store.put(f"{style_prefix(DIGEST)}1.safetensors", b"a")
    store.put(f"{style_prefix(DIGEST)}2.safetensors", b"b")
    store.put(f"{style_prefix(OTHER)}1.safetensors", b"c")
    assert delete_style_features(storage, DIGEST) == 2
    assert store.get(f"{style_prefix(DIGEST)}1.safetensors") is None
    assert store.get(f"{style_prefix(OTHER)}1.safetensors") == b"c"


def test_the_job_sweep_leaves_features_and_styles_alone(storage: Storage) -> None:
    storage.put("features/style/x/1.safetensors", b"f")
    storage.put("styles/s1.png", b"s")
    storage.put("results/j.png", b"r")
    # S3's LastModified has a one-second resolution: sweep until the result, written last, is
    # old enough to go (so are the others), rather than sleeping a fixed second.
    wait_until(lambda: storage.delete_expired(0, prefixes=("inputs", "results")) == 1, 10, "the result to expire",
               interval=0.1)
    assert storage.delete_expired(0, prefixes=("inputs", "results")) == 0
    assert storage.get("features/style/x/1.safetensors") == b"f" and storage.get("styles/s1.png") == b"s"


def test_feature_sweep_keeps_the_ttl_and_the_byte_budget(storage: Storage) -> None:
    previous = float("-inf")
    for i in range(4):
        key = f"features/style/x/{i}.safetensors"
        storage.put(key, b"x" * 100)
        if isinstance(storage, FileStorage):  # distinct ages, oldest first
            stamp = time.time() - 1000 + i
            os.utime(storage.path_for(key), (stamp, stamp))
        else:  # S3 stamps whole seconds: write again until the stamp is newer than the last one's

            def newer(key: str = key, previous: float = previous) -> float | None:
                storage.put(key, b"x" * 100)
                modified = next(o.modified for o in storage.list_objects("features") if o.key == key)
                return modified if modified > previous else None

            previous = wait_until(newer, 10, f"{key} stamped after the last one", interval=0.1)
    now = time.time()
    kept = sweep_features(storage, ttl=10_000, max_bytes=250, now=now)
    assert (kept.expired, kept.evicted, kept.bytes_kept, kept.objects_kept) == (0, 2, 200, 2)
    remaining = sorted(o.key for o in storage.list_objects("features"))
    assert remaining == ["features/style/x/2.safetensors", "features/style/x/3.safetensors"]
    gone = sweep_features(storage, ttl=1, max_bytes=10**9, now=now + 5000)
    assert (gone.expired, gone.objects_kept) == (2, 0)
