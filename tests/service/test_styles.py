"""The style library in-process (TestClient) against a real Redis and file storage.

What the worker does with a style (features, warm jobs, deletion of stored features) is
covered end to end in tests/e2e/test_styles.py; here: the routes' contract, validation,
tenancy, and the job records a multi-style or library-style submission creates.
"""

from __future__ import annotations

import json

import pytest
import redis
from fastapi.testclient import TestClient

from ham_core.jobs import JobStore
from ham_core.styles import StyleRecord, StyleStore
from tests.service.test_api import AUTH_A, AUTH_B, make_client, png_bytes  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("redis_client")


@pytest.fixture
def client(make_client) -> TestClient:  # noqa: F811
    return make_client(max_styles_per_job=3)


def create(client: TestClient, headers: dict = AUTH_A, image: str | None = "style0.png", **data: str):
    files = {"image": (image, png_bytes(image), "image/png") if image else ("", b"", "application/octet-stream")}
    return client.post("/v1/styles", files=files, data=data, headers=headers)


def transfer(client: TestClient, style_ids: list[str] = (), uploads: int = 0, **data: str):
    files = [("content", ("c.png", png_bytes("content0.png"), "image/png"))]
    files += [("style", (f"s{i}.png", png_bytes(f"style{i}.png"), "image/png")) for i in range(uploads)]
    fields: dict = {"steps": "3", "size": "64", **data}
    if style_ids:
        fields["style_id"] = list(style_ids)
    return client.post("/v1/transfers", files=files, data=fields, headers=AUTH_A)


def test_create_read_list_delete_a_style(client: TestClient) -> None:
    made = create(client, name="  house style ", style_prompt="ink wash")
    assert made.status_code == 201, made.text
    style = made.json()
    assert made.headers["location"] == f"/v1/styles/{style['id']}"
    assert (style["name"], style["style_prompt"], style["has_image"], style["warm_job_id"]) == (
        "house style", "ink wash", True, None,
    )  # fmt: skip
    assert client.get(f"/v1/styles/{style['id']}", headers=AUTH_A).json() == style
    assert [s["id"] for s in client.get("/v1/styles", headers=AUTH_A).json()["items"]] == [style["id"]]
    assert client.delete(f"/v1/styles/{style['id']}", headers=AUTH_A).status_code == 204
    assert client.get(f"/v1/styles/{style['id']}", headers=AUTH_A).status_code == 404
    assert client.delete(f"/v1/styles/{style['id']}", headers=AUTH_A).status_code == 404


def test_another_tenant_can_neither_see_nor_use_nor_delete_a_style(client: TestClient) -> None:
    style = create(client).json()
    assert client.get(f"/v1/styles/{style['id']}", headers=AUTH_B).status_code == 404
    assert client.delete(f"/v1/styles/{style['id']}", headers=AUTH_B).status_code == 404
    assert client.get("/v1/styles", headers=AUTH_B).json()["items"] == []
    files = {"content": ("c.png", png_bytes("content0.png"), "image/png")}
    used = client.post("/v1/transfers", files=files, data={"style_id": style["id"]}, headers=AUTH_B)
    assert (used.status_code, used.json()["error"]["field"]) == (404, "style_id")
    assert client.get(f"/v1/styles/{style['id']}", headers=AUTH_A).status_code == 200


@pytest.mark.parametrize(
    ("image", "data", "status", "field"),
    [
        (None, {}, 422, "image"),  # neither image nor prompt
        (None, {"style_prompt": "x" * 1001}, 422, "style_prompt"),
        ("style0.png", {"name": "n" * 201}, 422, "name"),
        ("style0.png", {"warm": "maybe"}, 422, "warm"),
        ("style0.png", {"warm": "true", "size": "100"}, 422, "size"),
        ("style0.png", {"warm": "true", "steps": "many"}, 422, "steps"),
        ("style0.png", {"size": "64x"}, 422, "size"),  # checked even without warm (ignored then)
        ("style0.png", {"size": "100"}, 422, "size"),
        ("style0.png", {"colour": "red"}, 422, "colour"),
    ],
)
def test_bad_style_forms_are_refused_naming_the_field(
    client: TestClient, image: str | None, data: dict, status: int, field: str
) -> None:
    response = create(client, image=image, **data)
    assert (response.status_code, response.json()["error"]["field"]) == (status, field), response.text


