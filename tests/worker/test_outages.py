"""A real ``ham worker`` process riding through Redis restarts and outages.

Each test has its own persistent ``redis-server`` (``restartable_redis``) that it stops and
starts on the same port, and a worker subprocess on the tiny model. Jobs are submitted
through the job store, as the API does; storage is a folder. Retry budgets are shortened
through the settings so every test is bounded to a few tens of seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from ham_core.config import Settings
from ham_core.jobs import Job, JobStatus, JobStore, content_key, new_job_id, style_key
from ham_core.storage import FileStorage
from ham_core.style_refs import StyleRef
from tests.fixtures.servers import RedisServer, free_port, log_tail, terminate
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
START_TIMEOUT = 120.0
JOB_TIMEOUT = 120.0

pytestmark = pytest.mark.slow


@dataclass
class Worker:
    proc: subprocess.Popen
    log: Path
    ready_file: Path
    metrics_port: int

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self) -> bool:
        """What the worker's ``/readyz`` answers."""
        try:
            return httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(what: str, condition: Callable[[], bool], worker: Worker, timeout: float = JOB_TIMEOUT) -> None:
    def alive() -> None:
        exited = f"the worker exited ({worker.proc.returncode}) while waiting for {what}"
        assert worker.alive, f"{exited}:\n{log_tail(worker.log)}"

    wait_until(condition, timeout, what, check=alive, detail=lambda: log_tail(worker.log))


def hold_down(redis_server: RedisServer, worker: Worker, seconds: float) -> None:
    """Keep Redis stopped for ``seconds`` while checking that the worker stays up and turns unready."""
    redis_server.stop()
    wait_for("/readyz to turn 503", lambda: not worker.ready(), worker, timeout=30)
    until = time.monotonic() + seconds
    while time.monotonic() < until:  # the outage itself lasts this long; the worker must live through it
        assert worker.alive, f"the worker exited during the outage:\n{log_tail(worker.log)}"
        time.sleep(0.1)
    redis_server.start()


@pytest.fixture
def settings(restartable_redis: RedisServer, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=restartable_redis.url,
        storage_url=f"file://{tmp_path / 'storage'}",
        queue_name="ham-outages",
        url_signing_key="k",
        worker_heartbeat=1,
        # A short retry budget per command (well under the outages below) and quick reconnects.
        redis_retries=2,
        redis_retry_base=0.05,
        redis_retry_cap=0.2,
        worker_reconnect_max=0.5,
        worker_outage_deadline=60,
        job_timeout=300,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield JobStore(client, settings)
    client.close()


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    handle = start_worker(settings, tmp_path)
    try:
        wait_for("the worker to be ready", handle.ready_file.exists, handle, timeout=START_TIMEOUT)
        yield handle
    finally:
        terminate(handle.proc, timeout=30)


def start_worker(settings: Settings, tmp_path: Path) -> Worker:
    """A ``ham worker`` subprocess on ``settings`` (not waited for)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAM_")}
    fields = settings.model_dump().items()
    env.update({f"HAM_{name.upper()}": str(value) for name, value in fields if value is not None})
    env.update(HAM_MODEL="tiny", HAM_DEVICE="cpu", HAM_WORKER_METRICS_PORT=str(port), HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    log, ready = tmp_path / "worker.log", tmp_path / "worker.ready"
    cmd = [sys.executable, "-m", "ham_cli", "worker", "--name", "outage-worker", "--ready-file", str(ready),
           "--metrics-host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Worker(proc, log, ready, port)


def submit(store: JobStore, settings: Settings, steps: int) -> str:
    storage = FileStorage(Path(settings.storage_url.removeprefix("file://")), "http://127.0.0.1:1", b"k")
    job_id = new_job_id()
    job = Job(id=job_id, tenant="t", params={"steps": steps, "size": 64}, styles=[StyleRef(style_key(job_id))])
    storage.put(content_key(job.id), (DATA / "content0.png").read_bytes())
    storage.put(style_key(job.id), (DATA / "style0.png").read_bytes())
    store.submit(job)
    return job.id


def status(store: JobStore, job_id: str) -> JobStatus | None:
    """The job's status; ``None`` while Redis does not answer."""
    try:
        job = store.get(job_id)
    except redis.ConnectionError:
        return None
    return job.status if job else None


def finished(store: JobStore, job_id: str) -> Callable[[], bool]:
    return lambda: status(store, job_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


def test_redis_restart_while_a_job_runs_costs_neither_the_job_nor_the_worker_nor_an_attempt(
    restartable_redis: RedisServer, settings: Settings, store: JobStore, worker: Worker
) -> None:
    job_id = submit(store, settings, steps=150)
    wait_for("the job to make progress", lambda: store.get(job_id).progress > 0.05, worker)
    restartable_redis.restart()
    assert store.get(job_id).status is JobStatus.RUNNING  # the restart happened mid-job
    wait_for("the job to finish", finished(store, job_id), worker)
    done = store.get(job_id)
    assert (done.status, done.attempts, done.error_code) == (JobStatus.SUCCEEDED, 1, None), done
    assert worker.alive
    wait_for("/readyz to be 200", worker.ready, worker, timeout=30)


def test_outages_longer_than_the_retry_budget_mid_job_and_between_jobs_lose_nothing(
    restartable_redis: RedisServer, settings: Settings, store: JobStore, worker: Worker
) -> None:
    # Mid-job: the running job rides through, the queued one waits; both succeed on one attempt.
    running = submit(store, settings, steps=300)
    queued = submit(store, settings, steps=2)
    wait_for("the first job to make progress", lambda: store.get(running).progress > 0.05, worker)
    hold_down(restartable_redis, worker, seconds=4)
    for job_id in (running, queued):
        wait_for(f"job {job_id} to finish", finished(store, job_id), worker)
        done = store.get(job_id)
        assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 1), done
    wait_for("/readyz to be 200 again", worker.ready, worker, timeout=30)

    # Between jobs: the idle worker waits for Redis instead of exiting, then serves new work.
    hold_down(restartable_redis, worker, seconds=3)
    wait_for("/readyz to be 200 after the idle outage", worker.ready, worker, timeout=30)
    after = submit(store, settings, steps=2)
    wait_for("the job submitted after the outage to finish", finished(store, after), worker)
    assert store.get(after).status is JobStatus.SUCCEEDED

    # Logged once per change of state, not once per retry.
    text = worker.log_text()
    assert text.count("Redis unreachable") == 2, text
    assert text.count("Redis reachable again") == 2, text
    assert "quitting" not in text


def fill(client: redis.Redis) -> None:
    """maxmemory below what Redis uses, noeviction: Redis answers, but refuses every write (OOM)."""
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1024 * 1024)


