"""Schemathesis hooks for ``test_api_schema.py``: what JSON Schema cannot say about a valid submission.

Loaded by the schemathesis CLI through ``SCHEMATHESIS_HOOKS``. Only cases whose body was generated
as *valid* are touched, and only where the schema's words cannot carry the rule:

- an image must decode (``format: binary`` admits any bytes): a real PNG replaces the drawn bytes,
  a data: URI of it the drawn ``content_url``/``style_url`` (the fuzz server fetches no URLs);
- ``step_start < step_end`` with at least one of ``steps`` inside the window while GAR or LAT is on
  (documented on the fields): the window is reset to the default;
- a webhook URL must be reachable in principle: a fixed loopback URL replaces the drawn one;
- a style image, a style prompt or both (said in words: an object-level ``anyOf`` would leave
  generated clients without a body model): a prompt is added when the case drew neither.

Every case, valid or not, gets ``Prefer: wait=0`` for any wait it drew, so a fuzzed long poll on a job that
no worker runs cannot stall the run, and a fresh ``Idempotency-Key``: a key seen before answers with
its first job whatever the body (as documented), which would turn a fuzzer's repeated example key
into "invalid body accepted".
"""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode

PNG = (Path(__file__).resolve().parents[1] / "data" / "content0.png").read_bytes()
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
WEBHOOK = "http://127.0.0.1:9/hook"


@schemathesis.hook
def map_case(ctx, case):
    if case.headers:
        for name in list(case.headers):
            if name.lower() == "prefer" and isinstance(case.headers[name], str):
                case.headers[name] = re.sub(r"wait\s*=\s*\d+", "wait=0", case.headers[name])
            elif name.lower() == "idempotency-key" and isinstance(case.headers[name], str):
                case.headers[name] = f"fuzz-{uuid.uuid4().hex}"
    body_info = case.meta.components.get(ParameterLocation.BODY) if case.meta else None
    positive = body_info is not None and body_info.mode == GenerationMode.POSITIVE
    if not positive or case.operation.path != "/v1/transfers" or not isinstance(case.body, dict):
        return case
    body = case.body
    for field in ("content", "style"):
        if field in body:
            body[field] = PNG
    for field in ("content_url", "style_url"):
        if field in body:
            body[field] = PNG_URI
    if "step_start" in body or "step_end" in body:
        body.pop("step_start", None)
        body.pop("step_end", None)
    if "webhook_url" in body:
        body["webhook_url"] = WEBHOOK
    if not {"style", "style_url", "style_prompt"} & set(body):
        body["style_prompt"] = "ink wash"
    return case
