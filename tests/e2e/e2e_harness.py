"""Start-up and browser helpers shared by the e2e tests (conftest.py) and take_screenshots.py.

Everything here drives the real product: the CLI prepares a workspace, a real worker process and a real
`streamlit run app.py` serve it, and Debian's Chromium (never `playwright install`) looks at it.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"

DATASET = "demo-small"  # Fashion-MNIST, 20 eval + 40 train images per class
MODELS = "tf_efficientnet_lite0,open_nsfw_resnet50_thin"
K = 10
WEIGHTS = "0,1,2"

IDLE = "[data-testid=stApp][data-test-script-state=notRunning]"
VIEWPORT = {"width": 1400, "height": 900}

# (title in app.py's st.navigation, URL path, screenshot name); the default page is served at /.
PAGES = [
    ("Start", "", "01-start"),
    ("Data & models", "data", "02-data"),
    ("Leaderboard", "leaderboard", "03-leaderboard"),
    ("Complementarity", "complementarity", "03b-complementarity"),
    ("Weight sweep", "sweep", "04-sweep"),
    ("Fusion heads", "fusion", "05-fusion"),
    ("Query explorer", "query_explorer", "06-explorer"),
    ("Embedding map", "embedding_map", "07-map"),
    ("Runs", "runs", "08-runs"),
]
# The Start page's heading is the app's name, not the navigation title.
HEADINGS = {"Start": "Ensemble Explorer"}


# --- workspace ------------------------------------------------------------------------------------------

def cli(workspace: Path, *args: str, log: Path) -> None:
    """`python -m core --workspace W ...`, its output appended to `log`; a failure shows the log's tail."""
    with open(log, "ab") as out:
        out.write(f"\n$ python -m core --workspace {workspace} {' '.join(args)}\n".encode())
        out.flush()
        done = subprocess.run([PYTHON, "-m", "core", "--workspace", str(workspace), *args], cwd=REPO,
                              stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode:
        raise RuntimeError(f"`python -m core {' '.join(args)}` exited {done.returncode}:\n{tail(log)}")


def prepare_workspace(workspace: Path, dataset: str = DATASET, models: str = MODELS, k: int = K,
                      weights: str = WEIGHTS) -> Path:
    """Extract, evaluate, sweep and fuse (reciprocal rank fusion) with the CLI (the same handlers the worker
    runs) before any app starts. A workspace already prepared with the same arguments (marker file) is reused
    as it is."""
    workspace = Path(workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    marker = workspace / f".e2e-prepared-{dataset}-{models}-k{k}-w{weights}-rrf".replace(",", "_")
    if marker.exists():
        return workspace
    log = workspace / "e2e-prepare.log"
    data = ["--dataset", dataset, "--models", models]
    cli(workspace, "extract", *data, log=log)
    cli(workspace, "evaluate", *data, "--k", str(k), log=log)
    cli(workspace, "sweep", *data, "--weights", weights, "--k", str(k), log=log)
    cli(workspace, "fuse", *data, "--method", "rrf", "--k", str(k), log=log)
    marker.touch()
    return workspace


# --- processes ------------------------------------------------------------------------------------------

def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: only this process (and its own group, if it leads one)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(grace)


@dataclass
class App:
    url: str
    workspace: Path
    dataset: str
    worker: subprocess.Popen | None
    server: subprocess.Popen
    logs: Path


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited {process.returncode} before answering:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)  # polling a port: there is no event to wait on
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log)}")


