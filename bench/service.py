"""Service benchmark: what the HTTP service adds around the engine, and how fast it takes jobs.

    python -m bench.service [--quick] [--out bench/results/service.json]

Starts its own stack on loopback, the way an operator would: a private ``redis-server``
(no persistence), ``ham api`` and ``ham worker`` (``HAM_MODEL=tiny``, file storage in a temp
dir, API keys on, queue and rate limits raised so that 429s do not dominate). Then:

(a) **Service overhead per job** — sequential jobs (tiny model, size 64, 2 steps, one image
    style): wall time from the start of ``POST /v1/transfers`` to the result PNG downloaded
    from ``result_url``, minus the engine time the worker recorded for that job
    (``stats.seconds.total`` in the job record). The public job resource does not carry
    ``stats``, so the bench reads it from its own Redis (``ham:job:{id}``). The client polls
    ``GET /v1/transfers/{id}`` every ``--poll-ms`` (20 ms); there is no long-poll, so up to one
    interval of the overhead is polling lag. The overhead is split with the server's own
    timestamps into submit, queue wait, worker time outside the engine, result detection
    and download. The first jobs (cold model and style cache) are warm-up and not counted.

(b) **Submit load** — open loop, no worker running (the API alone, as on a GPU deployment
    where workers live elsewhere): ``POST /v1/transfers`` (two 128² PNGs) at a fixed rate for
    a fixed time; latency is measured from each request's *scheduled* send time, so a
    stalled server cannot hide queueing (no coordinated omission). Then ``GET
    /v1/transfers/{id}`` of those (queued) jobs at a fixed rate. 429s are counted apart.

(c) **Result detection** — how long after a job finished (the server's ``finished_at``) a
    client knows, by each way of following a job: polling ``GET /v1/transfers/{id}`` once a
    second (what a hand-written client does), one long poll with ``Prefer: wait=60``, and the
    server-sent events of ``GET /v1/transfers/{id}/events``. Same jobs as (a), run one by one,
    alternating the method. Also the requests each method sent per job.

(d) **API CPU per accepted submit** (``--submit-cpu``) — the API process's own CPU time
    (user + system, from ``/proc/<pid>/stat``) over N sequential ``POST /v1/transfers`` of two
    512² photo-like PNGs (generated, deterministic), divided by N; no worker running. This is
    what one submit costs the API (HTTP, multipart, image validation, storage, Redis), free of
    the client's own time. ``--submit-cpu-only`` runs only this phase; with
    ``PYTHONPATH=<another checkout>`` it measures that code (a before/after).

A table goes to stdout, everything to JSON. This is a measurement, never a test. The whole
run takes about 2-3 minutes on 2 CPUs (``--quick``: under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import mimetypes
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
CONTENT = REPO / "tests" / "data" / "content0.png"
STYLE = REPO / "tests" / "data" / "style0.png"
LOOPBACK = "127.0.0.1"
API_KEY = "bench-key"
TENANT = "bench"
START_TIMEOUT = 120.0  # the worker builds the tiny model before it is ready
JOB_PARAMS = {"size": "64", "steps": "2"}


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do."""

    warmup_jobs: int
    jobs: int
    submit_rate: float  # requests per second, offered
    submit_seconds: float
    get_rate: float
    get_seconds: float


FULL = Plan(warmup_jobs=2, jobs=30, submit_rate=50.0, submit_seconds=10.0, get_rate=100.0, get_seconds=5.0)
QUICK = Plan(warmup_jobs=1, jobs=5, submit_rate=50.0, submit_seconds=3.0, get_rate=100.0, get_seconds=2.0)


