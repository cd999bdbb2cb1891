"""Adversarial clients against the real API: odd numbers, odd cursors, SSRF disguises, outages.

Each test pins a behaviour found by poking a running ``ham up`` as a hostile or careless client:
a clear 4xx for the client's mistake, 503 (never 500) while Redis or storage is down, recovery
afterwards, and ``ham submit`` failing in one line instead of a traceback.
"""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient

from ham_cli.main import main
from ham_core.config import Settings
from ham_core.webhooks import check_webhook_url
from service.api.app import create_app
from tests.fixtures.servers import RedisServer, free_port
from tests.fixtures.waiting import wait_until
from tests.service.test_api import make_settings
from tests.service.test_cli import LiveApi

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = "abuse-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _settings(tmp_path: Path, redis_url: str, **overrides) -> Settings:
    return make_settings(tmp_path, redis_url, **{"api_keys": f"abuser:{KEY}", **overrides})


@pytest.fixture
def client(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path, redis_url, webhook_secret="whsec"))) as test_client:
        yield test_client


def _files() -> dict:
    return {
        "content": ("content.png", (DATA / "content0.png").read_bytes(), "image/png"),
        "style": ("style.png", (DATA / "style0.png").read_bytes(), "image/png"),
    }


def _submit(client: TestClient, **fields: str):
    return client.post("/v1/transfers", headers=AUTH, files=_files(), data={"steps": "1", "size": "64", **fields})


# --- numbers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", "٤"),  # Arabic-Indic four: int() would take it as 4
        ("steps", "０４"),  # fullwidth digits
        ("seed", "1_000"),
        ("alpha", "١"),
        ("alpha", "0_5"),  # float() reads this as 5.0
        ("guidance", "７.５"),
    ],
)
def test_non_ascii_digits_and_underscores_are_not_numbers(client: TestClient, field: str, value: str) -> None:
    response = _submit(client, **{field: value})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_parameter" and error["field"] == field
    assert "must be a" in error["message"]


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-Infinity", "1e309"])
def test_nan_infinite_and_overflowing_floats_are_refused_by_range(client: TestClient, value: str) -> None:
    response = _submit(client, alpha=value)
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("alpha: must be in [0.0, 1.0], got ")


@pytest.mark.parametrize(("value", "stored"), [(".5", 0.5), ("5e-1", 0.5), (" +0.25 ", 0.25)])
def test_plain_decimal_and_exponent_floats_are_accepted(client: TestClient, value: str, stored: float) -> None:
    response = _submit(client, alpha=value)
    assert response.status_code == 202, response.text
    assert response.json()["params"]["alpha"] == stored


def test_a_bad_cursor_names_the_field_once(client: TestClient) -> None:
    response = client.get("/v1/transfers?cursor=abc", headers=AUTH)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error == {"code": "invalid_cursor", "field": "cursor",
                     "message": "cursor: not a cursor returned by this API: 'abc'"}


@pytest.mark.parametrize("job_id", ["a" * 5000, "%2e%2e", "..%252f..%252fetc", "%00", "%FF", "rq:job:x"])
def test_odd_job_ids_are_404_and_not_echoed_at_length(client: TestClient, job_id: str) -> None:
    for response in (client.get(f"/v1/transfers/{job_id}", headers=AUTH),
                     client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH)):
        assert response.status_code == 404
        error = response.json()["error"]
        assert error["code"] == "not_found" and len(error["message"]) < 120


# --- SSRF disguises --------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://[2002:7f00:1::]/hook", "http://[2002:a9fe:a9fe::]/latest",
                                 "http://[2001:0:7f00:1::]/hook"])
def test_webhook_to_a_6to4_or_teredo_wrapped_internal_address_is_refused(client: TestClient, url: str) -> None:
    with pytest.raises(ValueError, match="embedded IPv4"):
        check_webhook_url(url, allow_private=False)
    response = _submit(client, webhook_url=url)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_webhook_url"


@pytest.mark.parametrize("url", ["http://exa mple.com/hook", "http://example.com/a\tb", "http://example.com/\x7f"])
def test_webhook_url_with_whitespace_or_control_characters_is_refused_even_when_private_allowed(url: str) -> None:
    # Without the DNS check (private targets allowed) nothing else would notice the space in the host.
    with pytest.raises(ValueError, match="whitespace or control characters"):
        check_webhook_url(url, allow_private=True)


def test_concurrent_submits_with_one_idempotency_key_create_one_job(client: TestClient) -> None:
    answers: list[tuple[int, str]] = []

    def submit() -> None:
        response = client.post("/v1/transfers", headers={**AUTH, "Idempotency-Key": "race-1"}, files=_files(),
                               data={"steps": "1", "size": "64"})
        answers.append((response.status_code, response.json()["id"]))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(status for status, _ in answers) == [200] * 7 + [202]
    assert len({job_id for _, job_id in answers}) == 1
    listed = client.get("/v1/transfers", headers=AUTH).json()["items"]
    assert [job["id"] for job in listed] == [answers[0][1]]


# --- outages ---------------------------------------------------------------------------------------


