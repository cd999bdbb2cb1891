"""The model catalogue (ham_core.models) against a real Redis: settings, queue names,
announcements, family defaults, and every queue path of a job using its own model's queue."""

from __future__ import annotations

import time

import pytest
import redis
from pydantic import ValidationError

from ham_core.config import Settings
from ham_core.jobs import Job, JobStatus, JobStore, new_job_id, style_key
from ham_core.models import (
    PRESET_FAMILIES,
    Announcement,
    UnknownModel,
    announce,
    announcements,
    catalogue,
    guess_family,
    model_slug,
    queue_name,
    resolve_model,
    withdraw,
)
from ham_core.style_refs import StyleRef
from ham_engine.params import FAMILY_DEFAULTS, PARAM_SPECS, TransferParams, family_default, family_params
from worker.recovery import requeue_orphans


@pytest.fixture
def settings() -> Settings:
    return Settings(queue_name="ham-t", models="tiny,tiny-xl", worker_heartbeat=2, result_ttl=600)


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(redis_client, settings)


def job(model: str | None) -> Job:
    job_id = new_job_id()
    return Job(id=job_id, tenant="t", model=model, styles=[StyleRef(style_key(job_id), None)])


def info(model: str = "tiny-xl", worker: str = "w1", family: str = "sdxl") -> Announcement:
    return Announcement(model=model, family=family, default_size=1024, max_size=2048, dtype="float16",
                        device="cuda:0", random_preset=True, fingerprint="f" * 64, worker=worker)


def test_served_models_default_and_queue_names() -> None:
    assert Settings().served_models == ("tiny",) and Settings().default_model == "tiny"
    assert Settings(model="tiny-xl").default_model == "tiny-xl"
    s = Settings(queue_name="ham", models=" sdxl , tiny,sdxl", model="tiny")
    # The first of HAM_MODELS is the default whatever HAM_MODEL says (a worker's HAM_MODEL is its own model).
    assert s.served_models == ("sdxl", "tiny") and s.default_model == "sdxl"
    assert queue_name(s, "sdxl") == queue_name(s, None) == "ham"  # the default model keeps today's queue
    assert queue_name(s, "tiny") == "ham-tiny"
    assert model_slug("stabilityai/Stable-Diffusion-XL_base 1.0") == "stabilityai-stable-diffusion-xl_base-1.0"


@pytest.mark.parametrize("models", ["a/b,A-B", "tiny,,///", "x" * 201])
def test_models_that_would_share_a_queue_or_have_no_name_are_refused(models: str) -> None:
    with pytest.raises(ValidationError, match="HAM_MODELS"):
        Settings(models=models)


def test_resolve_model(settings: Settings) -> None:
    assert resolve_model(settings, None) == "tiny"
    assert resolve_model(settings, "tiny-xl") == "tiny-xl"
    with pytest.raises(UnknownModel, match=r"'sd3' is not served here; served: tiny, tiny-xl"):
        resolve_model(settings, "sd3")


def test_preset_families_match_the_engines_presets() -> None:
    from ham_engine.tiny import PRESETS

    assert {name: config.family for name, config in PRESETS.items()} == PRESET_FAMILIES


def test_family_defaults_match_the_families_training_sizes() -> None:
    import importlib

    from ham_engine.families import TRANSFORMER_PIPELINES
    from ham_engine.families.sd import StableDiffusion
    from ham_engine.families.sdxl import StableDiffusionXL

    families = [StableDiffusion, StableDiffusionXL] + [
        getattr(importlib.import_module(module), name) for module, name in TRANSFORMER_PIPELINES.values()]
    # Every family the engine knows has its training size as the default size.
    assert {family.name: family.default_size for family in families} == {
        name: defaults["size"] for name, defaults in FAMILY_DEFAULTS.items()}
    assert family_default("sdxl", "size") == 1024 and family_default("sd", "size") == 512
    assert family_default("sdxl", "steps") == TransferParams().steps
    assert family_params("sdxl", {"steps": 3}) == {"size": 1024, "steps": 3}
    assert family_params("sdxl", {"size": 64}) == {"size": 64}
    size = next(spec for spec in PARAM_SPECS if spec.name == "size").json_schema()
    assert size["x-family-defaults"] == {"sd": 512, "sdxl": 1024, "sd3": 1024, "flux": 1024}
    assert size["default"] == 512


