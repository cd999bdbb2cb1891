"""The commands the images run start and become ready with the environment compose gives them.

``ham api …`` and ``ham worker`` run as real subprocesses with the ``worker``/``api``
environment of ``docker-compose.yml`` + ``docker-compose.cpu.yml`` (tiny model on CPU) and the
worker image's ``ENV`` lines. Only what names a container address is swapped for this machine's:
Redis (the session's real redis-server), the S3 endpoint and credentials (the session's real
SeaweedFS), the API port and the metrics port. Everything else is passed through verbatim. The
images' and compose's own healthcheck commands are then run against the live processes. The
API runs with torch and diffusers unimportable, as in its image.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import pytest

from tests.deploy.compose_files import environment, exec_form, load_compose, parse_dockerfile
from tests.fixtures.servers import S3Server, free_port, log_tail, terminate
from tests.fixtures.waiting import wait_until

# The listeners of `weed mini`, moved off their defaults so they never clash with another weed here.
WEED_PORTS = ("s3.port", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
              "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc")

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
DEPLOY_REDIS_DB = 9  # its own database: unit tests flush db 0, the e2e stack uses 7, the schema fuzz 10
START_TIMEOUT = 120.0

pytestmark = pytest.mark.slow


@dataclass
class Process:
    proc: subprocess.Popen
    log: Path
    env: dict[str, str]

    def tail(self, lines: int = 60) -> str:
        return log_tail(self.log, lines)

    def stop(self, timeout: float = 30) -> int:
        return terminate(self.proc, timeout)


@dataclass
class Stack:
    api: Process
    worker: Process
    api_url: str
    metrics_url: str
    api_key: str
    s3: S3Server


def ham_command() -> list[str]:
    """The ``ham`` console script the images' ENTRYPOINT runs (module form if not installed)."""
    script = Path(sys.executable).parent / "ham"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ham_cli"]


# The API image has no torch: run its command with the engine's heavy modules made unimportable,
# exactly as the console script does otherwise (`from ham_cli.main import main`).
API_WITHOUT_TORCH = (
    "import sys\n"
    "for name in ('torch', 'diffusers', 'transformers', 'accelerate'):\n"
    "    sys.modules[name] = None\n"
    "from ham_cli.main import main\n"
    "sys.exit(main())\n"
)


def image_env(name: str) -> dict[str, str]:
    """ENV of the image's final stage, minus PATH (the venv here plays /opt/ham)."""
    env = parse_dockerfile(ROOT / "deploy" / "docker" / f"{name}.Dockerfile")[1][-1].env()
    env.pop("PATH", None)
    return env


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def process_env(service: dict, image: dict[str, str], local: dict[str, str]) -> dict[str, str]:
    """Image ENV, then compose's environment, then the local addresses (each must replace a set key)."""
    compose = environment(service)
    missing = set(local) - set(compose) - set(image)
    assert not missing, f"compose/image do not set {sorted(missing)}: nothing to replace"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HAM_", "AWS_", "HF_"))}
    return base | image | compose | local


def start(argv: list[str], env: dict[str, str], log: Path) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Process(proc, log, env)