def test_a_style_that_is_not_an_image_or_not_multipart_is_refused(client: TestClient) -> None:
    files = {"image": ("x.png", b"not an image at all", "image/png")}
    assert client.post("/v1/styles", files=files, headers=AUTH_A).status_code == 415
    assert client.post("/v1/styles", json={"style_prompt": "ink"}, headers=AUTH_A).status_code == 415
    assert client.get("/v1/styles", params={"cursor": "nope"}, headers=AUTH_A).status_code == 422


def test_listing_pages_newest_first_without_repeats(client: TestClient, redis_client: redis.Redis) -> None:
    store = StyleStore(redis_client)
    for i in range(5):  # equal timestamps too: ties are broken by id
        store.create(StyleRecord(id=f"{i:032x}", tenant="alice", style_prompt="p", created_at=1000.0 + i // 2))
    seen, cursor = [], None
    for _ in range(10):
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/styles", params=params, headers=AUTH_A).json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"{i:032x}" for i in (4, 3, 2, 1, 0)]


def test_a_recorded_digest_never_resurrects_a_deleted_style(redis_client: redis.Redis) -> None:
    store = StyleStore(redis_client)
    record = store.create(StyleRecord(id="a" * 32, tenant="t", style_prompt="p"))
    assert store.set_field(record.id, "image_digest", "d" * 64)
    assert store.get("t", record.id).image_digest == "d" * 64
    store.delete("t", record.id)
    assert not store.set_field(record.id, "image_digest", "d" * 64)
    assert not redis_client.exists(StyleStore.record_key(record.id))


def test_a_multi_style_submission_records_its_styles_in_order(client: TestClient, redis_client: redis.Redis) -> None:
    library = create(client, image="style3.png", style_prompt="ink").json()
    response = transfer(client, style_ids=[library["id"]], uploads=2)
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["style_count"], job["style_ids"], job["result_urls"]) == (3, [library["id"]], None)
    stored = JobStore(redis_client, client.app.state.services.settings).get(job["id"])
    assert [s.style_id for s in stored.styles] == [library["id"], None, None]
    # The job keeps its own copy of the library style's image: deleting the style cannot take it away.
    assert stored.styles[0].to_dict() == {
        "key": f"inputs/{job['id']}/style.png", "prompt": "ink", "style_id": library["id"],
    }  # fmt: skip
    assert stored.input_keys == [
        f"inputs/{job['id']}/content.png", f"inputs/{job['id']}/style.png", f"inputs/{job['id']}/style-1.png",
        f"inputs/{job['id']}/style-2.png",
    ]  # fmt: skip
    storage = client.app.state.services.storage
    assert all(storage.get(key) for key in stored.input_keys)
    assert storage.get(stored.styles[0].key) == storage.get(f"styles/{library['id']}.png")
    assert client.delete(f"/v1/styles/{library['id']}", headers=AUTH_A).status_code == 204
    assert all(storage.get(key) for key in stored.input_keys)


def test_style_limits_and_prompts_of_multi_style_jobs(client: TestClient) -> None:
    library = create(client).json()
    too_many = transfer(client, style_ids=[library["id"]] * 2, uploads=2)
    assert (too_many.status_code, too_many.json()["error"]["field"]) == (422, "style")
    with_prompt = transfer(client, style_ids=[library["id"]], style_prompt="ink")
    assert (with_prompt.status_code, with_prompt.json()["error"]["field"]) == (422, "style_prompt")
    unknown = transfer(client, style_ids=["0" * 32])
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "style_not_found")
    malformed = transfer(client, style_ids=["../../etc/passwd"])
    assert malformed.status_code == 404
    # One upload and a prompt is still the one-style job it always was.
    single = transfer(client, uploads=1, style_prompt="ink")
    assert single.status_code == 202 and single.json()["style_count"] == 1


def test_warm_creation_queues_a_transfer_job_of_the_style(client: TestClient, redis_client: redis.Redis) -> None:
    style = create(client, warm="true", size="64", steps="4").json()
    job = client.get(f"/v1/transfers/{style['warm_job_id']}", headers=AUTH_A).json()
    assert (job["status"], job["style_ids"], job["params"]["size"], job["params"]["steps"]) == (
        "queued", [style["id"]], 64, 4,
    )  # fmt: skip
    record = json.loads(redis_client.hget(f"ham:job:{style['warm_job_id']}", "styles"))
    assert record[0]["key"] == f"styles/{style['id']}.png"