@contextlib.contextmanager
def serve(workspace: Path, dataset: str = DATASET, worker: bool = True, port: int | None = None):
    """A worker (`python -m core worker`) and `streamlit run app.py` on a free port, ENSEMBLE_WORKSPACE=workspace.
    Yields an App; both processes are stopped (SIGTERM, then kill) on exit."""
    workspace = Path(workspace)
    logs = workspace / "e2e-logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ENSEMBLE_WORKSPACE": str(workspace), "PYTHONUNBUFFERED": "1"}
    port = port or free_port()
    started: list[subprocess.Popen] = []
    try:
        worker_process = None
        if worker:
            worker_process = subprocess.Popen(
                [PYTHON, "-m", "core", "--workspace", str(workspace), "worker", "--poll-interval", "0.5"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=open(logs / "worker.log", "ab"),
                stderr=subprocess.STDOUT)
            started.append(worker_process)
        server = subprocess.Popen(
            [PYTHON, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "127.0.0.1",
             "--server.headless", "true", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none", "--server.runOnSave", "false"],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=open(logs / "streamlit.log", "ab"),
            stderr=subprocess.STDOUT)
        started.append(server)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_stcore/health", server, logs / "streamlit.log")
        yield App(url=url, workspace=workspace, dataset=dataset, worker=worker_process, server=server, logs=logs)
    finally:
        for process in reversed(started):
            stop(process)


@contextlib.contextmanager
def chromium():
    """Headless Debian Chromium through Playwright's sync API."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, timeout_ms: float = 90_000):
    """A page in a fresh context (no shared session): the 1400x900 viewport, downloads accepted, and no File
    System Access API, so the dataframes' "Download as CSV" falls back to a plain download Playwright sees."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.add_init_script("delete window.showSaveFilePicker; window.showSaveFilePicker = undefined;")
    context.set_default_timeout(timeout_ms)  # a loaded 2-core machine: a page's first render can be slow
    return context.new_page()


# --- page helpers ---------------------------------------------------------------------------------------

def settle(page, timeout: float = 120_000) -> None:
    """The script has finished (no rerun pending) and every image on the page has loaded."""
    page.wait_for_selector(IDLE, timeout=timeout)
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete)", timeout=timeout)
    page.wait_for_selector(IDLE, timeout=timeout)


def heading(page, text: str, timeout: float = 120_000):
    """Wait for the page's h1 (st.title) to read `text`, then for the script to finish."""
    h1 = page.locator("h1", has_text=text).first
    h1.wait_for(timeout=timeout)
    settle(page, timeout)
    return h1


def goto(page, app: App, path: str = "", params: str | None = None, title: str | None = None) -> None:
    query = params if params is not None else f"dataset={app.dataset}"
    page.goto(f"{app.url}/{path}" + (f"?{query}" if query else ""))
    if title:
        heading(page, HEADINGS.get(title, title))
    else:
        settle(page)


def open_page(page, app: App, title: str, params: str | None = None) -> None:
    """Load a page by its navigation title (its URL path comes from PAGES), with ?dataset= unless `params`."""
    goto(page, app, next(path for t, path, _ in PAGES if t == title), params=params, title=title)


def nav(page, title: str) -> None:
    """Click `title` in the sidebar navigation and wait for that page's heading."""
    page.locator("[data-testid=stSidebarNav] a", has=page.get_by_text(title, exact=True)).first.click()
    heading(page, HEADINGS.get(title, title))


def problems(page) -> list[str]:
    """What no page may show: a raw traceback (stException) or the app's own 'Something went wrong' box."""
    found = []
    if page.locator("[data-testid=stException]").count():
        found.append("stException: " + page.locator("[data-testid=stException]").first.inner_text()[:500])
    broken = page.locator("[data-testid=stAlert]", has_text="Something went wrong")
    if broken.count():
        found.append("error box: " + broken.first.inner_text()[:500])
    missing = page.get_by_text("Page not found")
    if missing.count():
        found.append(f"'Page not found' dialog at {page.url}")
    return found


def query_params(page) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlparse
    return dict(parse_qsl(urlparse(page.url).query))


def screenshot(page, path: Path) -> Path:
    """A full-page PNG: Streamlit scrolls inside its main container, so the viewport is grown to the content
    height for the shot (and restored afterwards)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or VIEWPORT
    height = page.evaluate("""() => Math.max(document.body.scrollHeight,
        ...Array.from(document.querySelectorAll('[data-testid=stMain], [data-testid=stAppViewContainer], section.main'))
            .map(e => e.scrollHeight))""")
    page.set_viewport_size({"width": size["width"], "height": min(max(int(height), size["height"]), 12_000)})
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    settle(page)
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    return path


def widget(page, key: str):
    """The element container of the widget/element created with `key=...` (Streamlit's st-key-<key> class)."""
    return page.locator(f".st-key-{re.sub(r'[^A-Za-z0-9_-]', '-', key)}").first


def grid_csv(page, key) -> str:
    """The contents of an st.dataframe (a canvas grid, so no DOM text) through its own "Download as CSV".
    `key`: the dataframe's key (Streamlit marks only selectable dataframes with it) or a Locator of it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    frame = widget(page, key).locator("[data-testid=stDataFrame]") if isinstance(key, str) else key
    button = frame.locator("[data-testid=stElementToolbar] button[aria-label='Download as CSV']")
    for attempt in range(4):
        # The toolbar shows on hover and slides in; another grid's scroller can sit over it meanwhile.
        frame.hover()
        try:
            with page.expect_download(timeout=30_000) as download:
                button.click(timeout=15_000)
            return Path(download.value.path()).read_text(encoding="utf-8-sig")
        except PlaywrightTimeout:
            if attempt == 3:
                raise
            page.mouse.move(0, 0)


def grid_click_row(page, key: str, row: int, row_height: float = 35.0) -> None:
    """Select a row of an st.dataframe with on_select: click its row-marker (checkbox) cell on the canvas."""
    canvas = widget(page, key).locator("[data-testid=data-grid-canvas]")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + 18, box["y"] + row_height * (row + 1) + row_height / 2)


# --- the users' scale (bench/synthetic_study.py) ----------------------------------------------------------

def show_list(page, how: str) -> None:
    """Pick the query explorer's `how` list ("ensemble fixed", "ensemble broke", "hardest", "per class") and
    wait until its table is drawn."""
    widget(page, "explorer:how").get_by_text(how, exact=True).click()
    if how == "per class":  # a grid without on_select gets no key class: wait for its caption
        page.locator("[data-testid=stExpander]").get_by_text("biggest gain first").first.wait_for()
    else:
        widget(page, f"explorer:list:{how}").locator("[data-testid=stDataFrame]").wait_for()
    settle(page)


MAP_DRAWN = """(n) => { const plot = document.querySelector('.st-key-map-chart .js-plotly-plot');
    return !!plot && !!plot._fullData && plot.querySelector('.main-svg') !== null
        && plot._fullData.reduce((sum, t) => sum + (t.x ? t.x.length : 0), 0) === n; }"""


def map_points(page, n: int) -> dict[str, int]:
    """Ask the embedding map for `n` points and wait until the chart holds them; points per trace type."""
    field = widget(page, "map:points").locator("input")
    field.fill(str(n))
    field.press("Enter")
    page.wait_for_function(MAP_DRAWN, arg=n, timeout=300_000)
    settle(page)
    return page.evaluate("""() => document.querySelector('.st-key-map-chart .js-plotly-plot')._fullData
        .reduce((out, t) => { out[t.type] = (out[t.type] || 0) + t.x.length; return out; }, {})""")
