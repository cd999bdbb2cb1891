"""Schemathesis hooks for ``test_api_schema.py``: what JSON Schema cannot say about a valid submission.

Loaded by the schemathesis CLI through ``SCHEMATHESIS_HOOKS``. Only cases whose body was generated
as *valid* are touched, and only where the schema's words cannot carry the rule:

- an image must decode (``format: binary`` admits any bytes): a real PNG replaces the drawn bytes,
  a data: URI of it the drawn ``content_url``/``style_url`` (the fuzz server fetches no URLs);
- ``step_start < step_end`` with at least one of ``steps`` inside the window while GAR or LAT is on
  (documented on the fields): the window is reset to the default;
- ``teachers=recorded`` needs ``inversion=source`` (documented on the field): the inversion is set
  to ``source`` when the case drew recorded teachers;
- a webhook URL must be reachable in principle: a fixed loopback URL replaces the drawn one;
- the style rule (said in words: an object-level ``anyOf`` would leave generated clients without a
  body model): one style image, a style prompt or both, or up to ``max_styles_per_job`` images and
  library styles without a prompt; drawn ``style_id``s become the fuzz tenant's own style;
- a library style (``POST /v1/styles``): an image and/or a prompt, and ``size``/``steps`` only with
  ``warm=true``.

Every case, valid or not, gets ``Prefer: wait=0`` for any wait it drew, so a fuzzed long poll on a job that
no worker runs cannot stall the run, and a fresh ``Idempotency-Key``: a key seen before answers with
its first job for the same request and a 409 for another (as documented), which would turn a fuzzer's
repeated example key into "valid body refused".
"""

from __future__ import annotations

import base64
import os
import re
import uuid
from pathlib import Path

import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode

PNG = (Path(__file__).resolve().parents[1] / "data" / "content0.png").read_bytes()
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
# A style the fuzz tenant owns, made by the test before the run (a drawn id would be a 404).
STYLE_ID = os.environ.get("HAM_FUZZ_STYLE_ID", "0" * 32)
MAX_STYLES = int(os.environ.get("HAM_MAX_STYLES_PER_JOB", "4"))
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
    # A case without generation info for its body comes from the schema's examples: valid by intent.
    positive = body_info is None or body_info.mode == GenerationMode.POSITIVE
    if not positive or case.method.upper() != "POST" or not isinstance(case.body, dict):
        return case
    if case.operation.path == "/v1/transfers":
        _valid_transfer(case.body)
    elif case.operation.path == "/v1/styles":
        _valid_style(case.body)
    return case


def _valid_transfer(body: dict) -> None:
    if "content" in body:
        body["content"] = PNG
    if "content_url" in body:
        body["content_url"] = PNG_URI
    # Styles: real images and the fuzz tenant's library style, at most MAX_STYLES in all.
    uploads = _as_list(body.pop("style", None), PNG) + _as_list(body.pop("style_url", None), PNG_URI)
    ids = _as_list(body.pop("style_id", None), STYLE_ID)
    uploads, ids = uploads[:MAX_STYLES], ids[: max(0, MAX_STYLES - len(uploads))]
    image_field = "style" if "content" in body else "style_url"
    if uploads:
        body[image_field] = uploads if "content" in body or len(uploads) > 1 or ids else uploads[0]
    if ids:
        body["style_id"] = ids
    if ids or len(uploads) > 1:
        body.pop("style_prompt", None)  # several styles or a library style bring their own prompts
    elif not uploads and "style_prompt" not in body:
        body["style_prompt"] = "ink wash"
    if "step_start" in body or "step_end" in body:
        body.pop("step_start", None)
        body.pop("step_end", None)
    if body.get("teachers") == "recorded":
        body["inversion"] = "source"
    if "webhook_url" in body:
        body["webhook_url"] = WEBHOOK


def _valid_style(body: dict) -> None:
    if "image" in body:
        body["image"] = PNG
    if not body.get("image") and not str(body.get("style_prompt") or "").strip():
        body["style_prompt"] = "ink wash"
    if body.get("warm") is not True:
        body.pop("size", None)  # only with warm=true (said on the fields)
        body.pop("steps", None)


def _as_list(value: object, replacement: object) -> list:
    """A drawn style field (absent, one value, or a list) as a list of ``replacement``s of its length."""
    if value is None:
        return []
    return [replacement] * (len(value) if isinstance(value, list) else 1)
