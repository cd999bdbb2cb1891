"""docker-compose.yml, its cpu override, the Prometheus config and the Dockerfiles, checked offline.

The compose files validate against the Compose Specification schema (vendored, see
schemas/README.md) after interpolation and override merging; the Dockerfiles are parsed for
what Docker would run: pinned bases, a non-root user, a healthcheck, ``ham api``/``ham worker``.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from ham_core.config import Settings
from tests.deploy.compose_files import (
    Stage,
    dockerignore_excludes,
    environment,
    exec_form,
    load_compose,
    parse_dockerfile,
    read_dockerignore,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILES = {"api": ROOT / "deploy/docker/api.Dockerfile", "worker": ROOT / "deploy/docker/worker.Dockerfile"}
SETTINGS_ENV = {f"HAM_{name.upper()}" for name in Settings.model_fields}
SCHEMA = json.loads((Path(__file__).parent / "schemas" / "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def gpu() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def cpu() -> dict:
    return load_compose(COMPOSE, COMPOSE_CPU)


def final_stage(name: str) -> Stage:
    return parse_dockerfile(DOCKERFILES[name])[1][-1]


def duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    return int(text[:-1]) * units[text[-1]]


# --- compose -------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [("docker-compose.yml",), ("docker-compose.yml", "docker-compose.cpu.yml")])
def test_compose_files_satisfy_the_compose_schema(files: tuple[str, ...]) -> None:
    merged = load_compose(*(ROOT / f for f in files))
    errors = sorted(jsonschema.Draft201909Validator(SCHEMA).iter_errors(merged), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_schema_check_catches_a_misplaced_gpu_reservation(gpu: dict) -> None:
    broken = json.loads(json.dumps(gpu))
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["gpus"] = 1
    assert not jsonschema.Draft201909Validator(SCHEMA).is_valid(broken)


def test_stack_has_redis_s3_api_worker_prometheus_and_grafana(gpu: dict, cpu: dict) -> None:
    assert set(gpu["services"]) == set(cpu["services"]) == {
        "redis", "s3", "api", "worker", "worker-2", "prometheus", "grafana"}
    # The second model's pool runs only with its profile (docs/deploy.md, "Several models").
    assert gpu["services"]["worker-2"]["profiles"] == ["second-model"]
    assert "profiles" not in gpu["services"]["worker"]


def test_every_ham_variable_in_compose_is_a_settings_field(gpu: dict, cpu: dict) -> None:
    for stack in (gpu, cpu):
        for name, service in stack["services"].items():
            ham = {k for k in environment(service) if k.startswith("HAM_")}
            assert ham <= SETTINGS_ENV, f"{name}: not Settings fields: {sorted(ham - SETTINGS_ENV)}"
    assert {k for k in environment(gpu["services"]["worker"]) if k.startswith("HAM_")} >= {
        "HAM_REDIS_URL", "HAM_STORAGE_URL", "HAM_MODEL", "HAM_DEVICE", "HAM_JOB_TIMEOUT"}


@pytest.mark.parametrize("service", ["api", "worker"])
def test_compose_environment_builds_valid_settings(gpu: dict, cpu: dict, service: str) -> None:
    for stack in (gpu, cpu):
        env = environment(stack["services"][service])
        settings = Settings(**{k.removeprefix("HAM_").lower(): v for k, v in env.items() if k.startswith("HAM_")})
        assert settings.auth_enabled, "the compose stack listens on a published port: it must require API keys"
        assert settings.queue_name == "ham"


def test_api_and_worker_share_one_configuration(gpu: dict) -> None:
    """The worker differs from the API only in engine settings; queue, Redis and storage agree."""
    api, worker = environment(gpu["services"]["api"]), environment(gpu["services"]["worker"])
    engine_only = {"HAM_MODEL", "HAM_DEVICE", "HAM_WORKER_METRICS_PORT"}
    assert {k: v for k, v in worker.items() if k not in engine_only} == {k: v for k, v in api.items()
                                                                         if k != "HAM_MODEL"}
    # The API's default model is the (first) worker's: its jobs go to that worker's queue.
    assert worker["HAM_MODEL"] == api["HAM_MODEL"]


@pytest.mark.parametrize("stack", ["gpu", "cpu"])
def test_the_second_worker_serves_another_model_on_its_own_queue(gpu: dict, cpu: dict, stack: str) -> None:
    services = {"gpu": gpu, "cpu": cpu}[stack]["services"]
    first, second = environment(services["worker"]), environment(services["worker-2"])
    assert first["HAM_MODEL"] != second["HAM_MODEL"]
    assert environment(services["api"])["HAM_MODEL"] == first["HAM_MODEL"]
    # With the profile on, the operator lists both (docs/deploy.md): each worker then takes its own queue.
    models = f"{first['HAM_MODEL']},{second['HAM_MODEL']}"
    queues = {Settings(models=models, model=env["HAM_MODEL"], queue_name=env["HAM_QUEUE_NAME"]).default_model
              for env in (first, second)}
    assert queues == {first["HAM_MODEL"]}
    from ham_core.models import queue_name

    settings = Settings(models=models, queue_name=first["HAM_QUEUE_NAME"])
    assert queue_name(settings, first["HAM_MODEL"]) == "ham"
    assert queue_name(settings, second["HAM_MODEL"]).startswith("ham-")
    if stack == "gpu":
        assert services["worker-2"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["1"]
    else:
        assert second["HAM_MODEL"] == "tiny-xl" and second["HAM_DEVICE"] == "cpu"


def test_cpu_override_runs_tiny_on_cpu_without_a_gpu_reservation(cpu: dict) -> None:
    worker = cpu["services"]["worker"]
    env = environment(worker)
    assert (env["HAM_MODEL"], env["HAM_DEVICE"]) == ("tiny", "cpu")
    assert "deploy" not in worker
    assert worker["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # The base image swap keeps the Dockerfile's apt/python steps valid: same distribution.
    gpu_base = parse_dockerfile(DOCKERFILES["worker"])[0]["BASE_IMAGE"]
    assert gpu_base.endswith("ubuntu24.04") and worker["build"]["args"]["BASE_IMAGE"] == "ubuntu:24.04"


def test_gpu_worker_reserves_one_nvidia_gpu(gpu: dict) -> None:
    devices = gpu["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_worker_stop_grace_outlasts_the_job_timeout(gpu: dict, cpu: dict) -> None:
    for stack in (gpu, cpu):
        worker = stack["services"]["worker"]
        assert duration_seconds(worker["stop_grace_period"]) > int(environment(worker)["HAM_JOB_TIMEOUT"])


def test_redis_persists_and_never_evicts(gpu: dict) -> None:
    command = gpu["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert any(v.endswith(":/data") for v in gpu["services"]["redis"]["volumes"])


def test_storage_url_points_at_the_s3_service_and_its_bucket(gpu: dict) -> None:
    services = gpu["services"]
    url = urlsplit(environment(services["api"])["HAM_STORAGE_URL"])
    endpoint = urlsplit(parse_qs(url.query)["endpoint"][0])
    assert url.scheme == "s3" and endpoint.hostname == "s3" and endpoint.port == 8333
    assert f"-bucket={url.netloc}" in services["s3"]["command"]
    s3_env, api_env = environment(services["s3"]), environment(services["api"])
    assert s3_env["AWS_ACCESS_KEY_ID"] == api_env["AWS_ACCESS_KEY_ID"]
    assert s3_env["AWS_SECRET_ACCESS_KEY"] == api_env["AWS_SECRET_ACCESS_KEY"]


def test_services_wait_for_healthy_dependencies(gpu: dict) -> None:
    services = gpu["services"]
    for name in ("redis", "s3", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("api", "worker"):
        assert services[name]["depends_on"] == {
            "redis": {"condition": "service_healthy"}, "s3": {"condition": "service_healthy"}}


def test_compose_commands_are_the_image_commands(gpu: dict) -> None:
    for name in ("api", "worker"):
        service = gpu["services"][name]
        assert (ROOT / service["build"]["dockerfile"]).resolve() == DOCKERFILES[name].resolve()
        assert service["command"] == exec_form(final_stage(name).last("CMD"))


def test_prometheus_scrapes_the_api_and_every_worker(gpu: dict) -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {job["job_name"]: job["dns_sd_configs"][0] for job in config["scrape_configs"]}
    api_cmd = gpu["services"]["api"]["command"]
    assert targets["ham-api"]["names"] == ["api"]
    assert targets["ham-api"]["port"] == int(api_cmd[api_cmd.index("--port") + 1])
    assert targets["ham-worker"]["names"] == ["worker", "worker-2"]
    assert targets["ham-worker"]["port"] == int(environment(gpu["services"]["worker"])["HAM_WORKER_METRICS_PORT"])
    mounts = gpu["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


# --- Dockerfiles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["api", "worker"])
def test_dockerfile_bases_are_pinned_by_tag(name: str) -> None:
    _, stages = parse_dockerfile(DOCKERFILES[name])
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    for stage in stages:
        image, _, tag = stage.base.rpartition(":")
        assert image and tag and tag != "latest" and any(c.isdigit() for c in tag), stage.base


@pytest.mark.parametrize(("name", "command"), [("api", ["api", "--host", "0.0.0.0", "--port", "8000"]),
                                               ("worker", ["worker"])])
def test_dockerfile_runs_ham_as_a_non_root_user_with_a_healthcheck(name: str, command: list[str]) -> None:
    stage = final_stage(name)
    user = stage.last("USER")
    assert user and user.split(":")[0] not in ("root", "0"), user
    assert exec_form(stage.last("ENTRYPOINT")) == ["ham"]
    assert exec_form(stage.last("CMD")) == command
    healthcheck = stage.last("HEALTHCHECK")
    assert healthcheck and " CMD " in f" {healthcheck} "
    probe = exec_form(healthcheck.split(" CMD ", 1)[1] if " CMD " in healthcheck else healthcheck.split("CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"], "slim images have no curl: probe with the interpreter"


def test_worker_image_is_offline_with_a_model_cache_volume() -> None:
    stage = final_stage("worker")
    env = stage.env()
    assert env["HF_HOME"] == "/models" and env["HF_HUB_OFFLINE"] == "1"
    assert json.loads(stage.last("VOLUME")) == ["/models"]
    assert {k for k in env if k.startswith("HAM_")} <= SETTINGS_ENV
    assert {k for k in final_stage("api").env() if k.startswith("HAM_")} <= SETTINGS_ENV


def test_worker_installs_the_cuda_torch_build_before_the_engine_extras() -> None:
    args, stages = parse_dockerfile(DOCKERFILES["worker"])
    runs = stages[0].all("RUN")
    torch = next(i for i, r in enumerate(runs) if "--index-url" in r and "torch" in r)
    engine = next(i for i, r in enumerate(runs) if ".[engine]" in r)
    assert torch < engine
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cu128"
    assert "cuda:12.8" in args["BASE_IMAGE"], "the CUDA runtime must match the cu128 wheels"


def test_api_image_has_no_torch() -> None:
    runs = " ".join(parse_dockerfile(DOCKERFILES["api"])[1][0].all("RUN"))
    assert "torch" not in runs and "[engine]" not in runs


@pytest.mark.parametrize("name", ["api", "worker"])
def test_everything_the_dockerfiles_copy_is_in_the_build_context(name: str) -> None:
    patterns = read_dockerignore(ROOT / ".dockerignore")
    _, stages = parse_dockerfile(DOCKERFILES[name])
    sources = [src for stage in stages for copy in stage.all("COPY") if not copy.startswith("--from")
               for src in copy.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{name}: COPY {source}: not in the repository"
        assert not dockerignore_excludes(patterns, source), f"{name}: COPY {source}: excluded by .dockerignore"
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/data/content0.png", "service/__pycache__/app.pyc"):
        assert dockerignore_excludes(patterns, heavy), heavy