# --- the stack -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class Stack:
    """A private redis-server, ``ham api`` and (on demand) ``ham worker``, all in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.redis_port = free_port()
        self.api_port = free_port()
        self.api_url = f"http://{LOOPBACK}:{self.api_port}"
        self.redis_url = f"redis://{LOOPBACK}:{self.redis_port}/0"
        self.ready_file = workdir / "worker.ready"
        self.procs: dict[str, subprocess.Popen] = {}
        ham = Path(sys.executable).with_name("ham")
        # The console script, else this interpreter running the CLI module (a checkout on PYTHONPATH).
        found = str(ham) if ham.exists() else shutil.which("ham")
        self.ham = [found] if found else [sys.executable, "-m", "ham_cli"]
        self.env = {
            **os.environ,
            "HAM_REDIS_URL": self.redis_url,
            "HAM_STORAGE_URL": f"file://{workdir / 'storage'}",
            "HAM_PUBLIC_URL": self.api_url,
            "HAM_URL_SIGNING_KEY": secrets.token_hex(32),
            "HAM_MODEL": "tiny",
            "HAM_DEVICE": "cpu",
            "HAM_API_KEYS": f"{TENANT}:{API_KEY}",
            # Raised so the load phase measures the API, not the backpressure answers.
            "HAM_MAX_QUEUE_LENGTH": "1000000",
            "HAM_MAX_QUEUED_PER_TENANT": "1000000",
            "HAM_RATE_LIMIT_PER_MINUTE": "10000000",
            "HAM_WORKER_METRICS_PORT": str(free_port()),
            "HF_HUB_OFFLINE": "1",
        }

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir
        )

    def _wait(self, what: str, name: str, ready: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not ready after {START_TIMEOUT}s:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def start_redis_and_api(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self._spawn("redis", [binary, "--port", str(self.redis_port), "--bind", LOOPBACK, "--save", "",
                              "--appendonly", "no", "--dir", str(self.workdir)])
        client = redis.Redis.from_url(self.redis_url)

        def redis_up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        self._wait("redis", "redis", redis_up)
        self._spawn("api", [*self.ham, "api", "--host", LOOPBACK, "--port", str(self.api_port)])

        def api_ready() -> bool:
            try:
                return httpx.get(f"{self.api_url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        self._wait("ham api", "api", api_ready)

    def start_worker(self) -> None:
        self._spawn("worker", [*self.ham, "worker", "--metrics-host", LOOPBACK, "--ready-file", str(self.ready_file)])
        self._wait("ham worker", "worker", self.ready_file.exists)

    def stop(self) -> None:
        # Worker first (warm shutdown), then the API, Redis last.
        for name in ("worker", "api", "redis"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except ProcessLookupError:
                pass


@contextmanager
def running_stack(keep: bool) -> Iterator[Stack]:
    workdir = Path(tempfile.mkdtemp(prefix="ham-bench-"))
    stack = Stack(workdir)
    try:
        stack.start_redis_and_api()
        yield stack
    finally:
        stack.stop()
        if keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


# --- statistics ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """Median, p95, p99, mean, min and max of ``seconds``, in milliseconds."""
    ms = [s * 1000.0 for s in seconds]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50": statistics.median(ms),
        "p95": percentile(ms, 95),
        "p99": percentile(ms, 99),
        "mean": statistics.fmean(ms),
        "min": min(ms),
        "max": max(ms),
    }


def _iso_seconds(value: str | None) -> float | None:
    return None if value is None else datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --- (a) overhead per job ------------------------------------------------------------------


Files = dict[str, tuple[str, bytes, str]]


def read_files(content: Path, style: Path) -> Files:
    """The two uploads of every submission."""
    return {
        "content": (content.name, content.read_bytes(), mimetypes.guess_type(content.name)[0] or "image/png"),
        "style": (style.name, style.read_bytes(), mimetypes.guess_type(style.name)[0] or "image/png"),
    }


def run_one_job(client: httpx.Client, store: redis.Redis, poll: float, files: Files) -> dict[str, Any]:
    """Submit, poll until terminal, download; the timings of one job (wall clock, seconds)."""
    t_post = time.time()
    response = client.post("/v1/transfers", data=JOB_PARAMS, files=files)
    t_posted = time.time()
    if response.status_code != 202:
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
    job = response.json()
    polls = 0
    while job["status"] not in ("succeeded", "failed", "canceled"):
        time.sleep(poll)
        polls += 1
        job = client.get(f"/v1/transfers/{job['id']}").json()
    t_seen = time.time()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
    download = client.get(job["result_url"])
    t_done = time.time()
    if download.status_code != 200 or not download.content.startswith(b"\x89PNG"):
        raise RuntimeError(f"download answered {download.status_code}")
    stats = json.loads(store.hget(f"ham:job:{job['id']}", "stats"))
    engine = float(stats["seconds"]["total"])
    created, started, finished = (_iso_seconds(job[k]) for k in ("created_at", "started_at", "finished_at"))
    wall = t_done - t_post
    return {
        "id": job["id"],
        "wall": wall,
        "engine": engine,
        "overhead": wall - engine,
        "submit": t_posted - t_post,
        # Server timestamps: queue wait (created → a worker claimed it) and the worker's own
        # time outside the engine (read inputs, encode PNG, store result, transitions).
        "queue_wait": started - created,
        "worker_outside_engine": (finished - started) - engine,
        "detect": t_seen - finished,
        "download": t_done - t_seen,
        "polls": polls,
        "style_cache_hit": bool(stats.get("style_cache_hit")),
    }


def bench_overhead(stack: Stack, plan: Plan, poll: float, files: Files) -> dict[str, Any]:
    store = redis.Redis.from_url(stack.redis_url)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=60) as client:
        for _ in range(plan.warmup_jobs):
            run_one_job(client, store, poll, files)
        jobs = [run_one_job(client, store, poll, files) for _ in range(plan.jobs)]
    parts = ("wall", "engine", "overhead", "submit", "queue_wait", "worker_outside_engine", "detect", "download")
    return {
        "engine_time_source": "job record stats.seconds.total (read from Redis; not in the public job resource)",
        "poll_interval_ms": poll * 1000,
        "params": JOB_PARAMS,
        "warmup_jobs": plan.warmup_jobs,
        "summary_ms": {part: summary_ms([j[part] for j in jobs]) for part in parts},
        "jobs": jobs,
    }


# --- (c) result detection: polling, Prefer: wait, server-sent events ----------------------------

DETECT_POLL_SECONDS = 1.0


def _follow_by_poll(client: httpx.Client, job_id: str) -> tuple[dict[str, Any], int]:
    requests = 0
    while True:
        job = client.get(f"/v1/transfers/{job_id}").json()
        requests += 1
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job, requests
        time.sleep(DETECT_POLL_SECONDS)


def _follow_by_prefer_wait(client: httpx.Client, job_id: str) -> tuple[dict[str, Any], int]:
    requests = 0
    while True:
        job = client.get(f"/v1/transfers/{job_id}", headers={"Prefer": "wait=60"}).json()
        requests += 1
        if job["status"] in ("succeeded", "failed", "canceled"):
            return job, requests


def _follow_by_events(client: httpx.Client, job_id: str) -> tuple[dict[str, Any], int]:
    data = None
    with client.stream("GET", f"/v1/transfers/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                data = json.loads(line[6:])
                if data["status"] in ("succeeded", "failed", "canceled"):
                    return data, 1
    raise RuntimeError(f"event stream of {job_id} ended without a terminal event (last: {data})")


def bench_detection(stack: Stack, plan: Plan, files: Files) -> dict[str, Any]:
    methods = {"poll 1 s": _follow_by_poll, "Prefer: wait=60": _follow_by_prefer_wait,
               "events (SSE)": _follow_by_events}
    lags: dict[str, list[float]] = {name: [] for name in methods}
    requests: dict[str, list[int]] = {name: [] for name in methods}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=120) as client:
        for n in range(plan.jobs * len(methods)):
            name = list(methods)[n % len(methods)]
            response = client.post("/v1/transfers", data=JOB_PARAMS, files=files)
            if response.status_code != 202:
                raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
            job, sent = methods[name](client, response.json()["id"])
            seen = time.time()
            lags[name].append(seen - _iso_seconds(job["finished_at"]))
            requests[name].append(sent)
    return {
        "poll_interval_ms": DETECT_POLL_SECONDS * 1000,
        "params": JOB_PARAMS,
        "detect_ms": {name: summary_ms(values) for name, values in lags.items()},
        "requests_per_job": {name: statistics.fmean(values) for name, values in requests.items()},
    }


# --- (b) submit and read at a fixed offered load -----------------------------------------------


async def open_loop(
    client: httpx.AsyncClient, rate: float, seconds: float, request: Any
) -> tuple[list[float], Counter, list[Any], float]:
    """Fire ``request(client, i)`` at ``rate``/s for ``seconds``, not waiting for answers.

    Latency runs from each request's scheduled time. Returns latencies of 2xx answers,
    a count per status (``error`` for transport failures), the 2xx results, and the
    time until the last answer came back.
    """
    count = int(rate * seconds)
    latencies: list[float] = []
    statuses: Counter = Counter()
    results: list[Any] = []
    start = time.perf_counter() + 0.05

    async def one(i: int) -> None:
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            response = await request(client, i)
        except httpx.TransportError as exc:
            statuses[f"error:{type(exc).__name__}"] += 1
            return
        statuses[str(response.status_code)] += 1
        if 200 <= response.status_code < 300:
            latencies.append(time.perf_counter() - scheduled)
            results.append(response)

    await asyncio.gather(*(one(i) for i in range(count)))
    return latencies, statuses, results, time.perf_counter() - start


def _load_summary(rate: float, seconds: float, latencies: list[float], statuses: Counter, elapsed: float) -> dict:
    ok = sum(n for status, n in statuses.items() if status.startswith("2"))
    return {
        "offered_rps": rate,
        "duration_s": seconds,
        "sent": sum(statuses.values()),
        "ok": ok,
        "rejected_429": statuses.get("429", 0),
        "statuses": dict(statuses),
        "achieved_rps": ok / elapsed if elapsed > 0 else float("nan"),
        "latency_ms": summary_ms(latencies),
    }


async def bench_load(stack: Stack, plan: Plan, files: Files) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=stack.api_url, headers=headers, timeout=30, limits=limits) as client:
        # Open the keep-alive connections before the clock starts.
        await asyncio.gather(*(client.get("/healthz") for _ in range(20)))

        async def submit(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.post("/v1/transfers", data={**JOB_PARAMS, "seed": str(i)}, files=files)

        lat, statuses, results, elapsed = await open_loop(client, plan.submit_rate, plan.submit_seconds, submit)
        submitted = _load_summary(plan.submit_rate, plan.submit_seconds, lat, statuses, elapsed)
        ids = [r.json()["id"] for r in results]
        submitted["queued_after"] = len(ids)

        async def read(c: httpx.AsyncClient, i: int) -> httpx.Response:
            return await c.get(f"/v1/transfers/{ids[i % len(ids)]}")

        lat, statuses, _, elapsed = await open_loop(client, plan.get_rate, plan.get_seconds, read)
        read_summary = _load_summary(plan.get_rate, plan.get_seconds, lat, statuses, elapsed)
        read_summary["note"] = f"jobs read are queued, {len(ids)} in the queue (queue_position is an LPOS)"
    return {"submit": submitted, "get": read_summary}


def photo_like_png(seed: int, size: int = 512) -> bytes:
    """A deterministic 8-bit RGB PNG with a photo's mix of smooth gradients and fine noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + 25
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, format="PNG")
    return out.getvalue()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_submit_cpu(stack: Stack, submits: int) -> dict[str, Any]:
    """(d): the API's CPU per accepted submit of two 512² PNGs."""
    files = {"content": ("content.png", photo_like_png(1), "image/png"),
             "style": ("style.png", photo_like_png(2), "image/png")}
    pid = stack.procs["api"].pid
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as client:
        for i in range(3):  # warm-up: imports, connection pools, first-request paths
            client.post("/v1/transfers", data={**JOB_PARAMS, "seed": str(i)}, files=files).raise_for_status()
        before = process_cpu_seconds(pid)
        started = time.perf_counter()
        for i in range(submits):
            response = client.post("/v1/transfers", data={**JOB_PARAMS, "seed": str(1000 + i)}, files=files)
            if response.status_code != 202:
                raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
        wall = time.perf_counter() - started
        cpu = process_cpu_seconds(pid) - before
    return {
        "submits": submits,
        "upload_bytes": {name: len(f[1]) for name, f in files.items()},
        "image_size": [512, 512],
        "api_cpu_ms_per_submit": 1000 * cpu / submits,
        "wall_ms_per_submit": 1000 * wall / submits,
    }