def test_a_full_redis_is_an_outage_a_worker_started_meanwhile_waits_and_no_attempt_is_charged(
    settings: Settings, store: JobStore, tmp_path: Path
) -> None:
    queued = submit(store, settings, steps=2)
    fill(store.redis)
    try:
        handle = start_worker(settings, tmp_path)
        try:
            # It waits for a writable Redis instead of crash-looping on OOM.
            wait_for("the worker to log the refusal", lambda: "OutOfMemoryError" in handle.log_text(), handle, 60)
            until = time.monotonic() + 15
            while time.monotonic() < until:
                assert handle.alive, f"the worker exited while Redis was full:\n{log_tail(handle.log)}"
                time.sleep(0.2)
            assert not handle.ready_file.exists()
            job = store.get(queued)
            assert (job.status, job.attempts) == (JobStatus.QUEUED, 0)
        finally:
            store.redis.config_set("maxmemory", 0)  # memory freed
        wait_for("the queued job to finish", finished(store, queued), handle, timeout=START_TIMEOUT)
        done = store.get(queued)
        assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 1), done
        wait_for("/readyz to be 200", handle.ready, handle, timeout=30)
    finally:
        terminate(handle.proc, timeout=30)


def test_redis_filling_up_mid_job_is_waited_out_without_charging_an_attempt(
    settings: Settings, store: JobStore, worker: Worker
) -> None:
    job_id = submit(store, settings, steps=120)
    wait_for("the job to make progress", lambda: store.get(job_id).progress > 0.05, worker)
    fill(store.redis)
    try:
        wait_for("/readyz to turn 503", lambda: not worker.ready(), worker, timeout=30)
        until = time.monotonic() + 4
        while time.monotonic() < until:
            assert worker.alive, f"the worker exited while Redis was full:\n{log_tail(worker.log)}"
            time.sleep(0.1)
    finally:
        store.redis.config_set("maxmemory", 0)
    wait_for("the job to finish", finished(store, job_id), worker, timeout=2 * JOB_TIMEOUT)
    done = store.get(job_id)
    assert (done.status, done.attempts, done.run) == (JobStatus.SUCCEEDED, 1, 1), done
    wait_for("/readyz to be 200 again", worker.ready, worker, timeout=30)
