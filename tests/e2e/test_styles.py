"""End to end: the style library, multi-style jobs and the fleet-wide feature store.

A real stack (``ham api`` and ``ham worker`` processes, real Redis) on a real S3 server
(SeaweedFS): worker A computes a library style's features, worker B — a fresh process
with nothing in memory — finds them in ``features/`` on S3 on its first job.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from ham_core.config import Settings
from ham_core.storage import open_storage
from tests.e2e.conftest import Stack, running_stack
from tests.e2e.test_end_to_end import QUICK, download_png, png, wait_for
from tests.fixtures.images import unique_png

pytestmark = pytest.mark.slow
MAX_STYLES = 3


@pytest.fixture(scope="module")
def s3_stack(redis_url: str, s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    storage_url = s3_server.storage_url(f"ham-e2e-{uuid.uuid4().hex[:8]}")
    extra = {
        **s3_server.env(),
        "redis_db": "8",
        "HAM_QUEUE_NAME": "ham-e2e-styles",
        "HAM_MAX_STYLES_PER_JOB": str(MAX_STYLES),
    }
    with running_stack(redis_url, tmp_path_factory.mktemp("e2e-styles"), storage_url, **extra) as stack:
        stack.storage_url = storage_url  # type: ignore[attr-defined]
        yield stack


@pytest.fixture
def alpha(s3_stack: Stack) -> Iterator[httpx.Client]:
    with s3_stack.client("alpha") as client:
        yield client


@pytest.fixture
def beta(s3_stack: Stack) -> Iterator[httpx.Client]:
    with s3_stack.client("beta") as client:
        yield client


def create_style(client: httpx.Client, image: str | bytes | None = "style0.png", **data: str) -> dict[str, Any]:
    # No image: an empty file part keeps the body multipart (what a browser form sends for a blank file).
    if isinstance(image, bytes):
        files = {"image": ("style.png", image, "image/png")}
    else:
        files = {"image": (image, png(image), "image/png") if image else ("", b"", "application/octet-stream")}
    response = client.post("/v1/styles", files=files, data=data)
    assert response.status_code == 201, response.text
    return response.json()


def transfer(client: httpx.Client, content: str | bytes = "content0.png", styles: list[tuple[str, str]] = (),
             **extra: str):
    files: list[tuple[str, Any]] = [("content", ("content.png", content if isinstance(content, bytes) else png(content),
                                                 "image/png"))]
    data: dict[str, Any] = {**QUICK, **extra}
    for kind, value in styles:
        if kind == "style":
            files.append(("style", (value, png(value), "image/png")))
        else:
            data.setdefault("style_id", []).append(value)
    # httpx sends the text fields before the files: the job's styles are the style_ids, then the uploads.
    return client.post("/v1/transfers", files=files, data=data)


def job_stats(stack: Stack, job_id: str) -> dict[str, Any]:
    return json.loads(stack.redis.hget(f"ham:job:{job_id}", "stats"))


def metric(stack: Stack, port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    return sum(values)


def test_library_style_computed_on_worker_a_is_warm_on_worker_b(s3_stack: Stack, alpha: httpx.Client) -> None:
    # Images of its own: other tests of this module may have sent these pictures first (in any order),
    # and their features would be in the store; this test counts the rows of first uses.
    style = create_style(alpha, image=unique_png("style0.png"), name="house style")
    content_a, content_b = unique_png("content0.png"), unique_png("content1.png")
    assert alpha.get(f"/v1/styles/{style['id']}").json()["name"] == "house style"

    worker_a = s3_stack.live_workers()[0]
    first = transfer(alpha, content=content_a, styles=[("style_id", style["id"])])
    assert first.status_code == 202, first.text
    done = wait_for(alpha, first.json()["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["style_ids"] == [style["id"]], done
    stats_a = job_stats(s3_stack, done["id"])
    assert (stats_a["style_cache_hit"], stats_a["unet_rows"]) == (False, 5 * 3)
    download_png(done["result_url"])

    # Worker B: a new process, nothing in memory; A is gone so B takes the next job.
    worker_a.stop()
    worker_b = s3_stack.start_worker()
    second = transfer(alpha, content=content_b, styles=[("style_id", style["id"])])
    done_b = wait_for(alpha, second.json()["id"], {"succeeded", "failed"})
    assert done_b["status"] == "succeeded", done_b
    stats_b = job_stats(s3_stack, done_b["id"])
    assert (stats_b["style_cache_tier"], stats_b["unet_rows"]) == ("store", 3 * 3), stats_b
    assert metric(s3_stack, worker_b.metrics_port, 'ham_worker_feature_hits_total{kind="style",tier="store"}') == 1
    # The same content again on B: content and style both from memory, 2N rows.
    third = transfer(alpha, content=content_b, styles=[("style_id", style["id"])])
    stats_c = job_stats(s3_stack, wait_for(alpha, third.json()["id"], {"succeeded"})["id"])
    assert (stats_c["content_cache_tier"], stats_c["unet_rows"]) == ("memory", 2 * 3)


def test_a_job_with_three_styles_returns_three_pngs(s3_stack: Stack, alpha: httpx.Client) -> None:
    style = create_style(alpha, image="style2.png")
    response = transfer(alpha, styles=[("style", "style0.png"), ("style_id", style["id"]), ("style", "style1.png")])
    assert response.status_code == 202, response.text
    assert response.json()["style_count"] == 3
    done = wait_for(alpha, response.json()["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded", done
    assert len(done["result_urls"]) == 3 and done["result_urls"][0].split("?")[0] == done["result_url"].split("?")[0]
    pictures = [np.asarray(download_png(url).convert("RGB"), dtype=np.int16) for url in done["result_urls"]]
    assert all(p.shape == (64, 64, 3) for p in pictures)
    assert np.abs(pictures[0] - pictures[1]).max() > 0 and np.abs(pictures[1] - pictures[2]).max() > 0
    stats = job_stats(s3_stack, done["id"])
    assert len(stats["styles"]) == 3


def test_style_ids_of_other_tenants_unknown_ids_and_too_many_styles_are_refused(
    alpha: httpx.Client, beta: httpx.Client
) -> None:
    theirs = create_style(beta, image="style1.png")
    assert alpha.get(f"/v1/styles/{theirs['id']}").status_code == 404
    assert alpha.delete(f"/v1/styles/{theirs['id']}").status_code == 404
    assert theirs["id"] not in [s["id"] for s in alpha.get("/v1/styles").json()["items"]]
    refused = transfer(alpha, styles=[("style_id", theirs["id"])])
    assert (refused.status_code, refused.json()["error"]["field"]) == (404, "style_id")
    unknown = transfer(alpha, styles=[("style_id", uuid.uuid4().hex)])
    assert unknown.status_code == 404
    too_many = transfer(alpha, styles=[("style", "style0.png")] * (MAX_STYLES + 1))
    assert (too_many.status_code, too_many.json()["error"]["field"]) == (422, "style")
    with_prompt = transfer(alpha, styles=[("style_id", theirs["id"])], style_prompt="ink")
    assert (with_prompt.status_code, with_prompt.json()["error"]["field"]) == (422, "style_prompt")
    assert beta.get(f"/v1/styles/{theirs['id']}").status_code == 200  # still theirs, untouched


def test_warm_on_creation_makes_the_first_transfer_warm(s3_stack: Stack, alpha: httpx.Client) -> None:
    style = create_style(alpha, image="style3.png", warm="true", size="64", steps="3")
    assert style["warm_job_id"]
    warmed = wait_for(alpha, style["warm_job_id"], {"succeeded", "failed"})
    assert warmed["status"] == "succeeded", warmed
    done = wait_for(alpha, transfer(alpha, content="content2.png", styles=[("style_id", style["id"])]).json()["id"],
                    {"succeeded"})  # fmt: skip
    assert job_stats(s3_stack, done["id"])["style_cache_hit"] is True


def test_deleting_a_style_removes_its_image_and_features(
    s3_stack: Stack, alpha: httpx.Client, s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    style = create_style(alpha, image="style1.png")
    done = wait_for(alpha, transfer(alpha, styles=[("style_id", style["id"])]).json()["id"], {"succeeded"})
    assert done["status"] == "succeeded"
    storage = open_storage(Settings(storage_url=s3_stack.storage_url))  # type: ignore[attr-defined]
    digest = s3_stack.redis.hget(f"ham:style:{style['id']}", "image_digest").decode()
    assert storage.list_objects(f"features/style/{digest}")
    assert storage.get(f"styles/{style['id']}.png")

    assert alpha.delete(f"/v1/styles/{style['id']}").status_code == 204
    assert alpha.get(f"/v1/styles/{style['id']}").status_code == 404
    assert storage.list_objects(f"features/style/{digest}") == []
    with pytest.raises(KeyError):
        storage.get(f"styles/{style['id']}.png")
    assert transfer(alpha, styles=[("style_id", style["id"])]).status_code == 404


def test_style_listing_pages_newest_first(alpha: httpx.Client) -> None:
    made = [create_style(alpha, image=None, style_prompt=f"ink wash {i}")["id"] for i in range(3)]
    seen: list[str] = []
    cursor = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        page = alpha.get("/v1/styles", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [s["id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen[:3] == made[::-1] and len(seen) == len(set(seen))
