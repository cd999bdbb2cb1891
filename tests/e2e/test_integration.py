"""What a product backend integrates with, over real HTTP against the live stack of conftest.py:
JSON submissions with images by URL or data: URI, output formats, server-sent events,
``Prefer: wait``, webhook events.

Image URLs are served by a loopback HTTP server in the test. The stack's own API refuses them
(``HAM_FETCH_ALLOW_PRIVATE`` is off there); a second ``ham api`` process on the same Redis,
storage and queue, with the allowance, fetches them (its jobs run on the stack's worker).
"""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import TENANTS, Stack, _start_api
from tests.fixtures.servers import free_port
from tests.fixtures.waiting import wait_until

DATA = Path(__file__).resolve().parents[1] / "data"
TERMINAL = {"succeeded", "failed", "canceled"}
FETCH_TIMEOUT = 2.0

pytestmark = pytest.mark.slow


def png(name: str) -> bytes:
    return (DATA / name).read_bytes()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


class ImageServer:
    """A loopback HTTP server with a few behaviours, by path: files, redirects, slow and huge bodies."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                elif self.path == "/slow.png":
                    # Headers at once, then a trickle: only a deadline over the whole fetch stops it.
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"\x89")
                            self.wfile.flush()
                            time.sleep(0.25)
                    except OSError:
                        pass
                elif self.path.startswith("/huge"):
                    self.send_response(200)
                    chunked = self.path == "/huge-chunked.png"
                    if not chunked:
                        self.send_header("Content-Length", str(5_000_000))
                    self.end_headers()
                    try:
                        for _ in range(5_000_000 // 65536 + 1):
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        pass
                elif self.path in server.files:
                    body = server.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(404)
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    server = ImageServer()
    server.files["/content.png"] = png("content0.png")
    server.files["/style.png"] = png("style0.png")
    server.redirects["/r1"] = "/r2"
    server.redirects["/r2"] = "/r3"
    server.redirects["/r3"] = "/content.png"
    server.redirects["/loop"] = "/loop"
    yield server
    server.close()


@pytest.fixture(scope="module")
def fetching_api(stack: Stack) -> Iterator[str]:
    """A second API on the stack's Redis, storage and queue that may fetch loopback URLs."""
    port = free_port()
    env = {**stack.env, "HAM_FETCH_ALLOW_PRIVATE": "true", "HAM_FETCH_TIMEOUT": str(FETCH_TIMEOUT)}
    workdir = stack.workdir / "fetching-api"
    workdir.mkdir(exist_ok=True)
    proc = _start_api(env, workdir, port)
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def client_for(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {TENANTS['alpha']}"}, timeout=60)


@pytest.fixture(scope="module")
def alpha(stack: Stack) -> Iterator[httpx.Client]:
    stack.ensure_one_worker()
    with stack.client("alpha") as client:
        yield client


def finished(client: httpx.Client, job_id: str, timeout: float = 90) -> dict[str, Any]:
    """The job once terminal, by long polls (``Prefer: wait``)."""
    def terminal() -> dict[str, Any] | None:
        job = client.get(f"/v1/transfers/{job_id}", headers={"Prefer": "wait=10"}).json()
        return job if job["status"] in TERMINAL else None

    return wait_until(terminal, timeout, f"job {job_id} to finish", interval=0)  # the long poll is the wait


def jobs_of_alpha(stack: Stack) -> int:
    """How many jobs tenant alpha ever had recorded (a worker taking queued jobs does not change it)."""
    return int(stack.redis.zcard("ham:tenant:alpha:jobs"))


def assert_error(response: httpx.Response, status: int, code: str, field: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == (code, field), error
    assert error["message"].startswith(f"{field}: "), error
    return error["message"]


# --- JSON bodies and URLs ------------------------------------------------------------------------


def test_json_submission_with_urls_runs_and_fetches_each_image_once(fetching_api: str, images: ImageServer,
                                                                    alpha: httpx.Client):
    before = len(images.requests)
    with client_for(fetching_api) as client:
        response = client.post("/v1/transfers", json={
            "content_url": images.url("/content.png"), "style_url": images.url("/style.png"), "steps": 3, "size": 64,
        })
        assert response.status_code == 202, response.text
        job = finished(client, response.json()["id"])
    assert job["status"] == "succeeded" and job["has_style"] is True and job["params"]["steps"] == 3
    assert sorted(images.requests[before:]) == ["/content.png", "/style.png"]


def test_json_submission_with_data_uris_and_a_prompt(alpha: httpx.Client):
    response = alpha.post("/v1/transfers", json={
        "content_url": data_uri(png("content1.png")), "style_prompt": "ink wash", "steps": 2, "size": 64,
        "guidance": 3.0, "sini": False,
    })
    assert response.status_code == 202, response.text
    job = finished(alpha, response.json()["id"])
    assert job["status"] == "succeeded" and job["params"]["sini"] is False and job["style_prompt"] == "ink wash"


def test_loopback_urls_are_refused_without_the_allowance(stack: Stack, alpha: httpx.Client, images: ImageServer):
    before = len(images.requests)
    jobs_before = jobs_of_alpha(stack)
    message = assert_error(alpha.post("/v1/transfers", json={
        "content_url": images.url("/content.png"), "style_prompt": "ink", "steps": 2, "size": 64,
    }), 422, "invalid_url", "content_url")
    assert "loopback" in message and "HAM_FETCH_ALLOW_PRIVATE" in message
    assert_error(alpha.post("/v1/transfers", json={
        "content_url": data_uri(png("content0.png")), "style_url": images.url("/style.png"), "size": 64,
    }), 422, "invalid_url", "style_url")
    assert images.requests[before:] == []  # refused before any connection
    assert jobs_of_alpha(stack) == jobs_before


def test_three_redirects_are_followed_and_a_fourth_is_refused(fetching_api: str, images: ImageServer):
    with client_for(fetching_api) as client:
        ok = client.post("/v1/transfers", json={"content_url": images.url("/r1"), "style_prompt": "ink",
                                                "steps": 2, "size": 64})
        assert ok.status_code == 202, ok.text
        message = assert_error(client.post("/v1/transfers", json={
            "content_url": images.url("/loop"), "style_prompt": "ink"}), 422, "fetch_failed", "content_url")
    assert "more than 3 redirects" in message


@pytest.mark.parametrize("path", ["/huge.png", "/huge-chunked.png"])
def test_an_oversized_url_is_413_without_reading_it_all(fetching_api: str, images: ImageServer, path: str):
    with client_for(fetching_api) as client:
        assert_error(client.post("/v1/transfers", json={"content_url": images.url(path), "style_prompt": "ink"}),
                     413, "upload_too_large", "content_url")


def test_a_slow_url_is_422_within_the_fetch_timeout(fetching_api: str, images: ImageServer):
    with client_for(fetching_api) as client:
        began = time.monotonic()
        message = assert_error(client.post("/v1/transfers", json={
            "content_url": images.url("/slow.png"), "style_prompt": "ink"}), 422, "fetch_failed", "content_url")
        took = time.monotonic() - began
    assert f"within {FETCH_TIMEOUT:g}s" in message
    assert took < FETCH_TIMEOUT + 10  # the trickle would last 25 s


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        ({"content_url": "data:image/png;base64,@@@notbase64", "style_prompt": "ink"}, 422, "invalid_data_uri",
         "content_url"),
        ({"content_url": "data:image/png;base64", "style_prompt": "ink"}, 422, "invalid_data_uri", "content_url"),
        ({"content_url": "ftp://example.com/a.png", "style_prompt": "ink"}, 422, "invalid_url", "content_url"),
        ({"content_url": data_uri(b"not an image"), "style_prompt": "ink"}, 415, "unsupported_media_type",
         "content_url"),
        ({"style_prompt": "ink"}, 422, "missing_field", "content_url"),
        ({"content_url": data_uri(b"x"), "steps": "30", "style_prompt": "ink"}, 422, "invalid_parameter", "steps"),
        ({"content_url": data_uri(b"x"), "steps": None, "style_prompt": "ink"}, 422, "invalid_parameter", "steps"),
        ({"content_url": data_uri(b"x"), "output_format": "gif", "style_prompt": "ink"}, 422, "invalid_parameter",
         "output_format"),
        ({"content_url": data_uri(b"x"), "output_quality": 0, "style_prompt": "ink"}, 422, "invalid_parameter",
         "output_quality"),
        ({"content_url": data_uri(b"x"), "webhook_events": ["done"], "style_prompt": "ink"}, 422,
         "invalid_parameter", "webhook_events"),
        ({"content_url": data_uri(b"x"), "content": "x", "style_prompt": "ink"}, 422, "unknown_field", "content"),
    ],
)
def test_bad_json_submissions_are_4xx_naming_the_field(stack: Stack, alpha: httpx.Client, body, status, code, field):
    jobs_before = jobs_of_alpha(stack)
    response = alpha.post("/v1/transfers", json=body)
    assert response.status_code == status, response.text
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (code, field)
    assert jobs_of_alpha(stack) == jobs_before


