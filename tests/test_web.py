"""
The web page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright), against a
real uvicorn server on loopback with the tiny random model, the in-memory queue and the in-process
worker, API keys configured. Shown here: the page asks for the key and keeps it; a prompt typed and
generated shows the image (decoded, at the model's size) with its parameters, seed and a download
link holding the PNG; an uploaded image with a mask painted by dragging the mouse is inpainted
(the mask sent is white where painted, and every pixel outside it comes back unchanged); on a phone
sized screen the page fits the width and runs img2img. Nothing is fetched from anywhere but the
server. Screenshots are saved to .artifacts/web/ (gitignored) for a person to look at.

Chromium missing is a failure, not a skip: `apt-get install -y chromium` (.ci/run does it).
"""

import base64
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.pnginfo import read_parameters
from model.samplers import SAMPLERS
from service.settings import Settings
from test_compat import serve

CHROMIUM = os.environ.get("SD_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / ".artifacts" / "web"
KEY = "sk-web-test"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: the web page test needs it. "
                    "Install Debian's package with `apt-get install -y chromium` (.ci/run does this), "
                    "or point SD_TEST_CHROMIUM at a Chromium binary.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` package is missing: pip install -e '.[dev]'")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tiny_weights, tiny_pipe):
    pipe = RecordingPipe(tiny_pipe)
    srv, client = serve(Settings(weights=str(tiny_weights), batch_window=0.01, max_steps=50, api_keys=(KEY,)),
                        pipe)
    srv.pipe = pipe
    yield srv
    client.close()
    srv.__exit__()


def open_page(browser, server, **context):
    """A new page on `/`, recording every URL it requests."""
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.requested = []
    page.on("request", lambda r: page.requested.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page


def assert_only_this_server(page, server):
    outside = [u for u in page.requested if not u.startswith((server.url + "/", "blob:", "data:"))]
    assert not outside, f"the page fetched from elsewhere: {outside}"


def fetch_bytes(page, href: str) -> bytes:
    """What a blob: link holds, read inside the page."""
    b64 = page.evaluate("""async (href) => {
        const bytes = new Uint8Array(await (await fetch(href)).arrayBuffer());
        let s = ""; for (const b of bytes) s += String.fromCharCode(b);
        return btoa(s); }""", href)
    return base64.b64decode(b64)


class RecordingPipe:
    """The tiny pipeline, keeping the requests the worker ran (their images and masks as received)."""

    def __init__(self, pipe):
        self.pipe, self.requests = pipe, []

    @property
    def native_size(self):
        return self.pipe.native_size

    def generate(self, requests, **kw):
        self.requests += requests
        return self.pipe.generate(requests, **kw)


def set_range(page, selector: str, value) -> None:
    """Move a slider as a user's drag does: set the value and fire `input`."""
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(value))


def parameters(card) -> dict[str, str]:
    """The parameters table of a result card, {label: value}."""
    return card.evaluate("c => Object.fromEntries([...c.querySelectorAll('tr')].map("
                         "r => [r.cells[0].textContent, r.cells[1].textContent]))")


def newest_result(page, count: int):
    """Wait for the count-th result card; the newest card (results are shown newest first)."""
    from playwright.sync_api import TimeoutError

    try:
        page.wait_for_function("n => document.querySelectorAll('#results .result').length >= n"
                               " || document.querySelector('#status.error')", arg=count)
    except TimeoutError:
        page.screenshot(path=ARTIFACTS / "timeout.png", full_page=True)
        pytest.fail(f"no result after {TIMEOUT_MS / 1000:g} s; the page says {page.inner_text('#status')!r} "
                    f"(screenshot {ARTIFACTS / 'timeout.png'})")
    assert page.locator("#status.error").count() == 0, f"the page shows an error: {page.inner_text('#status')}"
    return page.locator("#results .result").first


