"""The API's latency histograms: short requests apart from long polls and event streams, every route named.

In-process (TestClient on a real Redis): a ``Prefer: wait`` read, an event stream and the
playground's files, then the ``/metrics`` text. tests/e2e/test_monitoring.py checks the
dashboard's p95 against a real Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app
from tests.service.test_api import AUTH_A, make_settings, submit


@pytest.fixture
def api(tmp_path, redis_url, redis_client) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(tmp_path, redis_url))) as client:
        yield client


def _count(text: str, metric: str, **labels: str) -> float:
    """The value of the sample ``metric{labels...}``, 0 when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and sample.labels == labels:
                return sample.value
    return 0.0


def test_a_long_poll_and_an_event_stream_are_counted_apart_from_short_requests(api: TestClient) -> None:
    client = api
    job_id = submit(client).json()["id"]
    route = "/v1/transfers/{job_id}"
    assert client.get(f"/v1/transfers/{job_id}", headers=AUTH_A).status_code == 200
    # The job stays queued (no worker): the long poll waits its full second.
    waited = client.get(f"/v1/transfers/{job_id}", headers={**AUTH_A, "Prefer": "wait=1"})
    assert waited.status_code == 200 and waited.headers["Preference-Applied"] == "wait=1"
    assert client.post(f"/v1/transfers/{job_id}/cancel", headers=AUTH_A).status_code == 200
    with client.stream("GET", f"/v1/transfers/{job_id}/events", headers=AUTH_A) as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        assert "event: canceled" in "".join(events.iter_text())
    text = client.get("/metrics").text

    # Every request is still counted by route and status...
    assert _count(text, "ham_http_requests_total", method="GET", route=route, status="200") == 2
    # ... but only the plain read is in the short-request latency.
    assert _count(text, "ham_http_request_duration_seconds_count", method="GET", route=route) == 1
    assert _count(text, "ham_http_long_request_duration_seconds_count", kind="wait", method="GET", route=route) == 1
    assert _count(text, "ham_http_long_request_duration_seconds_sum", kind="wait", method="GET", route=route) >= 1.0
    events_route = "/v1/transfers/{job_id}/events"
    assert _count(text, "ham_http_request_duration_seconds_count", method="GET", route=events_route) == 0
    assert _count(text, "ham_http_long_request_duration_seconds_count", kind="stream", method="GET",
                  route=events_route) == 1


def test_prefer_wait_zero_is_a_short_request(api: TestClient) -> None:
    client = api
    job_id = submit(client).json()["id"]
    client.get(f"/v1/transfers/{job_id}", headers={**AUTH_A, "Prefer": "wait=0"})
    text = client.get("/metrics").text
    assert _count(text, "ham_http_request_duration_seconds_count", method="GET", route="/v1/transfers/{job_id}") == 1
    assert "ham_http_long_request_duration_seconds_count{" not in text


def test_playground_files_have_a_route_label(api: TestClient) -> None:
    client = api
    page = client.get("/playground/").text
    assets = re.findall(r'(?:src|href)="(/playground/static/[^"]+)"', page)
    for asset in assets:
        assert client.get(asset).status_code == 200
    client.get("/playground/static/no-such-file.js")
    text = client.get("/metrics").text
    route = "/playground/static/{path}"
    assert _count(text, "ham_http_requests_total", method="GET", route=route, status="200") == len(assets)
    assert _count(text, "ham_http_requests_total", method="GET", route=route, status="404") == 1
    assert _count(text, "ham_http_requests_total", method="GET", route="/playground/", status="200") == 1
    assert 'route="<unmatched>"' not in text
