"""End to end over real HTTP: the API and worker processes of ``tests/e2e/conftest.py``.

Small images (64 px) and few steps, except where a job must still be running when the
test acts on it (cancel, kill, SIGTERM): those use many steps and act as soon as the job
reports progress.
"""

from __future__ import annotations

import io
import json
import signal
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from ham_core.webhooks import SIGNATURE_HEADER, verify
from tests.e2e.conftest import E2E_RECORD_BYTES, WEBHOOK_SECRET, Stack
from tests.fixtures.servers import free_port
from tests.fixtures.waiting import wait_until

DATA = Path(__file__).resolve().parents[1] / "data"
TERMINAL = {"succeeded", "failed", "canceled"}
QUICK = {"steps": "3", "size": "64"}
# Enough steps that a 64 px job runs for seconds on one CPU thread.
LONG = {"steps": "400", "size": "64"}

pytestmark = pytest.mark.slow


def png(name: str) -> bytes:
    return (DATA / name).read_bytes()


def submit(
    client: httpx.Client,
    content: bytes | None = None,
    style: bytes | None = None,
    style_prompt: str | None = None,
    headers: dict[str, str] | None = None,
    use_style: bool = True,
    **fields: str,
) -> httpx.Response:
    files: dict[str, Any] = {"content": ("content.png", content or png("content0.png"), "image/png")}
    if use_style:
        files["style"] = ("style.png", style or png("style0.png"), "image/png")
    data = dict(QUICK)
    data.update(fields)
    if style_prompt is not None:
        data["style_prompt"] = style_prompt
    return client.post("/v1/transfers", files=files, data=data, headers=headers or {})


