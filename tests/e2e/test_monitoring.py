"""Dashboards, alerts and logs against a live stack and a real Prometheus (Debian's package).

One stack (real Redis, ``ham api``, ``ham worker`` on the tiny model) with ``HAM_LOG_FORMAT=json``;
a ``prometheus`` process scrapes the API and the worker every second and evaluates
deploy/prometheus/alerts.yml. After a few jobs, every dashboard query and every alert
expression must evaluate without error through the Prometheus HTTP API, and the panels that
describe what just happened must return series. The logs of the same run must be JSON lines
carrying the request, job and tenant ids. Bounded: a few 64 px jobs, 1 s scrapes.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.e2e.conftest import REPO, TENANTS, Stack, run_stack
from tests.fixtures.servers import free_port, log_tail, terminate
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.slow

DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "ham.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DATA = REPO / "tests" / "data"
# Grafana's variables, as Grafana would expand them for a short time range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "${__rate_interval}": "1m"}
# The one target that may be empty after this run: the engine reports no content-trajectory cache
# (yet), so its hit rate is 0/0. Every other target must return a series with a finite value.
MAY_BE_EMPTY = {("Cache hit rates", "B")}
CLIENT_REQUEST_ID = "e2e-trace.42/attempt-1"
QUICK = {"steps": "3", "size": "64"}


class Prometheus:
    """A ``prometheus`` process on a free loopback port."""

    def __init__(self, workdir: Path, targets: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is missing: apt-get install prometheus (.ci/run does)"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT,
            )
        self.wait_for(lambda: httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200, "ready", 60)

    def wait_for(self, condition, what: str, timeout: float = 60) -> None:
        def running() -> None:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{log_tail(self.log)}")

        wait_until(
            condition, timeout, f"prometheus: {what}", interval=0.25,
            ignore=(httpx.HTTPError, KeyError, IndexError, ValueError), check=running,
            detail=lambda: log_tail(self.log),
        )

    def query(self, expr: str) -> list[dict]:
        """The instant vector of ``expr`` now; fails the test on any evaluation error."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] in ("vector", "scalar"), expr
        result = body["data"]["result"]
        return result if body["data"]["resultType"] == "vector" else [{"metric": {}, "value": result}]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else 0.0

    def stop(self) -> None:
        terminate(self.proc, 15)


@dataclass
class Observed:
    stack: Stack
    prometheus: Prometheus
    first_job_id: str
    long_polls: list[float] = field(default_factory=list)  # seconds each Prefer: wait read took


@pytest.fixture(scope="module")
def observed(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """The stack in JSON-log mode, a Prometheus scraping it, and a few finished jobs."""
    stacks = run_stack(redis_url, tmp_path_factory, HAM_LOG_FORMAT="json")
    stack = next(stacks)
    prometheus = None
    try:
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), {
            "ham-api": stack.base_url.removeprefix("http://"),
            "ham-worker": f"127.0.0.1:{stack.workers[0].metrics_port}",
        })
        prometheus.wait_for(lambda: prometheus.value("sum(up)") == 2, "scraping both targets")
        first_job_id, long_polls = run_jobs(stack)
        # Every job counted, then a few more scrapes so that rate() sees the increase.
        prometheus.wait_for(lambda: prometheus.value("sum(ham_worker_job_seconds_count)") >= 3, "seeing jobs")
        prometheus.wait_for(lambda: prometheus.value('max(ham_jobs_finished_total{outcome="succeeded"})') >= 3,
                            "seeing finished jobs")
        # Clients keep reading their jobs for a few scrapes (3 s at 5 requests/s): 64 px jobs finish
        # within one scrape interval, and rate() needs a series to change between two scrapes.
        with stack.client("alpha") as client:
            until = time.monotonic() + 3
            while time.monotonic() < until:
                assert client.get(f"/v1/transfers/{first_job_id}").status_code == 200
                time.sleep(0.2)
        seen = time.time()
        prometheus.wait_for(lambda: float(prometheus.query("ham_queue_depth")[0]["value"][0]) > seen + 2,
                            "scraping after the jobs")
        yield Observed(stack, prometheus, first_job_id, long_polls)
    finally:
        if prometheus is not None:
            prometheus.stop()
        stacks.close()


