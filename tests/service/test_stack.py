"""``ham up`` as a real subprocess: Redis, API and worker start, serve a transfer, and all stop."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.fixtures.servers import free_port
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
START_TIMEOUT = 120.0

pytestmark = pytest.mark.slow


def _children(pid: int) -> dict[int, str]:
    """Direct children of ``pid`` (Linux /proc) → their command line."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Field 4 of /proc/PID/stat is the parent pid; the command name (field 2) may contain spaces.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def _live_processes_mentioning(text: str) -> list[str]:
    """Command lines of running (not zombie) processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and not _gone(int(entry.name)):
            found.append(cmdline)
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state == "Z"  # exited; only waiting to be reaped


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _ham_up(tmp_path: Path, port: int, *extra: str) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAM_")}
    env.update(PYTHONPATH=str(REPO), HAM_MODEL="tiny", HAM_JOB_TIMEOUT="60", HAM_LOG_LEVEL="INFO")
    log = tmp_path / "ham-up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ham_cli", "up", "--host", "127.0.0.1", "--port", str(port), *extra],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _transfer(client: httpx.Client, **fields: str) -> dict:
    """Submit a small transfer, wait for it, and check its PNG downloads; returns the job."""
    files = {
        "content": ("c.png", (DATA / "content0.png").read_bytes(), "image/png"),
        "style": ("s.png", (DATA / "style0.png").read_bytes(), "image/png"),
    }
    submitted = client.post("/v1/transfers", data={"size": "64", "steps": "2", **fields}, files=files)
    assert submitted.status_code == 202, submitted.text
    job_url = submitted.headers["Location"]
    job_deadline = time.monotonic() + 150
    while True:
        answer = client.get(job_url)
        if answer.status_code == 429:  # ham up keeps the default rate limit: polls count against it
            time.sleep(min(5.0, float(answer.headers["Retry-After"])))
            continue
        assert answer.status_code == 200, answer.text
        job = answer.json()
        if job["status"] in ("succeeded", "failed", "canceled"):
            break
        assert time.monotonic() < job_deadline, job
        time.sleep(0.5)
    assert job["status"] == "succeeded", job
    result = client.get(job["result_url"])
    assert result.status_code == 200
    assert Image.open(io.BytesIO(result.content)).size == (64, 64)
    return job


def _wait_for_output(proc: subprocess.Popen, log: Path, text: str, timeout: float = START_TIMEOUT) -> None:
    def running() -> None:
        assert proc.poll() is None, f"ham up exited with {proc.returncode}:\n{log.read_text()}"

    wait_until(lambda: text in log.read_text(errors="replace"), timeout, f"{text!r} in the output", interval=0.2,
               check=running, detail=log.read_text)


def test_ham_up_serves_a_transfer_restarts_a_dead_worker_and_ctrl_c_stops_every_child(tmp_path: Path) -> None:
    port = free_port()
    proc, log = _ham_up(tmp_path, port)
    try:
        _wait_for_output(proc, log, "HAM is up")
        banner = log.read_text()
        api = f"http://127.0.0.1:{port}"
        assert f"HAM is up: {api}" in banner
        assert f"file://{tmp_path / 'ham-data' / 'storage'}" in banner
        assert "curl" in banner

        children = _children(proc.pid)
        commands = sorted(children.values())
        assert len(children) == 3, commands
        assert any("redis-server" in c for c in commands)
        assert any("ham_cli api" in c for c in commands)
        assert any("ham_cli worker" in c for c in commands)
        redis_port = int(banner.split("redis://127.0.0.1:")[1].split("/")[0])

        with httpx.Client(base_url=api, timeout=30) as client:
            assert client.get("/readyz").status_code == 200
            _transfer(client)

            # A worker that dies is restarted, and says so; the next job succeeds on the new one.
            [worker_pid] = [pid for pid, command in children.items() if "ham_cli worker" in command]
            os.kill(worker_pid, signal.SIGKILL)
            _wait_for_output(proc, log, "ham up: worker exited with status -9; restarting it in 1s")
            _wait_for_output(proc, log, "ham up: worker restarted")
            _transfer(client)
        children = _children(proc.pid)
        assert len(children) == 3 and worker_pid not in children, children

        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
        output = log.read_text()
        assert "ham up: stopped" in output
        assert "warm shut down" in output
        leftover = {pid: cmd for pid, cmd in children.items() if not _gone(pid)}
        assert leftover == {}
        assert not _listening(port)
        assert not _listening(redis_port)
    finally:
        _stop(proc)


def test_ham_up_exits_nonzero_when_a_child_dies_at_startup(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as squatter:  # the API's port is taken: `ham api` must fail to bind
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        proc, log = _ham_up(tmp_path, port)
        try:
            assert proc.wait(START_TIMEOUT) == 1, log.read_text()
        finally:
            _stop(proc)
    output = log.read_text()
    assert "ham up: error: api exited" in output
    assert "address already in use" in output.lower()
    # Redis (--dir) and the worker (--ready-file) name the data dir; the API names its port.
    assert _live_processes_mentioning(str(tmp_path)) == []
    assert _live_processes_mentioning(f"--port {port}") == []


def test_ham_up_with_two_models_starts_a_worker_per_model(tmp_path: Path) -> None:
    port = free_port()
    proc, log = _ham_up(tmp_path, port, "--model", "tiny", "--model", "tiny-xl")
    try:
        _wait_for_output(proc, log, "HAM is up")
        assert "models   tiny, tiny-xl (one worker each" in log.read_text()
        commands = sorted(_children(proc.pid).values())
        assert len(commands) == 4 and sum("ham_cli worker" in c for c in commands) == 2, commands
        api = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=api, timeout=30) as client:
            models = client.get("/v1/models").json()
            assert models["default"] == "tiny"
            assert [(m["name"], m["family"], m["workers_online"]) for m in models["items"]] == [
                ("tiny", "sd", 1), ("tiny-xl", "sdxl", 1)]
            assert all(m["random_preset"] and "noise" in m["note"] for m in models["items"])
            assert _transfer(client, model="tiny-xl")["model"] == "tiny-xl"
            assert _transfer(client)["model"] == "tiny"
        output = log.read_text()
        assert "worker-tiny-xl | " in output and "serving model 'tiny-xl'" in output
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()
    finally:
        _stop(proc)
