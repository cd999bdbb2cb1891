"""What the contract promises beyond the happy path: idempotency fingerprints, malformed bodies.

In-process (FastAPI TestClient) against a real Redis and file storage, like ``test_api.py``.
"""

from __future__ import annotations

import base64
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ham_core.config import Settings
from ham_core.idempotency import file_digest, form_fingerprint, json_fingerprint
from ham_core.jobs import IdempotencyConflict, Job, JobStore
from ham_core.ssrf import pinned_request
from tests.service.test_api import (
    AUTH_A,
    AUTH_B,
    assert_error,
    client,
    make_client,
    png_bytes,
    queue_ids,
    stored_files,
    submit,
)

__all__ = ["client", "make_client"]  # fixtures, shared with test_api.py


def _data_uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(name)).decode()


def _json(client: TestClient, key: str | None = None, **body):
    headers = {**AUTH_A, **({"Idempotency-Key": key} if key else {})}
    return client.post("/v1/transfers", json={"content_url": _data_uri("content0.png"), "style_prompt": "ink",
                                              **body}, headers=headers)


# --- the fingerprint ---------------------------------------------------------------------------


def test_a_form_fingerprint_ignores_field_order_but_not_style_order():
    styles = ("style", "style_id")
    a = form_fingerprint([("steps", "3"), ("style", "sha256:1"), ("size", "64"), ("style_id", "x")], styles)
    b = form_fingerprint([("size", "64"), ("style", "sha256:1"), ("style_id", "x"), ("steps", "3")], styles)
    swapped = form_fingerprint([("size", "64"), ("style_id", "x"), ("style", "sha256:1"), ("steps", "3")], styles)
    assert a == b != swapped
    # A blank field is a field not given, as the form reader treats it.
    assert form_fingerprint([("steps", "3"), ("size", "")], ()) == form_fingerprint([("steps", "3")], ())
    assert file_digest(b"abc") != file_digest(b"abd")


def test_a_json_fingerprint_ignores_member_order():
    assert json_fingerprint({"a": 1, "b": [1, 2]}) == json_fingerprint({"b": [1, 2], "a": 1})
    assert json_fingerprint({"a": 1}) != json_fingerprint({"a": 2})
    assert json_fingerprint({"b": [1, 2]}) != json_fingerprint({"b": [2, 1]})


# --- same key, same or different request ------------------------------------------------------------


def test_same_key_with_the_same_form_replays_and_with_another_form_is_409_naming_the_key(client, redis_client,
                                                                                         tmp_path):
    headers = {**AUTH_A, "Idempotency-Key": "order-7"}
    first = submit(client, headers=headers, steps="3")
    replay = submit(client, headers=headers, steps="3")
    assert (first.status_code, replay.status_code) == (202, 200)
    assert replay.json()["id"] == first.json()["id"]
    other_params = submit(client, headers=headers, steps="7")
    error = assert_error(other_params, 409, "idempotency_key_reused", "Idempotency-Key")
    assert "'order-7'" in error["message"] and first.json()["id"] in error["message"]
    other_image = client.post("/v1/transfers", headers=headers, data={"steps": "3"}, files={
        "content": ("content.png", png_bytes("content1.png"), "image/png"),
        "style": ("style.png", png_bytes("style0.png"), "image/png"),
    })
    assert_error(other_image, 409, "idempotency_key_reused", "Idempotency-Key")
    # Even a body that would not validate is a different request: 409, not the first job.
    invalid = client.post("/v1/transfers", headers=headers, data={"steps": "-1"},
                          files={"content": ("c.png", b"not an image", "image/png")})
    assert_error(invalid, 409, "idempotency_key_reused", "Idempotency-Key")
    # A file's name is not part of the request; the bytes are.
    renamed = client.post("/v1/transfers", headers=headers, data={"steps": "3"}, files={
        "content": ("renamed.png", png_bytes("content0.png"), "image/png"),
        "style": ("other-name.png", png_bytes("style0.png"), "image/png"),
    })
    assert renamed.status_code == 200 and renamed.json()["id"] == first.json()["id"]
    assert queue_ids(redis_client) == [first.json()["id"]]
    assert stored_files(tmp_path) == sorted(f"inputs/{first.json()['id']}/{n}.png" for n in ("content", "style"))


