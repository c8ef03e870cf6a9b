"""The rendered book, opened in headless Chromium as a reader would.

Every chapter page loads, shows its figures (decoded, non-zero size), renders its maths,
holds no error output or traceback, and every link of the navigation resolves. Screenshots
of the pages go to ``$KD_SCREENSHOT_DIR`` (default ``screenshots/`` at the project root).

MathJax normally comes from a CDN; offline, the test serves a local copy installed with npm
(``mathjax@3``) in its place. Without Chromium (``apt-get install chromium``), Playwright or
npm the test is skipped with a message saying which is missing.
"""
import functools
import http.server
import os
import shutil
import subprocess
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MATHJAX_DIR = ROOT / ".data" / "mathjax"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Script errors of Jupyter Book 1's own theme, not of the book: sphinx-thebe's loader is
# included twice on every page, and the second copy redeclares a constant.
KNOWN_THEME_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)
# chapter page -> (expects figures, expects maths)
PAGES = {"01_introduction": (True, True), "02_baseline": (True, False), "03_hinton_kd": (True, True),
         "04_cosine_hidden_state": (True, True), "05_intermediate_regressor": (True, True),
         "06_when_distillation_pays": (True, True),
         "07_results": (True, False), "08_resnet50_to_resnet18": (True, True),
         "09_self_distillation": (True, True), "10_pretrained_teacher": (True, True),
         "api": (False, False), "bibliography": (False, False)}


def _mathjax() -> Path | None:
    es5 = MATHJAX_DIR / "node_modules" / "mathjax" / "es5"
    if not es5.is_dir() and shutil.which("npm"):
        MATHJAX_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(MATHJAX_DIR), "--no-audit", "--no-fund",
                        "--silent", "mathjax@3"], capture_output=True, timeout=300)
    return es5 if es5.is_dir() else None


@pytest.fixture(scope="module")
def server(built_book):
    html, proc = built_book
    if proc.returncode != 0:
        pytest.fail("the book did not build:\n" + proc.stdout[-3000:])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(html))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS[1:])
        yield b
        b.close()


def _page(browser, mathjax):
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    def route(r):
        url = urlparse(r.request.url)
        if url.hostname in ("127.0.0.1", "localhost"):
            return r.continue_()
        if "mathjax" in url.path and mathjax is not None:
            local = mathjax / url.path.split("/es5/", 1)[-1]
            if local.is_file():
                return r.fulfill(path=str(local))
        return r.abort()  # no network: everything else from outside is refused at once
    page.route("**/*", route)
    return page


@pytest.mark.parametrize("name", PAGES)
def test_page_renders_as_a_reader_sees_it(browser, server, name):
    figures, maths = PAGES[name]
    mathjax = _mathjax()
    if maths and mathjax is None:
        pytest.skip("no local MathJax (npm install mathjax@3 failed): maths cannot render offline")
    page = _page(browser, mathjax)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    response = page.goto(urljoin(server, f"book/{name}.html"), wait_until="load")
    assert response.status == 200
    article = page.locator("article")
    text = article.inner_text()
    assert "Traceback (most recent call last)" not in text
    assert page.locator("article .output.error, article .output.traceback").count() == 0
    if figures:
        sizes = page.eval_on_selector_all(
            "article img", "els => els.map(e => [e.complete, e.naturalWidth, e.naturalHeight])")
        assert sizes, f"{name}: no figure on the page"
        assert all(done and w > 0 and h > 0 for done, w, h in sizes), f"{name}: broken image {sizes}"
    if maths:
        page.wait_for_selector("article mjx-container", state="attached", timeout=20_000)
        assert page.locator("article mjx-container").count() > 0
        assert page.locator("mjx-merror").count() == 0, f"{name}: MathJax could not parse a formula"
    shots = Path(os.environ.get("KD_SCREENSHOT_DIR", ROOT / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert not [e for e in errors if not any(k in e for k in KNOWN_THEME_ERRORS)], errors
    page.close()


def test_navigation_links_resolve(browser, server):
    page = _page(browser, None)
    page.goto(urljoin(server, "book/index.html"), wait_until="load")
    hrefs = page.eval_on_selector_all("nav a[href], .prev-next-area a[href]", "els => els.map(e => e.href)")
    page.close()
    internal = sorted({h.split("#")[0] for h in hrefs if h.startswith(server)})
    assert len(internal) >= len(PAGES)
    for url in internal:
        with urllib.request.urlopen(url) as r:
            assert r.status == 200, url
