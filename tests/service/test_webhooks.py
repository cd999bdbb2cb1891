"""Webhooks: signatures, the SSRF guard, and delivery to a real local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from ham_core.config import Settings
from ham_core.webhooks import (
    DELIVERY_HEADER,
    REDIS_DATA_KEY,
    REDIS_DUE_KEY,
    SIGNATURE_HEADER,
    WebhookDispatcher,
    check_webhook_url,
    pinned_request,
    sign,
    verify,
)
from tests.fixtures.waiting import wait_until

SECRET = "whsec-test"
BODY = b'{"id":"job1","status":"succeeded"}'


# --- signing -------------------------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    assert len(header.partition("v1=")[2]) == 64
    assert verify(SECRET, BODY, header, now=1_700_000_000) is True
    assert verify(SECRET, BODY, header, now=1_700_000_000 + 300) is True


def test_verify_refuses_tampered_body_or_wrong_secret() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    assert verify(SECRET, BODY.replace(b"succeeded", b"failed"), header, now=1_700_000_000) is False
    assert verify("another-secret", BODY, header, now=1_700_000_000) is False


def test_verify_refuses_old_or_future_timestamp() -> None:
    header = sign(SECRET, BODY, 1_700_000_000)
    assert verify(SECRET, BODY, header, now=1_700_000_000 + 301) is False
    assert verify(SECRET, BODY, header, now=1_700_000_000 - 301) is False
    assert verify(SECRET, BODY, header, tolerance=600, now=1_700_000_000 + 301) is True


def test_verify_refuses_a_replayed_signature_with_a_new_timestamp() -> None:
    digest = sign(SECRET, BODY, 1_700_000_000).partition("v1=")[2]
    assert verify(SECRET, BODY, f"t=1700000100,v1={digest}", now=1_700_000_100) is False


@pytest.mark.parametrize("header", ["", "garbage", "t=abc,v1=00", "v1=00", "t=1700000000", "t=1700000000,v1="])
def test_verify_refuses_malformed_headers(header: str) -> None:
    assert verify(SECRET, BODY, header, now=1_700_000_000) is False


def test_verify_accepts_any_of_several_v1_signatures() -> None:
    good = sign(SECRET, BODY, 1_700_000_000).partition("v1=")[2]
    assert verify(SECRET, BODY, f"t=1700000000,v1={'0' * 64},v1={good}", now=1_700_000_000) is True


# --- SSRF guard ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://100.64.0.1/hook",
        "https://[fd00::1]/hook",
    ],
)
def test_internal_webhook_targets_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="HAM_WEBHOOK_ALLOW_PRIVATE"):
        check_webhook_url(url, allow_private=False)
    check_webhook_url(url, allow_private=True)


def test_public_address_is_accepted() -> None:
    # The vetted address comes back: delivery connects to it, not to a second DNS answer.
    assert check_webhook_url("https://93.184.216.34:8443/hooks/ham", allow_private=False) == "93.184.216.34"


def test_pinned_request_keeps_the_name_in_host_and_sni() -> None:
    url, headers, extensions = pinned_request("https://hooks.example.com:8443/ham?x=1", "93.184.216.34")
    assert url == "https://93.184.216.34:8443/ham?x=1"
    assert headers == {"Host": "hooks.example.com:8443"}
    assert extensions == {"sni_hostname": "hooks.example.com"}
    url, headers, extensions = pinned_request("http://hooks.example.com/ham", "2606:2800:220:1::1")
    assert (url, headers, extensions) == ("http://[2606:2800:220:1::1]/ham", {"Host": "hooks.example.com"}, {})
    assert pinned_request("http://x.example/h", None) == ("http://x.example/h", {}, {})


def test_a_pinned_request_reaches_the_vetted_address_with_the_original_host() -> None:
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers["Host"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        # The name does not resolve at all: only the pinned address can have been used.
        url, headers, extensions = pinned_request(f"http://hooks.invalid:{port}/ham", "127.0.0.1")
        with httpx.Client(trust_env=False) as client:  # as the dispatcher sends
            response = client.post(url, content=b"{}", headers=headers, extensions=extensions)
        assert response.status_code == 204
        assert seen == [f"hooks.invalid:{port}"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "url", ["ftp://93.184.216.34/x", "file:///etc/passwd", "gopher://a/b", "93.184.216.34/x", "http:///path"]
)
def test_non_http_or_hostless_urls_are_refused_even_when_private_allowed(url: str) -> None:
    with pytest.raises(ValueError, match="webhook_url"):
        check_webhook_url(url, allow_private=True)


def test_unresolvable_host_is_refused() -> None:
    with pytest.raises(ValueError, match="does not resolve"):
        check_webhook_url("http://no-such-host.invalid/hook", allow_private=False)


def test_bad_port_is_refused() -> None:
    with pytest.raises(ValueError, match="not a valid URL"):
        check_webhook_url("http://93.184.216.34:99999/hook", allow_private=False)


# --- delivery to a real HTTP server ------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A local HTTP server answering POSTs with scripted statuses, recording what arrived."""

    url: str
    requests: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # consumed one per request; then 200
    delay: float = 0.0
    location: str | None = None
    # While set, requests to /held wait for it to be released (no timing involved).
    hold: threading.Event | None = None
    held: list[str] = field(default_factory=list)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        _wait(lambda: len(self.requests) >= count, timeout, f"{count} webhook requests")
        return self.requests


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    wait_until(condition, timeout, what, interval=0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            rec = state["r"]
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path.startswith("/slow"):
                time.sleep(rec.delay)
            if self.path.startswith("/held") and rec.hold is not None:
                rec.held.append(self.path)
                rec.hold.wait(30)
            rec.requests.append(Received(self.path, dict(self.headers.items()), body, time.monotonic()))
            status = rec.statuses.pop(0) if rec.statuses else 200
            self.send_response(status)
            if rec.location:
                self.send_header("Location", rec.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state["r"] = Receiver(url=f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state["r"]
    finally:
        server.shutdown()
        server.server_close()


def _settings(**overrides) -> Settings:
    values = {"webhook_secret": SECRET, "webhook_allow_private": True, "webhook_timeout": 5.0}
    return Settings(**{**values, **overrides})


@pytest.fixture
def dispatchers() -> Iterator[list[WebhookDispatcher]]:
    made: list[WebhookDispatcher] = []
    yield made
    for dispatcher in made:
        dispatcher.stop(timeout=1)


def _dispatcher(made: list[WebhookDispatcher], settings: Settings, redis=None, **options) -> WebhookDispatcher:
    dispatcher = WebhookDispatcher(settings, redis, backoff=options.pop("backoff", 0.2), **options)
    made.append(dispatcher)
    return dispatcher


def test_delivery_posts_signed_json_to_the_endpoint(receiver: Receiver, dispatchers) -> None:
    dispatcher = _dispatcher(dispatchers, _settings())
    dispatcher.start()
    dispatcher.submit(receiver.url + "/hooks/ham", {"id": "job1", "status": "succeeded", "progress": 1.0})
    (request,) = receiver.wait_for(1)
    assert request.path == "/hooks/ham"
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.body) == {"id": "job1", "status": "succeeded", "progress": 1.0}
    assert verify(SECRET, request.body, request.headers[SIGNATURE_HEADER]) is True
    assert len(request.headers[DELIVERY_HEADER]) == 32
    _wait(lambda: dispatcher.counts["delivered"] == 1, 5, "delivered count")
    assert dispatcher.pending() == 0


def test_server_errors_are_retried_with_growing_backoff(receiver: Receiver, dispatchers) -> None:
    receiver.statuses = [500, 503]
    dispatcher = _dispatcher(dispatchers, _settings(webhook_max_attempts=3), backoff=0.3)
    dispatcher.start()
    dispatcher.submit(receiver.url, {"id": "job2"})
    first, second, third = receiver.wait_for(3)
    assert len({r.headers[DELIVERY_HEADER] for r in (first, second, third)}) == 1
    assert second.at - first.at >= 0.3
    assert third.at - second.at >= 0.6
    assert all(verify(SECRET, r.body, r.headers[SIGNATURE_HEADER]) for r in (first, second, third))
    _wait(lambda: dispatcher.counts["delivered"] == 1, 5, "delivery")
    assert dispatcher.counts["retried"] == 2


def test_delivery_gives_up_after_max_attempts(receiver: Receiver, dispatchers) -> None:
    receiver.statuses = [500] * 10
    dispatcher = _dispatcher(dispatchers, _settings(webhook_max_attempts=2), backoff=0.05)
    dispatcher.start()
    dispatcher.submit(receiver.url, {"id": "job3"})
    _wait(lambda: dispatcher.counts["dropped"] == 1, 5, "drop")
    # Dropped with nothing left scheduled: no further attempt can happen (each request is recorded
    # by the receiver before it answers, so both are in by the time the drop is counted).
    assert dispatcher.pending() == 0
    assert len(receiver.requests) == 2


def test_client_errors_are_not_retried(receiver: Receiver, dispatchers) -> None:
    receiver.statuses = [410]
    dispatcher = _dispatcher(dispatchers, _settings(), backoff=0.05)
    dispatcher.start()
    dispatcher.submit(receiver.url, {"id": "job4"})
    _wait(lambda: dispatcher.counts["dropped"] == 1, 5, "drop")
    assert len(receiver.requests) == 1


def test_redirects_are_not_followed(receiver: Receiver, dispatchers) -> None:
    receiver.statuses = [307]
    receiver.location = receiver.url + "/elsewhere"
    dispatcher = _dispatcher(dispatchers, _settings(), backoff=0.05)
    dispatcher.start()
    dispatcher.submit(receiver.url + "/hook", {"id": "job5"})
    _wait(lambda: dispatcher.counts["dropped"] == 1, 5, "drop")
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_slow_endpoint_does_not_block_submit_or_other_deliveries(receiver: Receiver, dispatchers) -> None:
    receiver.hold = threading.Event()  # the /held endpoint answers only once the test releases it
    dispatcher = _dispatcher(dispatchers, _settings())
    dispatcher.start()
    dispatcher.submit(receiver.url + "/held", {"id": "slow"})
    _wait(lambda: receiver.held == ["/held"], 10, "the held delivery to be in flight")
    dispatcher.submit(receiver.url + "/fast", {"id": "fast"})  # returned although /held still hangs
    (first,) = receiver.wait_for(1)  # the fast one arrives while the held one is still in flight
    assert first.path == "/fast" and not receiver.hold.is_set()
    receiver.hold.set()
    second = receiver.wait_for(2)[1]
    assert second.path == "/held"


def test_timeout_counts_as_a_failed_attempt(receiver: Receiver, dispatchers) -> None:
    receiver.delay = 1.0
    dispatcher = _dispatcher(dispatchers, _settings(webhook_timeout=0.3, webhook_max_attempts=1))
    dispatcher.start()
    dispatcher.submit(receiver.url + "/slow", {"id": "late"})
    _wait(lambda: dispatcher.counts["dropped"] == 1, 5, "drop after timeout")
    assert dispatcher.counts["delivered"] == 0


def test_private_target_is_refused_at_send_time(receiver: Receiver, dispatchers) -> None:
    dispatcher = _dispatcher(dispatchers, _settings(webhook_allow_private=False))
    dispatcher.start()
    dispatcher.submit(receiver.url, {"id": "ssrf"})  # 127.0.0.1: loopback
    _wait(lambda: dispatcher.counts["rejected_url"] == 1, 5, "rejection")
    # The check runs before the request and the delivery is then done: nothing can still send it.
    assert dispatcher.pending() == 0
    assert receiver.requests == []


def test_empty_secret_disables_webhooks(receiver: Receiver, dispatchers) -> None:
    dispatcher = _dispatcher(dispatchers, _settings(webhook_secret=""))
    dispatcher.start()
    assert dispatcher.enabled is False
    dispatcher.submit(receiver.url, {"id": "off"})
    # Nothing was scheduled, so no sender could ever pick it up.
    assert dispatcher.pending() == 0
    assert receiver.requests == []


def test_pending_deliveries_in_redis_survive_a_restart(receiver: Receiver, dispatchers, redis_client) -> None:
    before_restart = _dispatcher(dispatchers, _settings(), redis_client)  # never started: like a crashed worker
    before_restart.submit(receiver.url + "/persisted", {"id": "job6"})
    assert redis_client.zcard(REDIS_DUE_KEY) == 1
    assert redis_client.hlen(REDIS_DATA_KEY) == 1
    assert receiver.requests == []  # no dispatcher is running: only a started one sends

    after_restart = _dispatcher(dispatchers, _settings(), redis_client, poll_interval=0.1)
    after_restart.start()
    (request,) = receiver.wait_for(1)
    assert request.path == "/persisted"
    assert json.loads(request.body) == {"id": "job6"}
    _wait(lambda: redis_client.zcard(REDIS_DUE_KEY) == 0, 5, "redis schedule to empty")
    assert redis_client.hlen(REDIS_DATA_KEY) == 0


def test_two_dispatchers_on_one_redis_deliver_once(receiver: Receiver, dispatchers, redis_client) -> None:
    for _ in range(2):
        _dispatcher(dispatchers, _settings(), redis_client, poll_interval=0.05).start()
    for n in range(5):
        dispatchers[n % 2].submit(receiver.url, {"n": n})
    receiver.wait_for(5)
    # A claimed delivery stays in the schedule (under its lease) until it is done, so an empty
    # schedule means no attempt is in flight: any duplicate would have arrived by then.
    _wait(lambda: redis_client.zcard(REDIS_DUE_KEY) == 0, 5, "redis schedule to empty")
    assert sorted(json.loads(r.body)["n"] for r in receiver.requests) == [0, 1, 2, 3, 4]
    # A dispatcher counts a delivery just after it leaves the schedule: wait for the count, which
    # can only reach 5 and stay there if nothing was delivered twice.
    _wait(lambda: sum(d.counts["delivered"] for d in dispatchers) == 5, 5, "5 deliveries counted")
    assert sum(d.counts["delivered"] for d in dispatchers) == 5


def test_redis_retries_keep_the_delivery_in_redis(receiver: Receiver, dispatchers, redis_client) -> None:
    receiver.statuses = [502]
    dispatcher = _dispatcher(dispatchers, _settings(), redis_client, backoff=0.3, poll_interval=0.05)
    dispatcher.start()
    dispatcher.submit(receiver.url, {"id": "job7"})
    receiver.wait_for(1)
    _wait(lambda: dispatcher.counts["retried"] == 1, 5, "retry")
    assert redis_client.zcard(REDIS_DUE_KEY) == 1
    stored = json.loads(redis_client.hvals(REDIS_DATA_KEY)[0])
    assert stored["attempt"] == 1
    receiver.wait_for(2)
    _wait(lambda: redis_client.zcard(REDIS_DUE_KEY) == 0, 5, "redis schedule to empty")
