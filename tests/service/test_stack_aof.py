"""``ham up``'s Redis keeps its data in an append-only file; an older snapshot-only data folder is
migrated once. Real ``redis-server`` processes, SIGKILLed rather than stopped cleanly."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import redis

from ham_cli.stack import AOF_ARGS, migrate_to_aof, needs_aof_migration, redis_persistence_args
from tests.fixtures.servers import free_port
from tests.fixtures.waiting import wait_until


def _start(redis_dir: Path, args: list[str]) -> tuple[subprocess.Popen, redis.Redis, str]:
    port = free_port()
    cmd = [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir),
           "--daemonize", "no", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    def running() -> None:
        assert proc.poll() is None, f"redis-server exited with {proc.returncode}"

    wait_until(client.ping, 30, "redis-server to answer", interval=0.02,
               ignore=(redis.ConnectionError, redis.BusyLoadingError), check=running)
    return proc, client, url


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_a_snapshot_only_data_folder_moves_to_aof_once_and_survives_a_sigkill(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    old, client, _ = _start(redis_dir, ["--appendonly", "no", "--save", "60 1"])  # an older `ham up`
    client.set("ham:job:old", "queued before the upgrade")
    client.save()
    _kill(old)
    assert needs_aof_migration(redis_dir)

    proc, client, url = _start(redis_dir, redis_persistence_args(redis_dir))
    try:
        assert client.get("ham:job:old") == b"queued before the upgrade"  # loaded from the snapshot
        migrate_to_aof(url)
        assert client.info("persistence")["aof_enabled"] == 1
        client.set("ham:job:new", "accepted after the upgrade")
        # Redis 7.0 has no WAITAOF: a rewrite puts the write in the AOF for sure before the SIGKILL.
        client.bgrewriteaof()
        migrate_to_aof(url)  # returns once no rewrite is in progress or scheduled
    finally:
        _kill(proc)
    assert not needs_aof_migration(redis_dir)
    assert redis_persistence_args(redis_dir) == list(AOF_ARGS)

    proc, client, _ = _start(redis_dir, redis_persistence_args(redis_dir))
    try:
        assert client.get("ham:job:old") == b"queued before the upgrade"
        assert client.get("ham:job:new") == b"accepted after the upgrade"
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    finally:
        _kill(proc)


def test_a_fresh_data_folder_starts_with_aof_directly(tmp_path: Path) -> None:
    assert not needs_aof_migration(tmp_path)
    assert redis_persistence_args(tmp_path) == ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
