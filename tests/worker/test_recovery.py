"""Dead-worker recovery, orphan re-enqueue and the expiry sweep, against a real Redis and file storage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import redis

from ham_core.config import Settings
from ham_core.jobs import ERROR_WORKER_LOST, Job, JobStatus, JobStore, content_key, new_job_id, style_key
from ham_core.storage import FileStorage
from ham_core.style_refs import StyleRef
from tests.fixtures.waiting import wait_until
from worker.recovery import (
    HEARTBEAT_MISSES,
    Maintenance,
    beat_value,
    heartbeat_key,
    recover_lost_jobs,
    requeue_orphans,
)


class Hooks:
    """Collects what would be POSTed (the dispatcher's own delivery is tested with it)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.events: list[str] = []

    def submit(self, url: str, payload: dict, event: str = "completed") -> None:
        self.sent.append((url, payload))
        self.events.append(event)


@pytest.fixture
def settings() -> Settings:
    return Settings(queue_name="ham-recovery", result_ttl=600, job_max_retries=1, worker_heartbeat=1)


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(redis_client, settings)


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "files", "http://127.0.0.1:1", b"k" * 32)


def running_job(store: JobStore, storage: FileStorage, worker: str, webhook_url: str | None = None) -> Job:
    job_id = new_job_id()
    job = Job(id=job_id, tenant="t", params={"steps": 2, "size": 64}, styles=[StyleRef(style_key(job_id))],
              webhook_url=webhook_url)
    storage.put(content_key(job.id), b"png")
    storage.put(style_key(job.id), b"png")
    store.submit(job)
    return store.start(job.id, worker)


def test_job_of_a_worker_without_heartbeat_is_requeued_then_failed_worker_lost(store, storage, redis_client):
    hooks = Hooks()
    job = running_job(store, storage, "dead-1", webhook_url="https://example.com/h")
    assert recover_lost_jobs(store, storage, hooks) == {job.id: "queued"}
    assert store.queue_position(job.id) == 0
    assert storage.get(content_key(job.id)) == b"png"  # a re-run needs its inputs
    store.start(job.id, "dead-2")
    assert recover_lost_jobs(store, storage, hooks) == {job.id: "failed"}
    failed = store.get(job.id)
    assert failed.error_code == ERROR_WORKER_LOST and failed.attempts == 2
    with pytest.raises(KeyError):
        storage.get(content_key(job.id))  # terminal: inputs deleted
    assert [(url, p["status"], p["error"]["code"]) for url, p in hooks.sent] == [
        ("https://example.com/h", "failed", "worker_lost")
    ]


def test_job_of_a_live_worker_is_left_running(store, storage, redis_client):
    job = running_job(store, storage, "alive")
    redis_client.set(heartbeat_key("alive"), beat_value(job.id), ex=10)
    assert recover_lost_jobs(store, storage) == {}
    assert store.get(job.id).status is JobStatus.RUNNING


def test_beat_from_before_the_start_cannot_deny_the_job(store, storage, redis_client):
    job = running_job(store, storage, "busy")
    redis_client.set(heartbeat_key("busy"), beat_value(None, now=job.started_at - 0.5), ex=10)
    assert recover_lost_jobs(store, storage) == {}


def test_job_a_live_worker_no_longer_runs_is_recovered(store, storage, redis_client):
    # E.g. Redis was unreachable when the worker tried to record the outcome; it moved on.
    job = running_job(store, storage, "forgetful")
    redis_client.set(heartbeat_key("forgetful"), beat_value(None, now=job.started_at + 1), ex=10)
    assert recover_lost_jobs(store, storage) == {job.id: "queued"}


def test_maintenance_beats_with_a_ttl_of_a_few_heartbeats_and_removes_the_beat_on_stop(store, storage, settings):
    maintenance = Maintenance(store, storage, settings, "w-beat")
    maintenance.start()
    try:
        ttl = store.redis.ttl(heartbeat_key("w-beat"))
        assert 0 < ttl <= HEARTBEAT_MISSES * settings.worker_heartbeat
    finally:
        maintenance.stop()
    assert not store.redis.exists(heartbeat_key("w-beat"))


def test_maintenance_thread_recovers_a_job_while_the_worker_is_busy_elsewhere(store, storage, settings):
    job = running_job(store, storage, "gone")
    maintenance = Maintenance(store, storage, settings, "w-bg")
    maintenance._thread.start()  # background loop only: no start-up pass
    try:
        wait_until(lambda: store.get(job.id).status is JobStatus.QUEUED, 5, "the job to be re-queued")
    finally:
        maintenance.stop()


def test_queued_job_missing_from_the_rq_list_is_reenqueued_after_the_grace(store, redis_client):
    job = Job(id=new_job_id(), tenant="t", params={})
    store.submit(job)
    redis_client.lrem(store.queue.key, 0, job.id)  # a worker popped it and died before starting it
    now = time.time()
    assert requeue_orphans(store, grace=3, now=now) == []
    assert requeue_orphans(store, grace=3, now=now + 1) == []
    assert requeue_orphans(store, grace=3, now=now + 4) == [job.id]
    assert store.queue_position(job.id) == 0
    assert requeue_orphans(store, grace=3, now=now + 10) == []  # in the list again: nothing to do


def test_expiry_sweep_deletes_old_stored_files_once_per_interval(store, storage, settings, tmp_path):
    storage.put("results/old.png", b"x")
    storage.put("results/new.png", b"y")
    old = storage.path_for("results/old.png")
    stale = time.time() - settings.result_ttl - 10
    os.utime(old, (stale, stale))
    Maintenance(store, storage, settings, "w-sweep").run_once()
    assert not old.exists()
    assert storage.get("results/new.png") == b"y"