def test_redis_stopped_mid_run_answers_503_then_recovers(tmp_path: Path, restartable_redis: RedisServer) -> None:
    # One retry per command: the 503s come after a short wait, not the full default budget.
    settings = _settings(tmp_path, restartable_redis.url, redis_retries=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        job_id = _submit(client).json()["id"]
        restartable_redis.stop()
        answers = {
            "submit": _submit(client),
            "replay": client.post("/v1/transfers", headers={**AUTH, "Idempotency-Key": "k"}, files=_files()),
            "get": client.get(f"/v1/transfers/{job_id}", headers=AUTH),
            "list": client.get("/v1/transfers", headers=AUTH),
            "cancel": client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH),
        }
        for name, response in answers.items():
            assert response.status_code == 503, (name, response.text)
            assert response.json()["error"]["code"] == "unavailable" and response.headers["Retry-After"] == "5"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"] == "ok"
        assert "ham_redis_up 0.0" in client.get("/metrics").text
        # Nothing was half-written while Redis was away: the refused submits left no inputs behind.
        assert sorted(p.name for p in (tmp_path / "storage" / "inputs").iterdir()) == [job_id]

        restartable_redis.start()  # back on the same port
        assert client.get("/readyz").status_code == 200
        assert _submit(client).status_code == 202


def test_unwritable_storage_answers_503_and_queues_nothing(client: TestClient, tmp_path: Path) -> None:
    # As root a read-only chmod does not stop writes; a file where the inputs folder belongs does.
    inputs = tmp_path / "storage" / "inputs"
    shutil.rmtree(inputs, ignore_errors=True)
    inputs.write_text("not a folder")
    response = _submit(client)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable" and response.headers["Retry-After"] == "5"
    assert client.get("/v1/transfers", headers=AUTH).json()["items"] == []
    inputs.unlink()
    assert _submit(client).status_code == 202


# --- cheap refusals ------------------------------------------------------------------------------


def _send_partial_upload(port: int, declared: int, sent: int) -> tuple[bytes, bool]:
    """POST a multipart upload declaring ``declared`` body bytes but sending only ``sent``; the reply.

    Returns what the server answered (read while the rest of the body is still unsent) and
    whether the server then closed the connection instead of waiting for the rest.
    """
    boundary = "ham-boundary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="content"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode()
    request = (f"POST /v1/transfers HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode() + head + b"\x89PNG" + b"\0" * (sent - len(head) - 4))
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)  # times out (fails the test) if the server waits for the body
            if not chunk:
                break
            reply += chunk
        closed = sock.recv(65536) == b""
    return reply, closed


def test_a_full_queue_answers_429_before_reading_a_large_upload(tmp_path: Path, redis_url: str, redis_client) -> None:
    settings = _settings(tmp_path, redis_url, max_queued_per_tenant=1)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10) as client:
            wait_until(lambda: server.started, 30, "uvicorn to start", interval=0.02)
            files = _files()
            first = client.post("/v1/transfers", files=files, data={"steps": "1", "size": "64"})
            assert first.status_code == 202
            # 20 MB declared, 64 KiB sent: the answer comes while the client is still "uploading".
            reply, closed = _send_partial_upload(port, declared=20 * 1024 * 1024, sent=64 * 1024)
            assert reply.startswith(b"HTTP/1.1 429"), reply[:300]
            assert b"tenant_queue_full" in reply and b"retry-after: 10" in reply.lower()
            assert closed  # the server hangs up rather than swallow the rest of the body
            # Below the limits the same route still reads and accepts uploads.
            assert client.post(f"/v1/transfers/{first.json()['id']}/cancel").status_code == 200
            assert client.post("/v1/transfers", files=files, data={"steps": "1", "size": "64"}).status_code == 202
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- ham submit ------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--key", "--idempotency-key"])
def test_submit_refuses_a_non_ascii_header_value_in_one_line(tmp_path: Path, capsys, option: str) -> None:
    args = ["submit", str(DATA / "content0.png"), "--style-prompt", "x", "-o", str(tmp_path / "o.png"),
            "--api", f"http://127.0.0.1:{free_port()}", option, "clé"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err == f"ham submit: error: {option}: must be ASCII (it travels in an HTTP header)\n"


def test_submit_with_a_malformed_api_url_fails_in_one_line(tmp_path: Path, capsys) -> None:
    args = ["submit", str(DATA / "content0.png"), "--style-prompt", "x", "-o", str(tmp_path / "o.png"),
            "--api", "http://[::1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("ham submit: error: --api: not a valid URL 'http://[::1': ") and err.count("\n") == 1


class _NotHam(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # the name http.server dispatches POSTs to
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = b"<html>hello</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_submit_to_something_that_is_not_the_api_fails_in_one_line(tmp_path: Path, capsys) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotHam)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        api = f"http://127.0.0.1:{server.server_address[1]}"
        status = main(["submit", str(DATA / "content0.png"), "--style-prompt", "x", "-o", str(tmp_path / "o.png"),
                       "--api", api])
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert status == 1
    assert err == f"ham submit: error: {api} answered HTTP 200 without a transfer job; is --api the HAM API?\n"


def test_submit_reports_an_unreachable_result_url_in_one_line(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, capsys
) -> None:
    # HAM_PUBLIC_URL names an address the client cannot reach (a misconfigured proxy, say).
    port, dead = free_port(), free_port()
    settings = Settings(redis_url=redis_url, storage_url=f"file://{tmp_path / 'storage'}",
                        public_url=f"http://127.0.0.1:{dead}", api_keys=f"cli:{KEY}", url_signing_key="k")
    with LiveApi(settings, port) as api:
        status = main(["submit", str(DATA / "content0.png"), "--style-prompt", "x", "-o", str(tmp_path / "o.png"),
                       "--api", api.url, "--key", KEY, "--poll-interval", "0.05", "-q"])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith(f"ham submit: error: downloading the result from http://127.0.0.1:{dead}/v1/files/results/")
    assert "\n" not in err and not (tmp_path / "o.png").exists()