def follow_last_job(stack: Stack, job_id: str) -> tuple[list[threading.Thread], list[float]]:
    """Three long polls (``Prefer: wait=60``) and one event stream on ``job_id``, as clients waiting for it."""
    durations: list[float] = []

    def long_poll() -> None:
        with stack.client("alpha") as client:
            started = time.monotonic()
            response = client.get(f"/v1/transfers/{job_id}", headers={"Prefer": "wait=60"}, timeout=90)
            assert response.status_code == 200 and response.headers["Preference-Applied"] == "wait=60"
            durations.append(time.monotonic() - started)

    def stream() -> None:
        with stack.client("alpha") as client, client.stream("GET", f"/v1/transfers/{job_id}/events",
                                                           timeout=90) as events:
            for line in events.iter_lines():
                if line.startswith("event: succeeded"):
                    break

    threads = [threading.Thread(target=target, daemon=True) for target in (long_poll, long_poll, long_poll, stream)]
    for thread in threads:
        thread.start()
    return threads, durations


def run_jobs(stack: Stack) -> tuple[str, list[float]]:
    """Three quick jobs, one refused request, and clients long-polling and streaming the last job.

    Returns the id of the first job (sent with an X-Request-ID) and the long polls' durations.
    """
    content = [(DATA / f"content{i}.png").read_bytes() for i in range(3)]
    style = (DATA / "style0.png").read_bytes()
    with stack.client("alpha") as client:
        ids = []
        # Two jobs with the same style image (a style-cache miss, then a hit) and a text-only style.
        for i, files in enumerate(({"style": ("s.png", style, "image/png")}, {"style": ("s.png", style, "image/png")},
                                   {})):
            data = {**QUICK, **({} if files else {"style_prompt": "an ink drawing"})}
            headers = {"X-Request-ID": CLIENT_REQUEST_ID} if i == 0 else {}
            response = client.post("/v1/transfers", data=data, headers=headers,
                                   files={"content": ("c.png", content[i], "image/png"), **files})
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        waiting, long_polls = follow_last_job(stack, ids[-1])
        assert client.post("/v1/transfers", data={"alpha": "2"}, files={
            "content": ("c.png", content[0], "image/png"), "style": ("s.png", style, "image/png")}).status_code == 422
        def finished(job_id: str) -> dict | None:
            job = client.get(f"/v1/transfers/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed") else None

        for job_id in ids:
            job = wait_until(lambda job_id=job_id: finished(job_id), 120, f"job {job_id} to finish", interval=0.1)
            assert job["status"] == "succeeded", job
        for thread in waiting:
            thread.join(timeout=60)
        assert len(long_polls) == 3, "a long poll did not come back"
    return ids[0], long_polls


