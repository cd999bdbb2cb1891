"""The HTTP API in-process (FastAPI TestClient) against a real Redis and file storage.

The worker's side of a job (start, progress, succeed, fail) is played by the real JobStore
transitions, so these tests pin what the API shows for every state without running the engine.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from ham_core.config import Settings
from ham_core.jobs import JobStatus
from service.api.app import create_app
from tests.fixtures.servers import free_port

DATA = Path(__file__).resolve().parents[1] / "data"
KEY_A = "key-alice-0123456789"
KEY_B = "key-bob-0123456789"
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


def make_settings(tmp_path: Path, redis_url: str, **overrides) -> Settings:
    values = {
        "redis_url": redis_url,
        "storage_url": f"file://{tmp_path / 'storage'}",
        "public_url": "http://testserver",
        "api_keys": f"alice:{KEY_A},bob:{KEY_B}",
        "url_signing_key": "test-signing-key",
        "rate_limit_per_minute": 10_000,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def make_client(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Iterator:
    """Build a TestClient for settings overrides (``redis_client`` flushes the DB per test)."""
    clients: list[TestClient] = []

    def build(raise_server_exceptions: bool = True, **overrides) -> TestClient:
        url = overrides.pop("redis_url", redis_url)
        client = TestClient(
            create_app(make_settings(tmp_path, url, **overrides)), raise_server_exceptions=raise_server_exceptions
        )
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def png_bytes(name: str = "content0.png") -> bytes:
    return (DATA / name).read_bytes()


def submit(client: TestClient, headers: dict | None = None, style: bool = True, **fields):
    files = {"content": ("content.png", png_bytes("content0.png"), "image/png")}
    if style:
        files["style"] = ("style.png", png_bytes("style0.png"), "image/png")
    return client.post("/v1/transfers", files=files, data=fields, headers=AUTH_A if headers is None else headers)


def queue_ids(redis_client: redis.Redis) -> list[str]:
    return [m.decode() for m in redis_client.lrange("rq:queue:ham", 0, -1)]


def stored_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "storage"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_error(response, status: int, code: str, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    if field is not None:
        assert error.get("field") == field, error
    return error


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` followed by a tiny IDAT: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buf, format="GIF")
    return buf.getvalue()


# --- submit and read ------------------------------------------------------------------------------


def test_submit_returns_202_queued_job_with_location_and_stores_inputs(client, redis_client, tmp_path):
    response = submit(client, steps="12", alpha="0.5", sini="false")
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/transfers/{job['id']}"
    assert job["status"] == "queued"
    assert job["queue_position"] == 0
    assert job["progress"] == 0.0
    assert job["has_style"] is True and job["style_prompt"] is None
    assert job["params"]["steps"] == 12 and job["params"]["alpha"] == 0.5 and job["params"]["sini"] is False
    assert job["params"]["size"] == 512  # defaults filled in
    assert (job["params"]["inversion"], job["params"]["teachers"]) == ("target", "auto")
    assert job["result_url"] is None and job["error"] is None and job["started_at"] is None
    assert job["created_at"].endswith("Z")
    assert queue_ids(redis_client) == [job["id"]]
    assert stored_files(tmp_path) == [f"inputs/{job['id']}/content.png", f"inputs/{job['id']}/style.png"]
    # Inputs are normalised PNGs, never the raw upload.
    stored = Image.open(tmp_path / "storage" / f"inputs/{job['id']}/content.png")
    assert stored.format == "PNG" and stored.mode == "RGB" and stored.size == (128, 128)


def test_text_only_submit_has_no_style_file(client, tmp_path):
    response = submit(client, style=False, style_prompt="  an ukiyo-e print  ")
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["has_style"] is False and job["style_prompt"] == "an ukiyo-e print"
    assert stored_files(tmp_path) == [f"inputs/{job['id']}/content.png"]


def test_queue_position_counts_jobs_ahead(client):
    ids = [submit(client).json()["id"] for _ in range(3)]
    positions = [client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).json()["queue_position"] for job_id in ids]
    assert positions == [0, 1, 2]


def test_job_lifecycle_as_seen_by_the_client(client, tmp_path):
    job_id = submit(client).json()["id"]
    services = client.app.state.services
    assert services.jobs.start(job_id, "worker-1") is not None
    services.jobs.set_progress(job_id, 0.4)
    running = client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).json()
    assert running["status"] == "running" and running["progress"] == 0.4
    assert running["queue_position"] is None and running["started_at"] is not None

    result = Image.new("RGB", (64, 64), (10, 20, 30))
    buf = io.BytesIO()
    result.save(buf, format="PNG")
    services.storage.put(f"results/{job_id}.png", buf.getvalue(), "image/png")
    services.jobs.succeed(job_id, f"results/{job_id}.png", {"seconds": 1.0})
    done = client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).json()
    assert done["status"] == "succeeded" and done["progress"] == 1.0 and done["finished_at"] is not None
    assert done["result_url"].startswith(f"http://testserver/v1/files/results/{job_id}.png?expires=")

    # The signed URL downloads without an API key.
    download = client.get(done["result_url"])
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert download.content == buf.getvalue()


def test_failed_job_exposes_error_code_and_message(client):
    job_id = submit(client).json()["id"]
    jobs = client.app.state.services.jobs
    jobs.start(job_id, "worker-1")
    jobs.fail(job_id, "internal_error", "CUDA out of memory")
    job = client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).json()
    assert job["status"] == "failed"
    assert job["error"] == {"code": "internal_error", "message": "CUDA out of memory"}
    assert job["result_url"] is None


def test_tampered_or_expired_file_url_is_403(client):
    job_id = submit(client).json()["id"]
    storage = client.app.state.services.storage
    storage.put(f"results/{job_id}.png", png_bytes(), "image/png")
    good = storage.url(f"results/{job_id}.png", 60)
    assert client.get(good).status_code == 200
    assert_error(client.get(good[:-4] + "0000"), 403, "invalid_signature")
    assert_error(
        client.get(good.replace(f"results/{job_id}.png", f"inputs/{job_id}/content.png")), 403, "invalid_signature"
    )
    assert_error(client.get(f"/v1/files/results/{job_id}.png"), 403, "invalid_signature")
    short = storage.url(f"results/{job_id}.png", 1)
    assert client.get(short).status_code == 200
    issued = time.time()
    storage.clock = lambda: issued + 2  # two seconds on: past the one-second expiry
    assert_error(client.get(short), 403, "invalid_signature")


# --- auth and tenancy -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY_A}"}, {"Authorization": "Bearer"}]
)
def test_missing_or_invalid_api_key_is_401_with_bearer_challenge(client, headers):
    for response in (client.get("/v1/transfers", headers=headers), submit(client, headers=headers)):
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


def test_another_tenants_job_is_404_never_403(client):
    job_id = submit(client).json()["id"]
    assert_error(client.get(f"/v1/transfers/{job_id}", headers=AUTH_B), 404, "not_found")
    assert_error(client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_B), 404, "not_found")
    assert client.get("/v1/transfers", headers=AUTH_B).json()["items"] == []
    assert client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).status_code == 200


@pytest.mark.parametrize("job_id", ["nope", "0" * 32, "../../etc/passwd", "x" * 300, "%00"])
def test_unknown_or_malformed_job_id_is_404(client, job_id):
    assert_error(client.get(f"/v1/transfers/{job_id}", headers=AUTH_A), 404, "not_found")


def test_auth_off_makes_everyone_the_local_tenant(make_client):
    client = make_client(api_keys="")
    response = submit(client, headers={})
    assert response.status_code == 202
    assert client.get(response.headers["location"]).json()["id"] == response.json()["id"]


def test_private_health_and_metrics_need_a_key(make_client):
    client = make_client(public_health=False, public_metrics=False)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert_error(client.get(path), 401, "unauthorized")
        assert client.get(path, headers=AUTH_B).status_code == 200


# --- validation before enqueue -----------------------------------------------------------------------

_BAD_INPUTS = {
    "no_style": (dict(style=False), 422, "invalid_parameter", "style"),
    "alpha_2": (dict(alpha="2"), 422, "invalid_parameter", "alpha"),
    "steps_0": (dict(steps="0"), 422, "invalid_parameter", "steps"),
    "steps_not_int": (dict(steps="ten"), 422, "invalid_parameter", "steps"),
    "steps_float": (dict(steps="1.5"), 422, "invalid_parameter", "steps"),
    "size_100": (dict(size="100"), 422, "invalid_parameter", "size"),
    "gamma_nan": (dict(gamma="nan"), 422, "invalid_parameter", "gamma"),
    "sini_maybe": (dict(sini="maybe"), 422, "invalid_parameter", "sini"),
    "window_inverted": (dict(step_start="0.9", step_end="0.1"), 422, "invalid_parameter", "step_start"),
    "inversion_unknown": (dict(inversion="backwards"), 422, "invalid_parameter", "inversion"),
    "recorded_needs_source": (dict(teachers="recorded"), 422, "invalid_parameter", "teachers"),
    "prompt_too_long": (dict(style=False, style_prompt="x" * 1001), 422, "invalid_parameter", "style_prompt"),
    "unknown_field": (dict(stepz="10"), 422, "unknown_field", "stepz"),
    "layer_patterns_are_server_side": (dict(gar_layers="down_blocks.*"), 422, "unknown_field", "gar_layers"),
    "webhooks_disabled": (dict(webhook_url="https://example.com/hook"), 422, "webhooks_disabled", "webhook_url"),
}


@pytest.mark.parametrize("case", list(_BAD_INPUTS))
def test_bad_parameter_is_422_naming_the_field_and_nothing_is_stored(client, redis_client, tmp_path, case):
    kwargs, status, code, field = _BAD_INPUTS[case]
    assert_error(submit(client, **kwargs), status, code, field)
    assert queue_ids(redis_client) == []
    assert stored_files(tmp_path) == []


def _post_files(client, content: tuple | None, style: tuple | None = None, data: dict | None = None):
    files = {}
    if content is not None:
        files["content"] = content
    if style is not None:
        files["style"] = style
    return client.post("/v1/transfers", files=files, data=data or {"style_prompt": "ink"}, headers=AUTH_A)


def test_inversion_and_teachers_are_form_fields_kept_in_the_job(client):
    response = submit(client, inversion=" source ", teachers="recorded")
    assert response.status_code == 202, response.text
    assert (response.json()["params"]["inversion"], response.json()["params"]["teachers"]) == ("source", "recorded")


def test_gif_is_415_even_when_named_png(client, redis_client):
    assert_error(_post_files(client, ("c.png", gif_bytes(), "image/png")), 415, "unsupported_media_type", "content")
    assert queue_ids(redis_client) == []


def test_truncated_png_is_422_invalid_image(client, tmp_path):
    data = png_bytes()
    assert_error(_post_files(client, ("c.png", data[: len(data) // 2], "image/png")), 422, "invalid_image", "content")
    assert stored_files(tmp_path) == []


def test_corrupt_style_image_names_the_style_field(client):
    response = _post_files(client, ("c.png", png_bytes(), "image/png"), ("s.png", b"\x89PNG\r\n\x1a\nxx", "image/png"))
    assert_error(response, 422, "invalid_image", "style")


def test_upload_over_the_size_limit_is_413(make_client, tmp_path):
    client = make_client(max_upload_bytes=20_000)  # content0.png is ~26 kB
    assert_error(_post_files(client, ("c.png", png_bytes(), "image/png")), 413, "upload_too_large", "content")
    assert stored_files(tmp_path) == []


def test_header_claiming_a_huge_image_is_413_before_decoding(client):
    bomb = png_with_header(100_000, 100_000)
    assert_error(_post_files(client, ("c.png", bomb, "image/png")), 413, "image_too_large", "content")


def test_request_body_over_the_limit_is_refused_from_content_length(make_client):
    client = make_client(max_upload_bytes=10_000)
    limit = 2 * 10_000 + 1024 * 1024
    body = b"x" * (limit + 1)
    response = client.post(
        "/v1/transfers", content=body, headers={**AUTH_A, "Content-Type": "multipart/form-data; boundary=abc"}
    )
    assert_error(response, 413, "request_too_large")


def test_streamed_body_over_the_limit_is_cut_off_while_reading(make_client):
    client = make_client(max_upload_bytes=10_000)
    sent = 0

    def chunks():  # no Content-Length: chunked transfer encoding
        nonlocal sent
        yield b'--abc\r\nContent-Disposition: form-data; name="content"; filename="c.png"\r\n\r\n'
        for _ in range(100):
            sent += 64 * 1024
            yield b"\0" * (64 * 1024)

    response = client.post(
        "/v1/transfers", content=chunks(), headers={**AUTH_A, "Content-Type": "multipart/form-data; boundary=abc"}
    )
    assert_error(response, 413, "request_too_large")


@pytest.mark.parametrize(
    ("case", "status", "code", "field"),
    [
        ("missing_content", 422, "missing_field", "content"),
        ("content_as_text", 422, "invalid_field", "content"),
        ("style_prompt_as_file", 422, "invalid_field", "style_prompt"),
        ("duplicate_steps", 422, "duplicate_field", "steps"),
        ("json_body", 422, "unknown_field", "content"),
        ("xml_body", 415, "unsupported_media_type", None),
        ("broken_multipart", 400, "invalid_multipart", None),
        ("no_boundary", 400, "invalid_multipart", None),
    ],
)
def test_malformed_form_is_4xx(client, redis_client, case, status, code, field):
    content = ("c.png", png_bytes(), "image/png")
    if case == "missing_content":
        response = _post_files(client, None, ("s.png", png_bytes("style0.png"), "image/png"))
    elif case == "content_as_text":
        response = client.post(
            "/v1/transfers",
            data={"content": "hello"},
            files={"style": ("s.png", png_bytes("style0.png"), "image/png")},
            headers=AUTH_A,
        )
    elif case == "style_prompt_as_file":
        response = client.post(
            "/v1/transfers", files={"content": content, "style_prompt": ("p.txt", b"ink")}, headers=AUTH_A
        )
    elif case == "duplicate_steps":
        response = client.post(
            "/v1/transfers",
            files=[("content", content)],
            data={"steps": ["10", "20"], "style_prompt": "x"},
            headers=AUTH_A,
        )
    elif case == "json_body":
        # JSON takes the images by reference (content_url): a file field's name is unknown there.
        response = client.post("/v1/transfers", json={"content": "x"}, headers=AUTH_A)
    elif case == "xml_body":
        response = client.post("/v1/transfers", content=b"<transfer/>",
                               headers={**AUTH_A, "Content-Type": "application/xml"})
    else:
        content_type = "multipart/form-data" if case == "no_boundary" else "multipart/form-data; boundary=abc"
        response = client.post("/v1/transfers", content=b"garbage", headers={**AUTH_A, "Content-Type": content_type})
    assert_error(response, status, code, field)
    assert queue_ids(redis_client) == []


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http://127.0.0.1:9/hook", "http://169.254.169.254/", "nope"])
def test_bad_webhook_url_is_422(make_client, redis_client, url):
    client = make_client(webhook_secret="s3cret")
    assert_error(submit(client, webhook_url=url), 422, "invalid_webhook_url", "webhook_url")
    assert queue_ids(redis_client) == []


def test_public_webhook_url_is_accepted_when_webhooks_are_on(make_client):
    client = make_client(webhook_secret="s3cret", webhook_allow_private=True)
    assert submit(client, webhook_url="http://127.0.0.1:9/hook").status_code == 202


@pytest.mark.parametrize("key", [b"", b"   ", b"k" * 201, "caf\u00e9".encode("latin-1"), b"tab\there"])
def test_malformed_idempotency_key_is_422(client, redis_client, key):
    response = submit(client, headers={**AUTH_A, "Idempotency-Key": key})
    assert_error(response, 422, "invalid_idempotency_key", "Idempotency-Key")
    assert queue_ids(redis_client) == []


# --- idempotency, backpressure, rate limit --------------------------------------------------------


def test_same_idempotency_key_returns_the_same_job_and_enqueues_once(client, redis_client, tmp_path):
    headers = {**AUTH_A, "Idempotency-Key": "order-42"}
    first = submit(client, headers=headers)
    second = submit(client, headers=headers)
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert queue_ids(redis_client) == [first.json()["id"]]
    assert stored_files(tmp_path) == sorted(f"inputs/{first.json()['id']}/{n}.png" for n in ("content", "style"))
    # The key is per tenant.
    other = submit(client, headers={**AUTH_B, "Idempotency-Key": "order-42"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_idempotent_retry_gets_its_job_even_when_the_queue_is_full(make_client, redis_client):
    client = make_client(max_queued_per_tenant=1)
    headers = {**AUTH_A, "Idempotency-Key": "order-43"}
    first = submit(client, headers=headers)
    assert submit(client).status_code == 429  # the tenant's queue is full now
    retry = submit(client, headers=headers)
    assert retry.status_code == 200 and retry.json()["id"] == first.json()["id"]
    assert queue_ids(redis_client) == [first.json()["id"]]


def test_tenant_queue_limit_is_429_with_retry_after(make_client, redis_client):
    client = make_client(max_queued_per_tenant=2)
    assert [submit(client).status_code for _ in range(2)] == [202, 202]
    response = submit(client)
    assert_error(response, 429, "tenant_queue_full")
    assert int(response.headers["retry-after"]) > 0
    assert len(queue_ids(redis_client)) == 2
    assert submit(client, headers=AUTH_B).status_code == 202  # other tenants are unaffected


def test_global_queue_cap_is_429_with_retry_after(make_client):
    client = make_client(max_queue_length=2)
    assert submit(client).status_code == 202
    assert submit(client, headers=AUTH_B).status_code == 202
    response = submit(client, headers=AUTH_B)
    assert_error(response, 429, "queue_full")
    assert int(response.headers["retry-after"]) > 0


def test_cancelled_jobs_free_queue_slots(make_client):
    client = make_client(max_queued_per_tenant=1)
    job_id = submit(client).json()["id"]
    assert submit(client).status_code == 429
    client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_A)
    assert submit(client).status_code == 202


def test_rate_limit_per_key_is_429_with_retry_after(make_client):
    client = make_client(rate_limit_per_minute=3)
    window_start = (time.time() // 60) * 60
    # Five seconds into a fresh window: the four requests fall in one window, however slow the machine.
    client.app.state.services.limiter.clock = lambda: window_start + 5
    statuses = [client.get("/v1/transfers", headers=AUTH_A).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    response = client.get("/v1/transfers", headers=AUTH_A)
    assert_error(response, 429, "rate_limited")
    assert int(response.headers["retry-after"]) == 55
    assert client.get("/v1/transfers", headers=AUTH_B).status_code == 200
    assert client.get("/healthz").status_code == 200  # operator endpoints are not rate limited


# --- cancel and list --------------------------------------------------------------------------------


def test_cancel_queued_job_removes_it_from_the_queue(client, redis_client):
    job_id = submit(client).json()["id"]
    response = client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_A)
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "canceled" and job["finished_at"] is not None and job["queue_position"] is None
    assert queue_ids(redis_client) == []
    assert client.app.state.services.jobs.start(job_id, "w") is None  # a worker skips it


def test_cancel_running_job_keeps_it_running_until_the_worker_stops(client):
    job_id = submit(client).json()["id"]
    jobs = client.app.state.services.jobs
    jobs.start(job_id, "w")
    response = client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_A)
    assert response.status_code == 200 and response.json()["status"] == "running"
    assert jobs.cancel_requested(job_id)


def test_cancel_terminal_job_is_409(client):
    job_id = submit(client).json()["id"]
    assert client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_A).status_code == 200
    error = assert_error(client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_A), 409, "job_finished")
    assert error["message"] == f"job {job_id} already finished (canceled); nothing to cancel"
    assert client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).json()["status"] == JobStatus.CANCELED.value


def test_list_pages_through_own_jobs_newest_first(client):
    ids = [submit(client).json()["id"] for _ in range(5)]
    submit(client, headers=AUTH_B)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/transfers", params=params, headers=AUTH_A).json()
        pages += 1
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == 3


@pytest.mark.parametrize(
    ("params", "code", "field"),
    [
        ({"limit": 0}, "invalid_request", "limit"),
        ({"limit": 101}, "invalid_request", "limit"),
        ({"limit": "x"}, "invalid_request", "limit"),
        ({"cursor": "garbage"}, "invalid_cursor", "cursor"),
    ],
)
def test_list_bad_query_is_422(client, params, code, field):
    assert_error(client.get("/v1/transfers", params=params, headers=AUTH_A), 422, code, field)


# --- operations ---------------------------------------------------------------------------------------


def test_healthz_and_readyz_when_everything_is_up(client):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"redis": "ok", "storage": "ok"}
    # Load balancers probe with HEAD.
    assert client.head("/healthz").status_code == 200
    assert client.head("/readyz").status_code == 200


def test_readyz_is_503_naming_redis_when_redis_is_down(make_client):
    client = make_client(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["storage"] == "ok" and body["checks"]["redis"] != "ok"
    assert body["error"]["code"] == "not_ready" and "redis" in body["error"]["message"]
    assert client.get("/healthz").status_code == 200
    # A request that needs Redis is a 503 too, never a 500.
    assert_error(client.get("/v1/transfers", headers=AUTH_A), 503, "unavailable")
    assert client.get("/metrics").status_code == 200


def test_readyz_is_503_naming_storage_when_storage_is_unusable(make_client, tmp_path):
    client = make_client()
    root = tmp_path / "storage"
    root.rename(tmp_path / "gone")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"] == "ok" and response.json()["checks"]["storage"] != "ok"


def test_metrics_expose_requests_latency_jobs_and_queue(client):
    submit(client)
    job_id = submit(client).json()["id"]
    client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_A)
    client.get("/v1/transfers/nope", headers=AUTH_A)
    text = client.get("/metrics").text
    assert 'ham_http_requests_total{method="POST",route="/v1/transfers",status="202"} 2.0' in text
    assert 'ham_http_requests_total{method="GET",route="/v1/transfers/{job_id}",status="404"} 1.0' in text
    assert 'ham_http_request_duration_seconds_bucket{le="+Inf",method="POST",route="/v1/transfers"} 2.0' in text
    assert "ham_jobs_submitted_total 2.0" in text
    assert "ham_queue_depth 1.0" in text
    assert "ham_oldest_queued_job_age_seconds " in text
    assert 'ham_jobs_finished_total{outcome="canceled"} 1.0' in text
    assert "ham_redis_up 1.0" in text


def test_metrics_label_fastapis_own_routes_and_keep_unknown_paths_in_one_label(client):
    client.get("/openapi.json")
    client.get("/no/such/path")
    client.get("/another/unknown")
    text = client.get("/metrics").text
    assert 'ham_http_requests_total{method="GET",route="/openapi.json",status="200"} 1.0' in text
    assert 'ham_http_requests_total{method="GET",route="<unmatched>",status="404"} 2.0' in text


def test_unknown_route_and_wrong_method_use_the_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found")
    response = client.delete("/v1/transfers", headers=AUTH_A)
    assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"]


def test_our_own_fault_is_a_logged_500_in_the_error_shape(make_client, caplog):
    client = make_client(raise_server_exceptions=False)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    client.app.state.services.jobs.list_for_tenant = broken
    response = client.get("/v1/transfers", headers=AUTH_A)
    assert_error(response, 500, "internal_error")
    assert "boom" not in response.text
    assert any("unhandled error" in record.message for record in caplog.records)


def test_openapi_documents_every_endpoint_with_examples(client):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    paths = spec["paths"]
    for path, method in [
        ("/v1/transfers", "post"),
        ("/v1/transfers", "get"),
        ("/v1/transfers/{job_id}", "get"),
        ("/v1/transfers/{job_id}/cancel", "post"),
        ("/v1/files/{key}", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths[path], (path, method)
    content = paths["/v1/transfers"]["post"]["requestBody"]["content"]
    assert content["multipart/form-data"]["schema"] == {"$ref": "#/components/schemas/TransferForm"}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/TransferRequest"}
    form = spec["components"]["schemas"]["TransferForm"]
    assert form["properties"]["content"]["format"] == "binary"
    assert {"style", "style_prompt", "steps", "alpha", "output_format"} <= set(form["properties"])
    # This server has no HAM_WEBHOOK_SECRET: a webhook field would be refused, so none is declared.
    assert "webhook_url" not in form["properties"]
    assert form["required"] == ["content"]
    body = spec["components"]["schemas"]["TransferRequest"]
    assert body["required"] == ["content_url"] and body["examples"]
    schemas = spec["components"]["schemas"]
    assert schemas["TransferJob"]["examples"][0]["status"] == "succeeded"
    assert schemas["ErrorResponse"]["examples"]
    assert {"401", "413", "415", "422", "429"} <= set(paths["/v1/transfers"]["post"]["responses"])
    assert client.get("/docs").status_code == 200


def test_openapi_declares_what_the_server_does(make_client):
    spec = make_client(webhook_secret="s").get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in paths[path]["get"] and "401" not in paths[path]["get"]["responses"], path
    for path, method in (("/v1/transfers", "get"), ("/v1/transfers", "post"), ("/v1/transfers/{job_id}", "get")):
        assert paths[path][method]["security"] == [{"HTTPBearer": []}]
        for parameter in paths[path][method].get("parameters", []):
            assert "anyOf" not in parameter["schema"], parameter  # optional, not nullable
    cursor = next(p for p in paths["/v1/transfers"]["get"]["parameters"] if p["name"] == "cursor")
    assert cursor["schema"]["pattern"].startswith("^") and cursor["schema"]["type"] == "string"
    form = spec["components"]["schemas"]["TransferForm"]
    assert {"webhook_url", "webhook_events"} <= set(form["properties"])
    for name, prop in form["properties"].items():
        assert "anyOf" not in prop and prop.get("type") != "null", name
    assert form["properties"]["steps"] == {**form["properties"]["steps"], "type": "integer", "minimum": 1,
                                           "maximum": 1000, "default": 50}
    # Operation ids are the handlers' names: what generated clients call their functions.
    assert paths["/v1/transfers"]["post"]["operationId"] == "create_transfer"
    locked = make_client(public_health=False).get("/openapi.json").json()["paths"]["/healthz"]["get"]
    assert locked["security"] == [{"HTTPBearer": []}] and "401" in locked["responses"]


def test_options_on_a_path_with_two_routes_lists_both_methods(client):
    response = client.options("/v1/transfers", headers=AUTH_A)
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"


def test_openapi_is_a_valid_openapi_3_document(client):
    jsonschema = pytest.importorskip("jsonschema")
    spec = client.get("/openapi.json").json()
    # Every $ref resolves inside the document.
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    assert refs
    for ref in refs:
        target = spec
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
    # Each component schema is itself a valid JSON Schema (2020-12, what OpenAPI 3.1 uses).
    for name, schema in spec["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema), name


def test_api_process_never_imports_torch(tmp_path, redis_url):
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.api.app import create_app\n"
        "from ham_core.config import Settings\n"
        f"app = create_app(Settings(redis_url={redis_url!r}, storage_url='file://{tmp_path}/s'))\n"
        "with TestClient(app) as c:\n"
        "    assert c.get('/readyz').status_code == 200\n"
        "    assert c.post('/v1/transfers', data={'alpha': '2'}).status_code in (415, 422)\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'ham_engine.engine') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_s3_storage_gets_inputs_and_serves_results_by_presigned_url(make_client, s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"ham-api-{int(time.time() * 1000) % 10**9}"
    client = make_client(storage_url=s3_server.storage_url(bucket))
    job_id = submit(client).json()["id"]
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert keys == {f"inputs/{job_id}/content.png", f"inputs/{job_id}/style.png"}

    services = client.app.state.services
    services.jobs.start(job_id, "w")
    services.storage.put(f"results/{job_id}.png", png_bytes("style1.png"), "image/png")
    services.jobs.succeed(job_id, f"results/{job_id}.png", {})
    url = client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).json()["result_url"]
    assert url.startswith(s3_server.endpoint) and "X-Amz-Signature=" in url
    assert httpx.get(url).content == png_bytes("style1.png")
    # The API's own file route serves nothing when storage is S3.
    assert_error(client.get(f"/v1/files/results/{job_id}.png?expires=1&sig=0"), 404, "not_found")
    assert client.get("/readyz").json()["checks"]["storage"] == "ok"


def test_rate_limit_is_shared_by_api_replicas(make_client):
    replicas = [make_client(rate_limit_per_minute=3), make_client(rate_limit_per_minute=3)]
    window_start = (time.time() // 60) * 60 + 60  # a window no other test has counted in
    for replica in replicas:
        replica.app.state.services.limiter.clock = lambda: window_start + 5
    statuses = [replicas[i % 2].get("/v1/transfers", headers=AUTH_A).status_code for i in range(4)]
    assert statuses == [200, 200, 200, 429]