def submitted(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(client: httpx.Client, job_id: str, until: set[str], timeout: float = 60) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        last.update(client.get(f"/v1/transfers/{job_id}").json())
        return dict(last) if last["status"] in until else None

    return wait_until(reached, timeout, f"job {job_id} to reach {until}", detail=lambda: str(last))


def wait_running_with_progress(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def progressing() -> dict[str, Any] | None:
        last.update(client.get(f"/v1/transfers/{job_id}").json())
        return dict(last) if last["status"] == "running" and last["progress"] > 0 else None

    def still_pending() -> None:
        assert last["status"] in ("queued", "running"), last

    return wait_until(
        progressing, timeout, f"job {job_id} to make progress", interval=0.02, check=still_pending,
        detail=lambda: str(last),
    )


def download_png(url: str) -> Image.Image:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


@pytest.fixture
def alpha(stack: Stack) -> httpx.Client:
    stack.ensure_one_worker()
    with stack.client("alpha") as client:
        yield client


# --- the happy path ---------------------------------------------------------------------


def test_image_guided_job_goes_queued_running_succeeded_and_its_png_downloads(stack: Stack, alpha: httpx.Client):
    response = submit(alpha, steps="40")
    job = submitted(response)
    assert response.headers["location"] == f"/v1/transfers/{job['id']}"
    assert job["status"] == "queued" and job["progress"] == 0.0
    assert job["params"]["steps"] == 40 and job["has_style"] is True

    seen: list[tuple[str, float]] = []
    deadline = time.monotonic() + 60
    while not seen or seen[-1][0] not in TERMINAL:
        current = alpha.get(f"/v1/transfers/{job['id']}").json()
        seen.append((current["status"], current["progress"]))
        assert time.monotonic() < deadline, seen[-5:]
        time.sleep(0.01)
    statuses = [s for s, _ in seen]
    running = [p for s, p in seen if s == "running"]
    assert statuses[-1] == "succeeded"
    assert "running" in statuses
    # Progress rises step by step while running, never backwards.
    assert len(set(running)) >= 3 and running == sorted(running)
    assert all(0.0 <= p < 1.0 for p in running)

    final = alpha.get(f"/v1/transfers/{job['id']}").json()
    assert final["progress"] == 1.0 and final["error"] is None
    assert final["started_at"] and final["finished_at"] and final["queue_position"] is None
    image = download_png(final["result_url"])
    assert image.size == (64, 64)


def test_text_guided_job_succeeds_without_a_style_image(alpha: httpx.Client):
    job = submitted(submit(alpha, use_style=False, style_prompt="an ink wash painting"))
    assert job["has_style"] is False and job["style_prompt"] == "an ink wash painting"
    final = wait_for(alpha, job["id"], TERMINAL)
    assert final["status"] == "succeeded", final
    assert download_png(final["result_url"]).size == (64, 64)


def test_recorded_teachers_run_in_the_worker_within_its_record_budget(stack: Stack, alpha: httpx.Client):
    job = submitted(submit(alpha, inversion="source", teachers="recorded"))
    assert wait_for(alpha, job["id"], TERMINAL)["status"] == "succeeded"
    stats = json.loads(stack.redis.hget(f"ham:job:{job['id']}", "stats"))
    assert stats["teachers"] == {"content_teacher": "recorded", "style_teacher": "recorded"}
    assert stats["record_budget_bytes"] == E2E_RECORD_BYTES  # HAM_RECORD_BYTES reached the engine
    assert 0 < stats["record_bytes"] <= E2E_RECORD_BYTES
    assert stats["unet_rows"] == 3 * int(QUICK["steps"]) + 2


def test_tampered_result_url_is_refused(alpha: httpx.Client):
    final = wait_for(alpha, submitted(submit(alpha))["id"], TERMINAL)
    url = final["result_url"]
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    assert httpx.get(tampered, timeout=10).status_code == 403


def test_same_idempotency_key_returns_the_same_job_and_runs_it_once(stack: Stack, alpha: httpx.Client):
    headers = {"Idempotency-Key": f"order-{time.time_ns()}"}
    first = submit(alpha, headers=headers)
    second = submit(alpha, headers=headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["id"] == first.json()["id"]
    reused = submit(alpha, headers=headers, steps="5")  # the key with another request: a client bug
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"
    final = wait_for(alpha, first.json()["id"], TERMINAL)
    assert final["status"] == "succeeded" and final["params"]["steps"] == 3
    listed = [j["id"] for j in alpha.get("/v1/transfers", params={"limit": 100}).json()["items"]]
    assert listed.count(first.json()["id"]) == 1


# --- cancel -----------------------------------------------------------------------------


def test_cancel_while_queued_never_runs_and_cancel_while_running_stops_at_a_step(stack: Stack, alpha: httpx.Client):
    # The single worker is busy with `running`, so `waiting` stays queued behind it.
    running = submitted(submit(alpha, **LONG))
    waiting = submitted(submit(alpha))
    wait_running_with_progress(alpha, running["id"])
    queued = alpha.get(f"/v1/transfers/{waiting['id']}").json()
    assert queued["status"] == "queued" and queued["queue_position"] == 0

    canceled = alpha.post(f"/v1/transfers/{waiting['id']}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"

    stop = alpha.post(f"/v1/transfers/{running['id']}/cancel")
    assert stop.status_code == 200 and stop.json()["status"] in ("running", "canceled")
    final = wait_for(alpha, running["id"], TERMINAL, timeout=20)
    assert final["status"] == "canceled" and final["progress"] < 0.99 and final["result_url"] is None

    # The queued one never started, even once the worker has run a job queued behind it.
    assert wait_for(alpha, submitted(submit(alpha))["id"], TERMINAL, timeout=30)["status"] == "succeeded"
    never = alpha.get(f"/v1/transfers/{waiting['id']}").json()
    assert never["status"] == "canceled" and never["started_at"] is None
    assert alpha.post(f"/v1/transfers/{waiting['id']}/cancel").status_code == 409


def test_cancel_of_a_finished_job_is_409(alpha: httpx.Client):
    final = wait_for(alpha, submitted(submit(alpha))["id"], TERMINAL)
    response = alpha.post(f"/v1/transfers/{final['id']}/cancel")
    assert response.status_code == 409
    assert response.json()["error"]["code"]


# --- tenancy ------------------------------------------------------------------------------


def test_another_tenants_job_is_404_and_absent_from_its_list(stack: Stack, alpha: httpx.Client):
    job = submitted(submit(alpha))
    with stack.client("beta") as beta:
        assert beta.get(f"/v1/transfers/{job['id']}").status_code == 404
        assert beta.post(f"/v1/transfers/{job['id']}/cancel").status_code == 404
        assert job["id"] not in [j["id"] for j in beta.get("/v1/transfers").json()["items"]]
    assert job["id"] in [j["id"] for j in alpha.get("/v1/transfers", params={"limit": 100}).json()["items"]]
    wait_for(alpha, job["id"], TERMINAL)


# --- bad input ----------------------------------------------------------------------------


def _big_png(width: int, height: int) -> bytes:
    # A flat image compresses to almost nothing, so it passes the byte limit and hits the pixel limit.
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise_bytes(n: int) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * (n // 256 + 1))[:n]


def _truncated_png() -> bytes:
    data = png("content1.png")
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    # A valid PNG header claiming 30000 x 30000 pixels; the body is never reached.
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_key", 401),
        ("wrong_key", 401),
        ("not_an_image", 415),
        ("gif", 415),
        ("truncated", 422),
        ("too_many_bytes", 413),
        ("too_many_pixels", 413),
        ("bomb_header", 413),
        ("alpha_out_of_range", 422),
        ("size_not_multiple", 422),
        ("unknown_field", 422),
        ("no_content", 422),
        ("no_style_at_all", 422),
        ("bad_webhook_scheme", 422),
    ],
)
def test_bad_input_gets_its_4xx_and_the_service_stays_healthy(stack: Stack, case: str, expected: int):
    with stack.client("alpha") as client, stack.client(None) as anonymous:
        gif = io.BytesIO()
        Image.new("RGB", (8, 8)).save(gif, format="GIF")
        response = {
            "no_key": lambda: submit(anonymous),
            "wrong_key": lambda: submit(anonymous, headers={"Authorization": "Bearer nope"}),
            "not_an_image": lambda: submit(client, content=b"hello, this is text"),
            "gif": lambda: submit(client, content=gif.getvalue()),
            "truncated": lambda: submit(client, content=_truncated_png()),
            "too_many_bytes": lambda: submit(client, content=_noise_bytes(1_200_000)),
            "too_many_pixels": lambda: submit(client, content=_big_png(1100, 1000)),
            "bomb_header": lambda: submit(client, content=_bomb_png()),
            "alpha_out_of_range": lambda: submit(client, alpha="2.5"),
            "size_not_multiple": lambda: submit(client, size="100"),
            "unknown_field": lambda: submit(client, alhpa="0.5"),
            "no_content": lambda: client.post(
                "/v1/transfers", files={"style": ("s.png", png("style0.png"), "image/png")}, data=QUICK
            ),
            "no_style_at_all": lambda: submit(client, use_style=False),
            "bad_webhook_scheme": lambda: submit(client, webhook_url="ftp://example.com/hook"),
        }[case]()
        assert response.status_code == expected, response.text
        body = response.json()
        assert body["error"]["code"] and body["error"]["message"]
        if case in ("alpha_out_of_range", "size_not_multiple"):
            assert body["error"]["field"] == case.split("_")[0]
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_service_still_runs_jobs_after_bad_input(alpha: httpx.Client):
    assert submit(alpha, content=_truncated_png()).status_code == 422
    final = wait_for(alpha, submitted(submit(alpha))["id"], TERMINAL)
    assert final["status"] == "succeeded"


# --- webhooks -----------------------------------------------------------------------------


class _Hooks:
    def __init__(self) -> None:
        self.received: list[tuple[bytes, str]] = []
        self.event = threading.Event()


def _hook_server(hooks: _Hooks) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hooks.received.append((body, self.headers.get(SIGNATURE_HEADER, "")))
            hooks.event.set()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_webhook_is_posted_on_success_with_a_valid_signature(alpha: httpx.Client):
    hooks = _Hooks()
    server = _hook_server(hooks)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        job = submitted(submit(alpha, webhook_url=url))
        assert hooks.event.wait(60), "no webhook arrived"
        body, header = hooks.received[0]
        assert verify(WEBHOOK_SECRET, body, header)
        assert not verify("another-secret", body, header)
        payload = json.loads(body)
        assert payload["id"] == job["id"] and payload["status"] == "succeeded"
        assert download_png(payload["result_url"]).size == (64, 64)
    finally:
        server.shutdown()
        server.server_close()


# --- worker faults ------------------------------------------------------------------------


def test_sigkilled_worker_job_is_retried_by_another_worker_and_finishes(stack: Stack, alpha: httpx.Client):
    victim = stack.ensure_one_worker()
    job = submitted(submit(alpha, steps="60"))
    first = wait_running_with_progress(alpha, job["id"])
    victim.send(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    killed_at = time.monotonic()
    # Nobody alive: the job still says running (nothing can know yet)...
    assert alpha.get(f"/v1/transfers/{job['id']}").json()["status"] == "running"
    # ...until a worker starts, notices the dead heartbeat and re-queues the job before taking work.
    stack.start_worker()
    final = wait_for(alpha, job["id"], TERMINAL, timeout=60)
    assert final["status"] == "succeeded", final
    assert final["started_at"] > first["started_at"]
    assert stack.redis.hget(f"ham:job:{job['id']}", "attempts") == b"2"
    # Bounded: dead-worker detection is a few heartbeats, not RQ's job timeout.
    assert time.monotonic() - killed_at < 60


def test_job_of_a_worker_killed_on_its_last_allowed_attempt_fails_worker_lost(stack: Stack, alpha: httpx.Client):
    # HAM_JOB_MAX_RETRIES=1: the second lost run is the last. Each replacement worker is
    # started while the job still runs elsewhere, so it recovers the job from its
    # background heartbeat pass (not only at start-up).
    first = stack.ensure_one_worker()
    job = submitted(submit(alpha, steps="1000", size="64"))
    started = wait_running_with_progress(alpha, job["id"])
    second = stack.start_worker()  # idle: the queue is empty
    first.send(signal.SIGKILL)
    first.proc.wait(timeout=10)
    wait_until(
        lambda: stack.redis.hget(f"ham:job:{job['id']}", "worker") == second.name.encode(), 30,
        "the second worker to recover the job", detail=lambda: str(alpha.get(f"/v1/transfers/{job['id']}").json()),
    )
    retried = wait_running_with_progress(alpha, job["id"])
    assert retried["started_at"] > started["started_at"]
    third = stack.start_worker()
    second.send(signal.SIGKILL)
    second.proc.wait(timeout=10)
    final = wait_for(alpha, job["id"], TERMINAL, timeout=30)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "worker_lost"
    assert "stopped responding" in final["error"]["message"]
    assert third.alive


def test_worker_serves_prometheus_metrics_and_readiness(stack: Stack, alpha: httpx.Client):
    worker = stack.ensure_one_worker()
    wait_for(alpha, submitted(submit(alpha))["id"], TERMINAL)
    base = f"http://127.0.0.1:{worker.metrics_port}"
    assert httpx.get(f"{base}/readyz").status_code == 200
    text = httpx.get(f"{base}/metrics").text
    assert 'ham_worker_job_seconds_count{outcome="succeeded"}' in text
    assert "ham_worker_steps_per_second" in text and "ham_worker_style_cache_hits_total" in text
    assert "ham_worker_device_memory_bytes" in text and "ham_worker_jobs_in_progress 0.0" in text


def test_sigterm_is_a_warm_shutdown_the_running_job_finishes_first(stack: Stack, alpha: httpx.Client):
    worker = stack.ensure_one_worker()
    job = submitted(submit(alpha, steps="80"))
    wait_running_with_progress(alpha, job["id"])
    worker.send(signal.SIGTERM)
    assert worker.proc.wait(timeout=60) == 0
    final = alpha.get(f"/v1/transfers/{job['id']}").json()
    assert final["status"] == "succeeded", final
    assert "warm shut down" in worker.log.read_text()


def test_webhook_is_posted_when_a_queued_job_is_canceled(alpha: httpx.Client):
    # Canceled while queued: no worker runs it, yet its webhook must still arrive (sent by a worker's dispatcher).
    hooks = _Hooks()
    server = _hook_server(hooks)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        blocker = submitted(submit(alpha, **LONG))
        waiting = submitted(submit(alpha, webhook_url=url))
        assert alpha.post(f"/v1/transfers/{waiting['id']}/cancel").json()["status"] == "canceled"
        assert hooks.event.wait(60), "no webhook arrived for the canceled job"
        body, header = hooks.received[0]
        assert verify(WEBHOOK_SECRET, body, header)
        payload = json.loads(body)
        assert payload["id"] == waiting["id"] and payload["status"] == "canceled"
        alpha.post(f"/v1/transfers/{blocker['id']}/cancel")
        wait_for(alpha, blocker["id"], TERMINAL, timeout=30)
    finally:
        server.shutdown()
        server.server_close()


def test_an_idle_worker_stays_up_and_then_runs_a_job(stack: Stack, alpha: httpx.Client):
    # Regression: with webhooks on, an idle worker used to quit on redis-py's 5 s socket timeout.
    worker = stack.ensure_one_worker()
    # Not a fixed sleep: Redis itself shows the worker's dequeue blocked past redis-py's 5 s socket timeout.
    blocking = {"blpop", "blmove", "brpop", "brpoplpush"}

    def alive() -> None:
        assert worker.alive, f"idle worker exited with {worker.proc.returncode}"

    wait_until(
        lambda: any(c["cmd"] in blocking and int(c["idle"]) >= 6 for c in stack.redis.client_list()),
        30, "the idle worker's dequeue to block for 6 s", check=alive,
    )
    alive()
    final = wait_for(alpha, submitted(submit(alpha))["id"], TERMINAL)
    assert final["status"] == "succeeded"
