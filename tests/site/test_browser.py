"""Drive headless Chromium over every chapter page of the built site, served on localhost.

Needs Debian's Chromium (`apt-get install chromium`) and Playwright for Python (pinned in
requirements.txt; it uses that Chromium, never a downloaded browser). Skipped when Chromium
is missing, unless DLARCH_REQUIRE_BROWSER=1. Screenshots go to _build/screenshots/.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest

from tests.notebooks import ROOT, chapters

HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    if os.environ.get("DLARCH_REQUIRE_BROWSER"):
        raise RuntimeError("Chromium not found: apt-get install chromium")
    pytest.skip("Chromium not installed (apt-get install chromium)", allow_module_level=True)
if not (HTML / "index.html").exists():
    pytest.skip("site not built", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

CHAPTERS = chapters()
SCREENSHOT_PAGES = {"index", "01_formal_definition"} | {c.stem for c in CHAPTERS[:3]}
# benign: no favicon; the theme's first-visit note; 'Failed to load resource' is reported
# with its URL by the response handler instead
BENIGN_CONSOLE = ("favicon.ico", "Got invalid theme mode", "Failed to load resource")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, server, path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    off_site: list[str] = []
    page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    page.on(
        "console",
        lambda m: errors.append(m.text) if m.type == "error" and not any(b in m.text for b in BENIGN_CONSOLE) else None,
    )
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else off_site.append(r.url))
    page.goto(f"{server}/{path}", wait_until="networkidle")
    return page, errors, off_site


@pytest.mark.parametrize("nb", CHAPTERS, ids=[c.stem for c in CHAPTERS])
def test_chapter_page_renders(browser, server, nb):
    page, errors, off_site = _open(browser, server, f"book/{nb.stem}.html")
    try:
        page.wait_for_function("document.querySelectorAll('mjx-container').length > 0", timeout=20_000)
        assert not errors, f"console errors: {errors[:5]}"
        assert not off_site, f"requests off the site: {off_site[:5]}"
        text = page.inner_text("main")
        assert "$$" not in text, "raw TeX left on the page"
        broken = page.evaluate(
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
        )
        assert not broken, f"images that did not load: {broken}"
        assert page.locator("main img:not([src*='_static/'])").count() >= 1, "no executed figure on the page"
        assert page.locator("a[href*='colab.research.google.com']").count() >= 1, "no Colab launch button"
        assert page.locator(".exercise").count() >= 3, "fewer than 3 exercises"
        assert page.locator("details.solution, .solution.dropdown, .solution.toggle").count() >= 3, (
            "solution toggles missing"
        )
        if nb.stem in SCREENSHOT_PAGES:
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / f"{nb.stem}.png"))
    finally:
        page.close()


@pytest.mark.parametrize(
    "path", ["index.html", "book/glossary.html", "book/references.html", "book/execution_times.html"]
)
def test_other_pages_load_cleanly(browser, server, path):
    page, errors, off_site = _open(browser, server, path)
    try:
        assert not errors, f"console errors: {errors[:5]}"
        assert not off_site, f"requests off the site: {off_site[:5]}"
        if path == "index.html":
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "index.png"))
        if path.endswith("execution_times.html") and (ROOT / "_build" / "timings" / "notebooks.csv").exists():
            # the test run's timing table is drawn as a table: one row per chapter, cells in columns
            table = page.locator("main table", has_text="Wall time per notebook")
            assert table.count() == 1, "the timing table is not a table on the page"
            cells = table.locator("tbody tr").first.locator("td")
            assert table.locator("tbody tr").count() == len(CHAPTERS) and cells.count() == 3
            assert cells.nth(0).bounding_box()["x"] < cells.nth(1).bounding_box()["x"], "columns side by side"
            SHOTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SHOTS / "execution_times.png"), full_page=True)
    finally:
        page.close()


def test_search_page_finds_a_term(browser, server):
    page, errors, _ = _open(browser, server, "search.html?q=residual")
    try:
        page.wait_for_selector("#search-results li, ul.search li", timeout=20_000)
        assert page.locator("ul.search li").count() >= 1
        assert not errors, errors[:5]
    finally:
        page.close()