def test_guess_family() -> None:
    assert guess_family("tiny-xl") == "sdxl" and guess_family("tiny") == "sd"
    assert guess_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert guess_family("stabilityai/stable-diffusion-2-1-base") == "sd"
    assert guess_family("stabilityai/stable-diffusion-3.5-medium") == "sd3" and guess_family("tiny-sd3") == "sd3"
    assert guess_family("stabilityai/stable-diffusion-3-medium-diffusers") == "sd3"
    assert guess_family("black-forest-labs/FLUX.1-dev") == "flux" and guess_family("tiny-flux") == "flux"


def test_announcements_count_online_workers_and_forget_old_ones(redis_client, settings) -> None:
    now = time.time()
    announce(redis_client, settings, info(worker="w1"), now=now)
    announce(redis_client, settings, info(worker="w2"), now=now - 7)  # 7 s > 3 beats of 2 s: offline
    announce(redis_client, settings, info(worker="gone"), now=now - 10_000)  # > 360 beats: forgotten
    found = announcements(redis_client, settings, "tiny-xl", now=now)
    assert [a.worker for a in found] == ["w1", "w2"]
    assert set(redis_client.hkeys("ham:model:tiny-xl:workers")) == {b"w1", b"w2"}
    entries = {e["name"]: e for e in catalogue(redis_client, settings, now=now)}
    xl = entries["tiny-xl"]
    assert (xl["workers_online"], xl["status"], xl["family_source"], xl["dtype"], xl["device"]) == (
        1, "online", "worker", "float16", "cuda:0")
    assert xl["queue"] == "ham-t-tiny-xl" and xl["fingerprint"] == "f" * 64
    tiny = entries["tiny"]  # nobody announced it: guessed from the name, accepted and queued
    assert (tiny["workers_online"], tiny["status"], tiny["family"], tiny["family_source"]) == (
        0, "no_workers", "sd", "name")
    assert tiny["random_preset"] is True and "noise" in tiny["note"]
    withdraw(redis_client, "tiny-xl", "w1")
    assert catalogue(redis_client, settings, now=now)[1]["workers_online"] == 0


def test_each_job_waits_starts_and_is_requeued_on_its_models_queue(store: JobStore, redis_client, settings) -> None:
    tiny, xl = job("tiny"), job("tiny-xl")
    legacy = job(None)  # a record from before models: the default model's
    for each in (tiny, xl, legacy):
        store.submit(each)
    assert redis_client.lrange("rq:queue:ham-t", 0, -1) == [tiny.id.encode(), legacy.id.encode()]
    assert redis_client.lrange("rq:queue:ham-t-tiny-xl", 0, -1) == [xl.id.encode()]
    assert store.get(xl.id).model == "tiny-xl" and store.get(legacy.id).model is None
    assert store.queue_position(xl.id) == 0 and store.queue_position(legacy.id) == 1
    entries = {e["name"]: e for e in catalogue(redis_client, settings)}
    assert (entries["tiny"]["queue_depth"], entries["tiny-xl"]["queue_depth"]) == (2, 1)
    assert entries["tiny-xl"]["oldest_queued_age"] >= 0

    # Started: it leaves its own list; a worker death puts it back there, not on the default queue.
    assert store.start(xl.id, "xl-worker").status == JobStatus.RUNNING
    assert redis_client.llen("rq:queue:ham-t-tiny-xl") == 0
    assert store.recover(xl.id, "xl-worker", max_retries=2).status == JobStatus.QUEUED
    assert redis_client.lrange("rq:queue:ham-t-tiny-xl", 0, -1) == [xl.id.encode()]
    assert redis_client.llen("rq:queue:ham-t") == 2

    # Cancel while queued removes it from its own list.
    store.request_cancel(xl.id)
    assert redis_client.llen("rq:queue:ham-t-tiny-xl") == 0


