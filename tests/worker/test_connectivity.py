"""The worker's view of its dependencies: one log line per change, readiness, bounded retries."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import redis

from ham_core.config import Settings
from ham_core.jobs import Job, JobStatus, JobStore, new_job_id
from ham_core.redis_client import connect_redis
from ham_core.storage import FileStorage
from tests.fixtures.servers import RedisServer
from tests.fixtures.waiting import wait_until
from worker.connectivity import Link, OutageTooLong, backoff, outlast
from worker.recovery import Maintenance


class Flaky:
    """A dependency that fails ``failures`` times, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError(f"down (call {self.calls})")
        return "ok"


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for failures, ceiling in ((1, 0.25), (2, 0.5), (3, 1.0), (8, 2.0)):
        pauses = [backoff(failures, cap=2.0) for _ in range(200)]
        assert all(ceiling / 2 <= p <= ceiling for p in pauses)
        assert len(set(pauses)) > 1  # jittered


def test_a_link_logs_and_reports_each_change_of_state_once(caplog: pytest.LogCaptureFixture) -> None:
    changes: list[bool] = []
    link = Link("Thing", probe=lambda: None, errors=(ConnectionError,), reconnect_max=0.01, on_change=changes.append)
    with caplog.at_level(logging.WARNING, logger="ham.worker"):
        for _ in range(3):
            link.failed(ConnectionError("refused"))
        for _ in range(3):
            link.recovered()
    assert changes == [False, True] and link.outages == 1
    lost, back = (record.getMessage() for record in caplog.records)  # exactly two lines
    assert lost.startswith("Thing unreachable (ConnectionError: refused)")
    assert back.startswith("Thing reachable again after ")


def test_outlast_retries_until_the_dependency_answers() -> None:
    action = Flaky(failures=3)
    link = Link("Thing", probe=action, errors=(ConnectionError,), reconnect_max=0.01)
    assert outlast("doing it", action, link, deadline=time.monotonic() + 10) == "ok"
    assert action.calls == 4 and link.up


def test_outlast_gives_up_at_the_deadline_and_lets_other_errors_through() -> None:
    link = Link("Thing", probe=lambda: None, errors=(ConnectionError,), reconnect_max=0.05)
    began = time.monotonic()
    with pytest.raises(OutageTooLong, match="doing it: gave up"):
        outlast("doing it", Flaky(failures=10**6), link, deadline=began + 0.3)
    assert 0.25 <= time.monotonic() - began < 2 and not link.up

    def bad() -> None:
        raise ValueError("the job's own fault")

    with pytest.raises(ValueError):
        outlast("doing it", bad, link, deadline=time.monotonic() + 10)


def test_wait_until_up_stops_when_asked() -> None:
    link = Link("Thing", probe=Flaky(failures=10**6), errors=(ConnectionError,), reconnect_max=0.01)
    stop_at = time.monotonic() + 0.2
    assert link.wait_until_up(should_stop=lambda: time.monotonic() > stop_at) is False


def test_after_an_outage_no_job_is_declared_lost_until_the_live_workers_could_beat_again(
    restartable_redis: RedisServer, tmp_path: Path
) -> None:
    settings = Settings(redis_url=restartable_redis.url, queue_name="ham-grace", worker_heartbeat=1,
                        redis_retries=1, redis_retry_cap=0.05)
    store = JobStore(connect_redis(settings), settings)
    storage = FileStorage(tmp_path / "files", "http://127.0.0.1:1", b"k")
    link = Link("Redis", store.redis.ping, (redis.ConnectionError, redis.TimeoutError), 0.1)
    maintenance = Maintenance(store, storage, settings, "w-grace", redis_link=link)
    maintenance.start()
    try:
        restartable_redis.stop()
        # The maintenance thread notices the outage, then the return.
        wait_until(lambda: not link.up, 10, "the link to notice the outage", interval=0.02)
        restartable_redis.start()
        wait_until(lambda: link.up, 10, "the link to notice Redis is back", interval=0.02)
        assert maintenance._recover_after > time.monotonic()  # in the grace window now
        # A job whose worker's heartbeat key did not survive the outage (its TTL ran out meanwhile).
        job = Job(id=new_job_id(), tenant="t", params={})
        store.submit(job)
        store.start(job.id, "w-alive-but-silent")
        maintenance.run_once()
        assert store.get(job.id).status is JobStatus.RUNNING  # not declared lost within the grace
        maintenance._recover_after = 0.0  # the grace is over and its worker never beat again
        maintenance.run_once()
        assert store.get(job.id).status is JobStatus.QUEUED
    finally:
        maintenance.stop()
