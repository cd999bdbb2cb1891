"""The API docs page in a real browser: Debian's headless Chromium driven by Playwright.

Swagger UI must render from the bundled assets alone (no CDN), against a real ``ham api``
process. Chromium runs with background networking off, so a page that needed the internet
would stay blank and fail here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.servers import free_port, log_tail, terminate
from tests.fixtures.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module")
def api_url(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("browser-api")
    port = free_port()
    env = {
        **os.environ,
        "HAM_REDIS_URL": redis_url,
        "HAM_STORAGE_URL": f"file://{workdir}/storage",
        "HAM_API_KEYS": "acme:browser-key",
    }
    log = workdir / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ham_cli", "api", "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        def running() -> None:
            if proc.poll() is not None:
                pytest.fail(f"ham api did not start:\n{log_tail(log)}")

        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200, 30, "ham api to start",
                   interval=0.1, ignore=(httpx.HTTPError,), check=running, detail=lambda: log_tail(log))
        yield url
    finally:
        terminate(proc)


def test_swagger_ui_renders_every_operation_without_internet(api_url: str) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: apt-get install chromium (make test does)"
    requested: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{api_url}/docs")
            page.wait_for_selector(".opblock-summary-path[data-path]", timeout=30_000)
            paths = {
                page.locator(".opblock-summary-path").nth(i).get_attribute("data-path")
                for i in range(page.locator(".opblock-summary-path").count())
            }
            title = page.locator(".info .title").first.inner_text()
        finally:
            browser.close()
    assert {"/v1/transfers", "/v1/transfers/{job_id}", "/v1/transfers/{job_id}/cancel", "/healthz"} <= paths
    assert "HAM style transfer" in title
    assert requested and all(url.startswith(api_url) for url in requested), [
        url for url in requested if not url.startswith(api_url)
    ]