def test_a_body_that_is_not_json_is_400(alpha: httpx.Client):
    response = alpha.post("/v1/transfers", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


# --- output formats ----------------------------------------------------------------------------


def _result(client: httpx.Client, **fields: Any) -> tuple[dict[str, Any], httpx.Response]:
    body = {"content_url": data_uri(png("content2.png")), "style_url": data_uri(png("style2.png")),
            "steps": 2, "size": 128, **fields}
    response = client.post("/v1/transfers", json=body, headers={"Prefer": "wait=60"})
    assert response.status_code == 202, response.text
    job = response.json() if response.json()["status"] in TERMINAL else finished(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    download = httpx.get(job["result_url"], timeout=30)
    assert download.status_code == 200
    return job, download


@pytest.mark.parametrize(("output_format", "content_type", "pillow"),
                         [("png", "image/png", "PNG"), ("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")])
def test_each_output_format_decodes_at_the_right_size(alpha: httpx.Client, output_format, content_type, pillow):
    job, download = _result(alpha, output_format=output_format)
    assert job["output_format"] == output_format
    assert download.headers["content-type"] == content_type
    with Image.open(io.BytesIO(download.content)) as image:
        assert image.format == pillow
        expected = Image.open(DATA / "content2.png").size
        scale = 128 / max(expected)
        assert max(image.size) == 128
        assert abs(image.size[0] - expected[0] * scale) <= 64 and abs(image.size[1] - expected[1] * scale) <= 64


def test_quality_changes_the_bytes_of_a_lossy_result(alpha: httpx.Client):
    _, low = _result(alpha, output_format="jpeg", output_quality=5, seed=7)
    _, high = _result(alpha, output_format="jpeg", output_quality=95, seed=7)
    assert len(low.content) < len(high.content)
    assert Image.open(io.BytesIO(low.content)).size == Image.open(io.BytesIO(high.content)).size


# --- live progress -------------------------------------------------------------------------------


def _events(client: httpx.Client, job_id: str, last_event_id: str | None = None,
            stop_after: int | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """``(event, id, job)`` of the stream until it ends (or ``stop_after`` events)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[tuple[str, str, dict[str, Any]]] = []
    current: dict[str, str] = {}
    with client.stream("GET", f"/v1/transfers/{job_id}/events", headers=headers, timeout=90) as stream:
        assert stream.status_code == 200, stream.read()
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line == "":
                if "data" in current:
                    events.append((current.get("event", "message"), current.get("id", ""),
                                   json.loads(current["data"])))
                    if stop_after is not None and len(events) >= stop_after:
                        return events
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                current[name] = value.removeprefix(" ")
    return events


def test_events_stream_progress_then_the_terminal_event_and_end(alpha: httpx.Client):
    job = alpha.post("/v1/transfers", json={"content_url": data_uri(png("content3.png")),
                                            "style_url": data_uri(png("style3.png")), "steps": 12, "size": 64}).json()
    results: dict[str, list] = {}

    def follow(name: str) -> None:
        results[name] = _events(alpha, job["id"])

    threads = [threading.Thread(target=follow, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for events in results.values():
        names = [name for name, _, _ in events]
        assert names[-1] == "succeeded" and set(names[:-1]) == {"progress"}, names
        progress = [data["progress"] for name, _, data in events if data["status"] == "running"]
        assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] > progress[0]
        ids = [int(event_id) for _, event_id, _ in events]
        assert ids == sorted(set(ids))  # versions rise, none repeated
        assert events[-1][2]["result_url"]
    # Both streams saw the same terminal version.
    assert results["first"][-1][1] == results["second"][-1][1]


def test_a_reconnect_with_last_event_id_resumes_after_it(alpha: httpx.Client):
    job = alpha.post("/v1/transfers", json={"content_url": data_uri(png("content0.png")), "style_prompt": "ink",
                                            "steps": 12, "size": 64}).json()
    first = _events(alpha, job["id"], stop_after=2)
    resumed = _events(alpha, job["id"], last_event_id=first[-1][1])
    assert all(int(event_id) > int(first[-1][1]) for _, event_id, _ in resumed)
    assert resumed[-1][0] == "succeeded"
    # A client that saw the terminal event is told not to reconnect (204 stops an EventSource).
    again = alpha.get(f"/v1/transfers/{job['id']}/events", headers={"Last-Event-ID": resumed[-1][1]})
    assert again.status_code == 204
    # A fresh connection to a finished job gets the terminal event alone, and the stream ends.
    assert [name for name, _, _ in _events(alpha, job["id"])] == ["succeeded"]


def test_events_of_another_tenants_job_are_404(stack: Stack, alpha: httpx.Client):
    job = alpha.post("/v1/transfers", json={"content_url": data_uri(png("content0.png")), "style_prompt": "ink",
                                            "steps": 2, "size": 64}).json()
    with stack.client("beta") as beta:
        assert beta.get(f"/v1/transfers/{job['id']}/events").status_code == 404


def test_prefer_wait_answers_when_the_job_finishes_not_after_n_seconds(alpha: httpx.Client):
    began = time.monotonic()
    response = alpha.post("/v1/transfers", json={"content_url": data_uri(png("content1.png")),
                                                 "style_prompt": "ink", "steps": 2, "size": 64},
                          headers={"Prefer": "wait=60"})
    took = time.monotonic() - began
    assert response.status_code == 202
    assert response.headers["Preference-Applied"] == "wait=60"
    assert response.json()["status"] == "succeeded" and response.json()["result_url"]
    assert took < 50  # it answered on completion, well before the 60 s
    # On GET too; without Prefer the answer is immediate.
    job_id = response.json()["id"]
    again = alpha.get(f"/v1/transfers/{job_id}", headers={"Prefer": "wait=5"})
    assert again.json()["status"] == "succeeded" and again.headers["Preference-Applied"] == "wait=5"


def test_prefer_wait_returns_the_job_as_it_stands_after_n_seconds(stack: Stack, alpha: httpx.Client):
    stack.stop_workers()  # nothing runs it: the wait must run out
    try:
        job = alpha.post("/v1/transfers", json={"content_url": data_uri(png("content1.png")),
                                                "style_prompt": "ink", "steps": 2, "size": 64}).json()
        began = time.monotonic()
        response = alpha.get(f"/v1/transfers/{job['id']}", headers={"Prefer": "wait=2"})
        assert response.json()["status"] == "queued"
        assert time.monotonic() - began >= 1.9
        capped = alpha.get(f"/v1/transfers/{job['id']}", headers={"Prefer": "wait=0, respond-async"})
        assert capped.headers["Preference-Applied"] == "wait=0"
    finally:
        stack.ensure_one_worker()
    assert finished(alpha, job["id"])["status"] == "succeeded"


# --- webhook events ------------------------------------------------------------------------------


class _Hooks(ThreadingHTTPServer):
    received: list[tuple[str, bytes, dict[str, str]]]


def _hook_server() -> _Hooks:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.server.received.append((self.headers["X-HAM-Event"], body, dict(self.headers)))  # type: ignore[attr-defined]
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = _Hooks(("127.0.0.1", free_port()), Handler)
    server.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_webhook_events_start_progress_and_completed_with_progress_throttled(alpha: httpx.Client):
    hooks = _hook_server()
    try:
        url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
        job = alpha.post("/v1/transfers", json={
            "content_url": data_uri(png("content2.png")), "style_prompt": "ink", "steps": 60, "size": 64,
            "webhook_url": url, "webhook_events": ["start", "progress", "completed"],
        }).json()
        final = finished(alpha, job["id"])
        wait_until(lambda: any(event == "completed" for event, _, _ in hooks.received), 30,
                   "the completed webhook", detail=lambda: str(hooks.received))
    finally:
        hooks.shutdown()
        hooks.server_close()
    events = [event for event, _, _ in hooks.received]
    assert events[0] == "start" and events[-1] == "completed"
    assert json.loads(hooks.received[-1][1])["status"] == "succeeded"
    # At most one progress webhook per second of the job's run (plus the first).
    started = final["started_at"]
    seconds = (_unix(final["finished_at"]) - _unix(started))
    assert events.count("progress") <= int(seconds) + 1, (events, seconds)


def test_default_webhook_events_are_completed_only(alpha: httpx.Client):
    hooks = _hook_server()
    try:
        url = f"http://127.0.0.1:{hooks.server_address[1]}/hook"
        job = alpha.post("/v1/transfers", json={"content_url": data_uri(png("content2.png")), "style_prompt": "ink",
                                                "steps": 3, "size": 64, "webhook_url": url}).json()
        finished(alpha, job["id"])
        wait_until(lambda: hooks.received, 30, "a webhook")
    finally:
        hooks.shutdown()
        hooks.server_close()
    assert [event for event, _, _ in hooks.received] == ["completed"]
    assert hooks.received[0][2]["X-HAM-Signature"]


def _unix(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
