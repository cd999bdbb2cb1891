"""Fetching ``content_url``/``style_url`` (service.api.fetch) from real loopback HTTP servers.

The SSRF guard refuses loopback, so to reach a test server as if it were public the guard is
wrapped: the test's own host name ``images.test`` is vetted to 127.0.0.1 (as a public DNS answer
would be), every other URL goes through the real guard. That shows each redirect hop is vetted
afresh and that the request connects to the vetted address with the original Host.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ham_core.config import Settings
from ham_core.ssrf import check_public_url
from service.api import fetch
from service.api.errors import ApiError
from service.api.fetch import decode_data_uri, fetch_reference
from tests.fixtures.servers import free_port

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


@pytest.fixture
def server() -> Iterator[tuple[int, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, "host": self.headers["Host"]})
            if self.path.startswith("/to/"):
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/to/"))
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1], seen
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def public_test_host(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    vetted: list[str] = []

    def guard(url: str, allow_private: bool, field: str, setting: str) -> str | None:
        vetted.append(url)
        if url.startswith("http://images.test:"):
            return "127.0.0.1"
        return check_public_url(url, allow_private, field, setting)

    monkeypatch.setattr(fetch, "check_public_url", guard)
    return vetted


def settings(**overrides: Any) -> Settings:
    return Settings(**{"fetch_timeout": 5.0, "max_upload_bytes": 10_000, **overrides})


def run(reference: str, **overrides: Any) -> bytes:
    return asyncio.run(fetch_reference("content_url", reference, settings(**overrides)))


def test_the_request_goes_to_the_vetted_address_with_the_original_host(server, public_test_host):
    port, seen = server
    assert run(f"http://images.test:{port}/photo.png") == PNG
    assert seen == [{"path": "/photo.png", "host": f"images.test:{port}"}]


def test_every_redirect_hop_is_vetted_again(server, public_test_host):
    port, seen = server
    target = f"http://images.test:{port}/final.png"
    assert run(f"http://images.test:{port}/to/{target}") == PNG
    assert public_test_host == [f"http://images.test:{port}/to/{target}", target]
    assert [hit["path"] for hit in seen] == [f"/to/{target}", "/final.png"]


@pytest.mark.parametrize("private", ["http://127.0.0.1:{port}/x.png", "http://10.0.0.1/x.png",
                                     "http://169.254.169.254/latest/meta-data"])
def test_a_redirect_to_a_private_address_is_refused_before_connecting(server, public_test_host, private):
    port, seen = server
    with pytest.raises(ApiError) as refused:
        run(f"http://images.test:{port}/to/{private.format(port=port)}")
    assert refused.value.status == 422 and refused.value.code == "invalid_url"
    assert refused.value.message.startswith("content_url: host ") and "HAM_FETCH_ALLOW_PRIVATE" in refused.value.message
    assert [hit["path"] for hit in seen] == [f"/to/{private.format(port=port)}"]  # never reached the target


def test_the_allowance_lets_loopback_through(server):
    port, _ = server
    assert run(f"http://127.0.0.1:{port}/x.png", fetch_allow_private=True) == PNG
    with pytest.raises(ApiError, match="loopback"):
        run(f"http://127.0.0.1:{port}/x.png")


def test_an_unresolvable_host_is_a_422_naming_the_field():
    with pytest.raises(ApiError) as refused:
        run("http://no-such-host.invalid/x.png")
    assert refused.value.field == "content_url" and "does not resolve" in refused.value.message


def test_data_uris_decode_and_refuse_bad_base64_and_oversize():
    encoded = base64.b64encode(PNG).decode()
    assert decode_data_uri("style_url", f"data:image/png;base64,{encoded}", 1000) == PNG
    assert decode_data_uri("style_url", "data:,hello%20world", 1000) == b"hello world"
    for bad in ("data:image/png;base64,%%%", "data:image/png;base64,abc", "data:nocomma"):
        with pytest.raises(ApiError) as refused:
            decode_data_uri("style_url", bad, 1000)
        assert (refused.value.status, refused.value.code, refused.value.field) == (422, "invalid_data_uri",
                                                                                    "style_url")
    with pytest.raises(ApiError) as big:
        decode_data_uri("style_url", "data:image/png;base64," + "A" * 4000, 1000)
    assert (big.value.status, big.value.code) == (413, "upload_too_large")