def test_same_key_with_the_same_json_replays_and_with_another_json_is_409(client, redis_client):
    first = _json(client, "json-1", steps=3, size=64)
    replay = _json(client, "json-1", size=64, steps=3)  # member order is not the request
    assert (first.status_code, replay.status_code) == (202, 200)
    assert replay.json()["id"] == first.json()["id"]
    assert_error(_json(client, "json-1", steps=4, size=64), 409, "idempotency_key_reused", "Idempotency-Key")
    # The same key as multipart is another request too.
    assert_error(submit(client, headers={**AUTH_A, "Idempotency-Key": "json-1"}), 409, "idempotency_key_reused")
    assert queue_ids(redis_client) == [first.json()["id"]]


def test_a_reused_key_is_409_even_when_the_queue_is_full(make_client, redis_client):
    client = make_client(max_queued_per_tenant=1)
    headers = {**AUTH_A, "Idempotency-Key": "full-1"}
    first = submit(client, headers=headers)
    assert submit(client, headers=headers).status_code == 200
    assert_error(submit(client, headers=headers, steps="9"), 409, "idempotency_key_reused")
    assert queue_ids(redis_client) == [first.json()["id"]]


def test_the_key_is_per_tenant_whatever_the_request(client):
    first = submit(client, headers={**AUTH_A, "Idempotency-Key": "shared"}, steps="3")
    other = submit(client, headers={**AUTH_B, "Idempotency-Key": "shared"}, steps="9")
    assert (first.status_code, other.status_code) == (202, 202)


