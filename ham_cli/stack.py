"""``ham up``: the whole service on one machine — Redis, the API and one worker.

Each part is a child process started the way an operator would start it:

- ``redis-server`` on 127.0.0.1 (port 6379 if free, else a free one), data in
  ``<data_dir>/redis``, kept in an append-only file fsynced every second (a data folder from
  an older ``ham up``, which snapshotted every 60 s, is migrated once on start);
- ``ham api --host H --port P``;
- ``ham worker`` (model from ``HAM_MODEL``, default the offline ``tiny`` demo), its metrics
  and probes on a free loopback port; with ``--model A --model B``, one worker per model
  (``HAM_MODEL=A`` and ``HAM_MODEL=B``, children ``worker-A``, ``worker-B``) and the API
  serving both (``HAM_MODELS=A,B``, the first the default).

They share one set of ``HAM_*`` settings: the caller's environment, plus the Redis URL,
file storage under ``<data_dir>/storage`` (unless ``HAM_STORAGE_URL`` is set), the public URL
and one URL-signing key (the worker signs result URLs in webhooks that the API must accept).
Children's output is shown with a ``api |`` / ``worker |`` prefix; Redis logs to a file.

Start-up waits for Redis to answer, the API's ``/readyz`` and the worker's ready file; a
child that exits meanwhile ends ``ham up`` with status 1 and its last lines. Once up, ``ham up``
supervises: a child that dies is started again, after 1 s, then 2, 4, … up to 30 s while it
keeps dying quickly, and the console says so each time (the API and the worker ride through a
Redis restart on their own). Ctrl-C or SIGTERM stops everything: the worker gets a warm
shutdown (finishes its job), the API a graceful one, Redis last. A second Ctrl-C makes the
shutdown cold; children still alive after that are killed.
"""

from __future__ import annotations

import collections
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

DEFAULT_DATA_DIR = Path("ham-data")
DEFAULT_REDIS_PORT = 6379
_POLL = 0.1
# Supervision: the first restart of a dead child waits RESTART_BASE seconds, each further one
# twice as long up to RESTART_MAX; a child that ran STABLE_RUN seconds starts over at the base.
RESTART_BASE = 1.0
RESTART_MAX = 30.0
STABLE_RUN = 60.0


class StackError(RuntimeError):
    """``ham up`` cannot start or keep running; the message says which part and why."""


@dataclass
class _Child:
    """One child process, how to start it again, and the tail of its output."""

    name: str
    proc: subprocess.Popen
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=40))
    log_file: Path | None = None
    started_at: float = field(default_factory=time.monotonic)
    # Restarts in a row without a stable run in between (each doubles the next pause).
    restarts: int = 0
    restart_at: float | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def last_lines(self) -> str:
        if self.log_file is not None:
            try:
                return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-40:])
            except OSError:
                return "(no log)"
        return "\n".join(self.tail) or "(no output)"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_port(host: str = "127.0.0.1", avoid: int | None = None) -> int:
    """A port free now, other than ``avoid`` (a port another part is about to bind, which the
    system may hand out again while it is still unbound)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port != avoid:
            return port


def _die_with_parent_hook():  # -> Callable[[], None] | None
    """A ``preexec_fn`` that makes the child get SIGTERM if ``ham up`` dies (even by SIGKILL).

    libc is loaded here, in the parent: between fork and exec the child may only call into C,
    since another thread (an output pump) could hold the import lock at fork time.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: children outlive a killed parent
        return None
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def _pump(child: _Child, stream: IO[bytes], out: IO[str]) -> None:
    """Copy a child's output to ours line by line, prefixed with its name."""
    prefix = f"{child.name:>6} | "
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        child.tail.append(line)
        with contextlib.suppress(ValueError, OSError):  # our stdout closed: keep draining the pipe
            out.write(prefix + line + "\n")
            out.flush()
    stream.close()


