"""JobStore against a real Redis: storage, queue, idempotency, transitions, recovery."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from ham_core.config import Settings
from ham_core.jobs import (
    ERROR_WORKER_LOST,
    TASK_FUNCTION,
    Job,
    JobConflict,
    JobFenced,
    JobStatus,
    JobStore,
    QueueFull,
    new_job_id,
    result_key,
    style_key,
)
from ham_core.style_refs import StyleRef


@pytest.fixture
def settings() -> Settings:
    return Settings(queue_name="ham-test", result_ttl=600, job_timeout=30, job_max_retries=2)


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> JobStore:
    return JobStore(redis_client, settings)


def make_job(tenant: str = "acme", **kw) -> Job:
    job_id, prompt = new_job_id(), kw.pop("style_prompt", None)
    return Job(id=job_id, tenant=tenant, params={"steps": 5, "size": 64}, styles=[StyleRef(style_key(job_id), prompt)],
               **kw)


def test_submit_stores_the_record_and_enqueues_an_rq_job_carrying_only_the_id(store, redis_client, settings):
    job, created = store.submit(make_job(style_prompt="ink", webhook_url="https://example.com/h"))
    assert created
    got = store.get(job.id)
    assert got == job
    assert got.status is JobStatus.QUEUED and got.params == {"steps": 5, "size": 64}
    assert redis_client.lrange(f"rq:queue:{settings.queue_name}", 0, -1) == [job.id.encode()]
    rq_job = Queue(settings.queue_name, connection=redis_client, serializer=JSONSerializer).fetch_job(job.id)
    assert rq_job.func_name == TASK_FUNCTION
    assert rq_job.args == [job.id]
    # JSON, not pickle: the stored payload parses as JSON.
    assert json.loads(__import__("zlib").decompress(redis_client.hget(f"rq:job:{job.id}", "data")))


def test_record_expires_after_result_ttl(store, redis_client, settings):
    job, _ = store.submit(make_job())
    ttl = redis_client.ttl(store.job_key(job.id))
    assert 0 < ttl <= settings.result_ttl


def test_get_unknown_job_is_none(store):
    assert store.get("nope") is None


def test_same_idempotency_key_returns_the_first_job_without_a_second_enqueue(store, redis_client, settings):
    first, created1 = store.submit(make_job(), "key-1")
    second, created2 = store.submit(make_job(), "key-1")
    assert created1 and not created2
    assert second.id == first.id
    assert redis_client.llen(f"rq:queue:{settings.queue_name}") == 1


def test_idempotency_key_is_scoped_to_the_tenant(store):
    a, _ = store.submit(make_job("a"), "k")
    b, created = store.submit(make_job("b"), "k")
    assert created and a.id != b.id


def test_concurrent_submits_with_one_idempotency_key_create_one_job(store, redis_client, settings):
    results: list[tuple[Job, bool]] = []
    lock = threading.Lock()

    def submit() -> None:
        out = store.submit(make_job(), "race")
        with lock:
            results.append(out)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(created for _, created in results) == 1
    assert len({job.id for job, _ in results}) == 1
    assert redis_client.llen(f"rq:queue:{settings.queue_name}") == 1


def test_concurrent_submits_never_overshoot_the_queue_limits(store, redis_client, settings):
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit(tenant: str) -> None:
        try:
            store.submit(make_job(tenant), max_queued_per_tenant=3, max_queued=5)
            outcome = "created"
        except QueueFull as exc:
            outcome = exc.scope
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=submit, args=(tenant,)) for tenant in ["a"] * 8 + ["b"] * 8]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("created") == 5
    assert store.queued_count("a") <= 3 and store.queued_count("b") <= 3
    assert store.queued_count() == 5 == redis_client.llen(f"rq:queue:{settings.queue_name}")


def test_queue_position_follows_fifo_order_and_is_none_once_started(store):
    jobs = [store.submit(make_job())[0] for _ in range(3)]
    assert [store.queue_position(j.id) for j in jobs] == [0, 1, 2]
    store.start(jobs[0].id, "w1")
    assert store.queue_position(jobs[0].id) is None
    assert [store.queue_position(j.id) for j in jobs[1:]] == [0, 1]


def test_queued_count_per_tenant_and_global(store):
    a = [store.submit(make_job("a"))[0] for _ in range(2)]
    store.submit(make_job("b"))
    assert store.queued_count("a") == 2 and store.queued_count("b") == 1 and store.queued_count() == 3
    store.start(a[0].id, "w")
    store.request_cancel(a[1].id)
    assert store.queued_count("a") == 0 and store.queued_count() == 1


def test_list_for_tenant_pages_newest_first_and_only_the_tenants_jobs(store):
    now = time.time()
    ids = [store.submit(make_job("a", created_at=now - 10 + i))[0].id for i in range(5)]
    store.submit(make_job("b"))
    page1, cursor = store.list_for_tenant("a", limit=2, cursor=None)
    page2, cursor2 = store.list_for_tenant("a", limit=2, cursor=cursor)
    page3, cursor3 = store.list_for_tenant("a", limit=2, cursor=cursor2)
    assert [j.id for j in page1 + page2 + page3] == ids[::-1]
    assert cursor and cursor2 and cursor3 is None
    assert store.list_for_tenant("nobody", limit=10) == ([], None)


def test_list_for_tenant_refuses_a_malformed_cursor(store):
    with pytest.raises(ValueError, match="cursor"):
        store.list_for_tenant("a", limit=2, cursor="not-a-cursor")


def test_start_runs_a_queued_job_once_and_counts_the_attempt(store):
    job, _ = store.submit(make_job())
    running = store.start(job.id, "w1")
    assert running.status is JobStatus.RUNNING and running.attempts == 1 and running.worker == "w1"
    assert running.started_at is not None
    assert store.start(job.id, "w2") is None  # a second start is refused


def test_a_repeated_start_by_the_same_worker_is_the_same_start(store):
    # A retried call whose first reply was lost: no second attempt, no refusal.
    job = make_job()
    store.submit(job)
    first = store.start(job.id, "w1")
    again = store.start(job.id, "w1")
    assert again is not None and (again.attempts, again.started_at) == (1, first.started_at)
    assert store.start(job.id, "w2") is None  # another worker still cannot take it


def test_requeue_with_a_refund_gives_the_attempt_back(store):
    job = make_job()
    store.submit(job)
    store.start(job.id, "w1")
    back = store.requeue(job.id, expected_worker="w1", refund_attempt=True)
    assert (back.status, back.attempts, store.queue_position(job.id)) == (JobStatus.QUEUED, 0, 0)
    store.start(job.id, "w1")
    assert store.requeue(job.id, expected_worker="w1").attempts == 1  # without a refund it counts


def test_cancel_while_queued_removes_it_from_the_queue_and_start_skips_it(store, redis_client, settings):
    job, _ = store.submit(make_job())
    canceled = store.request_cancel(job.id)
    assert canceled.status is JobStatus.CANCELED and canceled.finished_at is not None
    assert redis_client.llen(f"rq:queue:{settings.queue_name}") == 0
    assert store.start(job.id, "w1") is None


def test_cancel_while_running_sets_a_flag_the_worker_reads(store):
    job, _ = store.submit(make_job())
    store.start(job.id, "w1")
    assert not store.cancel_requested(job.id)
    flagged = store.request_cancel(job.id)
    assert flagged.status is JobStatus.RUNNING
    assert store.cancel_requested(job.id)
    assert store.mark_canceled(job.id).status is JobStatus.CANCELED


def test_cancel_of_a_finished_job_is_a_conflict(store):
    job, _ = store.submit(make_job())
    store.start(job.id, "w1")
    store.succeed(job.id, "results/x.png", {"steps": 5})
    with pytest.raises(JobConflict) as err:
        store.request_cancel(job.id)
    assert err.value.status == "succeeded"


def test_cancel_of_an_unknown_job_is_a_key_error(store):
    with pytest.raises(KeyError):
        store.request_cancel("missing")


def test_progress_is_recorded_only_while_running(store):
    job, _ = store.submit(make_job())
    store.set_progress(job.id, 0.5)
    assert store.get(job.id).progress == 0.0
    store.start(job.id, "w1")
    store.set_progress(job.id, 0.25)
    assert store.get(job.id).progress == 0.25


def test_succeed_records_result_and_stats_and_refuses_a_second_terminal_transition(store):
    job, _ = store.submit(make_job())
    store.start(job.id, "w1")
    done = store.succeed(job.id, "results/a.png", {"unet_calls": 12, "size": [64, 64]})
    assert done.status is JobStatus.SUCCEEDED and done.progress == 1.0
    assert done.result_key == "results/a.png" and done.stats == {"unet_calls": 12, "size": [64, 64]}
    with pytest.raises(JobConflict):
        store.fail(job.id, "internal_error", "late")


def test_fail_records_code_and_message(store):
    job, _ = store.submit(make_job())
    store.start(job.id, "w1")
    failed = store.fail(job.id, "invalid_input", "content: zero-size image")
    assert (failed.status, failed.error_code, failed.error_message) == (
        JobStatus.FAILED,
        "invalid_input",
        "content: zero-size image",
    )
    assert store.running_jobs() == []


def test_recover_requeues_at_the_front_until_retries_run_out_then_fails_worker_lost(store, redis_client, settings):
    job, _ = store.submit(make_job())
    other, _ = store.submit(make_job())
    for attempt in range(1, settings.job_max_retries + 1):
        assert store.start(job.id, f"w{attempt}").attempts == attempt
        assert [j.id for j in store.running_jobs()] == [job.id]
        again = store.recover(job.id, f"w{attempt}", settings.job_max_retries)
        assert again.status is JobStatus.QUEUED and again.progress == 0.0 and again.worker is None
        assert store.queue_position(job.id) == 0 and store.queue_position(other.id) == 1
    store.start(job.id, "last")
    lost = store.recover(job.id, "last", settings.job_max_retries)
    assert lost.status is JobStatus.FAILED and lost.error_code == ERROR_WORKER_LOST
    assert "stopped responding" in lost.error_message
    assert store.queue_position(job.id) is None and store.running_jobs() == []


def test_recover_leaves_a_job_alone_once_another_worker_owns_it(store):
    job, _ = store.submit(make_job())
    store.start(job.id, "alive")
    assert store.recover(job.id, "dead", 2) is None
    assert store.get(job.id).status is JobStatus.RUNNING


def test_recover_cancels_a_lost_job_whose_cancel_was_requested(store):
    job, _ = store.submit(make_job())
    store.start(job.id, "w1")
    store.request_cancel(job.id)
    assert store.recover(job.id, "w1", 2).status is JobStatus.CANCELED


def test_job_fields_round_trip_through_redis_encoding():
    job = make_job(style_prompt="ünïcode", webhook_url=None, stats={"a": [1, 2]}, started_at=3.5, attempts=2)
    assert Job.from_fields({k.encode(): v.encode() for k, v in job.to_fields().items()}) == job


def test_finished_counts_count_each_terminal_outcome_once(store):
    jobs = [store.submit(make_job())[0] for _ in range(4)]
    store.request_cancel(jobs[0].id)
    for job in jobs[1:]:
        store.start(job.id, "w")
    store.succeed(jobs[1].id, "results/1.png", {})
    store.fail(jobs[2].id, "internal_error", "boom")
    store.recover(jobs[3].id, "w", max_retries=0)
    with pytest.raises(JobConflict):
        store.fail(jobs[1].id, "internal_error", "again")
    assert store.finished_counts() == {"succeeded": 1, "failed": 2, "canceled": 1}


def test_list_for_tenant_pages_through_jobs_created_in_the_same_instant(store):
    ids = []
    for _ in range(5):
        job, _ = store.submit(Job(id=new_job_id(), tenant="a", params={}, styles=[StyleRef.text("x")]))
        ids.append(job.id)
    # Same created_at for all of them, as two API replicas can write.
    instant = time.time()
    store.redis.zadd(store.tenant_key("a"), {job_id: instant for job_id in ids})
    seen, cursor = [], None
    for _ in range(10):
        page, cursor = store.list_for_tenant("a", limit=2, cursor=cursor)
        seen += [job.id for job in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(ids)


@pytest.mark.parametrize("cursor", ["inf", "-1", "1e309", "1_000", "nan", "1.5", "1.5:xyz"])
def test_list_for_tenant_refuses_loose_cursors(store, cursor):
    with pytest.raises(ValueError, match="cursor"):
        store.list_for_tenant("a", limit=2, cursor=cursor)


# --- fencing: every worker write names its run -------------------------------------------


def _stolen(store: JobStore, settings: Settings) -> tuple[Job, Job]:
    """A job started by a run on ``stale`` (frozen, declared dead, recovered) and started again on ``owner``."""
    job, _ = store.submit(make_job())
    stale = store.start(job.id, "stale")
    store.set_progress(job.id, 0.6, run=stale.run)
    assert store.recover(job.id, "stale", settings.job_max_retries) is not None
    owner = store.start(job.id, "owner")
    return stale, owner


def test_each_start_is_a_new_run_and_a_refund_never_gives_the_run_number_back(store):
    job, _ = store.submit(make_job())
    first = store.start(job.id, "w1")
    assert (first.run, store.start(job.id, "w1").run) == (1, 1)  # a retried start is the same run
    store.requeue(job.id, expected_worker="w1", refund_attempt=True, run=1)
    second = store.start(job.id, "w1")
    assert (second.attempts, second.run) == (1, 2)


def test_a_stale_run_is_fenced_from_progress_poll_and_every_terminal_transition(store, settings):
    stale, owner = _stolen(store, settings)
    assert (owner.run, owner.progress) == (2, 0.0)  # the new run starts from 0, visibly another run
    assert store.set_progress(stale.id, 0.9, run=stale.run) is False
    assert store.get(stale.id).progress == 0.0  # the stale write changed nothing
    assert store.poll(stale.id, stale.run) == "fenced" and store.cancel_requested(stale.id, stale.run)
    assert store.poll(owner.id, owner.run) == "go"
    for write in (
        lambda: store.succeed(stale.id, "results/stale.png", {"steps": 5}, run=stale.run),
        lambda: store.fail(stale.id, "internal_error", "late", run=stale.run),
        lambda: store.mark_canceled(stale.id, run=stale.run),
    ):
        with pytest.raises(JobFenced) as err:
            write()
        assert err.value.status == "running" and err.value.run == stale.run
    assert store.requeue(stale.id, refund_attempt=True, run=stale.run) is None
    now = store.get(stale.id)
    assert (now.status, now.worker, now.run, now.attempts) == (JobStatus.RUNNING, "owner", 2, 2)
    done = store.succeed(owner.id, "results/owner.png", {"steps": 5}, run=owner.run)
    assert (done.status, done.result_key) == (JobStatus.SUCCEEDED, "results/owner.png")


def test_a_run_handed_back_to_the_queue_is_fenced_until_it_starts_again(store):
    job, _ = store.submit(make_job())
    run = store.start(job.id, "w1").run
    store.requeue(job.id, expected_worker="w1", refund_attempt=True, run=run)
    assert store.set_progress(job.id, 0.3, run=run) is False
    with pytest.raises(JobFenced):
        store.succeed(job.id, "results/x.png", {}, run=run)
    assert store.get(job.id).status is JobStatus.QUEUED


def test_progress_never_goes_backwards_within_a_run(store):
    job, _ = store.submit(make_job())
    run = store.start(job.id, "w1").run
    seen = []
    for value in (0.2, 0.5, 0.3, 0.5, 0.7):
        assert store.set_progress(job.id, value, run=run)
        seen.append(store.get(job.id).progress)
    assert seen == [0.2, 0.5, 0.5, 0.5, 0.7]


def test_a_cancel_reaches_the_owning_run_and_its_canceled_write(store):
    job, _ = store.submit(make_job())
    run = store.start(job.id, "w1").run
    store.request_cancel(job.id)
    assert store.poll(job.id, run) == "cancel"
    assert store.mark_canceled(job.id, run=run).status is JobStatus.CANCELED


def test_result_keys_are_named_per_run():
    keys = {result_key("j", "png", 0, 1), result_key("j", "png", 0, 2), result_key("j", "webp", 1, 2)}
    assert keys == {"results/j/run-1.png", "results/j/run-2.png", "results/j/run-2-1.webp"}
    assert result_key("j") == "results/j.png"  # no run: the name older records point at


def test_the_record_codec_follows_the_fields_and_missing_fields_take_the_owners_defaults():
    from dataclasses import fields

    from ham_core.output import DEFAULT_QUALITY

    job = make_job(webhook_events=("start", "completed"), result_keys=["results/a.png"], run=3, version=7)
    encoded = job.to_fields()
    assert set(encoded) == {f.name for f in fields(Job) if getattr(job, f.name) is not None}
    assert (encoded["webhook_events"], encoded["run"]) == ("start,completed", "3")
    assert Job.from_fields(encoded) == job
    bare = Job.from_fields({"id": job.id, "tenant": "t", "status": "queued", "created_at": "1.5"})
    assert (bare.output_quality, bare.output_format, bare.webhook_events) == (DEFAULT_QUALITY, "png", ("completed",))
    assert (bare.params, bare.stats, bare.run, bare.progress) == ({}, None, 0, 0.0)
    assert [(ref.key, ref.prompt) for ref in bare.styles] == [(None, None)]  # read as the older record it is


def test_the_task_function_named_by_the_queue_is_the_workers_entry_point():
    # The core names the worker's function by string (it never imports the worker): the string must resolve.
    import importlib

    from worker.task import run_transfer

    module, _, name = TASK_FUNCTION.rpartition(".")
    assert getattr(importlib.import_module(module), name) is run_transfer
