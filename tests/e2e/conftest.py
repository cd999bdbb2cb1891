"""A real stack for end-to-end tests: the API (``ham api``) and worker processes
(``ham worker``) as subprocesses on free loopback ports, the session's real Redis, file
storage in a temp dir, the tiny model on CPU, and two tenants.

Settings shared by every process of the stack are in :func:`stack` (short heartbeats so a
killed worker is noticed within seconds; private webhook targets allowed so a local HTTP
server can receive them). Each process logs to a file in the stack's directory; a failed
start shows the log's tail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis

from tests.fixtures.servers import free_port, log_tail, terminate
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
TENANTS = {"alpha": "key-alpha-0123456789", "beta": "key-beta-0123456789"}
WEBHOOK_SECRET = "e2e-webhook-secret"
HEARTBEAT = 1  # seconds; a SIGKILLed worker is declared dead after 3 of these
START_TIMEOUT = 90.0
# A separate Redis database, so unit tests flushing db 0 never touch the running stack.
E2E_REDIS_DB = 7
# The workers' HAM_RECORD_BYTES: far above what a 64 px tiny transfer records, and not the default.
E2E_RECORD_BYTES = 123_456_789


def _with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


@dataclass
class WorkerProcess:
    """One ``ham worker`` subprocess."""

    name: str
    proc: subprocess.Popen
    log: Path
    ready_file: Path
    metrics_port: int
    model: str = ""  # its HAM_MODEL

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def running() -> None:
            if not self.alive:
                raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}:\n{log_tail(self.log)}")

        wait_until(self.ready_file.exists, timeout, f"worker {self.name} to be ready", check=running,
                   detail=lambda: log_tail(self.log))

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """Warm shutdown (SIGTERM), SIGKILL if it does not exit in time; returns the exit code."""
        return terminate(self.proc, timeout)


@dataclass
class Stack:
    """The running API plus helpers to start, stop and replace workers."""

    base_url: str
    env: dict[str, str]
    workdir: Path
    redis: redis.Redis
    workers: list[WorkerProcess] = field(default_factory=list)
    _count: int = 0

    def client(self, tenant: str | None = "alpha") -> httpx.Client:
        headers = {"Authorization": f"Bearer {TENANTS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def start_worker(self, wait: bool = True, **env: str) -> WorkerProcess:
        self._count += 1
        name = f"e2e-worker-{self._count}"
        log = self.workdir / f"{name}.log"
        ready = self.workdir / f"{name}.ready"
        port = free_port()
        proc_env = {**self.env, "HAM_WORKER_METRICS_PORT": str(port), **env}
        cmd = [sys.executable, "-m", "ham_cli", "worker", "--name", name, "--ready-file", str(ready)]
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=proc_env, stdout=out, stderr=subprocess.STDOUT)
        worker = WorkerProcess(name, proc, log, ready, port, proc_env.get("HAM_MODEL", ""))
        self.workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    def live_workers(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def ensure_one_worker(self) -> WorkerProcess:
        """Exactly one live, ready worker (the tests that kill workers leave others behind)."""
        live = self.live_workers()
        for extra in live[1:]:
            extra.stop()
        if live:
            live[0].wait_ready()
            return live[0]
        return self.start_worker()

    def stop_workers(self) -> None:
        for worker in self.live_workers():
            worker.stop()


def _start_api(env: dict[str, str], workdir: Path, port: int) -> subprocess.Popen:
    log = workdir / "api.log"
    cmd = [sys.executable, "-m", "ham_cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    def running() -> None:
        if proc.poll() is not None:
            pytest.fail(f"ham api exited with {proc.returncode}:\n{log_tail(log)}")

    running()
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200, START_TIMEOUT,
               "ham api to be ready", interval=0.1, ignore=(httpx.HTTPError,), check=running,
               detail=lambda: log_tail(log))
    return proc


@contextmanager
def running_stack(redis_url: str, workdir: Path, storage_url: str | None = None, **extra: str) -> Iterator[Stack]:
    """The API and one worker on ``redis_url`` (database :data:`E2E_REDIS_DB`) and ``storage_url``
    (default: files in ``workdir``); ``extra`` adds or overrides ``HAM_*`` variables."""
    port = free_port()
    url = _with_db(redis_url, int(extra.pop("redis_db", E2E_REDIS_DB)))
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HAM_REDIS_URL": url,
        "HAM_STORAGE_URL": storage_url or f"file://{workdir / 'storage'}",
        "HAM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "HAM_URL_SIGNING_KEY": "e2e-url-signing-key",
        "HAM_API_KEYS": ",".join(f"{t}:{k}" for t, k in TENANTS.items()),
        "HAM_MODEL": "tiny",
        "HAM_DEVICE": "cpu",
        "HAM_QUEUE_NAME": "ham-e2e",
        "HAM_WORKER_HEARTBEAT": str(HEARTBEAT),
        "HAM_JOB_MAX_RETRIES": "1",
        "HAM_RATE_LIMIT_PER_MINUTE": "100000",
        "HAM_MAX_UPLOAD_BYTES": "1000000",
        "HAM_MAX_IMAGE_PIXELS": "1000000",
        "HAM_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "HAM_WEBHOOK_ALLOW_PRIVATE": "true",
        "HAM_WEBHOOK_TIMEOUT": "5",
        "HAM_RECORD_BYTES": str(E2E_RECORD_BYTES),
        # Two CPUs shared by the API, the workers and pytest: one torch thread each.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        **extra,
    }
    (workdir / "storage").mkdir()
    api = _start_api(env, workdir, port)
    stack = Stack(base_url=f"http://127.0.0.1:{port}", env=env, workdir=workdir, redis=client)
    try:
        stack.start_worker()
        yield stack
    finally:
        stack.stop_workers()
        api.send_signal(signal.SIGTERM)
        try:
            api.wait(timeout=15)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()
        client.flushdb()
        client.close()


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker; tests may add, kill and replace workers through the :class:`Stack`."""
    yield from run_stack(redis_url, tmp_path_factory)


def run_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory, **extra: str) -> Iterator[Stack]:
    """Start the stack (with ``extra`` on top of the shared settings) in a fresh folder, yield it, stop it."""
    with running_stack(redis_url, tmp_path_factory.mktemp("e2e"), **extra) as running:
        yield running