def test_generate_and_inpaint_in_chromium(browser, server, tmp_path):
    page = open_page(browser, server, viewport={"width": 1100, "height": 900})
    assert page.title() == "Stable Diffusion from scratch"
    assert page.locator("#sampler option").all_inner_texts() == list(SAMPLERS)

    # keys are configured: the page shows the key field, and without a key the API's 401 is shown
    assert page.locator("#api-key").is_visible()
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "4")
    page.fill("#seed", "7")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "401" in page.inner_text("#status") and "API key" in page.inner_text("#status")

    # with the key: txt2img, live progress, the image at the model's size with its parameters
    page.fill("#api-key", KEY)
    page.select_option("#sampler", "euler_a")
    page.click("#generate")
    card = newest_result(page, 1)
    img = card.locator("img").first
    size = img.evaluate("i => [i.complete, i.naturalWidth, i.naturalHeight]")
    assert size == [True, 16, 16]
    assert parameters(card) == {"mode": "txt2img", "prompt": "a red circle on a blue background",
                                "sampler": "euler_a", "steps": "4", "guidance": "7.5", "seed": "7", "size": "16x16"}
    assert page.inner_text("#status") == "done: seed 7"
    link = card.locator("a[download]").first
    assert link.get_attribute("download") == "sd-7.png"
    png = fetch_bytes(page, link.get_attribute("href"))
    assert Image.open(io.BytesIO(png)).size == (16, 16)
    params = read_parameters(png)
    assert params.startswith("a red circle on a blue background\n") and "Seed: 7" in params and "Steps: 4" in params
    page.screenshot(path=ARTIFACTS / "txt2img.png", full_page=True)

    # the key is kept in the browser
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.input_value("#api-key") == KEY

    # inpaint: upload, paint a mask by dragging over the left part of the image, generate
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(source).save(tmp_path / "source.png")
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#image", str(tmp_path / "source.png"))
    page.wait_for_selector("#stage:not([hidden])")
    box = page.locator("#mask").bounding_box()
    assert box["width"] > 100  # shown scaled up, so it can be painted on
    set_range(page, "#brush", 20)
    page.mouse.move(box["x"] + box["width"] * 0.15, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    for y in (0.3, 0.5, 0.7, 0.85):
        page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * y, steps=4)
    page.mouse.up()
    page.fill("#prompt", "a yellow square")
    page.fill("#seed", "11")
    page.click("#generate")
    card = newest_result(page, 1)  # the reload emptied the results
    assert card.locator("img").first.evaluate("i => i.naturalWidth") == 16
    assert parameters(card)["mode"] == "inpaint" and parameters(card)["seed"] == "11"

    # what the server received: the uploaded image, and a mask white where the mouse painted
    received = server.pipe.requests[-1]
    assert np.array_equal(np.asarray(received.image.convert("RGB")), source)
    mask = np.asarray(received.mask.convert("L"))
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 255}
    painted = mask == 255
    assert painted[:, :4].any() and not painted[:, 12:].any()  # the stroke ran down the left part only

    result = np.asarray(Image.open(io.BytesIO(
        fetch_bytes(page, card.locator("a[download]").first.get_attribute("href")))).convert("RGB"))
    assert np.array_equal(result[~painted], source[~painted])   # outside the mask: the input's own pixels
    assert not np.array_equal(result[painted], source[painted])  # inside it: repainted
    page.screenshot(path=ARTIFACTS / "inpaint.png", full_page=True)
    assert_only_this_server(page, server)


def test_phone_screen_img2img(browser, server, tmp_path):
    page = open_page(browser, server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                     device_scale_factor=2)
    page.fill("#api-key", KEY)
    Image.fromarray(np.full((24, 32, 3), (200, 40, 40), np.uint8)).save(tmp_path / "red.png")
    page.check("input[name=mode][value=img2img]")
    page.set_input_files("#image", str(tmp_path / "red.png"))
    set_range(page, "#strength", 0.5)
    page.fill("#prompt", "a blue circle")
    page.fill("#steps", "4")
    page.click("#generate")
    card = newest_result(page, 1)
    card.scroll_into_view_if_needed()
    # the upload's size (rounded down to 8) and the chosen strength
    assert card.locator("img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 24]
    shown = parameters(card)
    assert shown["mode"] == "img2img" and shown["strength"] == "0.5" and shown["size"] == "32x24"
    # nothing wider than the screen: no sideways scrolling
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=ARTIFACTS / "phone.png", full_page=True)
    assert_only_this_server(page, server)


def test_page_routes_beside_the_api(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as http:
        page = http.get("/")  # no key needed for the page itself
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page.text
        assert http.get("/ui/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
        config = http.get("/ui/config").json()
        assert config["samplers"] == list(SAMPLERS) and config["api_key_required"] is True
        assert config["native_size"] == 16 and config["max_steps"] == 50
        assert http.get("/docs").status_code == 200
        paths = http.get("/openapi.json").json()["paths"]
        assert "/" not in paths and "/ui/config" not in paths and "/jobs/{job_id}" in paths
        assert http.get("/jobs/nothing").status_code == 401  # the API still wants its key


class SlowPipe(RecordingPipe):
    """The tiny pipeline at about 0.15 s a step, so a person (and this test) can watch the live preview."""

    def preview_images(self, latents, size=None):
        return self.pipe.preview_images(latents, size=size)

    def generate(self, requests, callback=None, **kw):
        import time

        def slow(step, total):
            time.sleep(0.15)
            callback(step, total)
        return super().generate(requests, callback=slow, **kw)


@pytest.fixture(scope="module")
def slow_server(tiny_weights, tiny_pipe):
    pipe = SlowPipe(tiny_pipe)
    srv, client = serve(Settings(weights=str(tiny_weights), batch_window=0.01, max_steps=50), pipe)
    yield srv
    client.close()
    srv.__exit__()


def test_the_page_shows_the_live_preview_while_a_job_runs(browser, slow_server):
    page = open_page(browser, slow_server, viewport={"width": 1100, "height": 900})
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#steps", "40")
    page.fill("#width", "32")
    page.fill("#height", "16")
    page.click("#generate")
    # while the job runs (the progress bar shows), the preview appears: a decoded PNG at the job's aspect ratio
    page.wait_for_function("() => { const i = document.querySelector('#preview');"
                           " return !i.hidden && i.complete && i.naturalWidth > 0; }")
    assert page.locator("#progress").is_visible()
    size = page.eval_on_selector("#preview", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [32, 16]
    page.screenshot(path=ARTIFACTS / "preview.png", full_page=True)
    card = newest_result(page, 1)                       # the job ends: the image, and the preview goes
    assert card.locator("img").first.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [32, 16]
    assert page.locator("#preview").is_hidden()