def test_concurrent_duplicates_make_one_job_and_concurrent_different_requests_one_job_and_409s(client,
                                                                                               redis_client):
    answers: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def send(kind: str, steps: str) -> None:
        response = submit(client, headers={**AUTH_A, "Idempotency-Key": f"race-{kind}"}, steps=steps)
        with lock:
            answers.append((kind, response.status_code, response.json().get("id") or response.json()["error"]["code"]))

    threads = [threading.Thread(target=send, args=("same", "3")) for _ in range(6)]
    threads += [threading.Thread(target=send, args=("diff", str(2 + i))) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    same = [(status, what) for kind, status, what in answers if kind == "same"]
    assert sorted(status for status, _ in same) == [200] * 5 + [202]
    assert len({what for _, what in same}) == 1
    diff = [(status, what) for kind, status, what in answers if kind == "diff"]
    assert sorted(status for status, _ in diff) == [202] + [409] * 5
    assert {what for status, what in diff if status == 409} == {"idempotency_key_reused"}
    created = {what for _, status, what in answers if status == 202}
    assert sorted(queue_ids(redis_client)) == sorted(created) and len(created) == 2


def test_the_store_refuses_another_fingerprint_and_replays_records_without_one(redis_client):
    store = JobStore(redis_client, Settings(queue_name="ham-test", result_ttl=600))
    first, created = store.submit(Job(id="a" * 32, tenant="t"), "k", fingerprint="v1:one")
    assert created
    again, created = store.submit(Job(id="b" * 32, tenant="t"), "k", fingerprint="v1:one")
    assert not created and again.id == first.id
    with pytest.raises(IdempotencyConflict) as refused:
        store.submit(Job(id="c" * 32, tenant="t"), "k", fingerprint="v1:two")
    assert (refused.value.key, refused.value.job_id) == ("k", first.id)
    with pytest.raises(IdempotencyConflict):
        store.find_by_idempotency_key("t", "k", "v1:two")
    # A record written before fingerprints (the job id alone) replays whatever the request.
    redis_client.set(store.idempotency_key("t", "old"), first.id)
    assert store.find_by_idempotency_key("t", "old", "v1:any").id == first.id


# --- malformed bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [40, 1_000, 100_000])
def test_deeply_nested_json_is_400_without_a_traceback(make_client, redis_client, caplog, depth):
    client = make_client(raise_server_exceptions=False)
    body = b'{"content_url": ' + b"[" * depth + b"]" * depth + b"}"
    response = client.post("/v1/transfers", content=body, headers={**AUTH_A, "Content-Type": "application/json"})
    assert_error(response, 400, "invalid_json")
    assert "deep" in response.json()["error"]["message"]
    assert not [r for r in caplog.records if r.exc_info]
    assert queue_ids(redis_client) == []


def test_deeply_nested_json_with_an_idempotency_key_is_400_too(client):
    body = b"[" * 100_000 + b"]" * 100_000
    response = client.post("/v1/transfers", content=body,
                           headers={**AUTH_A, "Content-Type": "application/json", "Idempotency-Key": "deep"})
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("count", [5, 8, 100])
@pytest.mark.parametrize("field", ["style", "style_id"])
def test_too_many_styles_is_422_whatever_the_count(client, redis_client, count, field):
    parts: list[tuple[str, tuple]] = [("content", ("c.png", png_bytes(), "image/png"))]
    for index in range(count):
        if field == "style":
            parts.append(("style", (f"s{index}.png", png_bytes("style0.png"), "image/png")))
        else:
            parts.append(("style_id", (None, "0" * 32)))
    response = client.post("/v1/transfers", files=parts, headers=AUTH_A)
    error = assert_error(response, 422, "too_many_styles", "style")
    assert f"got {count}" in error["message"]
    assert queue_ids(redis_client) == []


# --- small promises --------------------------------------------------------------------------------


def test_prefer_wait_on_a_post_answers_the_finished_job_200(client, redis_client):
    jobs = client.app.state.services.jobs

    def worker() -> None:  # plays a worker: takes the job off the queue once it is there and finishes it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not queue_ids(redis_client):
            time.sleep(0.02)
        job_id = queue_ids(redis_client)[0]
        jobs.start(job_id, "worker-1")
        jobs.succeed(job_id, f"results/{job_id}.png", {"seconds": 1.0})

    player = threading.Thread(target=worker)
    player.start()
    headers = {**AUTH_A, "Prefer": "wait=20", "Idempotency-Key": "wait-1"}
    answer = submit(client, headers=headers)
    player.join(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "succeeded" and answer.headers["preference-applied"] == "wait=20"
    assert answer.headers["location"] == f"/v1/transfers/{answer.json()['id']}"
    # A replay of it, finished already, is the same 200; without Prefer a queued job is still a 202.
    assert submit(client, headers=headers).json()["status"] == "succeeded"
    assert submit(client).status_code == 202


def test_an_ipv6_literal_keeps_its_brackets_in_the_host_header():
    url, headers, _ = pinned_request("http://[2001:db8::1]:8080/a.png", "2001:db8::1")
    assert (url, headers) == ("http://[2001:db8::1]:8080/a.png", {"Host": "[2001:db8::1]:8080"})
    url, headers, extensions = pinned_request("https://[2001:db8::2]/a.png", "2001:db8::2")
    assert headers == {"Host": "[2001:db8::2]"} and url == "https://[2001:db8::2]/a.png"
    assert extensions == {"sni_hostname": "2001:db8::2"}
    url, headers, _ = pinned_request("http://images.example:81/a.png", "2001:db8::3")
    assert (url, headers) == ("http://[2001:db8::3]:81/a.png", {"Host": "images.example:81"})


@pytest.mark.parametrize("scheme", ["data", "DATA", "Data"])
def test_a_data_uri_scheme_is_case_insensitive(client, scheme):
    response = client.post("/v1/transfers", headers=AUTH_A, json={
        "content_url": _data_uri("content0.png").replace("data", scheme, 1), "style_prompt": "ink"})
    assert response.status_code == 202, response.text


@pytest.mark.parametrize("warm", ["1", "yes", "on", "0", "no", "off", "True "])
def test_warm_on_a_style_is_true_or_false_only(client, warm):
    response = client.post("/v1/styles", headers=AUTH_A, files={"style_prompt": (None, "ink"), "warm": (None, warm)})
    if warm.strip().lower() in ("true", "false"):
        assert response.status_code == 201, response.text
    else:
        assert_error(response, 422, "invalid_parameter", "warm")


def test_a_standalone_worker_binds_its_metrics_on_loopback_and_the_image_on_every_interface():
    from worker.main import build_parser

    assert build_parser().parse_args([]).metrics_host is None  # → the setting
    assert Settings().worker_metrics_host == "127.0.0.1"
    dockerfile = (Path(__file__).resolve().parents[2] / "deploy" / "docker" / "worker.Dockerfile").read_text()
    assert "HAM_WORKER_METRICS_HOST=0.0.0.0" in dockerfile


# --- styles in the JSON body --------------------------------------------------------------------


def _library_style(client: TestClient, image: str = "style1.png", prompt: str | None = None) -> str:
    files: dict = {"image": (image, png_bytes(image), "image/png")}
    if prompt:
        files["style_prompt"] = (None, prompt)
    made = client.post("/v1/styles", headers=AUTH_A, files=files)
    assert made.status_code == 201, made.text
    return made.json()["id"]


def test_a_json_job_takes_style_ids_and_lists_of_style_urls_in_order(client, redis_client):
    library = _library_style(client, prompt="ink")
    response = client.post("/v1/transfers", headers=AUTH_A, json={
        "content_url": _data_uri("content0.png"),
        "style_url": [_data_uri("style0.png"), _data_uri("style2.png")], "style_id": library, "steps": 3})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["style_count"], job["style_ids"], job["has_style"]) == (3, [library], True)
    stored = client.app.state.services.jobs.get(job["id"])
    assert [s.style_id for s in stored.styles] == [None, None, library]
    assert [s.prompt for s in stored.styles] == [None, None, "ink"]
    storage = client.app.state.services.storage
    normalised = [storage.get(s.key) for s in stored.styles]
    assert normalised[2] == storage.get(f"styles/{library}.png") and len(set(normalised)) == 3
    # One style_id alone, as a string or a one-item array: a one-style job of the library style.
    for given in (library, [library]):
        one = client.post("/v1/transfers", headers=AUTH_A, json={"content_url": _data_uri("content0.png"),
                                                                 "style_id": given})
        assert one.status_code == 202 and one.json()["style_ids"] == [library], one.text


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"style_id": []}, 422, "invalid_parameter", "style_id"),
    ({"style_url": [1]}, 422, "invalid_parameter", "style_url"),
    ({"style_url": ""}, 422, "invalid_parameter", "style_url"),
    ({"style_id": "0" * 32}, 404, "style_not_found", "style_id"),
    ({"style_url": ["data:,x"] * 5}, 422, "too_many_styles", "style_url"),
    ({"style_id": ["0" * 32] * 100}, 422, "too_many_styles", "style_id"),
    ({"style_url": [_data_uri("style0.png")] * 2, "style_prompt": "ink"}, 422, "invalid_parameter", "style_prompt"),
])
def test_bad_json_styles_are_refused_naming_the_field(client, redis_client, body, status, code, field):
    response = client.post("/v1/transfers", headers=AUTH_A, json={"content_url": _data_uri("content0.png"), **body})
    assert_error(response, status, code, field)
    assert queue_ids(redis_client) == []


