"""A Redis that answers but refuses is an outage, not a bug: the API against a real redis-server
made full (maxmemory below use, noeviction), read-only (a replica of a primary that is gone),
busy (a script past its time limit) and short of replicas (min-replicas-to-write)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from ham_core.config import Settings
from ham_core.redis_client import (
    REDIS_UNAVAILABLE,
    RedisBusyError,
    RedisNoReplicasError,
    connect_redis,
    probe_writable,
    refusal,
)
from service.api.app import create_app
from tests.fixtures.servers import RedisServer, free_port
from tests.service.test_api import make_settings

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = "refusal-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture
def admin(restartable_redis: RedisServer) -> Iterator[redis.Redis]:
    """A plain client for changing the server's configuration behind the service's back."""
    client = redis.Redis.from_url(restartable_redis.url)
    yield client
    client.config_set("maxmemory", 0)
    client.close()


@pytest.fixture
def client(tmp_path: Path, restartable_redis: RedisServer) -> Iterator[TestClient]:
    # One retry per command: the 503s come after a short wait, not the full default budget.
    settings = make_settings(tmp_path, restartable_redis.url, api_keys=f"t:{KEY}", redis_retries=1,
                             redis_retry_base=0.05, redis_retry_cap=0.1)  # fmt: skip
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def _submit(client: TestClient):
    files = {
        "content": ("content.png", (DATA / "content0.png").read_bytes(), "image/png"),
        "style": ("style.png", (DATA / "style0.png").read_bytes(), "image/png"),
    }
    return client.post("/v1/transfers", headers=AUTH, files=files, data={"steps": "1", "size": "64"})


def _fill(admin: redis.Redis) -> None:
    """maxmemory below what Redis already uses, nothing evictable: every write is refused with OOM."""
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1024 * 1024)  # ~1 MiB: below an empty Redis's own use
    assert int(admin.info("memory")["used_memory"]) > 1024 * 1024


def test_a_full_redis_answers_503_redis_full_with_retry_after_while_reads_keep_answering(
    client: TestClient, admin: redis.Redis
) -> None:
    job_id = _submit(client).json()["id"]
    _fill(admin)

    refused = _submit(client)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "redis_full" and refused.headers["Retry-After"] == "30"
    cancel = client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH)
    assert (cancel.status_code, cancel.json()["error"]["code"]) == (503, "redis_full")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"] == {"redis": "full", "storage": "ok"}
    # Reads need no write: they keep answering (the rate-limit counter fails open, and says so).
    got = client.get(f"/v1/transfers/{job_id}", headers=AUTH)
    assert got.status_code == 200 and got.json()["status"] == "queued"
    listed = client.get("/v1/transfers", headers=AUTH)
    assert listed.status_code == 200 and [j["id"] for j in listed.json()["items"]] == [job_id]
    metrics = client.get("/metrics").text
    assert 'ham_ratelimit_fail_open_total{reason="full"}' in metrics
    assert 'ham_redis_unavailable_total{reason="full"} 2.0' in metrics
    assert "ham_redis_memory_max_bytes 1.048576e+06" in metrics

    admin.config_set("maxmemory", 0)  # memory freed
    assert client.get("/readyz").status_code == 200
    assert _submit(client).status_code == 202


def test_a_read_only_redis_after_a_failover_answers_503_redis_readonly(
    client: TestClient, admin: redis.Redis
) -> None:
    job_id = _submit(client).json()["id"]
    admin.replicaof("127.0.0.1", free_port())  # now a replica of a primary that is not there
    try:
        refused = _submit(client)
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "redis_readonly")
        assert refused.headers["Retry-After"] == "5"
        assert client.get("/readyz").json()["checks"]["redis"] == "readonly"
        assert client.get(f"/v1/transfers/{job_id}", headers=AUTH).status_code == 200
    finally:
        admin.replicaof("NO", "ONE")
    assert _submit(client).status_code == 202


def test_busy_and_no_replicas_refusals_are_named_and_count_as_unavailable(restartable_redis: RedisServer) -> None:
    settings = Settings(redis_url=restartable_redis.url)
    fast = connect_redis(settings, retries=0)
    admin = redis.Redis.from_url(restartable_redis.url)
    admin.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(RedisNoReplicasError) as err:
            probe_writable(fast)
        assert isinstance(err.value, REDIS_UNAVAILABLE) and refusal(err.value) == "no_replicas"
    finally:
        admin.config_set("min-replicas-to-write", 0)
    # A script past busy-reply-threshold: every other client meets BUSY until it is killed.
    admin.config_set("busy-reply-threshold", 50)
    looping = redis.Redis.from_url(restartable_redis.url)
    spinner = threading.Thread(target=_spin, args=(looping,), daemon=True)
    spinner.start()
    try:
        while True:
            try:
                fast.get("k")
            except RedisBusyError as exc:
                assert refusal(exc) == "busy" and isinstance(exc, REDIS_UNAVAILABLE)
                break
    finally:
        admin_kill = redis.Redis.from_url(restartable_redis.url)
        _until_killed(admin_kill)
        spinner.join(timeout=10)
    assert fast.get("k") is None


def _spin(client: redis.Redis) -> None:
    with contextlib.suppress(redis.ResponseError):  # killed
        client.eval("while true do end", 0)


def _until_killed(client: redis.Redis) -> None:
    while True:
        try:
            client.script_kill()
            return
        except redis.ResponseError as exc:  # NOTBUSY: the script has not started yet
            if "NOTBUSY" not in str(exc):
                raise
