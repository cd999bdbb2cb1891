"""TransferRunner in-process: the real tiny engine, a real Redis, file storage."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import pytest
import redis
from PIL import Image

from ham_core.config import Settings
from ham_core.jobs import Job, JobStatus, JobStore, content_key, new_job_id, result_key, style_key
from ham_core.redis_client import connect_redis
from ham_core.storage import FileStorage
from ham_core.style_refs import StyleRef
from tests.fixtures.waiting import wait_until
from worker.metrics import WorkerMetrics
from worker.task import TransferRunner, install_runner, run_transfer

DATA = Path(__file__).resolve().parents[1] / "data"

pytestmark = pytest.mark.slow


class Hooks:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []
        self.events: list[str] = []

    def submit(self, url: str, payload: dict, event: str = "completed") -> None:
        self.sent.append((url, payload))
        self.events.append(event)


@pytest.fixture(scope="module")
def loaded_engine():
    from ham_engine.engine import HamEngine

    return HamEngine.load("tiny", device="cpu")


@pytest.fixture
def engine(loaded_engine):
    """The module's model in a fresh engine: empty caches whatever ran before (tests assert cache misses)."""
    from ham_engine.engine import HamEngine

    return HamEngine(loaded_engine.model)


@pytest.fixture
def settings() -> Settings:
    return Settings(queue_name="ham-task", result_ttl=600, job_timeout=30)


@pytest.fixture
def storage(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "files", "http://127.0.0.1:1", b"k" * 32)


def make_runner(engine, redis_client, storage, settings, hooks=None, metrics=None) -> TransferRunner:
    return TransferRunner(engine, JobStore(redis_client, settings), storage, settings, "w-test", metrics, hooks)


def submit(runner: TransferRunner, params: dict | None = None, content: bytes | None = None, **kw) -> Job:
    job_id, prompt = new_job_id(), kw.pop("style_prompt", None)
    job = Job(id=job_id, tenant="t", params=params or {"steps": 3, "size": 64},
              styles=[StyleRef(style_key(job_id), prompt)], **kw)
    runner.storage.put(content_key(job.id), content or (DATA / "content0.png").read_bytes())
    runner.storage.put(style_key(job.id), (DATA / "style0.png").read_bytes())
    runner.store.submit(job)
    return job


def test_successful_job_stores_the_png_deletes_inputs_records_stats_and_sends_the_webhook(
    engine, redis_client: redis.Redis, storage, settings
):
    hooks, metrics = Hooks(), WorkerMetrics()
    runner = make_runner(engine, redis_client, storage, settings, hooks, metrics)
    job = submit(runner, webhook_url="https://example.com/hook")
    assert runner.run(job.id) == "succeeded"
    done = runner.store.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.result_key == result_key(job.id, run=1) and done.progress == 1.0
    assert done.stats["steps"] == 3 and done.stats["unet_calls"] > 0
    assert Image.open(io.BytesIO(storage.get(result_key(job.id, run=1)))).size == (64, 64)
    with pytest.raises(KeyError):
        storage.get(content_key(job.id))
    [(url, payload)] = hooks.sent
    assert url == "https://example.com/hook"
    assert payload["id"] == job.id and payload["status"] == "succeeded"
    assert "/v1/files/results/" in payload["result_url"]
    text = metrics.render().decode()
    assert 'ham_worker_job_seconds_count{outcome="succeeded"} 1.0' in text
    assert "ham_worker_steps_total 3.0" in text and "ham_worker_style_cache_misses_total 1.0" in text
    assert 'ham_worker_teachers_total{served="live",teacher="content_teacher"} 1.0' in text
    assert "ham_worker_record_fallbacks_total 0.0" in text