def wait_ok(process: Process, url: str, timeout: float = START_TIMEOUT) -> float:
    """Seconds until ``url`` answers 200; fails with the log tail if the process dies first."""
    started = time.monotonic()

    def running() -> None:
        if process.proc.poll() is not None:
            pytest.fail(f"{process.proc.args} exited with {process.proc.returncode}:\n{process.tail()}")

    running()
    wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, timeout, f"{url} to answer 200", interval=0.1,
               ignore=(httpx.TransportError,), check=running, detail=process.tail)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def cpu_compose() -> dict:
    return load_compose(ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml")


@pytest.fixture(scope="module")
def stack(cpu_compose: dict, redis_url: str, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("deploy-commands")
    services = cpu_compose["services"]
    # The compose S3 service creates the bucket at start (-bucket=…); so does this.
    bucket = urlsplit(environment(services["api"])["HAM_STORAGE_URL"]).netloc
    client = s3_server.client()
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    api_port, metrics_port = free_port(), free_port()
    local = {
        "HAM_REDIS_URL": with_db(redis_url, DEPLOY_REDIS_DB),
        "HAM_STORAGE_URL": s3_server.storage_url(bucket),
        "HAM_PUBLIC_URL": f"http://127.0.0.1:{api_port}",
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    api_env = process_env(services["api"], image_env("api"), local)
    worker_env = process_env(
        services["worker"],
        image_env("worker"),
        # HF_HOME=/models is the image's volume; here a temp dir plays it.
        local | {"HAM_WORKER_METRICS_PORT": str(metrics_port), "HF_HOME": str(workdir / "models")},
    )
    api_argv = list(services["api"]["command"])
    api_argv[api_argv.index("--host") + 1] = "127.0.0.1"  # loopback only on a shared machine
    api_argv[api_argv.index("--port") + 1] = str(api_port)
    api = start([sys.executable, "-c", API_WITHOUT_TORCH, *api_argv], api_env, workdir / "api.log")
    worker = start(ham_command() + services["worker"]["command"], worker_env, workdir / "worker.log")
    api_key = api_env["HAM_API_KEYS"].split(",")[0].split(":", 1)[1]
    stack = Stack(api, worker, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{metrics_port}", api_key, s3_server)
    try:
        yield stack
    finally:
        stack.worker.stop()  # the SIGTERM test replaces the first worker
        api.stop()


def run_probe(argv: list[str], env: dict[str, str], port_map: dict[str, str] | None = None) -> int:
    """Run a healthcheck command as Docker would, its hard-coded container port mapped to ours."""
    argv = [sys.executable if part == "python" else part for part in argv]
    for old, new in (port_map or {}).items():
        argv = [part.replace(old, new) for part in argv]
    return subprocess.run(argv, env=env, timeout=30, capture_output=True).returncode


def test_api_command_becomes_ready_with_the_compose_env(stack: Stack, cpu_compose: dict) -> None:
    wait_ok(stack.api, f"{stack.api_url}/readyz")
    port = urlsplit(stack.api_url).port
    image_probe = parse_dockerfile(ROOT / "deploy/docker/api.Dockerfile")[1][-1].last("HEALTHCHECK")
    image_argv = exec_form(image_probe.split(" CMD ", 1)[1])
    assert run_probe(image_argv, stack.api.env, {":8000/": f":{port}/"}) == 0
    compose_argv = cpu_compose["services"]["api"]["healthcheck"]["test"][1:]
    assert run_probe(compose_argv, stack.api.env, {":8000/": f":{port}/"}) == 0


def test_worker_command_becomes_ready_once_the_model_is_loaded(stack: Stack, cpu_compose: dict) -> None:
    seconds = wait_ok(stack.worker, f"{stack.metrics_url}/readyz")
    assert "model loaded" in stack.worker.log.read_text(), "ready before the model was loaded"
    print(f"worker ready in {seconds:.1f}s")
    image_probe = parse_dockerfile(ROOT / "deploy/docker/worker.Dockerfile")[1][-1].last("HEALTHCHECK")
    # The image's probe reads HAM_WORKER_METRICS_PORT itself: no port mapping needed.
    assert run_probe(exec_form(image_probe.split(" CMD ", 1)[1]), stack.worker.env) == 0
    port = urlsplit(stack.metrics_url).port
    compose_argv = cpu_compose["services"]["worker"]["healthcheck"]["test"][1:]
    assert run_probe(compose_argv, stack.worker.env, {":9100/": f":{port}/"}) == 0


def test_the_compose_quickstart_job_runs_through_s3(stack: Stack) -> None:
    """docs/deploy.md's curl flow: submit with the compose API key, poll, download the presigned result.
    The API serves it with torch unimportable, as in its image."""
    wait_ok(stack.api, f"{stack.api_url}/readyz")
    wait_ok(stack.worker, f"{stack.metrics_url}/readyz")
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    files = {
        "content": ("content.png", (DATA / "content0.png").read_bytes(), "image/png"),
        "style": ("style.png", (DATA / "style0.png").read_bytes(), "image/png"),
    }
    response = httpx.post(f"{stack.api_url}/v1/transfers", files=files, data={"steps": "3", "size": "64"},
                          headers=headers, timeout=30)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    def finished() -> dict | None:
        job = httpx.get(f"{stack.api_url}/v1/transfers/{job_id}", headers=headers, timeout=10).json()
        return job if job["status"] in ("succeeded", "failed", "canceled") else None

    job = wait_until(finished, 120, f"job {job_id} to finish", interval=0.2, detail=stack.worker.tail)
    assert job["status"] == "succeeded", f"{job}\n{stack.worker.tail()}"
    result = urlsplit(job["result_url"])
    endpoint = urlsplit(stack.s3.endpoint)
    assert (result.hostname, result.port) == (endpoint.hostname, endpoint.port), "not a presigned S3 URL"
    assert "X-Amz-Signature" in parse_qs(result.query)
    download = httpx.get(job["result_url"], timeout=10)
    assert download.status_code == 200
    assert download.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_exported_metric_families_are_documented(stack: Stack) -> None:
    """docs/deploy.md explains every ham_* series the API and the worker export."""
    wait_ok(stack.api, f"{stack.api_url}/readyz")
    wait_ok(stack.worker, f"{stack.metrics_url}/readyz")
    families: set[str] = set()
    for url in (f"{stack.api_url}/metrics", f"{stack.metrics_url}/metrics"):
        text = httpx.get(url, timeout=10).text
        for family in re.findall(r"^# TYPE (ham_\w+) ", text, flags=re.MULTILINE):
            # prometheus_client also types a counter's _created gauge; the doc names the counter.
            if not family.endswith("_created"):
                families.add(family.removesuffix("_total"))
    assert {"ham_queue_depth", "ham_worker_ready"} <= families
    doc = (ROOT / "docs" / "deploy.md").read_text()
    undocumented = sorted(f for f in families if f not in doc)
    assert not undocumented, f"docs/deploy.md does not mention {undocumented}"


def test_worker_exits_cleanly_on_sigterm(stack: Stack) -> None:
    """What scale-down and `docker compose stop` send: an idle worker exits 0 at once."""
    wait_ok(stack.worker, f"{stack.metrics_url}/readyz")
    started = time.monotonic()
    try:
        assert stack.worker.stop(timeout=30) == 0, stack.worker.tail()
        assert time.monotonic() - started < 30
    finally:  # the stack is the module's: the tests after this one, in any order, need a worker
        stack.worker = start(list(stack.worker.proc.args), stack.worker.env, stack.worker.log)


def test_compose_s3_command_serves_the_bucket_to_the_compose_credentials(
    cpu_compose: dict, tmp_path: Path
) -> None:
    """The s3 service's own command line, run with the wheel's `weed`: the bucket exists at start
    and the credentials api/worker get are the ones it accepts (the image's entrypoint passes
    `mini …` straight to `weed`)."""
    import boto3
    from botocore.config import Config

    service = cpu_compose["services"]["s3"]
    weed = Path(sys.executable).parent / "weed"
    ports = {name: free_port() for name in WEED_PORTS}
    argv = [str(weed)]
    for part in service["command"]:
        if part.startswith("-dir="):
            part = f"-dir={tmp_path}"
        elif part == "-ip.bind=0.0.0.0":
            part = "-ip.bind=127.0.0.1"  # loopback only on a shared machine
        argv.append(part)
    argv += [f"-{name}={port}" for name, port in ports.items()]
    api_env = environment(cpu_compose["services"]["api"])
    bucket = urlsplit(api_env["HAM_STORAGE_URL"]).netloc
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | environment(service)
    process = start(argv, env, tmp_path / "weed.log")
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        region_name="us-east-1",
        aws_access_key_id=api_env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=api_env["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    try:
        def running() -> None:
            assert process.proc.poll() is None, process.tail()

        # Listed before anything is written: created by -bucket, not by S3 auto-create on upload.
        # Starting: connection refused, 5xx.
        wait_until(lambda: bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}, 60,
                   f"bucket {bucket!r} to be created", interval=0.2, ignore=(Exception,), check=running,
                   detail=process.tail)
        client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
        assert client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok"
    finally:
        process.stop()
        for port in ports.values():  # weed leaves unix sockets named by port behind
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
