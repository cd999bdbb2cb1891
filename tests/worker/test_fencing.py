"""A frozen worker comes back and must not finish a job another worker owns (fencing).

Real ``ham worker`` processes on the tiny model and a private ``redis-server``: worker A is
frozen with SIGSTOP mid-job (a long GC pause, CPU throttling, a partition), recovery hands the
job to worker B, A is woken with SIGCONT while B runs. The job must succeed once, from B's run;
A must notice at its next step that it was fenced, write nothing more, and serve the next job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from rq.registry import FailedJobRegistry, StartedJobRegistry

from ham_core.config import Settings
from ham_core.jobs import Job, JobStatus, JobStore, content_key, new_job_id, result_key, style_key
from ham_core.storage import FileStorage
from ham_core.style_refs import StyleRef
from tests.fixtures import waiting
from tests.fixtures.servers import RedisServer, free_port, log_tail, terminate

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
START_TIMEOUT = 120.0
WAIT = 120.0

pytestmark = pytest.mark.slow


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen
    log: Path
    ready_file: Path

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_until(what: str, condition: Callable[[], bool], workers: list[Worker], timeout: float = WAIT) -> None:
    def alive() -> None:
        for worker in workers:
            assert worker.alive, f"{worker.name} exited while waiting for {what}:\n{log_tail(worker.log)}"

    waiting.wait_until(condition, timeout, what, interval=0.02, check=alive,
                       detail=lambda: "\n".join(f"--- {w.name}\n{log_tail(w.log)}" for w in workers))


@pytest.fixture
def settings(restartable_redis: RedisServer, tmp_path: Path) -> Settings:
    return Settings(
        redis_url=restartable_redis.url,
        storage_url=f"file://{tmp_path / 'storage'}",
        queue_name="ham-fencing",
        url_signing_key="k",
        worker_heartbeat=1,
        job_max_retries=2,
        job_timeout=300,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    client = redis.Redis.from_url(settings.redis_url)
    yield JobStore(client, settings)
    client.close()


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[[str], Worker]]:
    started: list[Worker] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAM_")}
    env.update({f"HAM_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None})
    env.update(HAM_MODEL="tiny", HAM_DEVICE="cpu", HAM_WORKER_METRICS_PORT="0", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def start(name: str) -> Worker:
        log, ready = tmp_path / f"{name}.log", tmp_path / f"{name}.ready"
        env["HAM_WORKER_METRICS_PORT"] = str(free_port())
        cmd = [sys.executable, "-m", "ham_cli", "worker", "--name", name, "--ready-file", str(ready),
               "--metrics-host", "127.0.0.1"]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        worker = Worker(name, proc, log, ready)
        started.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in started:
            if worker.alive:
                worker.proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
                terminate(worker.proc, timeout=30)


def submit(store: JobStore, settings: Settings, steps: int, size: int = 64) -> str:
    storage = FileStorage(Path(settings.storage_url.removeprefix("file://")), "http://127.0.0.1:1", b"k")
    job_id = new_job_id()
    job = Job(id=job_id, tenant="t", params={"steps": steps, "size": size}, styles=[StyleRef(style_key(job_id))])
    storage.put(content_key(job.id), (DATA / "content0.png").read_bytes())
    storage.put(style_key(job.id), (DATA / "style0.png").read_bytes())
    store.submit(job)
    return job.id


class ProgressWatch:
    """Samples (run, progress) of one job while it runs, as clients see it, until stopped."""

    def __init__(self, client: redis.Redis, job_id: str) -> None:
        self.client, self.key = client, f"ham:job:{job_id}"
        self.samples: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            status, run, progress = self.client.hmget(self.key, ["status", "run", "progress"])
            if status == b"running" and (not self.samples or self.samples[-1] != (int(run), float(progress))):
                self.samples.append((int(run), float(progress)))

    def stop(self) -> list[tuple[int, float]]:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.samples


def test_a_frozen_worker_woken_while_another_runs_its_job_is_fenced_and_writes_nothing(
    settings: Settings, store: JobStore, start_worker: Callable[[str], Worker], tmp_path: Path
) -> None:
    first, second = start_worker("fence-a"), start_worker("fence-b")
    workers = [first, second]
    for worker in workers:
        wait_until(f"{worker.name} to be ready", worker.ready_file.exists, workers, timeout=START_TIMEOUT)
    job_id = submit(store, settings, steps=200)
    watch = ProgressWatch(store.redis, job_id)
    wait_until("the job to reach ~30 %", lambda: store.get(job_id).progress >= 0.3, workers)
    owner_name = store.get(job_id).worker
    frozen = next(w for w in workers if w.name == owner_name)
    other = next(w for w in workers if w is not frozen)
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        # Its heartbeat expires; the other worker's recovery requeues the job and runs it as run 2.
        wait_until("the other worker to run the job", lambda: (store.get(job_id).worker, store.get(job_id).run)
                   == (other.name, 2) and store.get(job_id).progress > 0.05, [other])  # fmt: skip
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    wait_until("the frozen worker to notice it was fenced", lambda: "fenced" in frozen.log_text(), workers)
    wait_until("the job to finish", lambda: store.get(job_id).terminal, workers)
    samples = watch.stop()

    done = store.get(job_id)
    assert (done.status, done.worker, done.run, done.attempts) == (JobStatus.SUCCEEDED, other.name, 2, 2), done
    assert done.result_key == result_key(job_id, "png", 0, 2)
    files = FileStorage(Path(settings.storage_url.removeprefix("file://")), "http://127.0.0.1:1", b"k")
    assert files.get(done.result_key)
    with pytest.raises(KeyError):
        files.get(result_key(job_id, "png", 0, 1))  # the stale run never wrote a result
    # As clients saw the running job: never backwards within a run; run 2 starts again from 0, and
    # run 1 never shows again once run 2 has begun (the stale worker's writes were all refused).
    runs = [run for run, _ in samples]
    assert runs == sorted(runs) and set(runs) == {1, 2}, samples
    for run in (1, 2):
        values = [p for r, p in samples if r == run]
        assert values == sorted(values), (run, values)
    assert next(p for r, p in samples if r == 2) == 0.0
    # The stale worker logged the fencing and recorded no outcome of its own.
    text = frozen.log_text()
    assert "fenced at a progress write" in text or "fenced before the result upload" in text, text
    assert f"job {job_id}: succeeded" not in text and "terminal transition refused" not in text
    # RQ's registries agree with the record: once the owner's RQ bookkeeping (which trails our
    # record) is done, no execution of the job is left started, and none is recorded failed.
    started = StartedJobRegistry(settings.queue_name, connection=store.redis)
    wait_until("RQ to close the owner's execution", lambda: job_id not in started.get_job_ids(), workers)
    assert job_id not in FailedJobRegistry(settings.queue_name, connection=store.redis).get_job_ids()
    assert "fenced run dropped" in text
    # The fenced worker serves the next job (the other one leaves so it must be the fenced one).
    assert terminate(other.proc, timeout=60) == 0
    next_id = submit(store, settings, steps=2)
    wait_until("the next job to finish", lambda: store.get(next_id).terminal, [frozen])
    following = store.get(next_id)
    assert (following.status, following.worker) == (JobStatus.SUCCEEDED, frozen.name)
    assert frozen.alive