# --- the job resource's links and expiry, rate-limit headers ------------------------------------------


def test_a_job_links_to_itself_its_cancel_and_its_events_and_says_when_its_result_expires(client):
    job = submit(client).json()
    base = f"/v1/transfers/{job['id']}"
    assert job["urls"] == {"self": base, "cancel": f"{base}/cancel", "events": f"{base}/events"}
    assert job["result_expires_at"] is None
    jobs = client.app.state.services.jobs
    jobs.start(job["id"], "worker-1")
    jobs.succeed(job["id"], f"results/{job['id']}.png", {"seconds": 1.0})
    done = client.get(job["urls"]["self"], headers=AUTH_A).json()
    finished = datetime.fromisoformat(done["finished_at"])
    expires = datetime.fromisoformat(done["result_expires_at"])
    assert expires - finished == timedelta(seconds=client.app.state.services.settings.result_ttl)
    assert client.post(done["urls"]["cancel"], headers=AUTH_A).status_code == 409  # the link is the action


def test_every_counted_answer_carries_the_ratelimit_headers(make_client):
    client = make_client(rate_limit_per_minute=3)
    answers = [submit(client), client.get("/v1/transfers/nope", headers=AUTH_A), client.get("/v1/transfers",
                                                                                            headers=AUTH_A)]
    assert [a.status_code for a in answers] == [202, 404, 200]
    for answer in answers:
        assert answer.headers["ratelimit-policy"] == '"per-minute";q=3;w=60'
    remaining = [int(a.headers["ratelimit"].split(";r=")[1].split(";")[0]) for a in answers]
    assert remaining == [2, 1, 0]
    refused = client.get("/v1/transfers", headers=AUTH_A)
    assert refused.status_code == 429 and refused.headers["ratelimit"].startswith('"per-minute";r=0;t=')
    assert int(refused.headers["ratelimit"].rsplit("t=", 1)[1]) == int(refused.headers["retry-after"])
    # Not counted, not promised: the public health probe has no rate-limit headers.
    assert "ratelimit" not in client.get("/healthz").headers


