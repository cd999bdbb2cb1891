"""End to end with diffusion-transformer models: workers started with ``HAM_MODEL=tiny-sd3`` / ``tiny-flux``.

The same API, queue and worker as every other model; the worker loads the SD3- or
FLUX-shaped random preset (joint attention, flow matching) and runs HAM through the same
engine. FLUX's guidance is distilled, so its text style teacher runs without CFG rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Stack, run_stack
from tests.e2e.test_end_to_end import QUICK, TERMINAL, download_png, submit, submitted, wait_for

pytestmark = pytest.mark.slow


# model → (family, sampling rows a step of a text style with the content warm: CFG halves or not)
MODELS = {"tiny-sd3": ("sd3", 5), "tiny-flux": ("flux", 3)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def sd3_stack(
    request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    yield from run_stack(redis_url, tmp_path_factory, HAM_MODEL=request.param)


@pytest.fixture
def alpha(sd3_stack: Stack) -> Iterator[httpx.Client]:
    sd3_stack.ensure_one_worker()
    with sd3_stack.client("alpha") as client:
        yield client


def _stats(stack: Stack, job_id: str) -> dict:
    return json.loads(stack.redis.hget(f"ham:job:{job_id}", "stats"))


def test_a_transformer_worker_serves_image_and_text_style_jobs(sd3_stack: Stack, alpha: httpx.Client) -> None:
    steps = int(QUICK["steps"])
    model = sd3_stack.env["HAM_MODEL"]
    family, text_rows = MODELS[model]
    image_job = submitted(submit(alpha))
    text_job = submitted(submit(alpha, use_style=False, style_prompt="an ink wash painting"))
    # The text job finds the content's inversion in the worker's content cache (one worker, FIFO).
    for job, rows in ((image_job, 5 * steps), (text_job, text_rows * steps)):
        final = wait_for(alpha, job["id"], TERMINAL)
        assert final["status"] == "succeeded", final
        assert download_png(final["result_url"]).size == (64, 64)
        stats = _stats(sd3_stack, job["id"])
        assert (stats["family"], stats["model"]) == (family, model)
        assert stats["unet_rows"] == rows, stats


def test_a_transformer_worker_records_its_teachers_during_a_source_inversion(
    sd3_stack: Stack, alpha: httpx.Client
) -> None:
    job = submitted(submit(alpha, inversion="source", teachers="recorded"))
    final = wait_for(alpha, job["id"], TERMINAL)
    assert final["status"] == "succeeded", final
    stats = _stats(sd3_stack, job["id"])
    assert stats["teachers"] == {"content_teacher": "recorded", "style_teacher": "recorded"}
    assert stats["unet_rows"] == 3 * int(QUICK["steps"]) + 2
