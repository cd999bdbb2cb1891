"""Chaos run: jobs keep flowing through worker kills, Redis restarts and outages, an API restart
and a storage outage — and none is lost, stuck or charged for what it did not do.

    python -m bench.chaos [--quick] [--jobs N] [--kills K] [--out bench/results/chaos.json]

Starts its own processes on loopback, in a temp dir, and stops them at the end: a
``redis-server`` with the append-only file on (``appendfsync everysec``, as production should
run it), ``ham api`` and three ``ham worker`` (tiny model, file storage, heartbeat 1 s, two
retries per job). The script supervises the workers as ``ham up`` or Kubernetes would: a worker
that exits is started again, and every exit it did not cause is counted.

A client submits N jobs at a steady pace (each with its own ``Idempotency-Key``, retried on
503 and connection errors, so a retry never makes a second job). Meanwhile, on a timeline:

- K SIGKILLs, each of a worker that is running a job (the job is retried elsewhere: one
  attempt charged, as a worker death should);
- a Redis restart (SIGTERM, start again on the same port; nothing lost thanks to the AOF);
- a 10 s Redis outage (stopped, then started);
- an API restart;
- a 10 s storage outage (the storage folder replaced by a file: every read and write fails);
- a worker frozen (SIGSTOP) for 6 s mid-job and woken (SIGCONT) while its job runs elsewhere:
  it must be fenced, never finish the job a second time;
- a full Redis for 10 s (maxmemory below use, ``noeviction``): refusals, not crashes;
- a SIGKILL of Redis itself, restarted from its AOF.

Then it waits (bounded) for every job to end and reports, per outcome: succeeded, failed by
error code, stuck (not terminal by the deadline), lost (accepted but no record), duplicate
results (a job whose run reached ``succeeded`` in more than one worker), worker restarts
(ours vs unexpected exits) and the attempts the jobs used. A table goes to stdout,
everything to JSON. This is a measurement, never a test. ~3-4 minutes on 2 CPUs
(``--quick``: ~2 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.service import CONTENT, LOOPBACK, REPO, START_TIMEOUT, STYLE, free_port, machine

API_KEY = "chaos-key"
TENANT = "chaos"
WORKERS = 3
JOB_PARAMS = {"size": "64", "steps": "12"}
OUTAGE_SECONDS = 10.0
TERMINAL = ("succeeded", "failed", "canceled")


@dataclass
class Plan:
    jobs: int
    kills: int
    submit_interval: float  # seconds between submissions
    settle_timeout: float  # after the last event, how long jobs may take to end


FULL = Plan(jobs=60, kills=4, submit_interval=1.2, settle_timeout=240.0)
QUICK = Plan(jobs=24, kills=2, submit_interval=2.5, settle_timeout=180.0)
# Seconds after the first submission: each event waits for the previous one to end.
# Gray failures (issue 16): a worker frozen past its heartbeat (then woken while its job runs
# elsewhere), a full Redis (maxmemory below use, noeviction), a SIGKILL of Redis itself (AOF
# everysec: at most ~1 s of acknowledged writes may go).
FREEZE_SECONDS = 6.0
TIMELINE = (
    (5.0, "redis restart"),
    (15.0, f"redis outage {OUTAGE_SECONDS:.0f}s"),
    (32.0, "api restart"),
    (40.0, f"storage outage {OUTAGE_SECONDS:.0f}s"),
    (55.0, f"freeze busy worker {FREEZE_SECONDS:.0f}s"),
    (65.0, f"redis full {OUTAGE_SECONDS:.0f}s"),
    (80.0, "redis SIGKILL"),
)


@dataclass
class Proc:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    killed_by_us: bool = False
    starts: int = 0
    unexpected_exits: list[int] = field(default_factory=list)


class ChaosStack:
    """Redis (AOF), the API and three workers in ``workdir``; workers are kept running."""

    def __init__(self, workdir: Path, code: Path | None = None) -> None:
        self.workdir = workdir
        self.redis_port, self.api_port = free_port(), free_port()
        self.redis_url = f"redis://{LOOPBACK}:{self.redis_port}/0"
        self.api_url = f"http://{LOOPBACK}:{self.api_port}"
        self.storage = workdir / "storage"
        self.storage.mkdir()
        ham = Path(sys.executable).with_name("ham")
        ham_cmd = [str(ham)] if ham.exists() else [sys.executable, "-m", "ham_cli"]
        self.env = {
            **os.environ,
            "HAM_REDIS_URL": self.redis_url,
            "HAM_STORAGE_URL": f"file://{self.storage}",
            "HAM_PUBLIC_URL": self.api_url,
            "HAM_URL_SIGNING_KEY": secrets.token_hex(32),
            "HAM_MODEL": "tiny",
            "HAM_DEVICE": "cpu",
            "HAM_API_KEYS": f"{TENANT}:{API_KEY}",
            "HAM_MAX_QUEUE_LENGTH": "100000",
            "HAM_MAX_QUEUED_PER_TENANT": "100000",
            "HAM_RATE_LIMIT_PER_MINUTE": "10000000",
            "HAM_WORKER_HEARTBEAT": "1",
            "HAM_JOB_MAX_RETRIES": "2",
            "HAM_WORKER_OUTAGE_DEADLINE": "60",
            "HAM_WORKER_RECONNECT_MAX": "2",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        if code is not None:  # the processes under test run this source tree (a before/after comparison)
            self.env["PYTHONPATH"] = str(code.resolve())
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.redis = Proc("redis", [binary, "--port", str(self.redis_port), "--bind", LOOPBACK, "--save", "",
                                    "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(workdir)])
        self.api = Proc("api", [*ham_cmd, "api", "--host", LOOPBACK, "--port", str(self.api_port)])
        self.workers = [
            Proc(f"worker-{i}", [*ham_cmd, "worker", "--metrics-host", LOOPBACK,
                                 "--ready-file", str(workdir / f"worker-{i}.ready")])
            for i in range(WORKERS)
        ]
        self.client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # --- processes ---

    def start(self, p: Proc) -> None:
        env, argv = dict(self.env), list(p.argv)
        if p.name.startswith("worker"):
            env["HAM_WORKER_METRICS_PORT"] = str(free_port())
            # A fresh name per start, like the default name: RQ refuses a name whose previous owner's
            # registration has not expired yet (a SIGKILLed worker leaves it behind).
            argv += ["--name", self.worker_name(p, p.starts + 1)]
        log = (self.workdir / f"{p.name}.log").open("ab")
        p.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  cwd=REPO)
        p.killed_by_us = False
        p.starts += 1

    @staticmethod
    def worker_name(p: Proc, start: int) -> str:
        return f"chaos-{p.name}-{start}"

    def signal(self, p: Proc, sig: int, wait: float = 30.0) -> None:
        if p.proc is None or p.proc.poll() is not None:
            return
        p.killed_by_us = True
        try:
            os.killpg(p.proc.pid, sig)
            p.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            os.killpg(p.proc.pid, signal.SIGKILL)
            p.proc.wait(timeout=10)
        except ProcessLookupError:
            pass

    def wait_until(self, what: str, ready: Any, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {timeout}s")
            time.sleep(0.05)

    def redis_up(self) -> bool:
        try:
            return bool(self.client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            return False

    def api_ready(self) -> bool:
        try:
            return httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def workers_ready(self) -> int:
        return sum(1 for i in range(WORKERS) if (self.workdir / f"worker-{i}.ready").exists())

    def boot(self) -> None:
        self.start(self.redis)
        self.wait_until("redis", self.redis_up)
        self.start(self.api)
        self.wait_until("the API", self.api_ready)
        for worker in self.workers:
            self.start(worker)
        self.wait_until("the workers", lambda: self.workers_ready() == WORKERS)
        threading.Thread(target=self._supervise, daemon=True).start()

    def _supervise(self) -> None:
        """Restart any worker that exited (as ``ham up`` or Kubernetes would), counting exits we did not cause."""
        while not self._stop.wait(0.2):
            with self._lock:
                for worker in self.workers:
                    if worker.proc is not None and worker.proc.poll() is not None:
                        if not worker.killed_by_us:
                            worker.unexpected_exits.append(worker.proc.returncode)
                        self.start(worker)

    def shutdown(self) -> None:
        self._stop.set()
        with self._lock:
            for p in (*self.workers, self.api, self.redis):
                self.signal(p, signal.SIGTERM)

    # --- chaos ---

    def kill_a_busy_worker(self) -> str | None:
        """SIGKILL the worker of a job that is running (by its record); the job id, or None."""
        with self._lock:
            try:
                running = [m.decode() for m in self.client.zrange("ham:running", 0, -1)]
                owners = {job: self.client.hget(f"ham:job:{job}", "worker") for job in running}
            except redis.RedisError:
                return None
            by_name = {self.worker_name(w, w.starts): w for w in self.workers}
            for job, owner in random.sample(list(owners.items()), len(owners)):
                worker = by_name.get(owner.decode()) if owner else None
                if worker is not None and worker.proc is not None and worker.proc.poll() is None:
                    self.signal(worker, signal.SIGKILL)
                    return job
        return None

    def restart_redis(self, down_for: float = 0.0) -> None:
        self.signal(self.redis, signal.SIGTERM)
        time.sleep(down_for)
        self.start(self.redis)
        self.wait_until("redis", self.redis_up)

    def restart_api(self) -> None:
        self.signal(self.api, signal.SIGTERM)
        self.start(self.api)
        self.wait_until("the API", self.api_ready)

    def freeze_a_busy_worker(self, seconds: float) -> str | None:
        """SIGSTOP the worker of a running job for ``seconds`` (its heartbeat lapses, the job is
        recovered elsewhere), then SIGCONT it: it must be fenced, not finish the job."""
        with self._lock:
            try:
                running = [m.decode() for m in self.client.zrange("ham:running", 0, -1)]
                owners = {job: self.client.hget(f"ham:job:{job}", "worker") for job in running}
            except redis.RedisError:
                return None
            by_name = {self.worker_name(w, w.starts): w for w in self.workers}
            for job, owner in owners.items():
                worker = by_name.get(owner.decode()) if owner else None
                if worker is not None and worker.proc is not None and worker.proc.poll() is None:
                    worker.proc.send_signal(signal.SIGSTOP)
                    try:
                        time.sleep(seconds)
                    finally:
                        worker.proc.send_signal(signal.SIGCONT)
                    return f"job {job}"
        return None

    def redis_full(self, seconds: float) -> None:
        """Redis answers but refuses every write (maxmemory below use, noeviction) for ``seconds``."""
        self.client.config_set("maxmemory-policy", "noeviction")
        self.client.config_set("maxmemory", 1024 * 1024)
        time.sleep(seconds)
        self.client.config_set("maxmemory", 0)

    def sigkill_redis(self) -> None:
        """Redis itself crashes (no clean stop) and comes back from its AOF."""
        self.signal(self.redis, signal.SIGKILL)
        self.start(self.redis)
        self.wait_until("redis", self.redis_up)

    def storage_outage(self, seconds: float) -> None:
        away = self.storage.with_name("storage.away")
        self.storage.rename(away)
        self.storage.write_text("storage outage")  # a file where the folder belongs: every access fails
        time.sleep(seconds)
        self.storage.unlink()
        away.rename(self.storage)


# --- the client ---


def submit_all(stack: ChaosStack, plan: Plan, accepted: dict[str, str], refusals: Counter) -> None:
    """Submit ``plan.jobs`` jobs, one per ``submit_interval``; each retried until accepted (bounded)."""
    files = {"content": (CONTENT.name, CONTENT.read_bytes(), "image/png"),
             "style": (STYLE.name, STYLE.read_bytes(), "image/png")}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=30) as client:
        for i in range(plan.jobs):
            key = f"chaos-{i}"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    response = client.post("/v1/transfers", data=JOB_PARAMS, files=files,
                                           headers={"Idempotency-Key": key})
                except httpx.TransportError:
                    refusals["connection_error"] += 1
                    time.sleep(0.5)
                    continue
                if response.status_code in (200, 202):
                    accepted[key] = response.json()["id"]
                    break
                refusals[str(response.status_code)] += 1
                time.sleep(float(response.headers.get("Retry-After", "1")) / 5)
            time.sleep(plan.submit_interval)


def run_chaos(stack: ChaosStack, plan: Plan, events: list[dict[str, Any]]) -> None:
    """The timeline: kills spread over the run, the Redis, API and storage events between them."""
    kills_left = plan.kills

    def at(t: float, what: str, action: Any) -> None:
        delay = t - (time.monotonic() - started)
        if delay > 0:
            time.sleep(delay)
        began = time.monotonic() - started
        detail = action()
        events.append({"at_s": round(began, 1), "event": what, "detail": detail,
                       "took_s": round(time.monotonic() - started - began, 1)})
        print(f"  t={began:5.1f}s  {what} {detail or ''}", file=sys.stderr)

    def kill() -> str | None:
        nonlocal kills_left
        for _ in range(200):  # wait (bounded, 20 s) for a busy worker
            job = stack.kill_a_busy_worker()
            if job:
                kills_left -= 1
                return f"job {job}"
            time.sleep(0.1)
        return "no busy worker"

    started = time.monotonic()
    span = max(plan.jobs * plan.submit_interval, TIMELINE[-1][0] + OUTAGE_SECONDS)
    actions = (lambda: stack.restart_redis(), lambda: stack.restart_redis(OUTAGE_SECONDS), stack.restart_api,
               lambda: stack.storage_outage(OUTAGE_SECONDS), lambda: stack.freeze_a_busy_worker(FREEZE_SECONDS),
               lambda: stack.redis_full(OUTAGE_SECONDS), stack.sigkill_redis)  # fmt: skip
    timeline: list[tuple[float, str, Any]] = [
        (t, what, action) for (t, what), action in zip(TIMELINE, actions, strict=True)
    ]
    # Kills spread over the run, between the other events.
    timeline += [(3.0 + (span - 3.0) * (i + 0.5) / max(1, plan.kills), "SIGKILL busy worker", kill)
                 for i in range(plan.kills)]
    for t, what, action in sorted(timeline, key=lambda item: item[0]):
        at(t, what, action)


def settle(stack: ChaosStack, accepted: dict[str, str], timeout: float) -> dict[str, dict[str, Any]]:
    """Wait (bounded) for every accepted job to end; their records, read from Redis."""
    deadline = time.monotonic() + timeout
    while True:
        records: dict[str, dict[str, Any]] = {}
        for job_id in accepted.values():
            raw = stack.client.hgetall(f"ham:job:{job_id}")
            records[job_id] = {k.decode(): v.decode() for k, v in raw.items()}
        if all(r.get("status") in TERMINAL for r in records.values()) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def succeeded_runs(workdir: Path) -> Counter:
    """How many times each job's run reached ``succeeded`` across all worker logs."""
    runs: Counter = Counter()
    pattern = re.compile(r"job ([0-9a-f]{32}): succeeded in")
    for log in workdir.glob("worker-*.log"):
        runs.update(pattern.findall(log.read_text(errors="replace")))
    return runs


