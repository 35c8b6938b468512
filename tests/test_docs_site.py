"""The documentation site builds without a warning and reads correctly in a real browser.

- ``mkdocs build --strict`` (broken links, missing references and docstring warnings fail it) into a temporary
  folder, with nothing fetched from outside at view time: no page loads a script, style sheet, font or image from
  another host.
- Headless Chromium (Debian's ``chromium``, driven over the Chrome DevTools protocol with ``websocket-client``)
  opens every page of the navigation from a local HTTP server and checks that it loads, that its formulas are
  typeset by MathJax (every formula rendered, none in error, no raw ``$...$``, ``\\(`` or ``\\[`` left in the
  text), and that every image (the notebooks' figures) loaded (``naturalWidth > 0``). Screenshots of the home
  page and the theory page are saved in the test's temporary folder.

Needs the ``docs`` extra (``pip install -e ".[docs]"``), ``npm`` for the first build on a machine (MathJax comes
from the npm registry) and, for the browser half, ``chromium`` (``apt-get install chromium``); each part skips
with the reason when what it needs is absent.
"""
from __future__ import annotations

import base64
import functools
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS_MODULES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter")
BUILD_TIMEOUT = 600
PAGE_TIMEOUT = 30.0


def _missing_docs_packages() -> list[str]:
    missing = []
    for name in DOCS_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


def _hooks():
    """docs/hooks.py, the site's build-time code, as a module."""
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


# ------------------------------------------------------------------------------------------- the build
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = _missing_docs_packages()
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)}): pip install -e \".[docs]\"")
    hooks = _hooks()
    cached = hooks.cache_dir() / f"mathjax-{hooks.MATHJAX_VERSION}" / "es5" / "tex-mml-chtml.js"
    if shutil.which("npm") is None and not cached.is_file():
        pytest.skip("npm is not installed: the site's MathJax is installed from the npm registry at build time")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean",
                             "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    elapsed = time.perf_counter() - start
    log = result.stdout + result.stderr
    (out.parent / "mkdocs-build.log").write_text(log)
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    shown = "\n".join(warnings or log.splitlines()[-30:])
    assert result.returncode == 0 and not warnings, \
        f"mkdocs build --strict failed (exit {result.returncode}) after {elapsed:.1f} s:\n{shown}"
    print(f"\nmkdocs build --strict: {elapsed:.1f} s into {out}")
    return out


def test_site_builds_strict(site):
    hooks = _hooks()
    for package in hooks.packages():
        for name in hooks.modules(package):  # every public module of every installed package has its page
            page = site / hooks.page_path(name).removesuffix(".md").removesuffix("/index")
            assert (page / "index.html").is_file(), f"{name} has no page in the API reference"
    assert (site / "index.html").is_file()
    assert (site / "theory" / "index.html").is_file()
    assert (site / "assets" / "mathjax" / "tex-mml-chtml.js").is_file(), "MathJax is not served by the site"
    assert (site / "reference" / "operators" / "base" / "index.html").is_file()
    for notebook in sorted((ROOT / "examples").glob("*.ipynb")):
        assert (site / "examples" / notebook.stem / "index.html").is_file(), f"{notebook.name} has no page"