def test_the_event_stream_types_each_event_and_not_the_stream_as_a_string():
    """Beside ``itemSchema`` a media type's ``schema`` types the whole stream (OpenAPI 3.2: the array of events);
    ``{"type": "string"}`` there contradicted every event (schemathesis ST108), so there is none."""
    from service.api.app import create_app

    media = create_app().openapi()["paths"]["/v1/transfers/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert media["text/event-stream"]["itemSchema"] == {"$ref": "#/components/schemas/TransferEvent"}
    assert "schema" not in media["text/event-stream"]


_FORM_CASES = [  # (form fields, with a style file, a style given): blank fields count as left out
    ({}, False, False), ({"style_prompt": ""}, False, False), ({"style_id": ""}, False, False),
    ({"style_prompt": "ink"}, False, True), ({}, True, True),
]


@pytest.mark.parametrize(("fields", "with_file", "styled"), _FORM_CASES)
def test_the_machine_readable_style_rule_of_a_form_agrees_with_the_server(client, fields, with_file, styled):
    """``x-style-rule`` (the style rule's "at least one style", where generators ignore it) judges as the server."""
    import jsonschema

    from service.api.schemas import STYLE_RULE_KEY

    rule = client.get("/openapi.json").json()["components"]["schemas"]["TransferForm"][STYLE_RULE_KEY]
    body = {"content": "<bytes>", **{k: [v] if k == "style_id" else v for k, v in fields.items()},
            **({"style": ["<bytes>"]} if with_file else {})}
    valid = jsonschema.Draft202012Validator(rule).is_valid(body)
    answer = submit(client, style=with_file, **fields)
    assert answer.status_code == (202 if valid else 422), (body, answer.text)
    assert valid == styled


@pytest.mark.parametrize("styles", [{}, {"style_prompt": "ink"}, {"style_url": "content1.png"},
                                    {"style_url": ["content1.png", "content0.png"]}])
def test_the_machine_readable_style_rule_of_a_json_body_agrees_with_the_server(client, styles):
    import jsonschema

    from service.api.schemas import STYLE_RULE_KEY

    rule = client.get("/openapi.json").json()["components"]["schemas"]["TransferRequest"][STYLE_RULE_KEY]
    if "style_url" in styles:
        urls = styles["style_url"]
        styles = {"style_url": [_data_uri(u) for u in urls] if isinstance(urls, list) else _data_uri(urls)}
    body = {"content_url": _data_uri("content0.png"), **styles}
    valid = jsonschema.Draft202012Validator(rule).is_valid(body)
    answer = client.post("/v1/transfers", json=body, headers=AUTH_A)
    assert answer.status_code == (202 if valid else 422), (styles, answer.text)
    assert valid == bool(styles)
