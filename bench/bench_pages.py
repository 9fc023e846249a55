"""Benchmark: how long the dashboard's pages take to render in a real browser, first load and warm.

Starts `streamlit run app.py` on a free port against --workspace (no worker), opens it in Debian's
Chromium (Playwright, executable_path=/usr/bin/chromium) and measures, each time until the script has
finished ([data-testid=stApp][data-test-script-state=notRunning]), every image has loaded and every Plotly
chart has drawn:
  first_load_s   a fresh server's first request (/?dataset=...): imports, opening the dataset, first caches;
  pages_warm_s   each page reached from another through the sidebar in one browser session: once to fill the
                 caches, then --repeats times; the median is its warm render (what moving around the dashboard
                 costs once caches are filled; this machine is shared and noisy, hence the median).
Writes JSON (machine, versions, threads, date, workspace size, seconds per page) to
bench/results/pages_<name>.json and prints it. Without --workspace it prepares (once, reused later) the
browser tests' demo-small workspace with the CLI.

    python bench/bench_pages.py --name cpu-demo-small
    python bench/bench_pages.py --workspace /data/ws --dataset demo --name cpu-demo
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the browser tests' harness: serve, chromium, page helpers

from e2e_harness import HEADINGS, PAGES, chromium, goto, heading, new_page, prepare_workspace, serve  # noqa: E402

DEFAULT_WORKSPACE = Path("/tmp/ensemble-bench-pages-demo-small")
CHARTS_DRAWN = """() => Array.from(document.querySelectorAll('[data-testid=stPlotlyChart]'))
    .every(c => c.querySelector('.main-svg'))"""


def drawn(page) -> None:
    page.wait_for_function(CHARTS_DRAWN, timeout=120_000)


def timed_switch(page, title: str) -> float:
    """Seconds from a click on `title` in the sidebar until its page is drawn."""
    link = page.locator("[data-testid=stSidebarNav] a", has=page.get_by_text(title, exact=True)).first
    start = time.perf_counter()
    link.click()
    heading(page, HEADINGS.get(title, title))
    drawn(page)
    return time.perf_counter() - start


def measure(workspace: Path, dataset: str, repeats: int) -> dict:
    with serve(workspace, dataset=dataset, worker=False) as app, chromium() as browser:
        page = new_page(browser)
        start = time.perf_counter()
        goto(page, app, "", params=f"dataset={dataset}", title="Start")
        drawn(page)
        first_load = time.perf_counter() - start
        times = {}
        for title, _, _ in PAGES[1:] + PAGES[:1]:  # Start last: warm like the others
            other = "Runs" if title == "Start" else "Start"
            timed_switch(page, other)
            timed_switch(page, title)  # cold: fills the caches
            for _ in range(repeats):
                timed_switch(page, other)
                times.setdefault(title, []).append(round(timed_switch(page, title), 3))
        page.context.close()
    return {"first_load_s": round(first_load, 3), "repeats": repeats,
            "pages_warm_s": {title: statistics.median(t) for title, t in times.items()}, "pages_warm_all_s": times}


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def machine() -> dict:
    import streamlit
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"device": f"CPU: {cpu}", "cpus": os.cpu_count(), "threads": {k: os.environ.get(k) for k in
                                                                        ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
            "load_average_1min": round(os.getloadavg()[0], 2),  # a shared machine: how busy it was
            "python": platform.python_version(), "streamlit": streamlit.__version__, "platform": platform.platform()}


def workspace_facts(workspace: Path) -> dict:
    from core import db
    from core.workspace import Workspace
    engine = db.make_engine(Workspace.open(workspace).db_url)
    with db.read_session(engine) as session:
        datasets = [{"name": d.name, "images": d.n_images} for d in db.list_datasets(session)]
        runs = db.count_runs(session)
        results = session.query(db.Result).count()
    engine.dispose()
    return {"path": str(workspace), "bytes": folder_size(workspace), "datasets": datasets, "runs": runs,
            "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help=f"default: demo-small prepared in {DEFAULT_WORKSPACE}")
    parser.add_argument("--dataset", default="demo-small", help="the ?dataset= every page opens (default demo-small)")
    parser.add_argument("--name", default="local", help="results go to bench/results/pages_<name>.json")
    parser.add_argument("--repeats", type=int, default=3, help="warm renders timed per page (the median is reported)")
    args = parser.parse_args()
    workspace = args.workspace or prepare_workspace(DEFAULT_WORKSPACE)
    report = {"benchmark": "pages", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "dataset": args.dataset, **machine(), "workspace": workspace_facts(workspace),
              **measure(workspace, args.dataset, args.repeats)}
    out = REPO / "bench" / "results" / f"pages_{args.name}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
