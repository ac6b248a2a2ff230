"""The built documentation site, served locally and read in headless Chromium.

Needs the site (``python -m sphinx -W --keep-going -b html docs build/html``),
Playwright's Python package and a Chromium (Debian's ``/usr/bin/chromium``, or
``$FASTATTN_CHROMIUM``). Without them these tests are skipped, unless
``FASTATTN_REQUIRE_SITE=1`` (CI sets it), where a missing piece fails them.

Screenshots of the landing page and of the ``scaled_dot_product_attention`` page at
1280x800 are written to ``build/screenshots/`` (CI keeps them as artifacts).
"""
import functools
import html.parser
import http.server
import os
import shutil
import threading
import urllib.parse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(os.environ.get("FASTATTN_SITE", ROOT / "build" / "html"))
SCREENSHOTS = ROOT / "build" / "screenshots"
REQUIRED = os.environ.get("FASTATTN_REQUIRE_SITE", "") == "1"
# As root and without a network, Chromium needs these (see the machine notes): no
# sandbox, and no background connections that the closed network would refuse.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]


def _missing(reason):
    if REQUIRED:
        pytest.fail(f"FASTATTN_REQUIRE_SITE=1 but {reason}")
    pytest.skip(reason)


def _chromium():
    for candidate in (os.environ.get("FASTATTN_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def site():
    if not (SITE / "index.html").exists():
        _missing(f"no built site in {SITE} (python -m sphinx -W --keep-going -b html docs "
                 "build/html)")
    return SITE


@pytest.fixture(scope="module")
def server(site):
    """The site over HTTP on 127.0.0.1 (search needs http, not file://)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(server):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install playwright)")
    executable = _chromium()
    if executable is None:
        _missing("no Chromium found (apt-get install chromium, or set FASTATTN_CHROMIUM)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True,
                                              args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A 1280x800 page that records failed requests and console errors of the site."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.problems = []
    # (a failed request also logs "Failed to load resource": responses are checked below)
    page.on("console", lambda msg: msg.type == "error"
            and not msg.text.startswith("Failed to load resource")
            and page.problems.append(f"console error: {msg.text}"))
    page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))

    def check(response):
        path = urllib.parse.urlparse(response.url).path
        if response.url.startswith(server) and response.status >= 400 \
                and not path.endswith("favicon.ico"):
            page.problems.append(f"{response.status} for {response.url}")
    page.on("response", check)
    yield page
    context.close()


def _open(page, server, path):
    page.goto(f"{server}/{path}", wait_until="networkidle")
    return page


def _images_loaded(page, selector="article img"):
    """Number of images in the article that loaded and have a size."""
    return page.evaluate(
        f"""() => [...document.querySelectorAll({selector!r})]
                  .filter(img => img.complete && img.naturalWidth > 0).length""")


def test_landing_page(page, server):
    _open(page, server, "index.html")
    assert "fastattn" in page.title()
    code = page.locator("article div.highlight pre").first
    assert "scaled_dot_product_attention" in code.inner_text()
    text = " ".join(page.locator("article").inner_text().split())
    scope = (ROOT / "README.md").read_text().split("<!-- scope-start -->")[1].split(
        "<!-- scope-end -->")[0]
    scope = " ".join(scope.replace("**", "").split())
    assert scope[:60] in text                           # what fastattn is not, from README
    for link in ("Installing", "User guides", "API reference", "Gallery"):
        assert page.locator(f"nav a:has-text('{link}')").count() >= 1, link
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "landing-1280x800.png"))
    assert page.problems == [], page.problems


def test_api_page_of_scaled_dot_product_attention(page, server):
    _open(page, server, "api/fastattn.scaled_dot_product_attention.html")
    assert "scaled_dot_product_attention" in page.title()
    signature = page.locator("dl.py.function > dt").first.inner_text()
    assert "scaled_dot_product_attention" in signature and "is_causal" in signature
    headings = page.locator("article dl.field-list > dt, article p.rubric").all_inner_texts()
    for section in ("Parameters", "Returns", "Examples"):
        assert any(h.strip(" :") == section for h in headings), (section, headings)
    examples = page.locator("article div.highlight pre")
    assert examples.count() >= 1 and ">>>" in examples.first.inner_text()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "sdpa-1280x800.png"))
    assert page.problems == [], page.problems


def test_gallery_page_shows_code_output_and_figure(page, server):
    _open(page, server, "auto_examples/plot_attention_patterns.html")
    assert "Attention patterns" in page.title()
    assert page.locator("article div.highlight-Python pre").count() >= 2
    assert "block-sparse vs. masked dense" in page.locator("article").inner_text()  # output
    assert _images_loaded(page, "article img.sphx-glr-single-img") >= 1
    _open(page, server, "auto_examples/index.html")
    assert _images_loaded(page, "article img") >= 3                            # thumbnails
    assert page.problems == [], page.problems


def test_guide_page_shows_its_figure(page, server):
    _open(page, server, "guide/long-sequences.html")
    assert _images_loaded(page) >= 1
    assert page.locator("article div.highlight pre").count() >= 5
    assert page.problems == [], page.problems


def test_search_finds_paged_attention(page, server):
    _open(page, server, "search.html?q=paged_attention")
    results = page.locator("#search-results li a")
    results.first.wait_for(timeout=30_000)
    hrefs = [results.nth(i).get_attribute("href") for i in range(results.count())]
    assert any("fastattn.paged_attention.html" in h for h in hrefs), hrefs
    assert page.problems == [], page.problems


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for name in ("href", "src"):
            if attrs.get(name) and not (tag == "link" and attrs.get("rel") == "preconnect"):
                self.links.append(attrs[name])


@functools.lru_cache(maxsize=None)
def _parse(path):
    parser = _Links()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser


def test_no_broken_internal_link(site):
    """Every relative href/src of every page points at a file of the site, and every
    #fragment at an id of its page."""
    # (_static/ holds the theme's template files, copied as they are: not pages)
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.parts)
    assert len(pages) > 50
    broken = []
    for html_page in pages:
        for link in _parse(html_page).links:
            url = urllib.parse.urlparse(link)
            if url.scheme or link.startswith(("//", "mailto:", "javascript:")):
                continue                       # external: not checked (no network)
            target = html_page if not url.path else \
                (html_page.parent / urllib.parse.unquote(url.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{html_page.relative_to(site)}: {link}")
            elif url.fragment and target.suffix == ".html" \
                    and url.fragment not in _parse(target).ids:
                broken.append(f"{html_page.relative_to(site)}: {link} (no such anchor)")
    assert broken == [], "\n".join(broken[:50])
