"""Benchmark: how long the dashboard's pages take to render in a real browser, first load and warm.

Starts `streamlit run app.py` on a free port against --workspace (no worker), opens it in Debian's
Chromium (Playwright, executable_path=/usr/bin/chromium) and measures, each time until the script has
finished ([data-testid=stApp][data-test-script-state=notRunning]), every image has loaded and every Plotly
chart has drawn:
  first_load_s   a fresh server's first request (/?dataset=...): imports, opening the dataset, first caches;
  pages_warm_s   each page reached from another through the sidebar in one browser session: once to fill the
                 caches, then --repeats times; the median is its warm render (what moving around the dashboard
                 costs once caches are filled; this machine is shared and noisy, hence the median).
and, without a browser, the query explorer's lists ("ensemble fixed / broke", "hardest") at --lists-queries
synthetic queries (default 50,000):
  lists_stored_s    read the per-query scores stored with two results (core.scores) and build the lists
                    (core.views): what the explorer does for stored results;
  lists_computed_s  score every query of both methods first (exact search, core.metrics.per_query_scores on
                    --lists-dims random dims), then the same lists: what an ad-hoc method costs;
  lists_ratio       computed / stored, both measured in this process.
With --synthetic, the users' scale instead (bench/synthetic_study.py: 50,000 eval queries, 1,000 classes, the
real evaluate and weights-chosen-on-train jobs on synthetic embeddings; built once in --workspace, default
/tmp/ensemble-bench-synthetic), in the browser:
  explorer_lists_s  each query explorer list (ensemble fixed / broke, hardest, per class) from a click on it
                    until its table is drawn, median of --repeats (the lists of a model and the concatenation);
  map_points_s      the embedding map (PCA) from asking for N points until the chart holds them: 50,000 after
                    20,000 and the reverse, median of --repeats; map_first_s: its first 50,000 (cold caches);
  leaderboard_per_class_s  the leaderboard's "Compare per class" (1,000 classes: table and bars) from switching
                    it on until the bars are drawn, median of --repeats after a first one.
Writes JSON (machine, versions, threads, date, workspace size, seconds per page) to
bench/results/pages_<name>.json and prints it. Without --workspace it prepares (once, reused later) the
browser tests' demo-small workspace with the CLI.

    python bench/bench_pages.py --name cpu-demo-small
    python bench/bench_pages.py --workspace /data/ws --dataset demo --name cpu-demo
    python bench/bench_pages.py --lists-only --lists-queries 50000 --name cpu-lists
    python bench/bench_pages.py --synthetic --name cpu-50k
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the browser tests' harness: serve, chromium, page helpers

from e2e_harness import (HEADINGS, PAGES, chromium, goto, heading, map_points, new_page, open_page,  # noqa: E402
                         prepare_workspace, serve, settle, show_list, widget)
from bench.machine import cpu_name, write_result

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


def measure(workspace: Path, dataset: str, repeats: int, only: set[str] | None = None) -> dict:
    with serve(workspace, dataset=dataset, worker=False) as app, chromium() as browser:
        page = new_page(browser)
        start = time.perf_counter()
        goto(page, app, "", params=f"dataset={dataset}", title="Start")
        drawn(page)
        first_load = time.perf_counter() - start
        times = {}
        for title, _, _ in PAGES[1:] + PAGES[:1]:  # Start last: warm like the others
            if only and title not in only:
                continue
            other = "Runs" if title == "Start" else "Start"
            timed_switch(page, other)
            timed_switch(page, title)  # cold: fills the caches
            for _ in range(repeats):
                timed_switch(page, other)
                times.setdefault(title, []).append(round(timed_switch(page, title), 3))
        page.context.close()
    return {"first_load_s": round(first_load, 3), "repeats": repeats,
            "pages_warm_s": {title: statistics.median(t) for title, t in times.items()}, "pages_warm_all_s": times}


LISTS = ("ensemble broke", "hardest", "per class", "ensemble fixed")  # the page opens on "thumbnail"


def measure_scale(workspace: Path, repeats: int) -> dict:
    """The explorer's lists and the map at bench.synthetic_study's scale, in Chromium (see the docstring)."""
    from urllib.parse import quote

    from bench import synthetic_study

    source = synthetic_study.build(workspace)
    ids = synthetic_study.result_ids(workspace)
    methods = f"{ids[synthetic_study.MODELS[0]]},{ids[synthetic_study.CONCAT]}"
    dataset = quote(source, safe="")
    lists: dict[str, list[float]] = {}
    with serve(workspace, dataset=dataset, worker=False) as app, chromium() as browser:
        page = new_page(browser, timeout_ms=300_000)
        open_page(page, app, "Query explorer", params=f"dataset={dataset}&methods={methods}")
        page.locator("[data-testid=stExpander] summary", has_text="Pick a query").first.wait_for()
        for how in LISTS:  # once to fill the caches
            show_list(page, how)
        for _ in range(repeats):
            for how in LISTS:
                start = time.perf_counter()
                show_list(page, how)
                lists.setdefault(how, []).append(round(time.perf_counter() - start, 3))
        open_page(page, app, "Leaderboard")
        per_class = []
        for i in range(2 * repeats + 2):  # on (timed until the bars are drawn), off, ...; the first on fills caches
            start = time.perf_counter()
            widget(page, "lb:per_class").locator("label").first.click()
            if i % 2 == 0:
                widget(page, "lb:per_class_bar").locator(".main-svg").first.wait_for()
            settle(page)
            if i % 2 == 0 and i:
                per_class.append(round(time.perf_counter() - start, 3))
        open_page(page, app, "Embedding map")
        start = time.perf_counter()
        map_points(page, 50_000)
        first = time.perf_counter() - start
        points: dict[int, list[float]] = {}
        for _ in range(repeats):
            for n in (20_000, 50_000):
                start = time.perf_counter()
                map_points(page, n)
                points.setdefault(n, []).append(round(time.perf_counter() - start, 3))
        page.context.close()
    return {"scale": {"queries": 50_000, "classes": 1000, "source": source, "methods": methods},
            "explorer_lists_s": {how: statistics.median(t) for how, t in lists.items()},
            "explorer_lists_all_s": lists, "leaderboard_per_class_s": statistics.median(per_class),
            "leaderboard_per_class_all_s": per_class, "map_first_s": round(first, 3),
            "map_points_s": {str(n): statistics.median(t) for n, t in points.items()},
            "map_points_all_s": {str(n): t for n, t in points.items()}}


def measure_lists(n_queries: int, dims: int, k: int = 50, seed: int = 0) -> dict:
    """The explorer's lists at n_queries: from stored per-query scores against scoring every query first."""
    import tempfile

    import numpy as np

    from core import views
    from core.metrics import per_query_scores
    from core.scores import load_query_scores, save_query_scores
    from core.workspace import Workspace

    rng = np.random.default_rng(seed)
    n_classes = max(2, n_queries // 50)  # ~50 images per class
    labels = rng.integers(0, n_classes, n_queries)
    centres = rng.normal(size=(n_classes, dims)).astype(np.float32)
    single = centres[labels] + rng.normal(size=(n_queries, dims)).astype(np.float32)
    ensemble = single + 0.5 * rng.normal(size=single.shape).astype(np.float32)
    rows, names = np.arange(n_queries), [f"class {c}" for c in range(n_classes)]

    def lists(a, b) -> None:
        for improved in (True, False):
            views.changed_rows(b, a, rows, labels, names, k, improved)
        views.hardest_rows(b, rows, labels, names, k, "ensemble")

    start = time.perf_counter()
    scored = [per_query_scores(x, labels, k) for x in (single, ensemble)]
    lists(*scored)
    computed = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as root:
        workspace = Workspace.open(root)
        for result_id, scores in enumerate(scored, start=1):
            save_query_scores(workspace, result_id, scores)
        start = time.perf_counter()
        lists(load_query_scores(workspace, 1), load_query_scores(workspace, 2))
        stored = time.perf_counter() - start
    return {"lists_queries": n_queries, "lists_dims": dims, "lists_k": k, "lists_stored_s": round(stored, 4),
            "lists_computed_s": round(computed, 3), "lists_ratio": round(computed / stored, 1)}


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def machine() -> dict:
    import streamlit
    return {"device": f"CPU: {cpu_name()}", "cpus": os.cpu_count(), "threads": {k: os.environ.get(k) for k in
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
    parser.add_argument("--lists-queries", type=int, default=50_000, help="queries of the list benchmark (0: skip it)")
    parser.add_argument("--lists-dims", type=int, default=32, help="embedding dims of the list benchmark's ad-hoc side")
    parser.add_argument("--lists-only", action="store_true", help="only the list benchmark (no browser)")
    parser.add_argument("--pages", help="comma-separated navigation titles to time (default: every page)")
    parser.add_argument("--synthetic", action="store_true",
                        help="the 50,000-query lists and map (bench/synthetic_study.py) instead of the pages")
    args = parser.parse_args()
    report = {"benchmark": "pages", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "dataset": args.dataset, **machine()}
    if args.synthetic:
        workspace = args.workspace or Path("/tmp/ensemble-bench-synthetic")
        report.update(measure_scale(workspace, args.repeats))
        report.update(workspace=workspace_facts(workspace))
    elif not args.lists_only:
        workspace = args.workspace or prepare_workspace(DEFAULT_WORKSPACE)
        only = set(args.pages.split(",")) if args.pages else None
        report.update(workspace=workspace_facts(workspace), **measure(workspace, args.dataset, args.repeats, only))
    if args.lists_queries and not args.synthetic:
        report.update(measure_lists(args.lists_queries, args.lists_dims))
    write_result(report, REPO / "bench" / "results" / f"pages_{args.name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
