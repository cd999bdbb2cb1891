"""A TypeScript client generated from the live ``/openapi.json`` works unmodified (``node --test``).

``clients/typescript``: ``openapi-typescript`` (pinned in its package-lock.json) generates the
types from the running stack's schema, ``tsc`` checks them, and ``node --test`` drives the API
with ``openapi-fetch``: a multipart job followed over its event stream and downloaded, a library
style used by ``style_id`` in a form and in a 3-style JSON job by data URI, an idempotency-key
reuse. Needs ``node`` (20+) and ``npm``; the packages are installed from the lock file
(``npm ci``) when ``node_modules`` is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import TENANTS, Stack

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "typescript"
DATA = ROOT / "tests" / "data"

pytestmark = pytest.mark.slow


def _npm(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["npm", *args], cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_generated_typescript_client_drives_the_live_api(stack: Stack):
    assert shutil.which("node") and shutil.which("npm"), "node and npm are needed for the TypeScript client"
    stack.ensure_one_worker()
    env = {**os.environ, "HAM_API_URL": stack.base_url, "HAM_API_KEY": TENANTS["alpha"], "HAM_TEST_DATA": str(DATA)}
    if not (PACKAGE / "node_modules" / "openapi-fetch").is_dir():
        installed = _npm("ci", "--no-audit", "--no-fund", env=env)
        assert installed.returncode == 0, installed.stdout + installed.stderr
    for step in (("run", "generate"), ("run", "typecheck"), ("test",)):
        done = _npm(*step, env=env)
        assert done.returncode == 0, f"npm {' '.join(step)}:\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    assert (PACKAGE / "generated" / "schema.d.ts").read_text().count("TransferEvent") >= 1
