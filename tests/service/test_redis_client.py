"""The one Redis connection policy: bounded retries with backoff, timeouts, health checks."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from redis.backoff import EqualJitterBackoff

from ham_core.config import Settings
from ham_core.redis_client import REDIS_UNAVAILABLE, connect_redis
from tests.fixtures.servers import RedisServer

REPO = Path(__file__).resolve().parents[2]


def test_clients_carry_the_configured_retry_timeouts_and_health_check() -> None:
    settings = Settings(redis_retries=4, redis_socket_timeout=3.5, redis_connect_timeout=1.5,
                        redis_health_check_interval=7)
    kwargs = connect_redis(settings).connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (3.5, 1.5)
    assert kwargs["health_check_interval"] == 7
    retry = kwargs["retry"]
    assert retry.get_retries() == 4 and isinstance(retry._backoff, EqualJitterBackoff)
    assert set(REDIS_UNAVAILABLE) <= set(retry._supported_errors)
    blocking = connect_redis(settings, socket_timeout=70, retries=1).connection_pool.connection_kwargs
    assert (blocking["socket_timeout"], blocking["retry"].get_retries()) == (70, 1)


def test_a_command_rides_through_a_redis_restart(restartable_redis: RedisServer) -> None:
    client = connect_redis(Settings(redis_url=restartable_redis.url, redis_retries=10, redis_retry_cap=1.0))
    client.set("k", "v")
    restartable_redis.stop()
    threading.Timer(0.3, restartable_redis.start).start()
    assert client.get("k") == b"v"  # issued while Redis is down; answered once it is back


def test_an_outage_longer_than_the_budget_raises_after_the_budget(restartable_redis: RedisServer) -> None:
    settings = Settings(redis_url=restartable_redis.url, redis_retries=3, redis_retry_base=0.1, redis_retry_cap=0.2)
    client = connect_redis(settings)
    client.ping()
    restartable_redis.stop()
    began = time.monotonic()
    with pytest.raises(REDIS_UNAVAILABLE):
        client.get("k")
    # Three pauses of at least half of min(cap, base * 2**n): 0.1 + 0.1 + 0.1 s.
    assert time.monotonic() - began >= 0.3


def test_no_redis_client_is_built_outside_the_one_place() -> None:
    built_here = REPO / "ham_core" / "redis_client.py"
    pattern = re.compile(r"\bRedis\(|\.from_url\(|StrictRedis\b")
    offenders = [
        str(path.relative_to(REPO))
        for folder in ("ham_core", "service", "worker", "ham_cli")
        for path in (REPO / folder).rglob("*.py")
        if path != built_here and pattern.search(path.read_text())
    ]
    assert offenders == []