def test_orphans_go_back_to_their_own_models_queue(store: JobStore, redis_client, settings) -> None:
    xl, tiny = job("tiny-xl"), job("tiny")
    store.submit(xl)
    store.submit(tiny)
    # A tiny worker's pass must not take the tiny-xl job (waiting in its own list) for an orphan.
    now = time.time()
    assert requeue_orphans(store, grace=1, now=now) == []
    assert requeue_orphans(store, grace=1, now=now + 5) == []
    assert redis_client.llen("rq:queue:ham-t-tiny-xl") == 1 and redis_client.llen("rq:queue:ham-t") == 1
    # Popped by a tiny-xl worker that died before starting it: re-enqueued on the tiny-xl list.
    redis_client.lpop("rq:queue:ham-t-tiny-xl")
    assert requeue_orphans(store, grace=1, now=now) == []
    assert requeue_orphans(store, grace=1, now=now + 5) == [xl.id]
    assert redis_client.lrange("rq:queue:ham-t-tiny-xl", 0, -1) == [xl.id.encode()]
    assert redis_client.llen("rq:queue:ham-t") == 1


# --- the API in-process (TestClient) on the same real Redis -------------------------------------------


@pytest.fixture
def api(tmp_path, redis_url, redis_client):
    from fastapi.testclient import TestClient

    from service.api.app import create_app
    from tests.service.test_api import make_settings

    clients = []

    def build(**overrides):
        client = TestClient(create_app(make_settings(tmp_path, redis_url, models="tiny,tiny-xl", **overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def test_a_model_without_workers_is_refused_only_when_the_setting_says_so(api, redis_client) -> None:
    from tests.service.test_api import AUTH_A, assert_error, submit

    strict = api(models_require_worker=True)
    refused = submit(strict, model="tiny-xl")
    assert_error(refused, 503, "model_unavailable", field="model")
    assert refused.headers["Retry-After"] == "30" and "'tiny-xl'" in refused.json()["error"]["message"]
    assert redis_client.llen("rq:queue:ham-tiny-xl") == 0
    announce(redis_client, strict.app.state.services.settings, info("tiny-xl"))
    accepted = submit(strict, model="tiny-xl")
    assert accepted.status_code == 202 and accepted.json()["model"] == "tiny-xl", accepted.text
    # The default setting queues it whatever the workers (a pool scaled to zero starts on its queue).
    lenient = api()
    queued = submit(lenient, model="tiny")
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    assert_error(submit(lenient, model="sd-99"), 422, "unknown_model", field="model")
    listed = lenient.get("/v1/models", headers=AUTH_A).json()
    assert {m["name"]: (m["status"], m["queue_depth"]) for m in listed["items"]} == {
        "tiny": ("no_workers", 1), "tiny-xl": ("online", 1)}
    assert lenient.get("/v1/models").status_code == 401  # an API key, as for transfers


def test_readyz_and_metrics_say_which_models_answer(api, redis_client) -> None:
    client = api()
    announce(redis_client, client.app.state.services.settings, info("tiny-xl"))
    ready = client.get("/readyz").json()
    assert ready["models"] == {"tiny": {"default": True, "workers_online": 0},
                               "tiny-xl": {"default": False, "workers_online": 1}}
    text = client.get("/metrics").text
    assert 'ham_model_workers_online{model="tiny-xl"} 1.0' in text
    assert 'ham_model_workers_online{model="tiny"} 0.0' in text
    assert 'ham_model_queue_depth{model="tiny"} 0.0' in text


def test_the_schema_names_the_served_models(api) -> None:
    schema = api().get("/openapi.json").json()["components"]["schemas"]
    assert schema["TransferRequest"]["properties"]["model"]["enum"] == ["tiny", "tiny-xl"]
    assert schema["TransferForm"]["properties"]["model"]["enum"] == ["tiny", "tiny-xl", ""]
    assert schema["TransferRequest"]["properties"]["size"]["x-family-defaults"]["sdxl"] == 1024
    assert "/v1/models" in api().get("/openapi.json").json()["paths"]
