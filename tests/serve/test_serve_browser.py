"""The explorer in a real headless Chromium (Debian's, driven by Playwright; no browser download):
the steps of issue 13's point 9, with every request that is not to the app's own address blocked
and recorded, and a screenshot of each step kept (tmp_path, and $RELPROP_ARTEFACTS when set)."""
from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import test_image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (apt-get install chromium; "
                                                     "./run test installs it when run as root)"),
]
pytest.importorskip("starlette", reason="relprop serve needs the serve extra (pip install 'relprop[serve]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
TIMEOUT_MS = 30_000
SCRIPT_TEXT = "<script>window.__pwned = 'text'</script> a <img src=x onerror=\"window.__pwned = 'img'\"> fine film"


def canvas_png() -> bytes:
    """A bundled test canvas as a PNG file (a random picture when Fashion-MNIST is not installed)."""
    from PIL import Image

    from relprop.datasets import make_canvas

    try:
        image, _, _ = make_canvas("test", 0)
    except (OSError, ValueError):
        return test_image(5)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_of(data_url: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


class Steps:
    """One screenshot per step, named in order."""

    def __init__(self, page, folder: Path):
        self.page, self.folder, self.count = page, folder, 0
        folder.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> None:
        self.count += 1
        path = self.folder / f"{self.count:02d}_{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        target = os.environ.get("RELPROP_ARTEFACTS")
        if target:
            Path(target, "serve-browser").mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(target, "serve-browser", path.name))


def counter(page, name: str) -> str:
    return page.get_attribute("body", f"data-{name}") or ""


def wait_for_next(page, name: str, before: str) -> None:
    """Until the page has drawn a new answer of kind ``name`` (its data-* counter moved on). The
    page's CSP forbids evaluating strings, so the wait is a CSS selector, not a JS predicate."""
    page.wait_for_selector(f"body[data-{name}]:not([data-{name}='{before}'])", state="attached", timeout=TIMEOUT_MS)


def explain_text(page, text: str) -> None:
    """Type ``text`` into the text model's box and wait for its word views (and the panels below)."""
    page.select_option("#model", "minilm-sst2")
    rendered = counter(page, "rendered")
    page.fill("#text", text)
    page.click("#explain-text")
    wait_for_next(page, "rendered", rendered)


def upload(page, name: str, data: bytes) -> None:
    """Upload ``data`` as an image file and wait for its maps, inside view and what-if curve."""
    rendered = counter(page, "rendered")
    page.set_input_files("#upload", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
    wait_for_next(page, "rendered", rendered)
    page.wait_for_selector("body[data-inside][data-whatif]", state="attached")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


def open_page(browser, base: str, bypass_csp: bool = False):
    """A fresh page with every request that is not to ``base`` aborted and recorded."""
    context = browser.new_context(viewport={"width": 1300, "height": 1000}, bypass_csp=bypass_csp)
    outside: list[str] = []

    def only_the_app(route):
        if route.request.url.startswith(base + "/"):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_app)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    return context, page, outside, problems


def test_explorer_in_a_browser(browser, live_server, tmp_path):
    context, page, outside, problems = open_page(browser, live_server)
    steps = Steps(page, tmp_path / "screens")
    page.goto(live_server + "/")
    page.wait_for_selector("body[data-ready]", state="attached")      # start() done: uploads are not reset
    assert page.title() == "relprop explorer"
    steps.shot("loaded")

    # an upload of a test canvas shows a non-blank map
    upload(page, "canvas.png", canvas_png())
    maps = page.locator("#maps figure[data-method='transformer_attribution'] img")
    first_map = maps.get_attribute("src")
    pixels = image_of(first_map)
    assert pixels.shape[:2] == (192, 192) and pixels.std() > 10
    assert page.locator("#maps figure").count() >= 6
    assert page.locator("#classes button").count() == 5
    steps.shot("canvas_uploaded")

    # switching the class changes the map
    rendered = counter(page, "rendered")
    page.locator("#classes button").nth(1).click()
    wait_for_next(page, "rendered", rendered)
    assert page.locator("#classes button.chosen").get_attribute("data-class") == \
        page.locator("#classes button").nth(1).get_attribute("data-class")
    assert maps.get_attribute("src") != first_map
    steps.shot("class_switched")

    # the block slider changes the inside view
    page.wait_for_selector("body[data-inside]", state="attached")
    inside = counter(page, "inside")
    page.wait_for_selector("#inside figure img")
    before = page.locator("#inside figure[data-panel='A'] img").first.get_attribute("src")
    page.locator("#block").fill("1")
    wait_for_next(page, "inside", inside)
    assert page.locator("#block-value").text_content() == "1"
    assert page.locator("#inside figure[data-panel='A'] img").first.get_attribute("src") != before
    assert "block 1" in page.locator("#inside figcaption").first.text_content()
    steps.shot("block_slider")

    # clicking a patch of a map shows that patch's row
    inside = counter(page, "inside")
    page.locator("#inside figure[data-panel='A'] img").first.click(position={"x": 100, "y": 10})
    wait_for_next(page, "inside", inside)
    assert page.locator("#row-value").text_content().startswith("row: patch 4 ")      # row 0, column 4 of 8
    steps.shot("patch_row")

    # the what-if slider changes the prediction
    page.wait_for_selector("#prediction:not(:empty)")
    whatif = counter(page, "whatif")
    clean = page.locator("#prediction").text_content()
    page.locator("#percent").fill("60")
    wait_for_next(page, "whatif", whatif)
    changed = page.locator("#prediction").text_content()
    assert changed != clean and changed.startswith("60% removed")
    assert page.locator("#curve polyline").get_attribute("points").count(",") == 13        # 0, 5, ..., 60 %
    steps.shot("whatif_slider")

    # the current view as a self-contained HTML report
    with page.expect_download() as download:
        page.click("#export-html")
    report = Path(download.value.path()).read_text(encoding="utf-8")
    assert download.value.suggested_filename == "relprop-report.html"
    assert report.startswith("<!DOCTYPE html>") and "60% removed" in report and "block 1" in report

    # text input shows highlighted words
    explain_text(page, "A gorgeous, witty and deeply moving film.")
    words = page.locator("#maps figure[data-method='transformer_attribution'] span.w")
    assert [words.nth(i).text_content() for i in range(words.count())][:3] == ["A", "gorgeous", ","]
    shades = {words.nth(i).evaluate("node => getComputedStyle(node).backgroundColor") for i in range(words.count())}
    assert len(shades) > 2                                         # coloured by score, not one colour
    assert words.nth(1).get_attribute("title")                    # hover shows the score
    words.nth(1).hover()
    assert page.locator("#word-score").text_content().startswith("gorgeous: ")
    page.wait_for_selector("body[data-busy='0']", state="attached")           # the what-if answered too
    assert page.locator("#whatif-image").is_hidden() and page.locator("#kept-text").is_visible()
    steps.shot("text_words")

    # the generation view of the tiny LM
    page.select_option("#model", "tiny-lm")
    rendered = counter(page, "rendered")
    page.fill("#new-tokens", "4")
    page.click("#generate")
    wait_for_next(page, "rendered", rendered)
    assert page.locator("#generation tr").count() >= 2
    steps.shot("generation")

    assert not problems, problems
    assert not outside, f"the page tried to reach other hosts: {outside}"
    context.close()


def test_escaping_executes_nothing(browser, live_server, evil_model_dir, tmp_path):
    """`<script>` and `<img onerror>` in typed text and in a model's label names stay text: checked
    with the CSP bypassed, so the page's own escaping is what is tested."""
    context, page, outside, problems = open_page(browser, live_server, bypass_csp=True)
    steps = Steps(page, tmp_path / "screens")
    page.goto(live_server + "/")
    page.wait_for_selector("body[data-ready]", state="attached")      # start() done: uploads are not reset
    explain_text(page, SCRIPT_TEXT)
    page.wait_for_selector("body[data-inside][data-whatif]", state="attached")
    assert "<script>window.__pwned" in page.locator("#maps p.words").first.text_content()
    steps.shot("script_in_text")

    page.select_option("#model", evil_model_dir.name)
    upload(page, "x.png", test_image(1, side=16))
    labels = [page.locator("#classes button span").nth(3 * i).text_content() for i in range(3)]
    assert sorted(labels) == sorted(["<script>window.__pwned = 'label'</script>",
                                     "<img src=x onerror=\"window.__pwned='img'\">", "plain"])
    steps.shot("script_in_labels")
    assert page.evaluate("() => window.__pwned === undefined")
    assert page.locator("script").count() == 1 and page.locator("img[src='x']").count() == 0
    assert not problems, problems
    assert not outside, f"the page tried to reach other hosts: {outside}"
    context.close()


def test_bad_file_shows_an_error_in_the_page(browser, live_server, tmp_path):
    from tests.serve.conftest import bomb_png

    context, page, outside, problems = open_page(browser, live_server)
    steps = Steps(page, tmp_path / "screens")
    page.goto(live_server + "/")
    page.wait_for_selector("body[data-ready]", state="attached")      # start() done: uploads are not reset
    for name, data, message in (("bomb.png", bomb_png(), "decompression bomb"),
                                ("notes.png", b"not an image", "not an image")):
        page.set_input_files("#upload", files=[{"name": name, "mimeType": "image/png", "buffer": data}])
        # expect() has its own 5 s default, which page.set_default_timeout does not change
        sync_api.expect(page.locator("#error")).to_contain_text(message, timeout=TIMEOUT_MS)
        steps.shot("error_" + name.split(".")[0])
        page.set_input_files("#upload", files=[])
    upload(page, "ok.png", test_image(0))                          # the server kept serving
    assert page.locator("#error").is_hidden()
    assert not outside
    # the failed uploads' 4xx answers are the only console errors the page may log
    assert all("status of 4" in problem for problem in problems), problems
    context.close()
