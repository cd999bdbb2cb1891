"""The live API against its own ``/openapi.json``, fuzzed by schemathesis (every check), as two tenants.

A real ``ham api`` process on the session's Redis (its own database) and file storage, with two API
keys (tenants ``a`` and ``b``); no worker, so accepted jobs stay queued. Bounded: a fixed seed and a
few examples per operation, one run per tenant. The checks include no 5xx, every response matching
its declared status, headers, content type and schema, schema-valid requests accepted, invalid ones
refused, auth enforced where declared, and ``tenant_isolation`` (registered by the hooks): in B's run
A's job and style ids go into path parameters, and B must never get a 2xx on them or see A's data.
The hooks in ``schemathesis_hooks.py`` supply what a schema cannot (decodable images, ids that exist).

Every operation is fuzzed, the event stream included: the hooks point it at a job already canceled,
so the stream sends the terminal event and ends (an unfinished job's stream stays open, and no worker
runs here). The run must pass whole: no check is disabled, and no failure is waived as the tool's mistake
(none is known; one would be named here, with its reason, and accepted by name alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.servers import free_port, log_tail, terminate
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
KEYS = {"a": "fuzz-key-a-0123456789", "b": "fuzz-key-b-0123456789"}
MAX_EXAMPLES = 12
PNG = (REPO / "tests" / "data" / "content0.png").read_bytes()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    env = {
        **os.environ,
        "HAM_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/10",  # its own: the deploy commands' stack uses 9
        "HAM_STORAGE_URL": f"file://{workdir / 'storage'}",
        "HAM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "HAM_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        "HAM_QUEUE_NAME": "ham-fuzz",
        "HAM_RATE_LIMIT_PER_MINUTE": "1000000",
        "HAM_MAX_QUEUED_PER_TENANT": "1000000",
        "HAM_MAX_QUEUE_LENGTH": "1000000",
        "HAM_MAX_UPLOAD_BYTES": "2000000",
        "HAM_WEBHOOK_SECRET": "fuzz-secret",
        "HAM_WEBHOOK_ALLOW_PRIVATE": "true",
    }
    log = workdir / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ham_cli", "api", "--port", str(port)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    def running() -> None:
        assert proc.poll() is None, log_tail(log)

    wait_until(lambda: httpx.get(f"{base}/readyz", timeout=1).status_code == 200, 60, "ham api to be ready",
               interval=0.1, ignore=(httpx.HTTPError,), check=running, detail=lambda: log_tail(log))
    yield base
    terminate(proc, 15)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def _resources(base: str, tenant: str) -> dict[str, list[str]]:
    """A tenant's library style, a queued job and a canceled one, with text only this tenant wrote."""
    marker = f"private-{tenant}-{uuid.uuid4().hex}"
    style = httpx.post(f"{base}/v1/styles", headers=_auth(tenant),
                       files={"style_prompt": (None, f"{marker} style prompt"), "name": (None, f"{marker} name")})
    assert style.status_code == 201, style.text
    jobs = []
    for _ in range(2):
        job = httpx.post(f"{base}/v1/transfers", headers=_auth(tenant),
                         files={"content": ("c.png", PNG, "image/png"), "style_prompt": (None, f"{marker} job prompt")})
        assert job.status_code == 202, job.text
        jobs.append(job.json()["id"])
    canceled = httpx.post(f"{base}/v1/transfers/{jobs[1]}/cancel", headers=_auth(tenant))
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled", canceled.text
    return {"style_ids": [style.json()["id"]], "job_ids": jobs[:1], "done_job_ids": jobs[1:], "secrets": [marker]}


@pytest.fixture(scope="module")
def tenant_resources(live_api: str) -> dict[str, dict[str, list[str]]]:
    return {tenant: _resources(live_api, tenant) for tenant in KEYS}


@pytest.mark.parametrize("tenant", ["a", "b"])
def test_the_live_api_keeps_its_openapi_contract(live_api: str, tenant_resources: dict, tenant: str,
                                                 tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    # Auth by the document's own security scheme, so the auth checks know where the key goes.
    config.write_text(f'[auth.openapi.HTTPBearer]\nbearer = "{KEYS[tenant]}"\n')
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
        f"{live_api}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261201",
        "--workers", "1",
        "--request-timeout", "30",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    own = tenant_resources[tenant]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks", "PYTHONPATH": str(REPO),
           # The hooks put the tenant's own style where a valid case drew a style_id, and its canceled job
           # under the event stream.
           "HAM_FUZZ_STYLE_ID": own["style_ids"][0], "HAM_FUZZ_DONE_JOB_ID": own["done_job_ids"][0],
           "HAM_FUZZ_FOREIGN": json.dumps(tenant_resources["a"]) if tenant == "b" else ""}
    trace = tmp_path / "foreign-calls.txt"
    env["HAM_FUZZ_TRACE"] = str(trace)
    # In the temp folder: schemathesis keeps a cache (.schemathesis/) where it runs.
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-20000:]
    assert "generated" in output
    operations = sum(len(ops) for ops in httpx.get(f"{live_api}/openapi.json").json()["paths"].values())
    assert f"Selected: {operations}/{operations}" in output and f"Tested: {operations}" in output, output[-5000:]
    if tenant == "b":
        # The isolation check saw B's calls on A's job and style in every operation with such a path parameter
        # (and in the methods no operation has, which schemathesis tries for a 405).
        calls = trace.read_text().splitlines()
        assert set(calls) >= {"GET /v1/transfers/{job_id}", "POST /v1/transfers/{job_id}/cancel",
                              "GET /v1/transfers/{job_id}/events", "GET /v1/styles/{style_id}",
                              "DELETE /v1/styles/{style_id}"}, calls
        a = tenant_resources["a"]  # and A's resources are as A left them
        assert httpx.get(f"{live_api}/v1/styles/{a['style_ids'][0]}", headers=_auth("a")).status_code == 200
        assert httpx.get(f"{live_api}/v1/transfers/{a['job_ids'][0]}", headers=_auth("a")).json()["status"] == "queued"


def test_the_isolation_check_bites():
    """The hooks' check itself: a 2xx on A's id, or A's data in an answer, fails; what B sent does not count."""
    code = (
        "from tests.service.schemathesis_hooks import isolation_problem as p\n"
        "a = {'job_ids': ['JA'], 'done_job_ids': ['JD'], 'style_ids': ['SA'], 'secrets': ['private-a']}\n"
        "assert p(a, 'http://h/v1/styles/SA', 200, '{}')\n"
        "assert p(a, 'http://h/v1/transfers/JD/events', 204, '')\n"
        "assert p(a, 'http://h/v1/styles', 200, '{\"name\": \"private-a name\"}')\n"
        "assert p(a, 'http://h/v1/transfers', 200, '{\"id\": \"JA\"}')\n"
        "assert p(a, 'http://h/v1/transfers/JA', 404, 'no transfer job JA') is None\n"
        "assert p(a, 'http://h/v1/styles/SB', 200, '{}') is None\n"
        "print('ok')\n"
    )
    # A subprocess: importing the hooks registers them with schemathesis, which this process should not do.
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr
