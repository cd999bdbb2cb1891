"""The playground in a real browser (Debian's Chromium, Playwright) against a live stack.

Real Redis, ``ham api`` and ``ham worker`` on the tiny model (tests/e2e/conftest.py). Each
test drives the page as a person would: the API key dialog, the file pickers, the parameter
controls, the submit button, the progress bar, the result, the download, the recent jobs.
Screenshots go to ``$HAM_TEST_ARTIFACTS/playground`` (default ``test-artifacts/playground``).

File pickers are filled with ``set_input_files``: a headless browser has no native file dialog
to drive, by mouse or by keyboard. Everything else is clicked or typed.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ham_engine.params import TransferParams
from tests.e2e.conftest import REPO, TENANTS, Stack

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
DATA = REPO / "tests" / "data"
ARTIFACTS = Path(os.environ.get("HAM_TEST_ARTIFACTS", REPO / "test-artifacts")) / "playground"
# Enough steps on a 128 px image that the bar is seen between 0 and 100 % on one CPU thread.
STEPS = "40"
SIZE = "128"
EXPECTED_SIZE = (128, 64)  # the content below is 128x64: longer side SIZE, aspect kept
# Records every value the progress bar shows (the page's own code knows nothing of this).
RECORD_PROGRESS = """
window.__progressSeen = [];
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  if (!bar) return;  // another page of the site (the method page)
  new MutationObserver(() => window.__progressSeen.push(Number(bar.getAttribute("aria-valuenow"))))
    .observe(bar, { attributes: true, attributeFilter: ["aria-valuenow"] });
});
"""


@dataclass
class Session:
    """One browser tab on the playground, with what it logged."""

    page: object
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def unexpected_errors(self, allowed_statuses: tuple[int, ...] = ()) -> list[str]:
        """Console errors and uncaught exceptions, less the browser's own line for an expected HTTP status."""
        allowed = tuple(f"status of {status}" for status in allowed_statuses)
        return [e for e in self.console_errors if not (e.startswith("Failed to load resource") and any(
            a in e for a in allowed))]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: apt-get install chromium (make test does)"
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("playground-images")
    content = folder / "content-wide.png"
    Image.open(DATA / "content1.png").convert("RGB").crop((0, 32, 128, 96)).save(content)
    bad = folder / "holiday.png"
    bad.write_bytes(b"this is a text file with a .png name, not an image\n" * 10)
    return {"content": content, "style": DATA / "style2.png", "bad": bad}


@pytest.fixture
def open_playground(browser: object, stack: Stack) -> Iterator:
    contexts = []

    def open_(width: int = 1280, height: int = 900, tenant: str = "alpha") -> Session:
        stack.ensure_one_worker()
        context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        session = Session(page)
        page.on("console", lambda message: message.type == "error" and session.console_errors.append(message.text))
        page.on("pageerror", lambda exc: session.console_errors.append(f"uncaught: {exc}"))
        page.on("request", lambda request: session.requests.append(request.url))
        page.add_init_script(RECORD_PROGRESS)
        page.goto(f"{stack.base_url}/")
        assert page.url == f"{stack.base_url}/playground/", "/ must redirect to the playground"
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        page.locator("#api-key").fill(TENANTS[tenant])
        page.locator("#api-key").press("Enter")
        dialog.wait_for(state="hidden")
        page.wait_for_selector("#param-alpha")
        return session

    yield open_
    for context in contexts:
        context.close()


def screenshot(session: Session, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    session.page.screenshot(path=str(path), full_page=True)
    return path


def pick_images(session: Session, images: dict[str, Path], content: str = "content") -> None:
    session.page.locator("#content").set_input_files(str(images[content]))
    session.page.locator("#style").set_input_files(str(images["style"]))


def wait_for_result(session: Session, timeout_ms: int = 120_000) -> tuple[int, int]:
    """Waits until the result image has decoded; returns its pixel size."""
    page = session.page
    page.wait_for_function(
        "() => { const i = document.getElementById('result-img');"
        " return (i.complete && i.naturalWidth > 0) || !document.getElementById('error').hidden; }",
        timeout=timeout_ms,
    )
    assert page.locator("#error").is_hidden(), page.locator("#error").inner_text()
    return tuple(page.evaluate("() => { const i = document.getElementById('result-img');"
                               " return [i.naturalWidth, i.naturalHeight]; }"))


def decoded_pixels(session: Session) -> dict:
    """Draws the result on a canvas and reads its pixels back: they exist and are not one flat colour."""
    return session.page.evaluate("""() => {
        const img = document.getElementById('result-img');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const ctx = canvas.getContext('2d');
        ctx.drawImage(img, 0, 0);
        const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        const distinct = new Set();
        for (let i = 0; i < data.length; i += 4) distinct.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        return {bytes: data.length, distinct: distinct.size};
    }""")


def test_playground_runs_a_transfer_and_downloads_it(open_playground, images, stack: Stack, tmp_path: Path) -> None:
    session = open_playground()
    page = session.page
    defaults = TransferParams()
    # The controls show the server's defaults (config.json), with labels that say so.
    for name in ("alpha", "beta", "gamma", "steps", "size", "seed"):
        assert float(page.locator(f"#param-{name}").input_value()) == float(getattr(defaults, name)), name
    assert "Default 0.75" in page.locator("#param-alpha-help").inner_text()
    assert "GAR" in page.locator("label[for=param-alpha]").inner_text()
    assert page.locator("#param-size").get_attribute("step") == "64"
    screenshot(session, "desktop-empty")

    pick_images(session, images)
    page.locator("#param-steps").fill(STEPS)
    page.locator("#param-size").fill(SIZE)
    page.locator("#submit").click()
    page.locator("#job").wait_for(state="visible")
    size = wait_for_result(session)
    assert size == EXPECTED_SIZE
    pixels = decoded_pixels(session)
    assert pixels["bytes"] == EXPECTED_SIZE[0] * EXPECTED_SIZE[1] * 4 and pixels["distinct"] > 16

    seen = page.evaluate("() => window.__progressSeen")
    assert seen[-1] == 100, seen
    assert any(0 < value < 100 for value in seen), f"the bar never showed a value between 0 and 100: {seen}"
    assert seen == sorted(seen), f"the bar went backwards: {seen}"
    # The job was followed on its event stream where the server has one, else by polling.
    with stack.client("alpha") as client:
        has_events = "/v1/transfers/{job_id}/events" in client.get("/openapi.json").json()["paths"]
    followed = [u for u in session.requests if "/v1/transfers/" in u and "limit=" not in u]
    assert followed and all(u.endswith("/events") for u in followed) == has_events, followed
    assert page.locator("#before-img").get_attribute("src").startswith("blob:"), "the content is shown beside"
    assert page.locator("#compare").is_visible()
    assert page.locator("#cancel").is_hidden(), "nothing left to cancel"
    assert page.locator("#style-library").is_hidden(), "this server has no style library"
    page.locator("#compare-slider").fill("20")
    assert "20%" in page.locator("#result-img").evaluate("e => e.style.clipPath")
    # The result is shown once (with the content under it for the comparison), not twice.
    assert page.locator("#result img").count() == 2 and page.locator("#result-img").count() == 1
    screenshot(session, "desktop-result")

    with page.expect_download() as download_info:
        page.locator("#download").click()
    download = download_info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.name.startswith("ham-") and saved.suffix == ".png"
    with Image.open(saved) as image:
        assert image.format == "PNG" and image.size == EXPECTED_SIZE

    job_id = saved.stem.removeprefix("ham-")
    with stack.client("alpha") as client:
        job = client.get(f"/v1/transfers/{job_id}").json()
        assert job["status"] == "succeeded" and job["params"]["steps"] == int(STEPS)
        assert httpx.get(job["result_url"]).content == saved.read_bytes()
    page.locator(f"button[aria-label='View result of job {job_id}']").wait_for()
    assert session.unexpected_errors() == []


def test_a_refused_key_is_asked_again_and_kept_for_the_tab_only(browser, stack: Stack) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        session = Session(page)
        page.on("console", lambda message: message.type == "error" and session.console_errors.append(message.text))
        page.on("pageerror", lambda exc: session.console_errors.append(f"uncaught: {exc}"))
        page.goto(f"{stack.base_url}/playground/")
        page.locator("#api-key").fill("not-a-key-0123")
        page.locator("#api-key").press("Enter")
        # The first call with the key (recent jobs) is refused: the dialog comes back and says why.
        page.locator("#key-error").wait_for(state="visible")
        assert "refused" in page.locator("#key-error").inner_text()
        assert page.locator("#key-dialog").is_visible()
        page.locator("#api-key").fill(TENANTS["alpha"])
        # The listing sent with the new key (a request still in flight with the refused one may answer first).
        good = f"Bearer {TENANTS['alpha']}"
        with page.expect_response(
            lambda r: "/v1/transfers?limit=" in r.url and r.request.headers.get("authorization") == good
        ) as listed:
            page.locator("#api-key").press("Enter")
        assert listed.value.status == 200
        page.locator("#key-dialog").wait_for(state="hidden")
        assert page.locator("#error").is_hidden()
        storage = page.evaluate("() => [sessionStorage.getItem('ham.apiKey'), localStorage.length]")
        assert storage == [TENANTS["alpha"], 0]
        # A new tab (same browser profile) asks again: the key lived in that tab's session only.
        other = context.new_page()
        other.goto(f"{stack.base_url}/playground/")
        other.locator("#key-dialog").wait_for(state="visible")
        assert session.unexpected_errors(allowed_statuses=(401,)) == []
    finally:
        context.close()


def test_a_bad_file_is_named_in_an_error(open_playground, images) -> None:
    session = open_playground()
    page = session.page
    pick_images(session, images, content="bad")
    page.locator("#submit").click()
    error = page.locator("#error")
    error.wait_for(state="visible")
    text = error.inner_text()
    # The server's refusal, in the words on screen ("Content photo", not the API's "content").
    assert "Content photo" in text and "image" in text.lower(), text
    assert page.locator("#content-drop.invalid").count() == 1, "the content picker is marked"
    assert page.locator("#content").get_attribute("aria-invalid") == "true"
    assert "Content photo" in page.locator("#content-error").inner_text()
    screenshot(session, "bad-file")
    # Chromium logs the 4xx answer itself; the page logs nothing and throws nothing.
    assert session.unexpected_errors(allowed_statuses=(415, 422)) == []


def test_files_can_be_dropped_on_the_pickers(open_playground, images) -> None:
    session = open_playground()
    page = session.page
    for picker, path in (("content", images["content"]), ("style", images["style"])):
        # What a browser dispatches when a file is dragged from the desktop onto the zone.
        page.evaluate("""([field, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, { type: "image/png" }));
            const zone = document.getElementById(`${field}-drop`);
            zone.dispatchEvent(new DragEvent("dragover", { dataTransfer: data, bubbles: true, cancelable: true }));
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
        }""", [picker, path.name, base64.b64encode(path.read_bytes()).decode()])
        assert page.evaluate(f"() => document.getElementById('{picker}').files[0].name") == path.name
        page.locator(f"#{picker}-preview").wait_for(state="visible")
    page.locator("#param-steps").fill("4")
    page.locator("#param-size").fill(SIZE)
    page.locator("#submit").click()
    assert wait_for_result(session) == EXPECTED_SIZE
    assert session.unexpected_errors() == []


def test_submitting_without_a_style_says_what_is_missing(open_playground, images) -> None:
    session = open_playground()
    page = session.page
    page.locator("#content").set_input_files(str(images["content"]))
    page.locator("#submit").click()
    page.locator("#error").wait_for(state="visible")
    assert "style image, a style prompt, or both" in page.locator("#error").inner_text()
    assert session.unexpected_errors() == []


def test_the_same_flow_at_phone_width(open_playground, images) -> None:
    session = open_playground(width=375, height=812)
    page = session.page
    pick_images(session, images)
    page.locator("#param-steps").fill("8")
    page.locator("#param-size").fill(SIZE)
    page.locator("#submit").click()
    assert wait_for_result(session) == EXPECTED_SIZE
    widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1] == 375, f"horizontal scrolling at 375 px: {widths}"
    for selector in ("#submit", "#result-img", "#download", "#param-alpha"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, (selector, box)
    screenshot(session, "phone-375-result")
    assert session.unexpected_errors() == []


def test_keyboard_only_submit(open_playground, images, stack: Stack) -> None:
    session = open_playground()
    page = session.page
    pick_images(session, images)  # no file dialog to drive headless (module docstring)
    # Tab from the top of the page through the form: every main control is reachable, in order.
    page.locator("body").focus()
    order: list[str] = []
    for _ in range(60):
        page.keyboard.press("Tab")
        focused = page.evaluate("() => document.activeElement.id")
        order.append(focused)
        if focused == "param-steps":
            page.keyboard.press("Control+A")
            page.keyboard.type("6")
        if focused == "param-size":
            page.keyboard.press("Control+A")
            page.keyboard.type(SIZE)
        if focused == "param-alpha":
            page.keyboard.press("ArrowUp")  # 0.75 -> 0.76
        if focused == "submit":
            break
    assert order[-1] == "submit", f"Tab never reached the submit button: {order}"
    expected = ["content", "style", "style_prompt", "param-steps", "param-size", "param-alpha", "param-beta",
                "param-gamma", "submit"]
    assert [i for i in order if i in expected] == expected, order
    page.keyboard.press("Enter")
    # While the job runs the focus stays on the button (a disabled button would drop it to <body>).
    page.locator("#job").wait_for(state="visible")
    assert page.evaluate("() => document.activeElement.id") == "submit"
    assert wait_for_result(session) == EXPECTED_SIZE
    job_id = page.locator("#download").get_attribute("download").removeprefix("ham-").removesuffix(".png")
    with stack.client("alpha") as client:
        params = client.get(f"/v1/transfers/{job_id}").json()["params"]
    assert params["alpha"] == pytest.approx(0.76) and params["steps"] == 6
    screenshot(session, "keyboard-result")
    assert session.unexpected_errors() == []


def test_a_full_queue_is_shown_with_its_retry_after(open_playground, images, stack: Stack) -> None:
    """A real 429: tenant beta fills its queue while no worker runs; the page says when to retry."""
    session = open_playground(tenant="beta")
    page = session.page
    stack.stop_workers()
    queued: list[str] = []
    png = io.BytesIO()
    Image.open(images["content"]).save(png, format="PNG")
    try:
        with stack.client("beta") as client:
            while True:
                response = client.post("/v1/transfers", data={"steps": "3", "size": "64", "style_prompt": "ink"},
                                       files={"content": ("c.png", png.getvalue(), "image/png")})
                if response.status_code == 429:
                    retry_after = response.headers["Retry-After"]
                    break
                assert response.status_code == 202, response.text
                queued.append(response.json()["id"])
                assert len(queued) <= 100, "the tenant queue limit never answered 429"
            pick_images(session, images)
            page.locator("#submit").click()
            page.locator("#error").wait_for(state="visible")
            text = page.locator("#error").inner_text()
            assert "Too many requests" in text and f"Try again in {retry_after} s" in text, text
            screenshot(session, "queue-full-429")
            assert session.unexpected_errors(allowed_statuses=(429,)) == []
    finally:
        with stack.client("beta") as client:
            for job_id in queued:
                client.post(f"/v1/transfers/{job_id}/cancel")
        stack.ensure_one_worker()


def test_the_model_picker_comes_from_the_catalogue_and_says_a_random_preset_draws_noise(open_playground) -> None:
    session = open_playground()
    page = session.page
    page.locator("#model-field").wait_for(state="visible")
    assert page.locator("#model").input_value() == "tiny"
    assert page.locator("#model option").all_inner_texts() == ["tiny (sd, 1 worker)"]
    note = page.locator("#model-note")
    note.wait_for(state="visible")
    assert "noise" in note.inner_text() and "HAM_MODEL" in note.inner_text()
    assert page.locator("#param-size").input_value() == "512"
    assert session.unexpected_errors() == []


# --- a first-time user: the estimate, the words, refusals before upload, a live list, accessibility -------

AXE = REPO / "tests" / "e2e" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
SIZES = [(1280, 900), (390, 844)]


def set_speed(stack: Stack, seconds_per_step: float, size: int) -> None:
    """What the workers would have measured: ``seconds_per_step`` at ``size`` px for the stack's model."""
    from ham_core.speed import SPEED_KEY, record_speed

    stack.redis.delete(SPEED_KEY)
    record_speed(stack.redis, stack.env.get("HAM_MODEL", "tiny"), size, 10, 10 * seconds_per_step)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_a_first_time_user_sees_the_estimate_and_what_each_control_does(
    open_playground, stack: Stack, width: int, height: int
) -> None:
    set_speed(stack, 20.0, 512)  # a slow CPU: 20 s a step at 512 px
    session = open_playground(width, height)
    page = session.page
    estimate = page.locator("#estimate")
    page.wait_for_function("() => document.getElementById('estimate').textContent.includes('Estimated')")
    # The paper's defaults (50 steps at 512 px): 1000 s, said to be long, with the fast setting offered.
    assert "about 16 min 40 s — that is long" in estimate.inner_text(), estimate.inner_text()
    fast = page.locator("#use-fast")
    assert fast.is_visible() and "20 steps, 256 px" in fast.inner_text()
    fast.click()
    assert page.locator("#param-steps").input_value() == "20" and page.locator("#param-size").input_value() == "256"
    # 20 s a step at 512 px is 5 s at 256 px (a quarter of the pixels): 20 steps, 100 s.
    assert "about 1 min 40 s" in estimate.inner_text(), estimate.inner_text()
    assert fast.is_hidden(), "nothing faster to offer"

    # α, β, γ in plain words: what each changes and which way, and the method page one click away.
    for name in ("alpha", "beta", "gamma"):
        help_text = page.locator(f"#param-{name}-help").inner_text()
        assert "Lower" in help_text and "higher" in help_text.lower(), help_text
        assert page.locator(f"#param-{name}-help a").get_attribute("href") == f"/playground/method#{name}"
    assert page.locator("#advanced summary").inner_text() == "Advanced"
    advanced_labels = page.locator("#more-params label").all_inner_texts()
    assert advanced_labels and not [t for t in advanced_labels if "_" in t or t in ("inversion", "teachers")]
    with page.expect_navigation():
        page.locator("#method-link").click()
    assert page.locator("h1").inner_text() == "How HAM restyles a picture"
    assert "SINI" in page.locator("main").inner_text() and page.locator("#alpha").is_visible()
    screenshot(session, f"method-{width}")
    assert session.unexpected_errors() == []


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_a_refused_file_and_a_bad_value_are_explained_before_upload_next_to_the_field(
    open_playground, images, tmp_path: Path, width: int, height: int
) -> None:
    session = open_playground(width, height)
    page = session.page
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture\n")
    page.locator("#content").set_input_files(str(notes))
    note = page.locator("#content-error")
    note.wait_for(state="visible")
    assert "“notes.txt” is not a PNG, JPEG or WebP image" in note.inner_text()
    assert page.locator("#content").get_attribute("aria-invalid") == "true"
    assert "content-error" in page.locator("#content").get_attribute("aria-describedby")
    assert page.evaluate("() => document.activeElement.id") == "content", "focus moves to the field"
    assert page.locator("#content-preview").is_hidden(), "no blank preview box"
    assert page.evaluate("() => document.getElementById('content').files.length") == 0

    pick_images(session, images)
    assert page.locator("#content").get_attribute("aria-invalid") is None, "a good file clears the mark"
    page.locator("#param-alpha").fill("2")
    page.locator("#submit").click()
    error = page.locator("#param-alpha-error")
    error.wait_for(state="visible")
    assert "α" in error.inner_text() and "must be between 0 and 1" in error.inner_text()
    assert "alpha" not in error.inner_text(), "the words on screen, not the API's field name"
    assert page.locator("#param-alpha").get_attribute("aria-invalid") == "true"
    assert page.evaluate("() => document.activeElement.id") == "param-alpha"
    uploads = [u for u in session.requests if u.endswith("/v1/transfers")]
    assert uploads == [], "refused in the browser: nothing was uploaded"
    screenshot(session, f"refused-before-upload-{width}")
    assert session.unexpected_errors() == []


def test_recent_jobs_follow_a_running_job_to_its_end(open_playground, images, stack: Stack) -> None:
    session = open_playground()
    page = session.page
    with stack.client("alpha") as client:  # a job from elsewhere (another tab, a script)
        response = client.post("/v1/transfers", data={"steps": STEPS, "size": SIZE, "style_prompt": "ink"},
                               files={"content": ("c.png", images["content"].read_bytes(), "image/png")})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
    page.locator("#refresh-recent").click()
    entry = page.locator(f"#recent-list li[data-job='{job_id}']")
    entry.wait_for()
    assert f"job {job_id[:8]}" in entry.inner_text(), "entries say which job they are"
    seen: list[str] = []
    page.expose_function("__recentSeen", lambda text: seen.append(text))
    page.evaluate("""(id) => new MutationObserver(() => {
        const li = document.querySelector(`#recent-list li[data-job="${id}"]`);
        if (li) window.__recentSeen(li.innerText);
    }).observe(document.getElementById('recent-list'), {childList: true, subtree: true, characterData: true})""",
                  job_id)
    page.wait_for_function(
        "(id) => { const li = document.querySelector(`#recent-list li[data-job=\"${id}\"]`);"
        " return li && li.innerText.includes('succeeded') && li.querySelector('img.thumb').naturalWidth > 0; }",
        arg=job_id, timeout=120_000,
    )
    running = [t for t in seen if t.startswith("running ")]
    assert any(not t.startswith("running 0%") for t in running), f"the entry never moved past 0 %: {seen}"
    # The worker measured the job: the next estimate at this size is made of it.
    speeds = httpx.get(f"{stack.base_url}/playground/speed.json").json()["speeds"]
    assert any(s["size"] == int(SIZE) and s["seconds_per_step"] > 0 for s in speeds), speeds
    assert page.locator(f"button[aria-label='View result of job {job_id}']").is_visible()
    assert session.unexpected_errors() == []


def test_without_a_key_the_list_says_how_to_see_jobs(browser, stack: Stack) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(f"{stack.base_url}/playground/")
        page.locator("#key-dialog").wait_for(state="visible")
        assert "Ask the people who run it" in page.locator("#key-dialog").inner_text()
        page.locator("#cancel-key").click()
        page.locator("#key-dialog").wait_for(state="hidden")
        assert "Enter an API key" in page.locator("#recent-empty").inner_text()
    finally:
        context.close()


def _contrast(first: list[float], second: list[float]) -> float:
    def luminance(rgb: list[float]) -> float:
        channels = [c / 255 for c in rgb[:3]]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_accessibility_has_no_serious_violations(browser, stack: Stack, images, width: int, height: int) -> None:
    """axe-core (npm, pinned in tests/e2e/axe/package-lock.json) on the form, an error, and a result."""
    if not AXE.exists():
        pytest.fail("axe-core is missing: npm ci --prefix tests/e2e/axe (.ci/run does)")
    # The page's CSP allows only its own scripts; the test's checker is let in around it.
    context = browser.new_context(viewport={"width": width, "height": height}, bypass_csp=True)
    try:
        page = context.new_page()
        page.goto(f"{stack.base_url}/playground/")
        page.locator("#api-key").fill(TENANTS["alpha"])
        page.locator("#api-key").press("Enter")
        page.locator("#key-dialog").wait_for(state="hidden")
        page.wait_for_selector("#param-alpha")
        page.locator("#advanced summary").click()  # the advanced controls are checked too

        def serious() -> list[str]:
            page.evaluate(AXE.read_text())
            result = page.evaluate("""async () => (await axe.run(document, {runOnly: {type: 'tag',
                values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'wcag22aa']}})).violations
                .filter((v) => v.impact === 'serious' || v.impact === 'critical')
                .map((v) => `${v.id}: ${v.help} (${v.nodes.map((n) => n.target.join(' ')).join(', ')})`)""")
            return result

        assert serious() == [], "the empty form"
        page.locator("#param-alpha").fill("2")
        page.locator("#submit").click()
        page.locator("#param-alpha-error").wait_for(state="visible")
        assert serious() == [], "a field error"
        page.locator("#param-alpha").fill("0.5")
        pick_images(Session(page), images)
        page.locator("#param-steps").fill("4")
        page.locator("#param-size").fill("64")
        page.locator("#submit").click()
        wait_for_result(Session(page))
        assert serious() == [], "a result"

        # WCAG 1.4.11: the focus ring and the input borders against what surrounds them, >= 3:1.
        colours = page.evaluate("""() => {
            const rgb = (c) => c.match(/[\\d.]+/g).map(Number);
            const alpha = document.getElementById('param-alpha');
            alpha.focus();
            const style = getComputedStyle(alpha);
            const card = getComputedStyle(document.querySelector('fieldset.params')).backgroundColor;
            const page = getComputedStyle(document.body).backgroundColor;
            const focus = getComputedStyle(document.documentElement).getPropertyValue('--focus').trim();
            const probe = document.createElement('span');
            probe.style.color = focus; document.body.append(probe);
            const ring = getComputedStyle(probe).color; probe.remove();
            return {border: rgb(style.borderTopColor), card: rgb(card), page: rgb(page), ring: rgb(ring)};
        }""")
        assert _contrast(colours["border"], colours["card"]) >= 3.0, colours
        assert _contrast(colours["ring"], colours["card"]) >= 3.0 and _contrast(colours["ring"], colours["page"]) >= 3.0
    finally:
        context.close()
