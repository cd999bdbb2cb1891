"""The live API against its own ``/openapi.json``, fuzzed by schemathesis (every check).

A real ``ham api`` process on the session's Redis (its own database) and file storage; no
worker, so accepted jobs stay queued. Bounded: a fixed seed and a few examples per operation.
The checks include no 5xx, every response matching its declared status, headers, content type
and schema, schema-valid requests accepted, invalid ones refused, auth enforced where declared.
The hooks in ``schemathesis_hooks.py`` supply what a schema cannot (decodable images).

The event stream is left out: it stays open while its job lives, and no worker runs these jobs;
tests/e2e/test_integration.py covers it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.servers import free_port, log_tail, terminate
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
KEY = "fuzz-key-0123456789"
MAX_EXAMPLES = 12

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
        "HAM_API_KEYS": f"fuzz:{KEY}",
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


def test_the_live_api_keeps_its_openapi_contract(live_api: str, tmp_path: Path):
    config = tmp_path / "schemathesis.toml"
    # Auth by the document's own security scheme, so the auth checks know where the key goes.
    config.write_text(f'[auth.openapi.HTTPBearer]\nbearer = "{KEY}"\n')
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config), "run",
        f"{live_api}/openapi.json",
        "--checks", "all",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261201",
        "--workers", "1",
        "--request-timeout", "30",
        "--exclude-path", "/v1/transfers/{job_id}/events",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    # A library style of the fuzz tenant: the hooks put its id where a valid case drew a style_id.
    made = httpx.post(f"{live_api}/v1/styles", headers={"Authorization": f"Bearer {KEY}"},
                      files={"style_prompt": (None, "ink wash"), "name": (None, "fuzz")})
    assert made.status_code == 201, made.text
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks", "PYTHONPATH": str(REPO),
           "HAM_FUZZ_STYLE_ID": made.json()["id"]}
    # In the temp folder: schemathesis keeps a cache (.schemathesis/) where it runs.
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-20000:]
    assert "API Operations" in output and "generated" in output