class _Stack:
    def __init__(
        self, host: str, port: int, data_dir: Path, startup_timeout: float, out: IO[str], models: tuple[str, ...] = ()
    ) -> None:
        self.host = host
        self.models = models
        self.port = port
        self.data_dir = data_dir.resolve()
        self.startup_timeout = startup_timeout
        self.out = out
        self.children: list[_Child] = []
        self.signals = 0
        self.ready_file = self.data_dir / "worker.ready"
        self.preexec = _die_with_parent_hook()

    # -- output --

    def say(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    # -- children --

    def spawn(self, name: str, argv: list[str], env: dict[str, str], log_file: Path | None = None) -> _Child:
        child = _Child(name, self._popen(argv, env, log_file), argv=argv, env=env, log_file=log_file)
        self._pump_output(child)
        self.children.append(child)
        return child

    def _popen(self, argv: list[str], env: dict[str, str], log_file: Path | None) -> subprocess.Popen:
        common = {"env": env, "stdin": subprocess.DEVNULL, "start_new_session": True, "preexec_fn": self.preexec}
        if log_file is not None:
            with log_file.open("ab") as log:
                return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **common)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **common)

    def _pump_output(self, child: _Child) -> None:
        if child.log_file is None:
            threading.Thread(target=_pump, args=(child, child.proc.stdout, self.out), daemon=True).start()

    def supervise(self, now: float | None = None) -> None:
        """Restart children that died since start-up, with a pause that doubles per quick death."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.alive():
                if child.restarts and now - child.started_at > STABLE_RUN:
                    child.restarts = 0  # it has run fine for a while: the next death starts over
                continue
            if child.restart_at is None:
                pause = min(RESTART_MAX, RESTART_BASE * 2**child.restarts)
                child.restart_at = now + pause
                self.say(f"ham up: {child.name} exited with status {child.proc.returncode}; "
                         f"restarting it in {pause:.0f}s")
            elif now >= child.restart_at:
                child.proc = self._popen(child.argv, child.env, child.log_file)
                child.started_at, child.restart_at = now, None
                child.restarts += 1
                self._pump_output(child)
                self.say(f"ham up: {child.name} restarted (pid {child.proc.pid}, restart {child.restarts})")

    def check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise StackError(
                    f"{child.name} exited with status {child.proc.returncode}; its last output:\n{child.last_lines()}"
                )

    def wait_until(self, what: str, ready, deadline: float) -> None:  # ready: () -> bool
        while not ready():
            self.check_children()
            if self.signals:
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise StackError(f"{what} not ready after {self.startup_timeout:.0f}s")
            time.sleep(_POLL)

    # -- start --

    def start(self, base_env: dict[str, str]) -> dict[str, str]:
        """Start Redis, then the API and the worker; return the settings they share."""
        redis_binary = shutil.which("redis-server")
        if redis_binary is None:
            raise StackError("redis-server not found on PATH (Debian/Ubuntu: apt-get install redis-server)")
        (self.data_dir / "redis").mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        deadline = time.monotonic() + self.startup_timeout

        redis_port = DEFAULT_REDIS_PORT if _port_free("127.0.0.1", DEFAULT_REDIS_PORT) else _free_port()
        self.spawn(
            "redis",
            [
                redis_binary,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data_dir / "redis"),
                "--daemonize",
                "no",
                *redis_persistence_args(self.data_dir / "redis"),
            ],
            base_env,
            log_file=self.data_dir / "redis.log",
        )
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        self.wait_until("redis", lambda: _redis_answers(redis_port), deadline)
        if needs_aof_migration(self.data_dir / "redis"):
            migrate_to_aof(redis_url)
            self.say("ham up: Redis data moved from its snapshot (dump.rdb) to the append-only file")

        env = self.shared_env(base_env, redis_url)
        cli = [sys.executable, "-m", "ham_cli"]
        self.spawn("api", [*cli, "api", "--host", self.host, "--port", str(self.port)], env)
        workers = self.worker_envs(env)
        for name, ready_file, worker_env in workers:
            ready_file.unlink(missing_ok=True)
            self.spawn(name, [*cli, "worker", "--ready-file", str(ready_file), "--metrics-host", "127.0.0.1"],
                       worker_env)
        api = self.api_url()
        self.wait_until("the API", lambda: _http_ok(f"{api}/readyz"), deadline)
        for name, ready_file, _ in workers:
            self.wait_until(f"the {name} (model loading)", ready_file.exists, deadline)
        return env

    def worker_envs(self, env: dict[str, str]) -> list[tuple[str, Path, dict[str, str]]]:
        """``(child name, ready file, environment)`` of each worker: one, or one per ``--model``."""
        if not self.models:
            return [("worker", self.ready_file, env)]
        from ham_core.models import model_slug

        workers = []
        for index, model in enumerate(self.models):
            slug = model_slug(model)
            # The first worker keeps the shared metrics port the banner shows; the others get their own.
            port = env["HAM_WORKER_METRICS_PORT"] if index == 0 else str(_free_port(avoid=self.port))
            workers.append((f"worker-{slug}", self.data_dir / f"worker-{slug}.ready",
                            {**env, "HAM_MODEL": model, "HAM_WORKER_METRICS_PORT": port}))
        return workers

    def shared_env(self, base_env: dict[str, str], redis_url: str) -> dict[str, str]:
        env = dict(base_env)
        env["HAM_REDIS_URL"] = redis_url
        env.setdefault("HAM_STORAGE_URL", f"file://{self.data_dir / 'storage'}")
        env.setdefault("HAM_PUBLIC_URL", self.api_url())
        # One key for the API and the worker: URLs either signs must verify in the API.
        env.setdefault("HAM_URL_SIGNING_KEY", secrets.token_hex(32))
        if "HAM_WORKER_METRICS_PORT" not in env:
            env["HAM_WORKER_METRICS_PORT"] = str(_free_port(avoid=self.port))
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.models:
            # Every process agrees on the catalogue (its first entry is the default model and its queue).
            env["HAM_MODELS"] = ",".join(self.models)
        return env

    def api_url(self) -> str:
        # A wildcard bind address is not something a client can connect to.
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    # -- stop --

    def stop(self, grace: float) -> None:
        """Worker and API first (warm), Redis last; escalate on a second signal or after ``grace``."""
        apps = [c for c in self.children if c.name != "redis"]
        redis = [c for c in self.children if c.name == "redis"]
        for group, timeout in ((apps, grace), (redis, 10.0)):
            signals_seen = self.signals
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while any(c.alive() for c in group) and time.monotonic() < deadline:
                if self.signals > signals_seen + 1:  # impatient user: a second Ctrl-C during shutdown
                    for child in group:
                        child.signal(signal.SIGTERM)  # the worker's cold shutdown: its job goes back to the queue
                    deadline = min(deadline, time.monotonic() + 5.0)
                    signals_seen = self.signals
                time.sleep(_POLL)
            for child in group:
                if child.alive():
                    self.say(f"ham up: {child.name} did not stop in time; killing it")
                    child.signal(signal.SIGKILL)
                    child.proc.wait(5)


# Redis persistence of ``ham up``: the append-only file, fsynced once a second (Redis's own
# default and what the compose file and the k8s dev Redis use). A SIGKILL of Redis (or a power cut)
# loses at most about the last second of acknowledged writes; a clean stop loses nothing.
AOF_ARGS = ("--appendonly", "yes", "--appendfsync", "everysec", "--save", "")


def needs_aof_migration(redis_dir: Path) -> bool:
    """Whether ``redis_dir`` holds data from before ``ham up`` used AOF: a snapshot, no AOF yet."""
    has_aof = (redis_dir / "appendonlydir").exists() or (redis_dir / "appendonly.aof").exists()
    return (redis_dir / "dump.rdb").exists() and not has_aof


def redis_persistence_args(redis_dir: Path) -> list[str]:
    """The ``redis-server`` arguments for ``redis_dir``.

    Redis started with ``appendonly yes`` and no AOF would start empty and ignore an existing
    ``dump.rdb``; so a data folder from an older ``ham up`` starts once from its snapshot, and
    :func:`migrate_to_aof` then turns AOF on while the data is loaded (one-time migration).
    """
    if needs_aof_migration(redis_dir):
        return ["--appendonly", "no", "--save", ""]
    return list(AOF_ARGS)


def migrate_to_aof(redis_url: str, timeout: float = 60.0) -> None:
    """Turn AOF on in a running Redis and wait until its first AOF is written (a rewrite of what it holds)."""
    from ham_core.config import Settings
    from ham_core.redis_client import connect_redis

    client = connect_redis(Settings(redis_url=redis_url))
    try:
        client.config_set("appendfsync", "everysec")
        client.config_set("appendonly", "yes")
        deadline = time.monotonic() + timeout
        while True:
            info = client.info("persistence")
            if info.get("aof_enabled") == 1 and not info.get("aof_rewrite_in_progress") and not info.get(
                "aof_rewrite_scheduled"
            ):
                return
            if time.monotonic() > deadline:
                raise StackError(f"Redis did not write its append-only file within {timeout:.0f}s")
            time.sleep(_POLL)
    finally:
        client.close()


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _banner(stack: _Stack, env: dict[str, str]) -> str:
    api = stack.api_url()
    auth = "" if not env.get("HAM_API_KEYS") else ' -H "Authorization: Bearer $HAM_API_KEY"'
    return "\n".join(
        [
            "",
            f"HAM is up: {api}   (API docs: {api}/docs)",
            f"  redis    {env['HAM_REDIS_URL']}",
            f"  storage  {env['HAM_STORAGE_URL']}",
            f"  worker   metrics on http://127.0.0.1:{env['HAM_WORKER_METRICS_PORT']}/metrics",
            *([f"  models   {', '.join(stack.models)} (one worker each; GET {api}/v1/models)"] if stack.models else []),
            "Try:",
            # The examples read the key from the variable `ham submit` also reads; say how to set it.
            *(["  export HAM_API_KEY=<one key of HAM_API_KEYS>"] if auth else []),
            f"  curl -s{auth} -F content=@content.png -F style=@style.png {api}/v1/transfers",
            f"  curl -s{auth} {api}/v1/transfers/<id>",
            f"  ham submit content.png --style style.png -o out.png --api {api}",
            "Ctrl-C stops everything.",
            "",
        ]
    )


def _checked_stack_arguments(port: int, models: tuple[str, ...], stop_grace: float | None) -> float:
    """``ham up``'s arguments and settings checked before anything starts; the stop grace in seconds."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be 1..65535, got {port}")
    if models:
        from ham_core.models import check_model_names

        try:
            check_model_names(models)
        except ValueError as exc:
            raise ValueError(f"--model: {exc}") from None
    if stop_grace is not None:
        return stop_grace
    from pydantic import ValidationError

    from ham_core.config import Settings

    try:
        return Settings().job_timeout + 30.0
    except ValidationError as exc:
        raise ValueError(f"invalid HAM_* settings: {exc}") from None