def clear_queue(stack: Stack) -> None:
    """Drop what the load phase queued (the bench owns this Redis), so the worker starts idle."""
    redis.Redis.from_url(stack.redis_url).flushdb()
    shutil.rmtree(stack.workdir / "storage" / "inputs", ignore_errors=True)


# --- report --------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


def print_table(result: dict[str, Any]) -> None:
    uploads = ", ".join(f"{name} {u['bytes'] // 1024} KiB" for name, u in result["uploads"].items())
    print(f"\nuploads: {uploads}")
    if "overhead" in result:
        _print_overhead(result["overhead"])
    if "load" in result:
        _print_load(result["load"])
    if "submit_cpu" in result:
        d = result["submit_cpu"]
        print(f"\n(d) API CPU per accepted submit, two 512² PNGs ({sum(d['upload_bytes'].values()) // 1024} KiB), "
              f"{d['submits']} sequential submits")
        print(f"{'api cpu ms/submit':<24}{d['api_cpu_ms_per_submit']:>9.1f}")
        print(f"{'wall ms/submit':<24}{d['wall_ms_per_submit']:>9.1f}")
    if "detection" in result:
        _print_detection(result["detection"])


def _print_detection(c: dict[str, Any]) -> None:
    print("\n(c) result detection: finished_at (server) to the client knowing, per way of following a job")
    print(f"{'method':<20}{'jobs':>6}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'requests/job':>14}")
    for name, s in c["detect_ms"].items():
        print(f"{name:<20}{s['n']:>6}{s['p50']:>9.1f}{s['p95']:>9.1f}{s['max']:>9.1f}"
              f"{c['requests_per_job'][name]:>14.1f}")