def dashboard_targets() -> list[tuple[str, str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr.replace("{{", ""), f"unexpanded Grafana variable in {expr}"
            out.append((panel["title"], target["refId"], expr))
    return out


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


# --- dashboard and alerts ------------------------------------------------------------------------


def test_every_dashboard_query_evaluates_and_the_live_panels_have_data(observed) -> None:
    prometheus = observed.prometheus
    empty = []
    for title, ref, expr in dashboard_targets():
        result = prometheus.query(expr)  # asserts success
        finite = [s for s in result if math.isfinite(float(s["value"][1]))]
        if (title, ref) not in MAY_BE_EMPTY and not finite:
            empty.append(f"{title} [{ref}]: {expr}")
    assert not empty, "panels without data after a few jobs:\n" + "\n".join(empty)


def test_dashboard_series_say_what_happened(observed) -> None:
    """Not only some data: the right numbers for three 3-step jobs, one of them a style-cache hit."""
    prometheus = observed.prometheus
    assert prometheus.value("sum(ham_worker_ready)") == 1
    assert prometheus.value("max(ham_queue_depth)") == 0
    assert prometheus.value('max(ham_jobs_finished_total{outcome="succeeded"})') == 3
    assert prometheus.value("sum(ham_worker_steps_total)") == 9
    assert prometheus.value("sum(ham_worker_unet_rows_per_job_count)") == 3
    assert prometheus.value("sum(ham_worker_style_cache_hits_total)") == 1
    assert prometheus.value("sum(ham_worker_style_cache_misses_total)") == 1
    assert prometheus.value('sum(ham_http_requests_total{route="/v1/transfers",method="POST",status="422"})') == 1


def test_the_latency_panel_is_the_short_request_latency_while_clients_long_poll(observed) -> None:
    """Three long polls and an event stream ran: counted as requests, but not in the p50/p95 panel."""
    prometheus = observed.prometheus
    route = 'route="/v1/transfers/{job_id}",method="GET"'
    assert prometheus.value('sum(ham_http_long_request_duration_seconds_count{kind="wait"})') == 3
    assert prometheus.value('sum(ham_http_long_request_duration_seconds_count{kind="stream"})') == 1
    reads = prometheus.value(f"sum(ham_http_requests_total{{{route}}})")
    short = prometheus.value(f"sum(ham_http_request_duration_seconds_count{{{route}}})")
    assert reads == short + 3
    # The panel's own p95, over a window that holds the whole run.
    (expr,) = [e.replace("[1m]", "[10m]") for title, ref, e in dashboard_targets()
               if title == "API latency p50 / p95" and ref == "B"]
    p95 = prometheus.value(expr)
    assert math.isfinite(p95)
    if min(observed.long_polls) > 1.0:  # the polls really waited: the panel must not show them
        assert p95 < min(observed.long_polls), (p95, observed.long_polls)


def test_every_alert_rule_evaluates_without_error(observed) -> None:
    prometheus = observed.prometheus
    rules = alert_rules()
    for rule in rules:
        prometheus.query(rule["expr"])  # asserts success

    def all_evaluated() -> bool:
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        states = {r["name"]: r for g in groups for r in g["rules"]}
        return set(states) == {r["alert"] for r in rules} and all(r["health"] != "unknown" for r in states.values())

    prometheus.wait_for(all_evaluated, "evaluating every rule", 30)
    groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    unhealthy = {r["name"]: r.get("lastError") for g in groups for r in g["rules"] if r["health"] != "ok"}
    assert not unhealthy, unhealthy
    # A healthy stack after a few good jobs fires nothing.
    firing = [a for a in httpx.get(f"{prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
              if a["state"] == "firing"]
    assert not firing, firing


# --- logs ----------------------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{path.name}:{number} is not JSON: {line[:200]}")
    return records


def test_log_lines_are_json_with_the_request_job_and_tenant(observed) -> None:
    stack, job_id = observed.stack, observed.first_job_id
    api = json_lines(stack.workdir / "api.log")
    worker = json_lines(stack.workers[0].log)
    assert api and worker
    for record in api + worker:
        assert {"ts", "level", "logger", "message", "process", "request_id", "job_id", "tenant"} <= set(record)
    queued = [r for r in api if r["job_id"] == job_id and "queued" in r["message"]]
    assert queued and all((r["request_id"], r["tenant"]) == (CLIENT_REQUEST_ID, "alpha") for r in queued), queued
    access = [r for r in api if r["logger"] == "uvicorn.access" and r["request_id"] == CLIENT_REQUEST_ID]
    assert access and "POST /v1/transfers" in access[0]["message"], "uvicorn's access line carries the id too"
    of_job = [r for r in worker if r["job_id"] == job_id]
    assert any("started" in r["message"] for r in of_job) and any("succeeded" in r["message"] for r in of_job)
    assert all((r["request_id"], r["tenant"], r["process"]) == (CLIENT_REQUEST_ID, "alpha", "worker")
               for r in of_job), of_job
    # RQ's own lines about the job ("Job OK", the result's lifespan) carry the ids too.
    rq_lines = [r for r in of_job if r["logger"].startswith("rq.")]
    assert any("Job OK" in r["message"] for r in rq_lines), [r for r in worker if r["logger"].startswith("rq.")]


def test_logs_hold_no_api_key(observed) -> None:
    stack = observed.stack
    with stack.client(None) as anonymous:
        # A presented key that is wrong is never echoed into a log line either.
        assert anonymous.get("/v1/transfers", headers={"Authorization": "Bearer wrong-key-abcdef"}).status_code == 401
    text = (stack.workdir / "api.log").read_text() + stack.workers[0].log.read_text()
    for key in (*TENANTS.values(), "wrong-key-abcdef"):
        assert key not in text


def test_a_client_request_id_round_trips_and_a_bad_one_is_replaced(observed) -> None:
    stack = observed.stack
    with stack.client("alpha") as client:
        assert client.get("/v1/transfers", headers={"X-Request-ID": CLIENT_REQUEST_ID}).headers[
            "X-Request-ID"] == CLIENT_REQUEST_ID
        for bad in ("has space", "x" * 200, '"quoted"', "-leading-dash"):
            got = client.get("/healthz", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
            assert got != bad and len(got) == 32 and int(got, 16) >= 0
        first = client.get("/healthz").headers["X-Request-ID"]
        assert first != client.get("/healthz").headers["X-Request-ID"], "a fresh id per request"
