"""ham_core.logs: the formats, the ids on every line, redaction; the API's X-Request-ID.

The live JSON logs of ``ham api`` and ``ham worker`` are checked in tests/e2e/test_monitoring.py.
"""

from __future__ import annotations

import io
import json
import logging
import logging.config
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ham_core.logs import ContextFilter, accept_request_id, bind, log_context, logging_config
from service.api.app import create_app
from tests.service.test_api import AUTH_A, KEY_A, KEY_B, make_settings, submit


@pytest.fixture
def client(tmp_path, redis_url, redis_client) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path, redis_url))) as client:
        yield client


@pytest.fixture
def capture(tmp_path, redis_url) -> Iterator:
    """Install the real logging config for given settings, with its handler writing to a buffer."""
    saved = logging.getLogger().handlers[:], logging.getLogger().level
    buffers: list[io.StringIO] = []

    def install(log_format: str = "json", **overrides) -> io.StringIO:
        settings = make_settings(tmp_path, redis_url, log_format=log_format, **overrides)
        config = logging_config(settings, "api")
        logging.config.dictConfig(config)
        buffer = io.StringIO()
        logging.getLogger().handlers[0].setStream(buffer)
        buffers.append(buffer)
        return buffer

    yield install
    root = logging.getLogger()
    root.handlers[:], root.level = saved


def lines(buffer: io.StringIO) -> list[str]:
    return [line for line in buffer.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_the_context_ids(capture) -> None:
    buffer = capture("json")
    log = logging.getLogger("ham.test")
    log.info("outside any request")
    with log_context(request_id="req-1"):
        log.info("before auth")
        bind(tenant="acme", job_id="job-9")
        log.warning("after auth: %s", "queued")
    records = [json.loads(line) for line in lines(buffer)]
    assert [(r["request_id"], r["job_id"], r["tenant"]) for r in records] == [
        (None, None, None), ("req-1", None, None), ("req-1", "job-9", "acme")]
    assert records[2]["message"] == "after auth: queued" and records[2]["level"] == "WARNING"
    assert records[2]["logger"] == "ham.test" and records[2]["process"] == "api"
    assert records[2]["ts"].endswith("Z")


def test_text_is_the_default_and_appends_the_known_ids(capture, tmp_path, redis_url) -> None:
    assert make_settings(tmp_path, redis_url).log_format == "text"
    buffer = capture("text")
    with log_context(request_id="req-2", tenant="acme"):
        logging.getLogger("ham.test").info("hello")
    (line,) = lines(buffer)
    assert line.endswith("INFO ham.test: hello [request_id=req-2 tenant=acme]")
    with pytest.raises(ValueError):
        json.loads(line)


def test_an_exception_is_one_json_line(capture) -> None:
    buffer = capture("json")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("ham.test").exception("failed")
    (line,) = lines(buffer)
    record = json.loads(line)
    assert "RuntimeError: boom" in record["exc_info"]


def test_secrets_are_redacted_from_messages(capture) -> None:
    buffer = capture("json", webhook_secret="whsec-0123456789")
    logging.getLogger("ham.test").error("key %s and secret whsec-0123456789 leaked", KEY_B)
    text = buffer.getvalue()
    assert KEY_B not in text and "whsec-0123456789" not in text
    assert json.loads(lines(buffer)[0])["message"] == "key [redacted] and secret [redacted] leaked"


def test_short_values_are_not_treated_as_secrets() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "abc in a message", None, None)
    ContextFilter(secrets=("abc",)).filter(record)
    assert record.getMessage() == "abc in a message"


def test_bind_outside_a_context_is_a_no_op_and_rejects_unknown_fields() -> None:
    bind(tenant="nobody")  # no error, nothing to fill
    with log_context(), pytest.raises(ValueError, match="unknown log context field"):
        bind(user="x")


@pytest.mark.parametrize(("presented", "kept"), [
    ("abc-123", True), ("4bf92f3577b34da6a3ce929d0e0e4736", True), ("order/42:retry.1+x=y", True),
    ("", False), (" leading-space", False), ("-dash-first", False), ("a" * 129, False), ("a b", False),
    ('x"y', False), ("x\ny", False), ("ünïcode", False), (None, False),
])
def test_accept_request_id(presented: str | None, kept: bool) -> None:
    got = accept_request_id(presented)
    if kept:
        assert got == presented
    else:
        assert got != presented and len(got) == 32 and int(got, 16) >= 0


def test_the_api_echoes_a_client_request_id_and_logs_it_with_tenant_and_job(client, capture) -> None:
    buffer = capture("json")
    response = submit(client, headers={**AUTH_A, "X-Request-ID": "trace-abc.1"})
    assert response.status_code == 202 and response.headers["X-Request-ID"] == "trace-abc.1"
    job_id = response.json()["id"]
    queued = [r for r in map(json.loads, lines(buffer)) if "queued" in r["message"]]
    assert [(r["request_id"], r["job_id"], r["tenant"]) for r in queued] == [("trace-abc.1", job_id, "alice")]
    assert KEY_A not in buffer.getvalue()
    # The job keeps the id, for the worker's lines.
    services = client.app.state.services
    assert services.jobs.get(job_id).request_id == "trace-abc.1"


def test_every_answer_has_a_request_id_even_errors(client) -> None:
    ids = set()
    for response in (client.get("/healthz"), client.get("/v1/transfers"), client.get("/nope"),
                     client.get("/healthz", headers={"X-Request-ID": "bad id"})):
        ids.add(response.headers["X-Request-ID"])
    assert len(ids) == 4 and "bad id" not in ids