def run_stack(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    data_dir: Path | None = None,
    startup_timeout: float = 600.0,
    stop_grace: float | None = None,
    out: IO[str] | None = None,
    models: tuple[str, ...] | list[str] = (),
) -> int:
    """Run Redis, the API and one worker until Ctrl-C/SIGTERM; the exit status of ``ham up``.

    ``data_dir`` (default ``./ham-data``) holds Redis' data, file storage and logs.
    ``stop_grace`` is how long the worker may take to finish its job on shutdown (default:
    ``HAM_JOB_TIMEOUT`` + 30 s). Returns 0 after a requested stop, 1 if a part fails to start.
    A part that dies while running is restarted (with backoff). ``models`` (``--model``, repeatable):
    one worker per model, the API serving all of them (the first is the default).
    """
    out = out or sys.stdout
    models = tuple(dict.fromkeys(m.strip() for m in models if m.strip()))
    try:
        stop_grace = _checked_stack_arguments(port, models, stop_grace)
    except ValueError as exc:
        print(f"ham up: error: {exc}", file=sys.stderr)
        return 2
    stack = _Stack(host, port, data_dir or DEFAULT_DATA_DIR, startup_timeout, out, models)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stack.signals += 1

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        env = stack.start(dict(os.environ))
        stack.say(_banner(stack, env))
        while not stack.signals:
            stack.supervise()
            time.sleep(_POLL)
        stack.say("ham up: stopping (Ctrl-C again to stop without waiting for the running job)")
    except KeyboardInterrupt:
        stack.say("ham up: interrupted during start-up; stopping")
    except StackError as exc:
        print(f"ham up: error: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        stack.stop(stop_grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == 0:
        stack.say("ham up: stopped")
    return status