def test_recorded_teachers_and_budget_fallbacks_are_counted(engine, redis_client, storage, settings):
    metrics = WorkerMetrics()
    runner = make_runner(engine, redis_client, storage, settings, metrics=metrics)
    recorded = {"steps": 3, "size": 64, "inversion": "source", "teachers": "recorded"}
    assert runner.run(submit(runner, params=recorded).id) == "succeeded"
    budget, engine.record_bytes = engine.record_bytes, 0  # nothing fits: the teachers run live
    engine.content_cache.clear()  # the repeat inverts its content again (else nothing is recorded)
    try:
        assert runner.run(submit(runner, params=recorded).id) == "succeeded"
    finally:
        engine.record_bytes = budget
    text = metrics.render().decode()
    assert 'ham_worker_teachers_total{served="recorded",teacher="content_teacher"} 1.0' in text
    assert 'ham_worker_teachers_total{served="cached",teacher="style_teacher"} 1.0' in text  # the repeat style
    assert 'ham_worker_teachers_total{served="live",teacher="content_teacher"} 1.0' in text
    assert "ham_worker_record_fallbacks_total 1.0" in text


def test_progress_is_written_every_step_and_rises(engine, redis_client, storage, settings):
    from ham_engine.engine import HamEngine

    # Empty caches: a cold job inverts, so its steps are inversion + sampling.
    runner = make_runner(HamEngine(engine.model), redis_client, storage, settings)
    job = submit(runner, params={"steps": 5, "size": 64})
    written: list[float] = []
    original = runner.store.set_progress
    runner.store.set_progress = lambda job_id, p, run=None: (written.append(p), original(job_id, p, run))[1]  # observe
    runner.run(job.id)
    assert len(written) == 10, written  # inversion + sampling: total = 2 * steps
    assert written == sorted(written) and written[-1] == pytest.approx(0.99)


def test_job_over_the_timeout_fails_with_timeout_between_steps(engine, redis_client, storage):
    settings = Settings(queue_name="ham-task", result_ttl=600, job_timeout=1)
    runner = make_runner(engine, redis_client, storage, settings)
    job = submit(runner, params={"steps": 1000, "size": 64})
    began = time.monotonic()
    assert runner.run(job.id) == "failed"
    failed = runner.store.get(job.id)
    assert failed.error_code == "timeout" and "1s" in failed.error_message
    assert time.monotonic() - began < 10


def test_cancel_while_running_stops_the_engine_and_marks_the_job_canceled(engine, redis_client, storage, settings):
    runner = make_runner(engine, redis_client, storage, settings)
    job = submit(runner, params={"steps": 1000, "size": 64})

    def cancel_when_running() -> None:
        wait_until(lambda: runner.store.get(job.id).progress > 0, 120, "the job to make progress", interval=0.01)
        runner.store.request_cancel(job.id)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    assert runner.run(job.id) == "canceled"
    canceller.join()
    canceled = runner.store.get(job.id)
    assert canceled.status is JobStatus.CANCELED and canceled.progress < 0.5
    with pytest.raises(KeyError):
        storage.get(result_key(job.id, run=1))


def test_job_canceled_while_queued_is_skipped(engine, redis_client, storage, settings):
    runner = make_runner(engine, redis_client, storage, settings)
    job = submit(runner)
    runner.store.request_cancel(job.id)
    assert runner.run(job.id) == "skipped"
    assert runner.store.get(job.id).attempts == 0


@pytest.mark.parametrize(
    ("case", "code"),
    [("corrupt_input", "invalid_input"), ("missing_input", "inputs_missing"), ("bad_params", "invalid_input")],
)
def test_bad_job_fails_with_a_code_and_the_worker_carries_on(engine, redis_client, storage, settings, case, code):
    metrics = WorkerMetrics()
    runner = make_runner(engine, redis_client, storage, settings, metrics=metrics)
    if case == "corrupt_input":
        job = submit(runner, content=b"\x89PNG\r\n\x1a\nnot really")
    elif case == "missing_input":
        job = submit(runner)
        storage.delete(content_key(job.id))
    else:
        job = submit(runner, params={"steps": 3, "size": 65})
    assert runner.run(job.id) == "failed"
    assert runner.store.get(job.id).error_code == code
    assert runner.run(submit(runner).id) == "succeeded"
    failures = {s.labels["code"]: s.value for s in metrics.job_failures.collect()[0].samples
                if s.name.endswith("_total")}
    assert failures == {c: (1.0 if c == code else 0.0) for c in failures} and code in failures


