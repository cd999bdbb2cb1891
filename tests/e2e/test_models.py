"""End to end: one API, two models — a ``tiny`` pool and a ``tiny-xl`` pool on one stack.

Real ``ham api`` and ``ham worker`` processes on real Redis: ``HAM_MODELS=tiny,tiny-xl``, one
worker with ``HAM_MODEL=tiny`` and one with ``HAM_MODEL=tiny-xl``. Each model's jobs wait in
its own queue and run only on its own workers; ``/v1/models`` shows both live; the families'
defaults apply; a library style used with both models hits each model's own features.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ham_core.config import Settings
from ham_core.storage import open_storage
from tests.e2e.conftest import REPO, TENANTS, Stack, running_stack
from tests.e2e.test_end_to_end import QUICK, download_png, png, wait_for
from tests.fixtures import waiting
from tests.fixtures.images import unique_png

pytestmark = pytest.mark.slow
QUEUE = "ham-e2e-models"
# Its own Redis database: 7 is the shared e2e stack's, 8 the styles stack's, 9 the deploy commands',
# 10 the schema fuzz API's.


@pytest.fixture(scope="module")
def two_pools(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    extra = {"redis_db": "11", "HAM_QUEUE_NAME": QUEUE, "HAM_MODELS": "tiny,tiny-xl", "HAM_MODEL": "tiny"}
    with running_stack(redis_url, tmp_path_factory.mktemp("e2e-models"), **extra) as stack:
        stack.start_worker(HAM_MODEL="tiny-xl")
        yield stack


@pytest.fixture
def alpha(two_pools: Stack) -> Iterator[httpx.Client]:
    with two_pools.client("alpha") as client:
        yield client


def transfer(client: httpx.Client, model: str | None = None, **fields: str) -> httpx.Response:
    data = {**QUICK, **fields}
    if model is not None:
        data["model"] = model
    files = {"content": ("c.png", png("content0.png"), "image/png"), "style": ("s.png", png("style0.png"), "image/png")}
    return client.post("/v1/transfers", files=files, data=data)


def catalogue(client: httpx.Client) -> dict[str, dict[str, Any]]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {item["name"]: item for item in response.json()["items"]}


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> Any:
    return waiting.wait_until(predicate, timeout, what)


def test_models_lists_both_pools_live(two_pools: Stack, alpha: httpx.Client) -> None:
    body = alpha.get("/v1/models").json()
    assert body["default"] == "tiny"
    assert [item["name"] for item in body["items"]] == ["tiny", "tiny-xl"]
    models = catalogue(alpha)
    tiny, xl = models["tiny"], models["tiny-xl"]
    assert (tiny["queue"], xl["queue"]) == (QUEUE, f"{QUEUE}-tiny-xl")
    assert (tiny["family"], tiny["family_source"], tiny["default_size"]) == ("sd", "worker", 512)
    assert (xl["family"], xl["family_source"], xl["default_size"]) == ("sdxl", "worker", 1024)
    assert (tiny["defaults"], xl["defaults"]) == ({"size": 512}, {"size": 1024})
    for item in (tiny, xl):
        assert item["workers_online"] == 1 and item["status"] == "online", item
        assert item["random_preset"] is True and "noise" in item["note"] and "HAM_MODEL" in item["note"]
        assert (item["dtype"], item["device"], item["max_size"]) == ("float32", "cpu", 2048)
        # The feature store is on (the default): the weights fingerprint is announced, and differs per model.
        assert item["fingerprint"] and len(item["fingerprint"]) >= 16
        assert item["queue_depth"] == 0 and item["oldest_queued_age"] is None
    assert tiny["fingerprint"] != xl["fingerprint"]
    assert tiny["default"] is True and xl["default"] is False


def test_each_models_jobs_run_only_on_its_workers(two_pools: Stack, alpha: httpx.Client) -> None:
    sent = {"tiny": [], "tiny-xl": []}
    for _ in range(3):
        for model in sent:
            response = transfer(alpha, model)
            assert response.status_code == 202, response.text
            assert response.json()["model"] == model
            sent[model].append(response.json()["id"])
    # A transfer naming no model runs on the default one.
    plain = transfer(alpha)
    assert plain.status_code == 202 and plain.json()["model"] == "tiny"
    sent["tiny"].append(plain.json()["id"])
    ran_on: dict[str, set[str]] = {}
    for model, ids in sent.items():
        for job_id in ids:
            done = wait_for(alpha, job_id, {"succeeded", "failed"}, timeout=120)
            assert done["status"] == "succeeded", done
            ran_on.setdefault(model, set()).add(two_pools.redis.hget(f"ham:job:{job_id}", "worker").decode())
    # Each model's pool: its live workers (another test may have replaced the tiny-xl one).
    pools = {model: {w.name for w in two_pools.live_workers() if w.model == model} for model in sent}
    assert all(pools.values()) and not pools["tiny"] & pools["tiny-xl"], pools
    assert ran_on["tiny"] <= pools["tiny"] and ran_on["tiny-xl"] <= pools["tiny-xl"], (ran_on, pools)


def test_an_unknown_model_is_a_422_naming_the_served_ones(alpha: httpx.Client) -> None:
    response = transfer(alpha, "sd-99")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("unknown_model", "model")
    assert "'sd-99'" in error["message"] and "tiny, tiny-xl" in error["message"]
    as_json = alpha.post("/v1/transfers", json={"content_url": "data:,", "style_prompt": "ink", "model": "nope"})
    assert as_json.status_code == 422 and as_json.json()["error"]["code"] == "unknown_model", as_json.text


def test_family_defaults_size_sd_512_sdxl_1024(alpha: httpx.Client) -> None:
    # One step, so the 1024 px tiny-xl job stays quick on a CPU.
    tiny = transfer(alpha, "tiny", steps="1", size="")
    xl = transfer(alpha, "tiny-xl", steps="1", size="")
    assert tiny.status_code == xl.status_code == 202, (tiny.text, xl.text)
    assert tiny.json()["params"]["size"] == 512
    assert xl.json()["params"]["size"] == 1024
    # Given explicitly, the size is the client's, whatever the family.
    explicit = transfer(alpha, "tiny-xl", steps="1", size="128")
    assert explicit.json()["params"]["size"] == 128
    for response, side in ((tiny, 512), (xl, 1024), (explicit, 128)):
        done = wait_for(alpha, response.json()["id"], {"succeeded", "failed"}, timeout=180)
        assert done["status"] == "succeeded", done
        assert max(download_png(done["result_url"]).size) == side


def test_a_model_without_workers_queues_until_its_pool_starts(two_pools: Stack, alpha: httpx.Client) -> None:
    xl_worker = next(w for w in two_pools.live_workers() if w.name != "e2e-worker-1")
    assert xl_worker.stop() == 0
    # A clean stop withdraws the announcement at once.
    wait_until(lambda: catalogue(alpha)["tiny-xl"]["workers_online"] == 0, what="tiny-xl offline")
    assert catalogue(alpha)["tiny-xl"]["status"] == "no_workers"
    queued = transfer(alpha, "tiny-xl")
    assert queued.status_code == 202, queued.text
    job = queued.json()
    assert (job["status"], job["queue_position"]) == ("queued", 0)
    state = catalogue(alpha)["tiny-xl"]
    assert state["queue_depth"] == 1 and state["oldest_queued_age"] >= 0, state
    # The tiny pool does not take it: a tiny job submitted after it finishes while it waits.
    other = transfer(alpha, "tiny")
    assert wait_for(alpha, other.json()["id"], {"succeeded"})["status"] == "succeeded"
    assert alpha.get(f"/v1/transfers/{job['id']}").json()["status"] == "queued"
    replacement = two_pools.start_worker(HAM_MODEL="tiny-xl")
    done = wait_for(alpha, job["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "succeeded" and done["model"] == "tiny-xl", done
    assert two_pools.redis.hget(f"ham:job:{job['id']}", "worker").decode() == replacement.name
    assert catalogue(alpha)["tiny-xl"]["queue_depth"] == 0


def test_one_library_style_hits_each_models_own_features(two_pools: Stack, alpha: httpx.Client) -> None:
    # An image of its own: another test of this module warms style1.png (in any order).
    files = {"image": ("style1.png", unique_png("style1.png"), "image/png")}
    style = alpha.post("/v1/styles", files=files, data={"name": "both models"})
    assert style.status_code == 201, style.text
    style_id = style.json()["id"]

    def run(model: str, content: str) -> dict[str, Any]:
        files = {"content": ("c.png", png(content), "image/png")}
        response = alpha.post("/v1/transfers", files=files, data={**QUICK, "style_id": style_id, "model": model})
        assert response.status_code == 202, response.text
        done = wait_for(alpha, response.json()["id"], {"succeeded", "failed"}, timeout=120)
        assert done["status"] == "succeeded", done
        return json.loads(two_pools.redis.hget(f"ham:job:{done['id']}", "stats"))

    steps = int(QUICK["steps"])
    # First use on tiny: the style's features are computed (inversion + sampling: 5 rows per step).
    first = run("tiny", "content2.png")
    assert (first["style_cache_hit"], first["unet_rows"]) == (False, 5 * steps), first
    # The same style on tiny-xl: tiny's features are not tiny-xl's — computed again, 5 rows per step.
    xl_first = run("tiny-xl", "content2.png")
    assert (xl_first["style_cache_hit"], xl_first["unet_rows"]) == (False, 5 * steps), xl_first
    # Each model again with another content: each finds its own style features (3 rows per step).
    for model in ("tiny", "tiny-xl"):
        again = run(model, "content3.png")
        assert (again["style_cache_hit"], again["unet_rows"]) == (True, 3 * steps), (model, again)
    # The shared store holds the style's features once per model (two blobs under its image digest).
    storage = open_storage(Settings(storage_url=two_pools.env["HAM_STORAGE_URL"]))
    digest = two_pools.redis.hget(f"ham:style:{style_id}", "image_digest").decode()
    assert len(storage.list_objects(f"features/style/{digest}")) == 2


def test_the_client_and_ham_submit_pick_a_model(two_pools: Stack, tmp_path) -> None:
    from ham_client import ApiError, Client, ModelList

    data = REPO / "tests" / "data"
    with Client(two_pools.base_url, api_key=TENANTS["alpha"]) as ham:
        models = ham.models()
        assert isinstance(models, ModelList) and models.default == "tiny"
        assert [m.name for m in models.items] == ["tiny", "tiny-xl"]
        assert [m.family for m in models.items] == ["sd", "sdxl"] and models.items[1].random_preset
        job = ham.submit(data / "content0.png", style=data / "style0.png", model="tiny-xl", steps=2, size=64)
        assert job.model == "tiny-xl"
        assert ham.wait(job.id, timeout=120).status == "succeeded"
        with pytest.raises(ApiError) as refused:
            ham.submit(data / "content0.png", style_prompt="ink", model="sd-99")
        assert (refused.value.status, refused.value.code, refused.value.field) == (422, "unknown_model", "model")
    out = tmp_path / "out.png"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def ham_submit(model: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "ham_cli", "submit", str(data / "content1.png"), "--style",
                   str(data / "style1.png"), "--model", model, "--steps", "2", "--size", "64", "-o", str(out),
                   "--api", two_pools.base_url, "--key", TENANTS["alpha"], "-q"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)

    done = ham_submit("tiny-xl")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    refused_cli = ham_submit("sd-99")
    assert refused_cli.returncode == 1 and "sd-99" in refused_cli.stderr and "tiny, tiny-xl" in refused_cli.stderr, (
        refused_cli.stderr)


def test_warming_a_style_for_a_model_runs_on_that_models_pool(two_pools: Stack, alpha: httpx.Client) -> None:
    files = {"image": ("style2.png", png("style2.png"), "image/png")}
    warm = {"warm": "true", "steps": "2", "model": "tiny-xl"}
    created = alpha.post("/v1/styles", files=files, data=warm)
    assert created.status_code == 201, created.text
    job = wait_for(alpha, created.json()["warm_job_id"], {"succeeded", "failed"}, timeout=180)
    # No size given: the SDXL family's 1024 (the size transfers on tiny-xl default to).
    assert (job["status"], job["model"], job["params"]["size"]) == ("succeeded", "tiny-xl", 1024), job
    worker = two_pools.redis.hget(f"ham:job:{job['id']}", "worker").decode()
    assert worker != "e2e-worker-1", "the tiny worker ran a tiny-xl warm-up"
    refused = alpha.post("/v1/styles", files=files, data={**warm, "model": "sd-99"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_model", refused.text
    # Without warm the warm job's fields are checked and ignored (a generated client sends every field).
    unwarmed = alpha.post("/v1/styles", files=files, data={"model": "tiny-xl"})
    assert unwarmed.status_code == 201 and unwarmed.json()["warm_job_id"] is None, unwarmed.text
    unknown = alpha.post("/v1/styles", files=files, data={"model": "sd-99"})
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "unknown_model", unknown.text
