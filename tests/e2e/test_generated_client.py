"""A client generated from the live ``/openapi.json`` by a standard generator works unmodified.

``openapi-python-client`` (PyPI) generates a package into the test's temp folder from the
running stack's schema; a subprocess then imports it as generated and submits, reads, lists,
cancels and downloads through it, creates a library style and uses it by ``style_id`` in a form
and in a 3-style JSON job by data URI, and reads that job's event stream as ``TransferEvent``s.
A schema that lies (a nullable optional field, a body without a model, a wrong response shape)
fails here as it would for a customer.
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
import base64, io, json, sys, time
from urllib.parse import parse_qs, urlsplit
from ham_generated import AuthenticatedClient
from ham_generated.api.files import download_file
from ham_generated.api.styles import create_style, delete_style, get_style
from ham_generated.api.transfers import (cancel_transfer, create_transfer, get_transfer, list_transfers,
                                         transfer_events)
from ham_generated.models import (StyleForm, StyleResource, TransferEvent, TransferForm, TransferJob, TransferList,
                                  TransferRequest)
from ham_generated.types import File

base_url, key, content_path, style_path, style2_path = sys.argv[1:6]
client = AuthenticatedClient(base_url=base_url, token=key, timeout=None)
out = {}
def data_uri(path):
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()

def finished(job):
    for _ in range(600):
        job = get_transfer.sync(job.id, client=client, prefer="wait=10")
        if job.status.value in ("succeeded", "failed", "canceled"):
            return job
    raise TimeoutError(job.id)

def download(url):
    parts = urlsplit(url)
    query = {name: values[0] for name, values in parse_qs(parts.query).items()}
    key_path = parts.path.removeprefix("/v1/files/")
    got = download_file.sync_detailed(key_path, client=client, expires=query["expires"], sig=query["sig"])
    return [got.status_code, got.headers["content-type"], len(got.content)]

form = TransferForm(
    content=File(payload=open(content_path, "rb"), file_name="content.png", mime_type="image/png"),
    style=[File(payload=open(style_path, "rb"), file_name="style.png", mime_type="image/png")],
    steps=2, size=64, sini=False,
)
created = create_transfer.sync_detailed(client=client, body=form)
assert created.status_code == 202, created.content
job = created.parsed
assert isinstance(job, TransferJob), job
out["created"] = job.id
out["urls"] = [job.urls.self_, job.urls.cancel, job.urls.events]
job = finished(job)
out["status"] = job.status.value
out["sini"] = job.params.additional_properties["sini"]
out["download"] = download(job.result_url)

page = list_transfers.sync(client=client, limit=1)
assert isinstance(page, TransferList), page
out["listed"] = page.items[0].id

# The style library: create a style, use it by style_id in a form and in a 3-style JSON job.
style = create_style.sync(client=client, body=StyleForm(
    image=File(payload=open(style2_path, "rb"), file_name="s.png", mime_type="image/png"), name="house"))
assert isinstance(style, StyleResource), style
out["style"] = [style.name, style.has_image, get_style.sync(style.id, client=client).id == style.id]
by_id = create_transfer.sync(client=client, body=TransferForm(
    content=File(payload=open(content_path, "rb"), file_name="c.png", mime_type="image/png"),
    style_id=[style.id], steps=2, size=64))
by_id = finished(by_id)
out["by_id"] = [by_id.status.value, by_id.style_ids, by_id.style_count]
three = create_transfer.sync(client=client, body=TransferRequest(
    content_url=data_uri(content_path), style_url=[data_uri(style_path), data_uri(style2_path)], style_id=style.id,
    steps=2, size=64))
assert isinstance(three, TransferJob), three

# The events of the 3-style job: each one a TransferEvent, the last one terminal.
stream = transfer_events.sync_detailed(three.id, client=client)
events, current = [], {}
for line in stream.content.decode().splitlines():
    if not line:
        if "data" in current:
            events.append(TransferEvent.from_dict(current))
        current = {}
    elif not line.startswith(":"):
        name, _, value = line.partition(":")
        current[name] = value.removeprefix(" ")
final = TransferJob.from_dict(json.loads(events[-1].data))
out["events"] = [events[-1].event.value, final.status.value, len(final.result_urls or [])]
out["three"] = [final.style_count, final.style_ids]
out["three_downloads"] = [download(url)[0] for url in final.result_urls or []]
out["deleted"] = delete_style.sync_detailed(style.id, client=client).status_code

by_json = create_transfer.sync(client=client, body=TransferRequest(
    content_url=data_uri(content_path), style_prompt="ink", steps=400, size=64))
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
         str(DATA / "style0.png"), str(DATA / "style1.png")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
    )
    assert used.returncode == 0, used.stdout + used.stderr
    out = json.loads(used.stdout.strip().splitlines()[-1])
    assert out["status"] == "succeeded" and out["sini"] is False
    assert out["download"][:2] == [200, "image/png"] and out["download"][2] > 100
    assert out["listed"] == out["created"]
    job = f"/v1/transfers/{out['created']}"
    assert out["urls"] == [job, f"{job}/cancel", f"{job}/events"]
    assert out["style"] == ["house", True, True]
    assert out["by_id"][0] == "succeeded" and out["by_id"][2] == 1 and len(out["by_id"][1]) == 1
    assert out["events"] == ["succeeded", "succeeded", 3]
    assert out["three"][0] == 3 and out["three"][1] == out["by_id"][1]
    assert out["three_downloads"] == [200, 200, 200]
    assert out["deleted"] == 204
    assert out["canceled"] in ("canceled", "running")
