"""The ``ham`` console script: help, ``ham api`` as a real process, ``ham submit`` over real HTTP.

``ham submit`` talks to a real API (uvicorn on a loopback port, real Redis, file storage);
the worker's part is played by the real JobStore transitions in a thread, so the client's
whole poll-and-download path runs without the engine.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn
from PIL import Image

from ham_cli.main import main
from ham_core.config import Settings
from ham_core.jobs import JobStore
from service.api.app import create_app
from tests.fixtures.servers import free_port
from tests.fixtures.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
KEY = "cli-key-0123456789"


def _wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> httpx.Response:
    def running() -> None:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")

    running()
    return wait_until(lambda: httpx.get(url, timeout=1.0), timeout, f"{url} to answer",
                      ignore=(httpx.TransportError,), check=running)


def test_help_lists_every_command_without_importing_torch():
    code = (
        "import sys\n"
        "from ham_cli.main import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("transfer", "api", "worker", "up", "submit"):
        assert command in out.stdout
    assert "TORCH False" in out.stdout


def test_submit_help_documents_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["submit", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--style", "--style-prompt", "--api", "--key", "--steps", "-o"):
        assert option in text


def test_ham_api_serves_and_stops_cleanly_on_sigterm(tmp_path, redis_url):
    port = free_port()
    env = {
        **os.environ,
        "HAM_REDIS_URL": redis_url,
        "HAM_STORAGE_URL": f"file://{tmp_path / 'storage'}",
        "HAM_API_KEYS": f"t:{KEY}",
        "HAM_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ham_cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/transfers").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status says "terminated".
    assert proc.returncode in (0, -signal.SIGTERM)
    assert "Finished server process" in proc.stderr.read()


def test_ham_api_refuses_invalid_settings_in_one_line(tmp_path):
    env = {**os.environ, "HAM_API_KEYS": "no-colon-here"}
    out = subprocess.run([sys.executable, "-m", "ham_cli", "api", "--port", str(free_port())],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "HAM_API_KEYS" in out.stderr and len(out.stderr.strip().splitlines()) == 1


# --- ham submit against a live API -------------------------------------------------------------------


class LiveApi:
    """The API on a loopback port (uvicorn in a thread) plus a stand-in for the worker."""

    def __init__(self, settings: Settings, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.jobs = JobStore(redis.Redis.from_url(settings.redis_url), settings)
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.outcome = "succeed"
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._work, daemon=True)

    def __enter__(self) -> LiveApi:
        self.thread.start()
        _wait_http(f"{self.url}/healthz")
        self.worker.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.worker.join(timeout=5)
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def _work(self) -> None:
        storage = self.app.state.services.storage
        while not self._stop.is_set():
            for raw in self.jobs.redis.lrange(self.jobs.queue.key, 0, -1):
                job = self.jobs.start(raw.decode(), "stand-in-worker")
                if job is None:
                    continue
                for progress in (0.25, 0.5, 0.75):
                    self.jobs.set_progress(job.id, progress)
                    time.sleep(0.05)
                if self.outcome == "fail":
                    self.jobs.fail(job.id, "internal_error", "the engine ran out of memory")
                    continue
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="PNG")
                storage.put(f"results/{job.id}.png", buf.getvalue(), "image/png")
                self.jobs.succeed(job.id, f"results/{job.id}.png", {"steps": job.params["steps"]})
            time.sleep(0.02)


@pytest.fixture
def live_api(tmp_path: Path, redis_url: str, redis_client: redis.Redis) -> Iterator[LiveApi]:
    port = free_port()
    settings = Settings(
        redis_url=redis_url,
        storage_url=f"file://{tmp_path / 'storage'}",
        public_url=f"http://127.0.0.1:{port}",
        api_keys=f"cli:{KEY}",
        url_signing_key="cli-test",
    )
    with LiveApi(settings, port) as api:
        yield api


def _submit_args(api: LiveApi, out: Path, *extra: str) -> list[str]:
    return ["submit", str(DATA / "content0.png"), "--api", api.url, "--key", KEY, "-o", str(out),
            "--poll-interval", "0.05", *extra]


def test_submit_posts_polls_and_downloads_the_result(live_api, tmp_path, capsys):
    out = tmp_path / "out.png"
    status = main(_submit_args(live_api, out, "--style", str(DATA / "style0.png"), "--steps", "5", "--no-gar"))
    err = capsys.readouterr().err
    assert status == 0, err
    result = Image.open(out)
    assert result.size == (32, 32) and result.getpixel((0, 0)) == (200, 10, 10)
    assert "running" in err and "wrote" in err
    job_id = err.split(":")[0].strip()
    job = live_api.jobs.get(job_id)
    assert job.params["steps"] == 5 and job.params["gar"] is False and job.has_style


def test_submit_sends_the_inversion_convention_and_teachers(live_api, tmp_path, capsys):
    extra = ("--style-prompt", "x", "--inversion", "source", "--teachers", "recorded")
    assert main(_submit_args(live_api, tmp_path / "out.png", *extra)) == 0
    job_id = capsys.readouterr().err.split(":")[0].strip()
    job = live_api.jobs.get(job_id)
    assert (job.params["inversion"], job.params["teachers"]) == ("source", "recorded")


def test_submit_text_only_style(live_api, tmp_path, capsys):
    status = main(_submit_args(live_api, tmp_path / "out.png", "--style-prompt", "charcoal sketch", "-q"))
    assert status == 0
    assert capsys.readouterr().err == ""


def test_submit_reports_a_failed_job_in_one_line(live_api, tmp_path, capsys):
    live_api.outcome = "fail"
    status = main(_submit_args(live_api, tmp_path / "out.png", "--style-prompt", "x"))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert err[-1].startswith("ham submit: error: job ") and "failed: internal_error" in err[-1]
    assert not (tmp_path / "out.png").exists()


def test_submit_reports_a_refused_parameter_in_one_line(live_api, tmp_path, capsys):
    status = main(_submit_args(live_api, tmp_path / "out.png", "--style-prompt", "x", "--alpha", "2"))
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err == "ham submit: error: HTTP 422 invalid_parameter [alpha]: alpha: must be in [0.0, 1.0], got 2.0"


def test_submit_with_a_wrong_key_reports_401(live_api, tmp_path, capsys):
    args = _submit_args(live_api, tmp_path / "out.png", "--style-prompt", "x")
    args[args.index(KEY)] = "wrong"
    assert main(args) == 1
    assert "HTTP 401 unauthorized" in capsys.readouterr().err


def test_submit_to_an_unreachable_api_fails_in_one_line(tmp_path, capsys):
    status = main(["submit", str(DATA / "content0.png"), "--style-prompt", "x", "-o", str(tmp_path / "o.png"),
                   "--api", f"http://127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err.strip()
    assert status == 1
    assert err.startswith("ham submit: error: cannot reach the API at http://127.0.0.1:") and "\n" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--style-prompt", "x", "--style", "/nonexistent/style.png"], "style: cannot read"),
        ([], "give --style, --style-prompt, or both"),
    ],
)
def test_submit_checks_local_inputs_before_sending(tmp_path, capsys, args, message):
    status = main(["submit", str(DATA / "content0.png"), "-o", str(tmp_path / "o.png"),
                   "--api", f"http://127.0.0.1:{free_port()}", *args])
    assert status == 1
    assert message in capsys.readouterr().err
