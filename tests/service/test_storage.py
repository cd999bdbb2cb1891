"""Object storage: the file backend (signed URLs) and the S3 backend against a real SeaweedFS."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from ham_core.config import Settings
from ham_core.storage import FileStorage, S3Storage, StorageError, check_key, open_storage
from tests.fixtures.waiting import wait_until

KEY = "results/job123.png"


def _url_parts(url: str) -> tuple[str, str, str]:
    """(key, expires, sig) from a file-backend download URL."""
    parts = urlsplit(url)
    assert parts.path.startswith("/v1/files/")
    query = parse_qs(parts.query)
    return parts.path.removeprefix("/v1/files/"), query["expires"][0], query["sig"][0]


@pytest.fixture
def files(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "store", "http://api.example:8000/", b"k" * 32)


# --- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["inputs/abc-123/content.png", "results/0f1e.png", "a", "x_y.z/w"])
def test_check_key_accepts_the_service_layout(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "../etc/passwd", "inputs/../../x", "/abs/path", "a//b", "a/./b", "a\\b", "a/b/", "sp ace", "nul\0"]
)
def test_check_key_refuses_traversal_and_odd_characters(key: str) -> None:
    with pytest.raises(ValueError, match="storage key"):
        check_key(key)


# --- file backend --------------------------------------------------------------------------------


def test_file_put_get_delete_round_trip(files: FileStorage) -> None:
    files.put(KEY, b"\x89PNG data", "image/png")
    assert files.get(KEY) == b"\x89PNG data"
    assert files.path_for(KEY) == files.root / "results" / "job123.png"
    files.put(KEY, b"replaced")
    assert files.get(KEY) == b"replaced"
    files.delete(KEY)
    with pytest.raises(KeyError):
        files.get(KEY)


def test_file_delete_of_missing_key_is_fine_and_prunes_empty_dirs(files: FileStorage) -> None:
    files.delete("inputs/nope/content.png")
    files.put("inputs/j1/content.png", b"c")
    files.put("inputs/j1/style.png", b"s")
    files.delete("inputs/j1/content.png")
    assert (files.root / "inputs" / "j1").is_dir()
    files.delete("inputs/j1/style.png")
    assert not (files.root / "inputs").exists()
    assert files.root.is_dir()


def test_file_put_leaves_no_temp_files(files: FileStorage) -> None:
    files.put(KEY, b"x" * 1000)
    assert [p.name for p in files.path_for(KEY).parent.iterdir()] == ["job123.png"]


def test_file_path_for_refuses_traversal(files: FileStorage) -> None:
    for key in ("../outside.png", "results/../../outside.png", "/etc/passwd"):
        with pytest.raises(ValueError):
            files.path_for(key)
        with pytest.raises(ValueError):
            files.put(key, b"x")


def test_file_path_for_refuses_symlink_escaping_the_root(files: FileStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (files.root / "results").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the storage root"):
        files.get("results/secret.png")


def test_file_url_is_signed_and_verifies(files: FileStorage) -> None:
    files.clock = lambda: 1_800_000_000.5
    url = files.url(KEY, ttl=60)
    assert url.startswith("http://api.example:8000/v1/files/results/job123.png?expires=")
    key, expires, sig = _url_parts(url)
    assert key == KEY
    assert int(expires) == 1_800_000_060
    assert len(sig) == 64
    assert files.verify(key, expires, sig) is True


def test_file_url_expired_is_refused(files: FileStorage) -> None:
    key, expires, sig = _url_parts(files.url(KEY, ttl=5))
    assert files.verify(key, expires, sig, now=int(expires)) is True
    assert files.verify(key, expires, sig, now=int(expires) + 1) is False


def test_file_url_tampered_signature_key_or_expiry_is_refused(files: FileStorage) -> None:
    key, expires, sig = _url_parts(files.url(KEY, ttl=60))
    flipped = ("0" if sig[0] != "0" else "1") + sig[1:]
    assert files.verify(key, expires, flipped) is False
    assert files.verify("results/other.png", expires, sig) is False
    assert files.verify(key, str(int(expires) + 3600), sig) is False
    assert files.verify(key, "not-a-number", sig) is False
    assert files.verify("../etc/passwd", expires, sig) is False
    other = FileStorage(files.root, files.public_url, b"another-key")
    assert other.verify(key, expires, sig) is False


def test_file_url_rejects_non_positive_ttl(files: FileStorage) -> None:
    with pytest.raises(ValueError, match="ttl"):
        files.url(KEY, ttl=0)


def test_file_delete_expired_removes_only_old_files(files: FileStorage) -> None:
    files.put("inputs/old/content.png", b"old")
    files.put("results/old.png", b"old")
    files.put("results/new.png", b"new")
    an_hour_ago = time.time() - 3600
    for key in ("inputs/old/content.png", "results/old.png"):
        os.utime(files.path_for(key), (an_hour_ago, an_hour_ago))
    assert files.delete_expired(older_than_seconds=600) == 2
    assert files.get("results/new.png") == b"new"
    with pytest.raises(KeyError):
        files.get("results/old.png")
    assert not (files.root / "inputs").exists()


def test_file_ping_fails_when_root_is_gone(files: FileStorage) -> None:
    files.ping()
    files.root.rmdir()
    with pytest.raises(StorageError, match="not a writable directory"):
        files.ping()


def test_file_store_whose_root_is_gone_is_an_outage_not_missing_keys(tmp_path: Path) -> None:
    root = tmp_path / "volume"
    root.write_text("not mounted")  # a file where the store belongs: it cannot even be created
    store = FileStorage(root, "http://127.0.0.1:1", b"k")  # starts anyway; ping and every call say why
    with pytest.raises(StorageError):
        store.ping()
    with pytest.raises(StorageError, match="not a directory"):
        store.get("inputs/x/content.png")
    root.unlink()
    store.put("inputs/x/content.png", b"png")  # the volume is back: the store works without a restart
    assert store.get("inputs/x/content.png") == b"png"
    with pytest.raises(KeyError):
        store.get("inputs/y/content.png")


def test_open_storage_file_url_shares_signing_key_from_settings(tmp_path: Path) -> None:
    settings = Settings(storage_url=f"file://{tmp_path}/s", public_url="http://h:1", url_signing_key="shared")
    first, second = open_storage(settings), open_storage(settings)
    assert isinstance(first, FileStorage)
    assert first.root == (tmp_path / "s").resolve()
    assert second.verify(*_url_parts(first.url(KEY, ttl=60))) is True


def test_open_storage_without_signing_key_is_consistent_within_a_process(tmp_path: Path) -> None:
    settings = Settings(storage_url=f"file://{tmp_path}/s", url_signing_key="")
    first, second = open_storage(settings), open_storage(settings)
    assert second.verify(*_url_parts(first.url(KEY, ttl=60))) is True


@pytest.mark.parametrize(
    "url",
    ["relative/path", "file://host/path", "ftp://x/y", "s3://", "s3://bucket?bogus=1", "s3://b?create_bucket=maybe"],
)
def test_open_storage_rejects_unusable_urls(url: str) -> None:
    with pytest.raises(ValueError, match="HAM_STORAGE_URL"):
        open_storage(Settings(storage_url=url))


# --- S3 backend (real SeaweedFS) -------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3(s3_env) -> S3Storage:
    storage = open_storage(Settings(storage_url=s3_env.storage_url(f"ham-{uuid.uuid4().hex[:12]}")))
    assert isinstance(storage, S3Storage)
    return storage


def test_s3_put_get_delete_round_trip(s3: S3Storage, s3_server) -> None:
    s3.put(KEY, b"\x89PNG bytes", "image/png")
    assert s3.get(KEY) == b"\x89PNG bytes"
    head = s3_server.client().head_object(Bucket=s3.bucket, Key=KEY)
    assert head["ContentType"] == "image/png"
    s3.delete(KEY)
    with pytest.raises(KeyError):
        s3.get(KEY)
    s3.delete(KEY)  # missing is fine


def test_s3_bucket_is_created_on_first_use(s3: S3Storage, s3_server) -> None:
    names = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert s3.bucket not in names
    s3.ping()
    names = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert s3.bucket in names


def test_s3_missing_bucket_without_autocreate_fails_ping(s3_env) -> None:
    url = s3_env.storage_url("ham-absent-bucket") + "&create_bucket=false"
    storage = open_storage(Settings(storage_url=url))
    with pytest.raises(StorageError, match="ham-absent-bucket"):
        storage.ping()
    with pytest.raises(StorageError):  # a missing bucket is misconfiguration, not a missing object
        storage.get(KEY)


def test_s3_prefix_namespaces_objects(s3_env) -> None:
    bucket = f"ham-{uuid.uuid4().hex[:12]}"
    url = s3_env.storage_url(bucket).replace(f"s3://{bucket}", f"s3://{bucket}/staging")
    storage = open_storage(Settings(storage_url=url))
    storage.put(KEY, b"x")
    assert s3_env.client().get_object(Bucket=bucket, Key=f"staging/{KEY}")["Body"].read() == b"x"
    assert storage.get(KEY) == b"x"


def test_s3_presigned_url_downloads_with_plain_http(s3: S3Storage) -> None:
    s3.put(KEY, b"result image bytes", "image/png")
    response = httpx.get(s3.url(KEY, ttl=60))
    assert response.status_code == 200
    assert response.content == b"result image bytes"
    assert response.headers["content-type"] == "image/png"


def test_s3_presigned_url_expired_is_refused(s3: S3Storage) -> None:
    s3.put(KEY, b"x")
    url = s3.url(KEY, ttl=1)
    # The S3 server judges expiry by its own clock: wait for the condition, not a fixed time.
    def refused() -> httpx.Response | None:
        response = httpx.get(url)
        return response if response.status_code != 200 else None

    response = wait_until(refused, 30, "a 1-second presigned URL to stop working", interval=0.1)
    assert response.status_code == 403
    assert b"expired" in response.content.lower()


def test_s3_presigned_url_for_another_key_is_refused(s3: S3Storage) -> None:
    s3.put(KEY, b"mine")
    s3.put("results/other.png", b"theirs")
    tampered = s3.url(KEY, ttl=60).replace("job123.png", "other.png")
    assert httpx.get(tampered).status_code == 403


def test_s3_url_ttl_is_bounded_by_sigv4(s3: S3Storage) -> None:
    with pytest.raises(ValueError, match="at most 604800 seconds"):
        s3.url(KEY, ttl=8 * 24 * 3600)


def test_s3_refuses_traversal_keys(s3: S3Storage) -> None:
    with pytest.raises(ValueError, match="storage key"):
        s3.put("../escape.png", b"x")


def test_s3_delete_expired_sweeps_old_objects(s3: S3Storage) -> None:
    s3.put("inputs/j/content.png", b"a")
    s3.put("results/j.png", b"b")
    assert s3.delete_expired(older_than_seconds=3600) == 0
    # S3 LastModified has one-second resolution: sweep until the objects count as older than 0 s.
    deleted = [0]

    def swept() -> bool:
        deleted[0] += s3.delete_expired(older_than_seconds=0)
        return deleted[0] >= 2

    wait_until(swept, 30, "both objects to be swept", detail=lambda: f"{deleted[0]} of 2 swept")
    assert deleted[0] == 2
    with pytest.raises(KeyError):
        s3.get("results/j.png")


def test_s3_unreachable_endpoint_raises_storage_error(s3_env) -> None:
    from tests.fixtures.servers import free_port

    url = f"s3://bucket?endpoint=http://127.0.0.1:{free_port()}&region=us-east-1"
    storage = open_storage(Settings(storage_url=url))
    with pytest.raises(StorageError):
        storage.ping()
    with pytest.raises(StorageError):
        storage.get(KEY)


def test_s3_public_endpoint_signs_urls_for_the_clients_address(s3_env) -> None:
    # The service reaches S3 as 127.0.0.1, clients as localhost (compose: s3:8333 vs localhost:8333).
    bucket = f"ham-{uuid.uuid4().hex[:12]}"
    internal = s3_env.storage_url(bucket)
    endpoint = parse_qs(urlsplit(internal).query)["endpoint"][0]
    public = endpoint.replace("127.0.0.1", "localhost")
    storage = open_storage(Settings(storage_url=f"{internal}&public_endpoint={public}"))
    storage.put(KEY, b"for the browser", "image/png")
    url = storage.url(KEY, ttl=60)
    assert url.startswith(public + "/")
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == b"for the browser"