def test_an_overflow_fails_the_job_with_numerical_error_not_a_black_image(redis_client, storage, settings):
    import torch

    from ham_engine.engine import HamEngine

    broken = HamEngine.load("tiny", device="cpu")
    with torch.no_grad():
        broken.model.unet.conv_in.weight.mul_(1e30)  # the first GroupNorm's variance overflows to inf
    runner = make_runner(broken, redis_client, storage, settings)
    job = submit(runner)
    assert runner.run(job.id) == "failed"
    failed = runner.store.get(job.id)
    assert failed.error_code == "numerical_error" and "not finite" in failed.error_message
    with pytest.raises(KeyError):
        storage.get(result_key(job.id, run=1))


def test_an_sdxl_worker_runs_image_and_image_plus_prompt_jobs(redis_client, storage, settings):
    from ham_engine.engine import HamEngine

    runner = make_runner(HamEngine.load("tiny-xl", device="cpu"), redis_client, storage, settings)
    image_job = submit(runner)
    text_job = submit(runner, style_prompt="an ink engraving")
    assert [runner.run(image_job.id), runner.run(text_job.id)] == ["succeeded", "succeeded"]
    done = runner.store.get(text_job.id)
    assert (done.stats["family"], done.stats["mode"]) == ("sdxl", "image+text")
    assert Image.open(io.BytesIO(storage.get(result_key(text_job.id, run=1)))).size == (64, 64)


class _LibraryFailure:
    """An engine whose library raises a plain ValueError mid-transfer (not an input error of ours)."""

    def __init__(self, engine) -> None:
        self.model = engine.model

    def transfer(self, *args, **kwargs):
        raise ValueError("cannot reshape tensor of 0 elements")


def test_a_value_error_from_inside_a_library_is_an_internal_error_not_invalid_input(
    engine, redis_client, storage, settings
):
    runner = make_runner(_LibraryFailure(engine), redis_client, storage, settings)
    job = submit(runner)
    assert runner.run(job.id) == "failed"
    failed = runner.store.get(job.id)
    assert failed.error_code == "internal_error" and job.id in failed.error_message


def _block_results(storage: FileStorage) -> Path:
    """A file where the results folder goes: every result write fails (as root, chmod would not)."""
    blocker = storage.root / "results"
    shutil.rmtree(blocker, ignore_errors=True)
    blocker.write_bytes(b"")
    return blocker


def test_storage_outage_past_the_deadline_requeues_the_job_without_charging_an_attempt(
    engine, redis_client, storage
):
    settings = Settings(queue_name="ham-task", result_ttl=600, job_timeout=30, worker_outage_deadline=0.5)
    metrics = WorkerMetrics()
    runner = make_runner(engine, redis_client, storage, settings, metrics=metrics)
    job = submit(runner)
    blocker = _block_results(storage)
    # More outages than retries allowed: none of them is the job's fault, so none counts.
    for _ in range(settings.job_max_retries + 2):
        assert runner.run(job.id) == "queued"
        record = runner.store.get(job.id)
        assert (record.status, record.attempts, record.error_code) == (JobStatus.QUEUED, 0, None)
        assert runner.store.queue_position(job.id) == 0
    assert not runner.storage_link.up  # the outage was noticed (and logged once)
    assert metrics.registry.get_sample_value("ham_worker_storage_errors_total") >= 1  # counted per outage seen
    blocker.unlink()  # the outage ends: the next run succeeds on its first charged attempt
    assert runner.run(job.id) == "succeeded"
    assert runner.store.get(job.id).attempts == 1
    assert runner.storage_link.up


def test_storage_outage_shorter_than_the_deadline_is_waited_out_within_the_run(engine, redis_client, storage):
    settings = Settings(queue_name="ham-task", result_ttl=600, job_timeout=30, worker_outage_deadline=60)
    runner = make_runner(engine, redis_client, storage, settings)
    job = submit(runner)
    blocker = _block_results(storage)

    def end_outage() -> None:
        wait_until(lambda: not runner.storage_link.up, 30, "the runner to hit the outage", interval=0.01)
        blocker.unlink()

    healer = threading.Thread(target=end_outage)
    healer.start()
    assert runner.run(job.id) == "succeeded"
    healer.join()
    done = runner.store.get(job.id)
    assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 1)
    assert Image.open(io.BytesIO(storage.get(result_key(job.id, run=1)))).size == (64, 64)


