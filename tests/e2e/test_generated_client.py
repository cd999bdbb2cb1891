"""A client generated from the live ``/openapi.json`` by a standard generator works unmodified.

``openapi-python-client`` (PyPI) generates a package into the test's temp folder from the
running stack's schema; a subprocess then imports it as generated and submits, reads, lists,
cancels and downloads through it. A schema that lies (a nullable optional field, a body without
a model, a wrong response shape) fails here as it would for a customer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import TENANTS, Stack

DATA = Path(__file__).resolve().parents[1] / "data"

pytestmark = pytest.mark.slow

# Runs in a subprocess with the generated package on its path; prints one JSON line.
USE_IT = r"""
import io, json, sys, time
from urllib.parse import parse_qs, urlsplit
from ham_generated import AuthenticatedClient
from ham_generated.api.files import download_file
from ham_generated.api.transfers import cancel_transfer, create_transfer, get_transfer, list_transfers
from ham_generated.models import TransferForm, TransferJob, TransferList, TransferRequest
from ham_generated.types import File

base_url, key, content_path, style_path = sys.argv[1:5]
client = AuthenticatedClient(base_url=base_url, token=key, timeout=None)
out = {}

form = TransferForm(
    content=File(payload=open(content_path, "rb"), file_name="content.png", mime_type="image/png"),
    style=File(payload=open(style_path, "rb"), file_name="style.png", mime_type="image/png"),
    steps=2, size=64, sini=False,
)
created = create_transfer.sync_detailed(client=client, body=form)
assert created.status_code == 202, created.content
job = created.parsed
assert isinstance(job, TransferJob), job
out["created"] = job.id
for _ in range(600):
    job = get_transfer.sync(job.id, client=client, prefer="wait=10")
    if job.status.value in ("succeeded", "failed", "canceled"):
        break
out["status"] = job.status.value
out["sini"] = job.params.additional_properties["sini"]

parts = urlsplit(job.result_url)
query = {name: values[0] for name, values in parse_qs(parts.query).items()}
key_path = parts.path.removeprefix("/v1/files/")
downloaded = download_file.sync_detailed(key_path, client=client, expires=query["expires"], sig=query["sig"])
out["download"] = [downloaded.status_code, downloaded.headers["content-type"], len(downloaded.content)]

page = list_transfers.sync(client=client, limit=1)
assert isinstance(page, TransferList), page
out["listed"] = page.items[0].id

by_json = create_transfer.sync(client=client, body=TransferRequest(
    content_url="data:image/png;base64," + __import__("base64").b64encode(open(content_path, "rb").read()).decode(),
    style_prompt="ink", steps=400, size=64))
canceled = cancel_transfer.sync(by_json.id, client=client)
out["canceled"] = canceled.status.value if isinstance(canceled, TransferJob) else repr(canceled)
print(json.dumps(out))
"""


def test_an_openapi_python_client_works_unmodified(stack: Stack, tmp_path: Path):
    stack.ensure_one_worker()
    generator = Path(sys.executable).parent / "openapi-python-client"
    generated = subprocess.run(
        [str(generator), "generate", "--url", f"{stack.base_url}/openapi.json", "--meta", "none",
         "--output-path", str(tmp_path / "ham_generated")],
        capture_output=True, text=True, timeout=300,
    )
    assert generated.returncode == 0, generated.stdout + generated.stderr
    # Generated as-is: no model for a body would make create_transfer take `Any`.
    source = (tmp_path / "ham_generated" / "api" / "transfers" / "create_transfer.py").read_text()
    assert "body: TransferForm" in " ".join(source.split()) or "TransferForm |" in source
    used = subprocess.run(
        [sys.executable, "-c", USE_IT, stack.base_url, TENANTS["alpha"], str(DATA / "content0.png"),
         str(DATA / "style0.png")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
    )
    assert used.returncode == 0, used.stdout + used.stderr
    out = json.loads(used.stdout.strip().splitlines()[-1])
    assert out["status"] == "succeeded" and out["sini"] is False
    assert out["download"][:2] == [200, "image/png"] and out["download"][2] > 100
    assert out["listed"] == out["created"]
    assert out["canceled"] in ("canceled", "running")
