"""``ham_client`` against the live stack of conftest.py: the calls, the retries, the waiting,
the typed models checked against the server's own ``/openapi.json``, webhook verification.

Where the server must misbehave (a 429 with ``Retry-After``, an events endpoint that is
down), a loopback proxy in front of the real API does it and forwards everything else.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from ham_client import (
    ApiError,
    AsyncClient,
    Client,
    Job,
    JobFailed,
    JobPage,
    RetryPolicy,
    WebhookSignatureError,
    verify_webhook,
)
from tests.e2e.conftest import TENANTS, WEBHOOK_SECRET, Stack
from tests.fixtures.servers import free_port
from tests.fixtures.waiting import wait_until

DATA = Path(__file__).resolve().parents[1] / "data"
QUICK = {"steps": 2, "size": 64}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ham(stack: Stack) -> Iterator[Client]:
    stack.ensure_one_worker()
    with Client(stack.base_url, api_key=TENANTS["alpha"]) as client:
        yield client


class Proxy:
    """Forwards to the API; answers the next ``refusals`` itself, and ``blocked`` paths with 502."""

    def __init__(self, upstream: str) -> None:
        self.refusals: list[tuple[int, dict[str, str]]] = []
        self.blocked: tuple[str, ...] = ()
        self.seen: list[tuple[float, str, str, dict[str, str]]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen.append((time.monotonic(), self.command, self.path, dict(self.headers)))
                if proxy.refusals:
                    status, headers = proxy.refusals.pop(0)
                    self._reply(status, headers, json.dumps({"error": {"code": "rate_limited",
                                                                       "message": "slow down"}}).encode())
                    return
                if self.path.split("?")[0].endswith(proxy.blocked) and proxy.blocked:
                    self._reply(502, {}, b"bad gateway")
                    return
                forwarded = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + self.path, headers=forwarded, content=body,
                                       timeout=90)
                headers = {k: v for k, v in answer.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                                "content-encoding")}
                self._reply(answer.status_code, headers, answer.content)

            do_GET = do_POST = _handle

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxy(stack: Stack) -> Iterator[Proxy]:
    server = Proxy(stack.base_url)
    yield server
    server.close()


def test_submit_wait_download_from_paths(ham: Client):
    job = ham.submit(DATA / "content0.png", style=DATA / "style0.png", **QUICK, output_format="webp")
    assert isinstance(job, Job) and job.status in ("queued", "running", "succeeded")
    done = ham.wait(job.id, timeout=90)
    assert done.status == "succeeded" and done.terminal
    with Image.open(io.BytesIO(ham.download(done))) as image:
        assert image.format == "WEBP" and max(image.size) == 64


def test_submit_bytes_pil_images_and_a_prompt(ham: Client):
    pil = Image.open(DATA / "content1.png").convert("RGB")
    job = ham.wait(ham.submit(pil, style=(DATA / "style1.png").read_bytes(), **QUICK).id, timeout=90)
    assert job.status == "succeeded" and job.has_style
    text = ham.wait(ham.submit((DATA / "content2.png").read_bytes(), style_prompt="ink wash", **QUICK).id, 90)
    assert text.style_prompt == "ink wash" and not text.has_style


def test_submit_by_data_uri_goes_as_json(ham: Client):
    uri = "data:image/png;base64," + __import__("base64").b64encode((DATA / "content3.png").read_bytes()).decode()
    job = ham.wait(ham.submit(uri, style=DATA / "style3.png", **QUICK).id, timeout=90)
    assert job.status == "succeeded"


def test_get_list_cancel_and_errors_are_typed(stack: Stack, ham: Client):
    # Two jobs of its own, so the listing has a second page whatever ran before (in any order).
    earlier = ham.submit(DATA / "content1.png", style_prompt="ink", **QUICK)
    job = ham.submit(DATA / "content0.png", style_prompt="ink", steps=400, size=64)
    assert ham.get(job.id).id == job.id
    page = ham.list(limit=1)
    assert isinstance(page, JobPage) and [item.id for item in page.items] == [job.id] and page.next_cursor
    assert ham.list(limit=1, cursor=page.next_cursor).items[0].id == earlier.id
    ham.cancel(job.id)
    assert ham.wait(job.id, timeout=90).status == "canceled"
    with pytest.raises(JobFailed):
        ham.download(ham.get(job.id))
    with pytest.raises(ApiError) as refused:
        ham.submit(DATA / "content0.png", style_prompt="ink", alpha=2)
    assert (refused.value.status, refused.value.code, refused.value.field) == (422, "invalid_parameter", "alpha")
    with pytest.raises(ApiError) as missing:
        ham.get("0" * 32)
    assert missing.value.status == 404


def test_an_explicit_idempotency_key_returns_the_same_job_for_the_same_request_only(ham: Client):
    key = f"client-order-{time.time_ns()}"
    first = ham.submit(DATA / "content0.png", style_prompt="ink", idempotency_key=key, **QUICK)
    second = ham.submit(DATA / "content0.png", style_prompt="ink", idempotency_key=key, **QUICK)
    assert second.id == first.id and second.style_prompt == "ink"
    with pytest.raises(ApiError) as reused:
        ham.submit(DATA / "content1.png", style_prompt="other", idempotency_key=key, **QUICK)
    assert (reused.value.status, reused.value.code, reused.value.field) == (409, "idempotency_key_reused",
                                                                           "Idempotency-Key")


def test_a_429_is_retried_after_retry_after_with_the_same_idempotency_key(proxy: Proxy):
    proxy.refusals = [(429, {"Retry-After": "2"})]
    with Client(proxy.url, api_key=TENANTS["alpha"]) as client:
        job = client.submit(DATA / "content0.png", style_prompt="ink", **QUICK)
    posts = [(at, headers) for at, method, path, headers in proxy.seen if method == "POST"]
    assert len(posts) == 2
    waited = posts[1][0] - posts[0][0]
    assert waited >= 2.0, waited  # Retry-After honoured (measured)
    keys = {headers["Idempotency-Key"] for _, headers in posts}
    assert len(keys) == 1 and keys.pop().startswith("ham-client-")
    assert job.status in ("queued", "running", "succeeded")


def test_retries_give_up_after_the_policy_and_raise_the_api_error(proxy: Proxy):
    proxy.refusals = [(503, {"Retry-After": "0"})] * 3
    with Client(proxy.url, api_key=TENANTS["alpha"], retry=RetryPolicy(max_retries=2)) as client, \
            pytest.raises(ApiError) as refused:
        client.get("0" * 32)
    assert refused.value.status == 503
    assert len(proxy.seen) == 3


def test_wait_falls_back_to_polling_when_the_event_stream_is_unavailable(proxy: Proxy, ham: Client):
    proxy.blocked = ("/events",)
    with Client(proxy.url, api_key=TENANTS["alpha"]) as client:
        job = client.submit(DATA / "content0.png", style_prompt="ink", **QUICK)
        done = client.wait(job.id, timeout=90)
    assert done.status == "succeeded"
    paths = [path for _, _, path, _ in proxy.seen]
    assert any(path.endswith("/events") for path in paths)
    assert any(path == f"/v1/transfers/{job.id}" for path in paths)


def test_the_async_client_has_the_same_calls(stack: Stack):
    async def run() -> tuple[Job, bytes, JobPage]:
        async with AsyncClient(stack.base_url, api_key=TENANTS["alpha"]) as client:
            job = await client.submit(DATA / "content1.png", style=DATA / "style2.png", **QUICK,
                                      output_format="jpeg", output_quality=70)
            done = await client.wait(job.id, timeout=90)
            return done, await client.download(done), await client.list(limit=1)

    done, data, page = asyncio.run(run())
    assert done.status == "succeeded" and done.output_quality == 70
    assert Image.open(io.BytesIO(data)).format == "JPEG"
    assert page.items[0].id == done.id


def test_the_client_models_match_the_servers_openapi(stack: Stack):
    schema = httpx.get(f"{stack.base_url}/openapi.json").json()["components"]["schemas"]
    for model, name in ((Job, "TransferJob"), (JobPage, "TransferList")):
        server = schema[name]
        ours = model.model_json_schema()
        assert set(ours["properties"]) == set(server["properties"]), name
        assert set(ours.get("required", [])) <= set(server["required"]), name
        for field in server["required"]:
            assert field in ours["properties"], (name, field)
    # Every status the server may send parses.
    status = schema["TransferJob"]["properties"]["status"]["enum"]
    assert set(status) == set(Job.model_json_schema()["properties"]["status"]["enum"])


def test_verify_webhook_accepts_a_real_delivery_and_refuses_a_tampered_one(ham: Client):
    received: list[tuple[bytes, dict[str, str]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.rfile.read(int(self.headers["Content-Length"])), dict(self.headers)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        job = ham.submit(DATA / "content0.png", style_prompt="ink", **QUICK,
                         webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook")
        wait_until(lambda: received, 60, "a webhook")
    finally:
        server.shutdown()
        server.server_close()
    body, headers = received[0]
    delivered = verify_webhook(body, headers, WEBHOOK_SECRET)
    assert delivered.id == job.id and delivered.status == "succeeded"
    with pytest.raises(WebhookSignatureError):
        verify_webhook(body.replace(b"succeeded", b"failed"), headers, WEBHOOK_SECRET)
    with pytest.raises(WebhookSignatureError):
        verify_webhook(body, headers, "another-secret")
    with pytest.raises(WebhookSignatureError):
        verify_webhook(body, headers, WEBHOOK_SECRET, now=time.time() + 3600)


def test_the_style_library_from_both_clients_and_the_command_line(stack: Stack, ham: Client):
    style = ham.create_style(DATA / "style1.png", name="house")
    assert (style.name, style.has_image, ham.get_style(style.id).id) == ("house", True, style.id)
    assert style.id in [s.id for s in ham.list_styles(limit=100).items]
    # Several styles in one submit: an uploaded image, then the library style; one result each.
    job = ham.submit(DATA / "content0.png", style=[DATA / "style0.png"], style_id=style.id, **QUICK)
    done = ham.wait(job.id, timeout=300)
    assert (done.status, done.style_count, done.style_ids, len(done.result_urls or [])) == (
        "succeeded", 2, [style.id], 2)
    ham.delete_style(style.id)
    with pytest.raises(ApiError) as gone:
        ham.get_style(style.id)
    assert gone.value.status == 404

    async def run() -> tuple[str, list[str], int]:
        async with AsyncClient(stack.base_url, api_key=TENANTS["alpha"]) as client:
            made = await client.create_style(style_prompt="ink wash", name="async")
            listed = [s.id for s in (await client.list_styles(limit=100)).items]
            await client.delete_style(made.id)
            with pytest.raises(ApiError) as missing:
                await client.get_style(made.id)
            return made.id, listed, missing.value.status

    made, listed, status = asyncio.run(run())
    assert made in listed and status == 404

    command = [sys.executable, "-m", "ham_cli", "styles"]
    where = ["--api", stack.base_url, "--key", TENANTS["alpha"]]
    created = subprocess.run([*command, "create", str(DATA / "style2.png"), "--name", "cli", *where],
                             capture_output=True, text=True, timeout=60)
    assert created.returncode == 0, created.stderr
    made = json.loads(created.stdout)
    listing = subprocess.run([*command, "list", "--limit", "100", *where], capture_output=True, text=True, timeout=60)
    assert made["id"] in [json.loads(line)["id"] for line in listing.stdout.splitlines()]
    deleted = subprocess.run([*command, "delete", made["id"], *where], capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"deleted": made["id"]}
    again = subprocess.run([*command, "get", made["id"], *where], capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "HTTP 404" in again.stderr
