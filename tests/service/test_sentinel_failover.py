"""A failover on loopback: a primary, a replica and three ``redis-server --sentinel``.

Jobs are submitted through the job store on a Sentinel-discovered client with
``HAM_REDIS_MIN_REPLICAS_ACK=1`` (each submit acknowledged only once the replica holds it); the
primary is SIGKILLed mid-load; Sentinel promotes the replica and the same client carries on there.
Every acknowledged job must still be known afterwards. Until a replica is back (the old primary,
restarted), submits are refused rather than acknowledged without a second copy.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from ham_core.config import Settings
from ham_core.jobs import Job, JobStore, new_job_id
from ham_core.redis_client import REDIS_UNAVAILABLE, connect_redis
from tests.fixtures.servers import free_port
from tests.fixtures.waiting import wait_until

MASTER = "ham-test-primary"


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen([shutil.which("redis-server"), *args], stdout=out, stderr=subprocess.STDOUT)


def _until(what: str, condition, timeout: float = 30.0) -> None:
    wait_until(condition, timeout, what)


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict]:
    procs: list[subprocess.Popen] = []
    primary, replica = free_port(), free_port()
    base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]
    primary_args = ["--port", str(primary), "--dir", str(tmp_path), *base]
    procs.append(_spawn(primary_args, tmp_path / "primary.log"))
    procs.append(_spawn(["--port", str(replica), "--dir", str(tmp_path), "--replicaof", "127.0.0.1", str(primary),
                         *base], tmp_path / "replica.log"))  # fmt: skip
    sentinels = [free_port() for _ in range(3)]
    for port in sentinels:
        conf = tmp_path / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
        )
        procs.append(_spawn([str(conf), "--sentinel"], tmp_path / f"sentinel-{port}.log"))
    try:
        for port in (primary, replica, *sentinels):
            _until(f"redis on {port}", lambda port=port: _answers(port))
        replica_client = redis.Redis(port=replica)
        _until("the replica to sync", lambda: replica_client.info("replication")["master_link_status"] == "up")
        # Every Sentinel must know the replica and the other Sentinels before a failover can happen.
        for port in sentinels:
            probe = redis.Redis(port=port)
            _until("the sentinels to meet", lambda probe=probe: int(
                probe.sentinel_master(MASTER)["num-other-sentinels"]) == 2 and probe.sentinel_slaves(MASTER))
        restart = lambda: _spawn(primary_args, tmp_path / "primary.log")  # noqa: E731
        yield {"primary": primary, "replica": replica, "sentinels": sentinels, "procs": procs,
               "restart_primary": restart}  # fmt: skip
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def test_acknowledged_submits_survive_a_sigkill_of_the_primary_and_the_client_follows_the_failover(cluster) -> None:
    settings = Settings(
        redis_sentinels=",".join(f"127.0.0.1:{port}" for port in cluster["sentinels"]),
        redis_sentinel_master=MASTER,
        redis_min_replicas_ack=1,
        redis_replica_ack_timeout=0.5,
        redis_retries=12,
        redis_retry_base=0.1,
        redis_retry_cap=1.0,
        redis_socket_timeout=1.0,
        redis_connect_timeout=0.5,
        queue_name="ham-failover",
    )
    store = JobStore(connect_redis(settings), settings)
    accepted: list[str] = []
    refused = 0
    killed = restarted = False
    sentinel = redis.Redis(port=cluster["sentinels"][0], decode_responses=True)

    def promoted() -> bool:
        return int(sentinel.sentinel_get_master_addr_by_name(MASTER)[1]) == cluster["replica"]
    deadline = time.monotonic() + 60
    while len(accepted) < 40:
        assert time.monotonic() < deadline, f"{len(accepted)} accepted, {refused} refused"
        job = Job(id=new_job_id(), tenant="t", params={"steps": 1})
        try:
            store.submit(job)
            store.confirm_replicated()
        except REDIS_UNAVAILABLE:
            refused += 1  # the API answers 503 here; the client retries with its Idempotency-Key
            if killed and not restarted and promoted():
                # The promoted replica has no replica of its own, so WAIT 1 refuses until the old
                # primary is back (as Kubernetes restarts its pod) and Sentinel makes it a replica.
                cluster["procs"][0] = cluster["restart_primary"]()
                restarted = True
            continue
        accepted.append(job.id)
        if len(accepted) == 15 and not killed:
            cluster["procs"][0].send_signal(signal.SIGKILL)  # the primary, mid-load
            killed = True
    # The client now talks to the promoted replica.
    assert store.redis.info("server")["tcp_port"] == cluster["replica"]
    assert store.redis.info("replication")["role"] == "master"
    lost = [job_id for job_id in accepted if store.get(job_id) is None]
    assert lost == [], f"{len(lost)} of {len(accepted)} acknowledged jobs lost ({refused} submits refused)"
    # A refused submit may still have been stored (only its acknowledgement failed): never fewer.
    assert store.queued_count() >= len(accepted)
