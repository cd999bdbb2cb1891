"""A bounded, seeded fuzz of the HTTP API: random and malformed requests never get a 5xx.

Every answer must be a 2xx or a 4xx in the one error shape, and the service must still be
healthy and accept a valid job afterwards. Real Redis, real file storage, in-process app.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from ham_core.config import Settings
from service.api.app import create_app

DATA = Path(__file__).resolve().parents[1] / "data"
KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
REQUESTS = 220

_FIELDS = ["content", "style", "style_prompt", "steps", "seed", "size", "alpha", "beta", "gamma", "guidance",
           "sini", "gar", "lat", "step_start", "step_end", "inversion", "teachers", "webhook_url"]
_WEIRD_NAMES = ["", "stepz", "gar_layers", "Content", "a" * 300, "na\"me", "é", "steps[]", "__proto__"]


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def _files(rng: random.Random) -> list[bytes]:
    png = (DATA / "content1.png").read_bytes()
    return [
        png,
        png[: rng.randrange(1, len(png))],
        png[:8] + bytes(rng.randrange(256) for _ in range(200)),
        b"GIF89a" + bytes(64),
        _png_header_only(rng.choice([0, 1, 70_000, 2**31 - 1]), rng.choice([0, 1, 70_000, 2**31 - 1])),
        b"\xff\xd8\xff\xe0" + bytes(rng.randrange(256) for _ in range(100)),
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(40),
        b"",
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))),
        png * 9,  # over max_upload_bytes
    ]


def _value(rng: random.Random) -> str:
    return rng.choice([
        str(rng.randint(-10, 2000)),
        str(rng.uniform(-2, 40)),
        "9" * rng.randint(15, 60),
        "1e308", "-1e308", "nan", "inf", "-inf", "", "   ", "0x10", "1_000", "true", "false", "maybe",
        "\u00e9\u4e2d\U0001f600", "\x00\x01", "x" * rng.choice([10, 1001, 70_000]),
        "http://127.0.0.1/hook", "https://example.com/h", "file:///etc/passwd", "http://[::1]/", "http://%zz/",
    ])


def _multipart(rng: random.Random) -> tuple[bytes, str, bool]:
    boundary = rng.choice(["b0und", "x" * 70, "----WebKitFormBoundary7MA4YWxkTrZu0gW"])
    files = _files(rng)
    parts = []
    near_valid = rng.random() < 0.4  # a valid request with at most a couple of random fields
    if near_valid:
        names = ["content", "style_prompt", *rng.sample(_FIELDS[3:15], rng.randint(0, 2))]
    else:
        names = rng.sample(_FIELDS, rng.randint(0, len(_FIELDS)))
        if rng.random() < 0.3:
            names.append(rng.choice(_WEIRD_NAMES + _FIELDS))  # unknown or duplicate
    for name in names:
        as_file = name in ("content", "style") if rng.random() < 0.85 else rng.random() < 0.5
        if near_valid and name in ("content", "style_prompt"):
            as_file = name == "content"
        if as_file:
            filename = rng.choice(["c.png", "", "../../x.png", "a\"b.png", "\u00e9.png"])
            head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            head += f"Content-Type: {rng.choice(['image/png', 'image/gif', 'text/plain', ''])}\r\n"
            body = (files[0] if rng.random() < 0.9 else files[-1]) if near_valid else rng.choice(files)
        else:
            head = f'Content-Disposition: form-data; name="{name}"\r\n'
            body = ("ink wash" if near_valid and name == "style_prompt" else _value(rng)).encode("utf-8")
        parts.append(f"--{boundary}\r\n{head}\r\n".encode("utf-8", "replace") + body + b"\r\n")
    raw = b"".join(parts) + f"--{boundary}--\r\n".encode()
    mangle = 1.0 if near_valid else rng.random()
    if mangle < 0.1:
        raw = raw[: rng.randrange(0, max(1, len(raw)))]
    elif mangle < 0.15:
        raw = raw.replace(b"\r\n", b"\n")
    elif mangle < 0.2:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 500)))
    if near_valid:
        return raw, f"multipart/form-data; boundary={boundary}", True
    content_type = rng.choice([
        f"multipart/form-data; boundary={boundary}",
        f"multipart/form-data; boundary={boundary}",
        f"multipart/form-data; boundary={boundary}",
        f"multipart/form-data; boundary={boundary}",
        f"multipart/form-data; boundary={boundary}",
        "multipart/form-data",
        f"multipart/form-data; boundary=other{boundary}",
        "application/x-www-form-urlencoded",
        "application/json",
        "",
    ])
    return raw, content_type, False


def _headers(rng: random.Random, content_type: str | None = None) -> dict:
    headers = dict(AUTH) if rng.random() < 0.9 else {"Authorization": rng.choice(["Bearer", "Bearer x", "Basic a"])}
    if content_type:
        headers["Content-Type"] = content_type
    if rng.random() < 0.3:
        headers["Idempotency-Key"] = bytes(rng.randrange(1, 256) for _ in range(rng.randint(0, 250))).replace(
            b"\r", b"").replace(b"\n", b"").strip() or b"k"
    return headers


def _random_request(client: TestClient, rng: random.Random, job_ids: list[str]):
    kind = rng.random()
    if kind < 0.65:
        body, content_type, near_valid = _multipart(rng)
        headers = {**AUTH, "Content-Type": content_type} if near_valid else _headers(rng, content_type)
        return client.post("/v1/transfers", content=body, headers=headers)
    some_id = rng.choice([*job_ids, "x", "0" * 32, "%2e%2e%2f", "a" * 200, "\u00e9"]) if job_ids else "x"
    if kind < 0.75:
        return client.get(f"/v1/transfers/{some_id}", headers=_headers(rng))
    if kind < 0.82:
        return client.post(f"/v1/transfers/{some_id}/cancel", headers=_headers(rng))
    if kind < 0.92:
        params = {"limit": rng.choice(["0", "1", "100", "101", "-5", "abc", "1e3", ""]),
                  "cursor": rng.choice(["", "1.5", "nan", "inf", "-inf", "garbage", "9" * 300, "1e400"])}
        return client.get("/v1/transfers", params=params, headers=_headers(rng))
    key = rng.choice(["results/x.png", "../etc/passwd", "inputs//a", "a" * 600, "%00"])
    params = {
        "expires": rng.choice(["", "-1", "99999999999999999999", "abc", "1e10"]),
        "sig": rng.choice(["", "00", "zz"]),
    }
    return client.get(f"/v1/files/{key}", params=params)


@pytest.fixture
def client(tmp_path: Path, redis_url: str, redis_client: redis.Redis):
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'storage'}",
        api_keys=f"fuzz:{KEY}",
        rate_limit_per_minute=100_000,
        max_queued_per_tenant=10_000,
        max_upload_bytes=200_000,
        max_image_pixels=4_000_000,
        webhook_secret="s3cret",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def test_random_and_malformed_requests_never_get_a_5xx(client):
    rng = random.Random(20260101)
    job_ids: list[str] = []
    statuses: dict[int, int] = {}
    for i in range(REQUESTS):
        response = _random_request(client, rng, job_ids)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, f"request {i}: {response.status_code} {response.text[:300]}"
        if response.status_code >= 400:
            error = response.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)
        elif response.request.url.path == "/v1/transfers" and response.request.method == "POST":
            job_ids.append(response.json()["id"])
    # The fuzz reached the accepting path and every kind of refusal.
    assert statuses.get(202, 0) >= 5, statuses
    assert {400, 401, 413, 415, 422} <= set(statuses), statuses

    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    valid = client.post(
        "/v1/transfers",
        files={"content": ("c.png", (DATA / "content0.png").read_bytes(), "image/png")},
        data={"style_prompt": "ink wash", "steps": "5"},
        headers=AUTH,
    )
    assert valid.status_code == 202, valid.text


_JSON_BODIES: list[bytes] = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"content_url": ' + b"{" * 5_000 + b"}" * 5_000 + b"}",
    b'{"content_url": "data:,x", "style_url": [' + b"[" * 40 + b"]" * 40 + b"]}",
    b'{"content_url": "DATA:image/png;base64,AAAA", "style_prompt": "ink"}',
    b'{"content_url": "data:,x", "style_id": [' + b",".join([b'"' + b"0" * 32 + b'"'] * 100) + b"]}",
    b'{"content_url": "data:,x", "style_url": [], "style_prompt": "ink"}',
    b'{"content_url": "data:,x", "style_id": {"a": 1}}',
    b'{"content_url": "data:,x", "steps": 1e400, "style_prompt": "ink"}',
    b'{"content_url": "data:,x", "steps": NaN, "style_prompt": "ink"}',
    b'{"content_url": "data:,x", "style_prompt": "ink", "seed": 123456789012345678901234567890}',
    b'{"content_url": "\\ud800", "style_prompt": "ink"}',
    b'{"a": 1, "a": 2}',
    b"\xff\xfe{}",
    b"",
    b"null",
    b'"string"',
]


@pytest.mark.parametrize("body", _JSON_BODIES, ids=range(len(_JSON_BODIES)))
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "idempotency-key"])
def test_malformed_json_bodies_are_4xx_in_the_error_shape(client, body: bytes, keyed: bool):
    headers = {**AUTH, "Content-Type": "application/json", **({"Idempotency-Key": "json-fuzz"} if keyed else {})}
    response = client.post("/v1/transfers", content=body, headers=headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert isinstance(error["code"], str) and error["message"]