def test_a_recorded_success_whose_reply_was_lost_is_taken_as_done(engine, redis_client, storage, settings):
    # Redis recorded the transition, then the connection dropped before the reply came back.
    hooks = Hooks()
    runner = make_runner(engine, redis_client, storage, settings, hooks)
    job = submit(runner, webhook_url="https://example.com/hook")
    original = runner.store.succeed
    calls: list[str] = []

    def succeed_then_lose_the_reply(job_id, key, stats, result_keys=None, run=None):
        calls.append(job_id)
        done = original(job_id, key, stats, result_keys, run)
        if len(calls) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return done

    runner.store.succeed = succeed_then_lose_the_reply
    assert runner.run(job.id) == "succeeded"
    assert len(calls) == 2  # retried, refused as already succeeded — by this worker: done
    done = runner.store.get(job.id)
    assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 1)
    assert [payload["status"] for _, payload in hooks.sent] == ["succeeded"]


def test_progress_and_cancel_polls_never_stop_the_engine_while_redis_is_away(engine, redis_client, storage, settings):
    runner = make_runner(engine, redis_client, storage, settings)
    job = submit(runner, params={"steps": 8, "size": 64})
    down = connect_redis(Settings(redis_url="redis://127.0.0.1:1/0"), retries=0)  # nothing listens there
    runner.progress_store = JobStore(down, settings)
    outcome = runner.run(job.id)
    assert outcome == "succeeded", runner.store.get(job.id)
    assert runner.redis_link.outages == 1  # noticed (and logged once); the job went on regardless
    assert runner.store.get(job.id).status is JobStatus.SUCCEEDED


def test_run_transfer_needs_an_installed_runner(engine, redis_client, storage, settings):
    install_runner(None)
    with pytest.raises(RuntimeError, match="ham worker"):
        run_transfer("x")
    runner = make_runner(engine, redis_client, storage, settings)
    install_runner(runner)
    try:
        assert run_transfer(submit(runner).id) == "succeeded"
    finally:
        install_runner(None)


def test_metrics_count_feature_hits_per_kind_and_tier_for_one_and_several_styles():
    from ham_engine.results import StyleStats, TransferStats
    from worker.metrics import WorkerMetrics

    metrics = WorkerMetrics()
    run = dict(unet_calls=6, unet_rows=6, unet_rows_by_phase={"invert": 0, "sample": 6}, seconds={}, steps=3,
               size=(64, 64), device="cpu", dtype="float32", model="tiny", family="sd", inversion="target",
               teachers={}, record_bytes=0, record_budget_bytes=0, record_fallback=None)  # fmt: skip
    one = TransferStats(**run, content_cache_hit=False, content_cache_tier=None,
                        styles=(StyleStats(True, "store", "image", False),))  # fmt: skip
    batch = TransferStats(**run, content_cache_hit=True, content_cache_tier="memory", styles=(
        StyleStats(True, "memory", "image", False),
        StyleStats(False, None, "image", False),
        StyleStats(None, None, "text", True),  # a text style: nothing to cache
    ))  # fmt: skip
    metrics.observe_job("succeeded", 1.0, one)
    metrics.observe_job("succeeded", 1.0, batch)
    text = metrics.render().decode()
    assert 'ham_worker_feature_hits_total{kind="style",tier="store"} 1.0' in text
    assert 'ham_worker_feature_hits_total{kind="style",tier="memory"} 1.0' in text
    assert 'ham_worker_feature_hits_total{kind="content",tier="memory"} 1.0' in text
    assert 'ham_worker_feature_misses_total{kind="style"} 1.0' in text
    assert 'ham_worker_feature_misses_total{kind="content"} 1.0' in text
    assert "ham_worker_style_cache_hits_total 2.0" in text
