"""The built book, opened in headless Chromium the way a reader opens it.

Run after the book build (`make test` does both): it serves `_build/html` on loopback and checks
every page in `_toc.yml`: no console or page errors, every image loaded, every formula typeset by
MathJax, a Colab launch link on notebook pages, figures on every chapter, and chapter code that fits
the article column of a 1280-pixel-wide window without scrolling sideways.
"""
import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = pytest.mark.book


def toc_pages():
    """Every document named in _toc.yml, in reading order, as (path, is_notebook)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc.get("parts", []):
        files += [c["file"] for c in part["chapters"]]
    return [(f, (ROOT / f"{f}.ipynb").exists()) for f in files]


@pytest.fixture(scope="module")
def site():
    if not (HTML / "index.html").exists():
        pytest.fail("no built book in _build/html: build it first (`make html`, part of `make test`)")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed (Debian: apt-get install chromium); `make test` installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )
        yield b
        b.close()


def is_local(url):
    """Whether a URL is served by the book itself (the test machine reaches nothing else)."""
    return url.startswith(("http://127.0.0.1", "data:", "blob:", "about:")) or not url


def open_page(browser, url):
    """Load a page, wait for MathJax, and return (page, console errors, failed requests).

    The only resources outside the book are the Colab badges at the top of each chapter; they load
    for readers online and are left out of the checks here, which run without a network.
    """
    page = browser.new_page(viewport={"width": 1280, "height": 800})  # a common laptop screen
    errors, failed = [], []
    page.on("console", lambda m: errors.append(m.text)
            if m.type == "error" and is_local(m.location.get("url", "")) else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(r.url) if is_local(r.url) else None)
    page.goto(url, wait_until="networkidle")
    page.evaluate("() => (window.MathJax && MathJax.startup) ? MathJax.startup.promise : null")
    return page, errors, failed


def test_toc_pages_are_built():
    missing = [f for f, _ in toc_pages() if not (HTML / f"{f}.html").exists()]
    assert not missing, f"pages in _toc.yml with no HTML: {missing}"


@pytest.mark.parametrize("doc,is_notebook", toc_pages(), ids=[f for f, _ in toc_pages()])
def test_page_renders(site, browser, doc, is_notebook):
    page, errors, failed = open_page(browser, f"{site}/{doc}.html")
    try:
        assert not errors, f"console errors on {doc}: {errors}"
        assert not failed, f"requests that failed on {doc}: {failed}"
        broken = page.evaluate(
            "() => [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
        )
        broken = [src for src in broken if is_local(src)]
        assert not broken, f"images that did not load on {doc}: {broken}"
        n_math = page.locator("span.math, div.math").count()
        n_typeset = page.locator("mjx-container").count()
        assert n_typeset >= n_math, f"{doc}: {n_math} formulas but only {n_typeset} typeset by MathJax"
        raw = page.evaluate(
            "() => [...document.querySelectorAll('span.math, div.math')]"
            ".filter(e => !e.querySelector('mjx-container')).length"
        )
        assert raw == 0, f"{doc}: {raw} formulas left as raw TeX"
        if is_notebook:
            colab = page.locator("a[href*='colab.research.google.com/github/']")
            assert colab.count() >= 1, f"{doc}: no Colab launch link"
            figures = page.evaluate(
                "() => [...document.querySelectorAll('.cell_output img')].filter(i => i.naturalWidth > 0).length"
            )
            assert figures >= 1, f"{doc}: a chapter without a single rendered figure"
            assert n_typeset >= 1, f"{doc}: a chapter without typeset math"
            wide = page.evaluate(
                "() => [...document.querySelectorAll('.cell_input pre')]"
                ".filter(p => p.scrollWidth > p.clientWidth + 1)"
                ".map(p => p.textContent.split('\\n').reduce((a, l) => l.length > a.length ? l : a))"
            )
            assert not wide, f"{doc}: code cells that scroll sideways, longest lines: {wide[:3]}"
    finally:
        page.close()
