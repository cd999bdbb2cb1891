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
- the style rule (said in words, its "at least one style" under ``x-style-rule``, which schemathesis does
  not read: an object-level ``anyOf`` would leave generated clients without a body model): one style
  image, a style prompt or both, or up to ``max_styles_per_job`` images and library styles without a
  prompt; drawn ``style_id``s become the fuzz tenant's own style;
- a library style (``POST /v1/styles``): an image and/or a prompt, and ``size``/``steps`` only with
  ``warm=true``.

Two tenants are fuzzed, one run each. In tenant B's run (``HAM_FUZZ_FOREIGN`` set: tenant A's resources as
JSON) a ``before_call`` hook puts A's job and style ids into the ``job_id``/``style_id`` path parameter of
about half the cases (chosen by a hash of the drawn id, so a replayed case gets the same id), and the
``tenant_isolation`` check fails the run when B gets a 2xx on A's resource or any response to B carries
A's data (A's ids B did not send, A's style name, its prompts).

The event stream ends only at a terminal job, and no worker runs in these tests: every events case
gets a job already canceled (the tenant's own, ``HAM_FUZZ_DONE_JOB_ID``, or, in B's run for half of
them, A's, which must be a 404), so the stream sends one event and closes.

Every case, valid or not, gets ``Prefer: wait=0`` for any wait it drew, so a fuzzed long poll on a job that
no worker runs cannot stall the run, and a fresh ``Idempotency-Key``: a key seen before answers with
its first job for the same request and a 409 for another (as documented), which would turn a fuzzer's
repeated example key into "valid body refused".
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import uuid
import zlib
from pathlib import Path

import schemathesis
from schemathesis.core.parameters import ParameterLocation
from schemathesis.generation import GenerationMode
from schemathesis.generation.meta import TestPhase

PNG = (Path(__file__).resolve().parents[1] / "data" / "content0.png").read_bytes()
PNG_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()
# A style the fuzz tenant owns, made by the test before the run (a drawn id would be a 404).
STYLE_ID = os.environ.get("HAM_FUZZ_STYLE_ID", "0" * 32)
MAX_STYLES = int(os.environ.get("HAM_MAX_STYLES_PER_JOB", "4"))
WEBHOOK = "http://127.0.0.1:9/hook"
EVENTS_PATH = "/v1/transfers/{job_id}/events"


@functools.cache
def foreign() -> dict:
    """Tenant A's resources in tenant B's run (empty in A's own): ``job_ids``, ``style_ids``, ``secrets``.

    Read once: the environment is set per schemathesis run (one process per tenant)."""
    return json.loads(os.environ.get("HAM_FUZZ_FOREIGN") or "{}")


def _pick(drawn: object, choices: list[str]) -> str | None:
    """One of ``choices`` for about half the drawn values (by hash, so a replay picks the same), else None."""
    digest = zlib.crc32(str(drawn).encode())
    return choices[(digest // 2) % len(choices)] if choices and digest % 2 == 0 else None


@schemathesis.hook
def before_call(ctx, case, kwargs):
    """Events on a job that is already over; in B's run, A's ids in about half the path parameters."""
    params = case.path_parameters
    if not params:
        return
    other = foreign()
    if case.meta is not None and case.meta.phase.name == TestPhase.STATEFUL:
        # A stateful step's id comes from a link: the tenant's own resource, made a step before; another id
        # would make schemathesis report "created resource not found".
        other = {}
    if case.operation.path == EVENTS_PATH:
        done = os.environ.get("HAM_FUZZ_DONE_JOB_ID", "0" * 32)
        params["job_id"] = _pick(params.get("job_id"), other.get("done_job_ids", [])) or done
        _trace(case, params, other)
        return
    for name, ids in (("job_id", other.get("job_ids", [])), ("style_id", other.get("style_ids", []))):
        if name in params:
            params[name] = _pick(params[name], ids) or params[name]
    _trace(case, params, other)


def _trace(case, params: dict, other: dict) -> None:
    """One line per call that carries another tenant's id (``HAM_FUZZ_TRACE``), for the test to count."""
    ids = set(other.get("job_ids", []) + other.get("done_job_ids", []) + other.get("style_ids", []))
    trace = os.environ.get("HAM_FUZZ_TRACE")
    if trace and ids & {str(v) for v in params.values()}:
        with open(trace, "a") as out:
            out.write(f"{case.method.upper()} {case.operation.path}\n")


@schemathesis.check
def tenant_isolation(ctx, response, case):
    """In B's run: no 2xx on A's resource, and no response that shows A's data B did not send itself."""
    other = foreign()
    if not other:
        return None
    problem = isolation_problem(other, str(response.request.url), response.status_code,
                                response.content.decode("utf-8", "replace"))
    if problem:
        raise AssertionError(problem)
    return None


def isolation_problem(other: dict, url: str, status: int, text: str) -> str | None:
    """Why this answer to tenant B breaks tenant isolation, or None."""
    a_ids = other.get("job_ids", []) + other.get("done_job_ids", []) + other.get("style_ids", [])
    targeted = [i for i in a_ids if i in url]
    if targeted and 200 <= status < 300:
        return f"tenant B got {status} for tenant A's resource {targeted[0]} ({url})"
    leaked = [s for s in a_ids + other.get("secrets", []) if s in text and s not in url]
    if leaked:
        return f"the answer to tenant B ({status}, {url}) shows tenant A's data: {leaked}"
    return None


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