def _print_overhead(a: dict[str, Any]) -> None:
    print(f"\n(a) per job, {len(a['jobs'])} sequential jobs (tiny, size {JOB_PARAMS['size']}, "
          f"{JOB_PARAMS['steps']} steps), poll {a['poll_interval_ms']:.0f} ms")
    print(f"engine time from {a['engine_time_source']}")
    print(f"{'ms':<24}{'p50':>9}{'p95':>9}{'mean':>9}{'max':>9}")
    for part, s in a["summary_ms"].items():
        print(f"{part:<24}{s['p50']:>9.1f}{s['p95']:>9.1f}{s['mean']:>9.1f}{s['max']:>9.1f}")


def _print_load(load: dict[str, Any]) -> None:
    print("\n(b) fixed offered load (open loop, latency from scheduled send time, no worker running)")
    print(f"{'request':<24}{'offered/s':>10}{'ok/s':>8}{'ok':>6}{'429':>6}{'other':>7}"
          f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, label in (("submit", "POST /v1/transfers"), ("get", "GET /v1/transfers/{id}")):
        s = load[name]
        lat = s["latency_ms"]
        other = s["sent"] - s["ok"] - s["rejected_429"]
        print(f"{label:<24}{s['offered_rps']:>10.0f}{s['achieved_rps']:>8.1f}{s['ok']:>6}{s['rejected_429']:>6}"
              f"{other:>7}{lat.get('p50', float('nan')):>9.1f}{lat.get('p95', float('nan')):>9.1f}"
              f"{lat.get('p99', float('nan')):>9.1f}{lat.get('max', float('nan')):>9.1f}")


def main(argv: list[str] | None = None) -> int:
    """Run the service benchmark; print a table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few jobs, short load phases: a smoke run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "service.json"), help="JSON output path")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="job polling interval in (a), ms (default 20)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with the servers' logs")
    parser.add_argument("--content", type=Path, default=CONTENT, help=f"content upload (default {CONTENT.name})")
    parser.add_argument("--style", type=Path, default=STYLE, help=f"style upload (default {STYLE.name})")
    parser.add_argument("--submit-rate", type=float, help="offered POST rate in (b), per second (default 50)")
    parser.add_argument("--skip-jobs", action="store_true", help="only the load phase (b); no worker")
    parser.add_argument("--submit-cpu", type=int, default=0, metavar="N",
                        help="(d): API CPU per submit of two 512² PNGs, over N submits (default: not run)")
    parser.add_argument("--submit-cpu-only", action="store_true", help="only phase (d) (N default 50)")
    args = parser.parse_args(argv)
    if args.poll_ms <= 0:
        parser.error("--poll-ms must be positive")
    plan = QUICK if args.quick else FULL
    if args.submit_rate is not None:
        if args.submit_rate <= 0:
            parser.error("--submit-rate must be positive")
        plan = dataclasses.replace(plan, submit_rate=args.submit_rate)
    files = read_files(args.content, args.style)
    began = time.monotonic()
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "plan": plan.__dict__,
        "uploads": {name: {"file": str(path), "bytes": path.stat().st_size}
                    for name, path in (("content", args.content), ("style", args.style))},
    }
    submit_cpu = args.submit_cpu or (50 if args.submit_cpu_only else 0)
    with running_stack(args.keep_logs) as stack:
        if submit_cpu:
            print(f"API CPU over {submit_cpu} submits of two 512² PNGs ...", file=sys.stderr)
            result["submit_cpu"] = bench_submit_cpu(stack, submit_cpu)
            clear_queue(stack)
        if not args.submit_cpu_only:
            print("load phase (API alone) ...", file=sys.stderr)
            result["load"] = asyncio.run(bench_load(stack, plan, files))
        if not args.skip_jobs and not args.submit_cpu_only:
            clear_queue(stack)
            print("starting the worker ...", file=sys.stderr)
            stack.start_worker()
            print(f"{plan.warmup_jobs + plan.jobs} sequential jobs ...", file=sys.stderr)
            result["overhead"] = bench_overhead(stack, plan, args.poll_ms / 1000.0, files)
            print(f"{3 * plan.jobs} jobs followed by poll, Prefer: wait and events ...", file=sys.stderr)
            result["detection"] = bench_detection(stack, plan, files)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    result["seconds"] = time.monotonic() - began
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