def test_no_page_loads_anything_from_another_host(site):
    import re

    remote = re.compile(r"""<(?:script|img|link|iframe|source)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8", errors="replace")
        for match in remote.finditer(text):
            tag = text[match.start(): text.find(">", match.start()) + 1]
            if tag.lower().startswith("<link") and "stylesheet" not in tag.lower() and "icon" not in tag.lower():
                continue  # rel="canonical" and the like are not loaded
            pytest.fail(f"{page.relative_to(site)} loads {tag[:200]} from another host")


# ------------------------------------------------------------------------------------------- the browser
class Handler(http.server.SimpleHTTPRequestHandler):
    failed: list[str] = []  # paths the browser asked for that the site does not have

    def log_message(self, *args):  # quiet
        pass

    def send_error(self, code, *args, **kwargs):
        if code >= 400:
            Handler.failed.append(f"{code} {self.path}")
        super().send_error(code, *args, **kwargs)


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, url: str):
        import websocket

        self.ws = websocket.create_connection(url, timeout=PAGE_TIMEOUT, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str, timeout: float = PAGE_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method:
                    return self.events.pop(i)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(json.loads(self.ws.recv()))

    def navigate(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                           timeout=PAGE_TIMEOUT * 1000)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    if importlib.util.find_spec("websocket") is None:
        pytest.skip("websocket-client is not installed (part of the docs extra: pip install -e \".[docs]\")")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; or set $CHROMIUM)")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tmp_path_factory.mktemp("chromium-profile")
    process = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--remote-allow-origins=*",
         f"--user-data-dir={profile}", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium ({chromium}) did not start its DevTools server")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t.get("type") == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        yield tools, f"http://127.0.0.1:{server.server_address[1]}/"
        tools.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        server.shutdown()


# Run in the page after its load event: waits (up to 20 s) until MathJax has typeset every formula and every
# image has finished loading, then reports what a reader would see.
CHECK_PAGE = r"""
(async () => {
  const content = document.querySelector("article.md-content__inner") || document.body;
  const skip = "code, pre, script, style, textarea, mjx-container, .jp-OutputArea, .jp-CodeCell .jp-InputArea";
  function state() {
    const raw = [];
    const walker = document.createTreeWalker(content, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
      const node = walker.currentNode;
      if (node.parentElement && node.parentElement.closest(skip)) continue;
      const text = node.textContent;
      if (/\\\(|\\\[|\$\$|\$[^$\s][^$]*\$/.test(text)) raw.push(text.trim().slice(0, 120));
    }
    const arithmatex = [...content.querySelectorAll(".arithmatex")];
    return {
      title: document.title,
      hasContent: !!document.querySelector(".md-content"),
      formulas: content.querySelectorAll("mjx-container").length,
      untypeset: arithmatex.filter(e => !e.querySelector("mjx-container")).length,
      arithmatex: arithmatex.length,
      mathErrors: content.querySelectorAll("mjx-merror").length,
      raw,
      images: [...content.querySelectorAll("img")].map(i => ({src: i.src.slice(0, 80), complete: i.complete,
                                                           width: i.naturalWidth})),
      mathjax: !!(window.MathJax && window.MathJax.version),
    };
  }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const deadline = Date.now() + 20000;
  let s = state();
  while (Date.now() < deadline && (s.untypeset > 0 || s.raw.length > 0 || s.images.some(i => !i.complete))) {
    await new Promise(r => setTimeout(r, 100));
    s = state();
  }
  return s;
})()
"""

NAV_LINKS = r"""
[...new Set([...document.querySelectorAll("nav.md-nav--primary a.md-nav__link[href]")]
  .map(a => new URL(a.getAttribute("href"), location.href))
  .filter(u => u.origin === location.origin)
  .map(u => u.origin + u.pathname))]
"""


def test_pages_in_a_browser(site, browser, tmp_path_factory):
    tools, base = browser
    shots = tmp_path_factory.mktemp("screenshots")
    tools.navigate(base)
    pages = tools.evaluate(NAV_LINKS)
    assert base in pages and len(pages) >= 20, f"the navigation lists only {pages}"
    expected = ["theory/", "installation/", "benchmarks/", "tutorials/extending/", "reference/", "reference/cli/",
                "tutorials/operators/", *[f"examples/{p.stem}/" for p in sorted((ROOT / "examples").glob("*.ipynb"))]]
    for path in expected:
        assert base + path in pages, f"{path} is not in the navigation"
    failures, formulas, figures = [], {}, {}
    start = time.perf_counter()
    for url in pages:
        tools.navigate(url)
        s = tools.evaluate(CHECK_PAGE)
        path = url.removeprefix(base) or "/"
        problems = []
        if not s["hasContent"] or "404" in s["title"]:
            problems.append(f"did not load (title {s['title']!r})")
        if not s["mathjax"]:
            problems.append("MathJax is not loaded")
        if s["untypeset"] or s["mathErrors"] or s["raw"]:
            problems.append(f"{s['untypeset']} of {s['arithmatex']} formulas not typeset, {s['mathErrors']} in error, "
                            f"raw TeX left: {s['raw'][:3]}")
        broken = [i for i in s["images"] if not i["complete"] or i["width"] == 0]
        if broken:
            problems.append(f"images that did not load: {broken[:3]}")
        if problems:
            failures.append(f"{path}: " + "; ".join(problems))
        formulas[path], figures[path] = s["formulas"], len(s["images"])
        if path in ("/", "theory/"):
            tools.screenshot(shots / ("home.png" if path == "/" else "theory.png"))
    elapsed = time.perf_counter() - start
    print(f"\n{len(pages)} pages checked in Chromium in {elapsed:.1f} s; screenshots in {shots}")
    assert not failures, "\n".join(failures)
    assert not Handler.failed, f"the pages asked for files the site does not have: {sorted(set(Handler.failed))[:10]}"
    assert formulas["theory/"] >= 50, f"the theory page has only {formulas['theory/']} typeset formulas"
    for notebook in sorted((ROOT / "examples").glob("*.ipynb")):
        path = f"examples/{notebook.stem}/"
        assert formulas[path] > 0, f"{path} shows no typeset formula"
        assert figures[path] > 0, f"{path} shows no figure"
    for name in ("home.png", "theory.png"):
        shot = shots / name
        assert shot.is_file() and shot.stat().st_size > 10_000, f"the screenshot {shot} is missing or blank"