def fenced_runs(workdir: Path) -> int:
    """How many runs, across all worker logs, learned another run owned their job and stopped."""
    pattern = re.compile(r"job [0-9a-f]{32}: fenced in")
    return sum(len(pattern.findall(log.read_text(errors="replace"))) for log in workdir.glob("worker-*.log"))


def report(plan: Plan, stack: ChaosStack, accepted: dict[str, str], records: dict[str, dict[str, Any]],
           refusals: Counter, events: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    statuses = Counter(r.get("status", "missing") for r in records.values())
    failed_by_code = Counter(r.get("error_code") for r in records.values() if r.get("status") == "failed")
    runs = succeeded_runs(stack.workdir)
    attempts = Counter(int(r.get("attempts", 0)) for r in records.values() if r)
    killed = [e["detail"].removeprefix("job ") for e in events
              if e["event"].startswith("SIGKILL") and e["detail"].startswith("job")]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "plan": plan.__dict__,
        "code": stack.env.get("PYTHONPATH", str(REPO)),
        "seconds": round(seconds, 1),
        "events": events,
        "submitted": plan.jobs,
        "accepted": len(accepted),
        "succeeded": statuses.get("succeeded", 0),
        "failed_by_code": dict(failed_by_code),
        "canceled": statuses.get("canceled", 0),
        "stuck": sum(1 for r in records.values() if r and r.get("status") not in TERMINAL),
        "lost": statuses.get("missing", 0),
        "duplicate_results": sum(1 for n in runs.values() if n > 1),
        # Runs that woke after their job was recovered and stopped without writing (a frozen worker).
        "fenced_runs": fenced_runs(stack.workdir),
        "distinct_job_ids": len(set(accepted.values())),
        "worker_kills": len(killed),
        # A worker death is the one failure a job pays for: one attempt each.
        "attempts_of_killed_jobs": {job: int(records.get(job, {}).get("attempts", 0)) for job in killed},
        "worker_restarts": sum(w.starts - 1 for w in stack.workers),
        "unexpected_worker_exits": sum(len(w.unexpected_exits) for w in stack.workers),
        "attempts_used": {str(k): v for k, v in sorted(attempts.items())},
        "attempts_total": sum(k * v for k, v in attempts.items()),
        "submit_refusals": dict(refusals),
    }


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("jobs submitted / accepted", f"{result['submitted']} / {result['accepted']}"),
        ("succeeded", result["succeeded"]),
        ("failed (by code)", ", ".join(f"{k}: {v}" for k, v in result["failed_by_code"].items()) or "0"),
        ("stuck (not terminal)", result["stuck"]),
        ("lost (no record)", result["lost"]),
        ("duplicate results", result["duplicate_results"]),
        ("fenced runs (woke to find their job taken)", result["fenced_runs"]),
        ("worker SIGKILLs (of busy workers)", result["worker_kills"]),
        ("attempts of the killed workers' jobs", ", ".join(map(str, result["attempts_of_killed_jobs"].values()))),
        ("worker restarts / unexpected exits", f"{result['worker_restarts']} / {result['unexpected_worker_exits']}"),
        ("attempts used (attempts: jobs)", ", ".join(f"{k}: {v}" for k, v in result["attempts_used"].items())),
        ("attempts total", f"{result['attempts_total']} for {result['accepted']} jobs"),
        ("submit retries (by answer)", ", ".join(f"{k}: {v}" for k, v in result["submit_refusals"].items()) or "0"),
        ("wall time", f"{result['seconds']} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'chaos run':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    """Run the chaos scenario; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.jobs} jobs, {QUICK.kills} kills")
    parser.add_argument("--jobs", type=int, help=f"jobs to submit (default {FULL.jobs})")
    parser.add_argument("--kills", type=int, help=f"worker SIGKILLs (default {FULL.kills})")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "chaos.json"), help="JSON output path")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the processes' logs")
    parser.add_argument("--code", type=Path, help="run the API and workers from this source tree (e.g. an "
                        "export of an older commit, to compare); default: this checkout")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.jobs is not None:
        if not 1 <= args.jobs <= 1000:
            parser.error("--jobs must be in 1..1000")
        plan.jobs = args.jobs
    if args.kills is not None:
        if not 0 <= args.kills <= 50:
            parser.error("--kills must be in 0..50")
        plan.kills = args.kills
    workdir = Path(tempfile.mkdtemp(prefix="ham-chaos-"))
    stack = ChaosStack(workdir, args.code)
    began = time.monotonic()
    accepted: dict[str, str] = {}
    refusals: Counter = Counter()
    events: list[dict[str, Any]] = []
    try:
        print("starting redis, the API and 3 workers ...", file=sys.stderr)
        stack.boot()
        print("submitting and breaking things:", file=sys.stderr)
        submitter = threading.Thread(target=submit_all, args=(stack, plan, accepted, refusals), daemon=True)
        submitter.start()
        run_chaos(stack, plan, events)
        submitter.join(timeout=plan.jobs * plan.submit_interval + 300)
        print("waiting for the jobs to end ...", file=sys.stderr)
        records = settle(stack, accepted, plan.settle_timeout)
        result = report(plan, stack, accepted, records, refusals, events, time.monotonic() - began)
    finally:
        stack.shutdown()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
