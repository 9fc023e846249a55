"""The real dashboard in Debian's Chromium, on a workspace the CLI prepared (demo-small, two models, k=10).

After every action the tests wait for Streamlit's script to finish ([data-test-script-state=notRunning])
and for the text they expect; they never sleep a fixed time.
"""
from __future__ import annotations

import csv
import io
import re
import time
import zipfile

import pytest
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from e2e_harness import (PAGES, SCREENSHOTS, grid_click_row, grid_csv, heading, nav, new_page, problems,
                         open_page, query_params, serve, settle, widget)

pytestmark = pytest.mark.e2e
FUSE_TEXT = {"max": "max: each item's best similarity", "combsum": "combsum: summed z-scored similarities (weighted)",
             "qe": "qe: alpha query expansion of the concatenation", "dba": "dba: database-side augmentation"}

MODELS = ("tf_efficientnet_lite0", "open_nsfw_resnet50_thin")


def rows_of(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def clean(page) -> None:
    assert problems(page) == [], f"{page.url} shows an error"


def sidebar(page) -> str:
    return page.locator("[data-testid=stSidebarUserContent]").inner_text()


def test_every_page_opens_from_the_navigation(page, app, shot):
    """Click through all eight pages in the sidebar: each shows its heading and content, no traceback,
    keeps ?dataset= in the URL, and gets a full-page screenshot."""
    open_page(page, app, "Start")
    titles = [a.split("\n")[-1] for a in page.locator("[data-testid=stSidebarNav] a").all_inner_texts()]
    assert titles == [title for title, _, _ in PAGES]
    side = sidebar(page)
    assert "Worker running" in side and f"Dataset: {app.dataset}" in side and str(app.workspace) in side

    for title, path, name in PAGES:
        if title != "Start":
            nav(page, title)
        assert page.url.split("?")[0] == f"{app.url}/{path}", page.url
        assert query_params(page).get("dataset") == app.dataset, page.url
        clean(page)
        main = page.locator("[data-testid=stMain]")
        if title == "Start":
            assert re.search(r"holds \d+ dataset\(s\) and \d+ run\(s\)", main.inner_text())
        elif title == "Data & models":
            metrics = page.locator("[data-testid=stMetric]").all_inner_texts()
            assert any("Eval split" in m and "200" in m for m in metrics), metrics
            assert any("Train split" in m and "400" in m for m in metrics), metrics
            page.locator("[data-testid=stImage]").nth(9).wait_for()  # one sample per class
        elif title == "Leaderboard":
            main.get_by_text("All methods at k=10").wait_for()
            page.locator("[data-testid=stPlotlyChart]").first.wait_for()
            page.locator(".st-key-lb-pareto [data-testid=stPlotlyChart]").or_(
                main.get_by_text("No method has a measured cost")).first.wait_for()
        elif title == "Complementarity":  # E2E_WORKSPACE may hold a comparison from an earlier run
            main.get_by_text("No comparison of models on this dataset yet").or_(
                main.get_by_text("Upper bound: picking")).first.wait_for()
        elif title == "Weight sweep":
            main.get_by_text(re.compile(r"\d+ weight vectors over")).first.wait_for()
            page.locator(".st-key-sweep-heatmap [data-testid=stPlotlyChart]").wait_for()
        elif title == "Fusion heads":
            # a head trained by a later test is there when E2E_WORKSPACE is reused
            main.get_by_text("No trained heads on this dataset yet.").or_(
                widget(page, "fusion:table")).first.wait_for()
            assert page.get_by_role("button", name=re.compile("Train head")).is_enabled()
        elif title == "Query explorer":
            main.locator("h3", has_text="Query #").wait_for()
        elif title == "Embedding map":
            main.get_by_text("200 eval images").wait_for()
        elif title == "Runs":
            assert "done" in grid_csv(page, "runs:table")
        shot(name)
    assert len(list(SCREENSHOTS.glob("0*.png"))) >= len(PAGES)


def test_leaderboard_lists_both_models_and_an_ensemble(page, app):
    open_page(page, app, "Leaderboard")
    clean(page)
    assert "eval split: 200 queries" in page.locator("[data-testid=stMain]").inner_text()
    table = rows_of(grid_csv(page, "lb:table"))
    by_type = {}
    for row in table:
        by_type.setdefault(row["type"], []).append(row)
    assert {r["method"] for r in by_type["single"]} == set(MODELS), table
    ensembles = [r for r in table if r["type"] != "single"]
    assert ensembles, table
    for row in table:
        assert 0.0 < float(row["map@k"]) <= 1.0, row
        assert row.get("k", "10") in ("10", "10.0"), row
    best_single = max(float(r["map@k"]) for r in by_type["single"])
    # The CLI ran the oracle sweep and a reciprocal rank fusion (nothing tuned).
    oracle = [r for r in ensembles if r["chosen on"] == "oracle (tuned on eval)"]
    honest = [r for r in ensembles if r["chosen on"] == "none"]
    assert oracle and [r["type"] for r in honest] == ["rank"] and len(oracle) + len(honest) == len(ensembles), table
    metrics = page.locator("[data-testid=stMetric]").all_inner_texts()
    assert any("Best single model" in m and f"{best_single:.4f}" in m for m in metrics), metrics
    best_oracle = max(float(r["map@k"]) for r in oracle)
    assert any("Best ensemble, oracle (tuned on eval)" in m and f"{best_oracle:.4f}" in m for m in metrics), metrics
    assert any("chosen without eval" in m and f"{float(honest[0]['map@k']):.4f}" in m for m in metrics), metrics
    # every method priced by its dims: one point each on the cost plot
    widget(page, "lb:cost_by").get_by_text("dims", exact=True).click()
    settle(page)
    chart = page.locator(".st-key-lb-pareto [data-testid=stPlotlyChart]")
    chart.locator(".main-svg").first.wait_for()
    assert chart.locator(".scatterlayer .point").count() == len(table)
    page.get_by_text(re.compile(r"Best within [\d.]+ dims: ")).wait_for()
    clean(page)


def test_a_link_to_a_server_path_is_refused(page, app):
    """?dataset= naming a folder outside the data roots: one clear message, nothing scanned, no traceback."""
    open_page(page, app, "Leaderboard", params="dataset=/usr/share/icons")
    clean(page)
    page.get_by_text("The dashboard does not open '/usr/share/icons'").wait_for()
    assert "/usr/share/icons" not in sidebar(page)


def test_runs_page_lists_the_cli_runs_and_opens_one(page, app):
    open_page(page, app, "Runs")
    clean(page)
    runs = rows_of(grid_csv(page, "runs:table"))
    kinds = {r["kind"] for r in runs if r["status"] == "done"}
    assert {"extract", "evaluate", "sweep"} <= kinds, runs
    # Rows are listed newest first; select the CLI's evaluate run by clicking its row.
    position = max(i for i, r in enumerate(runs) if r["kind"] == "evaluate")
    run_id = runs[position]["id"]
    grid_click_row(page, "runs:table", position)
    page.locator("h3", has_text=f"Run {run_id}:").wait_for()
    settle(page)
    assert query_params(page).get("run") == run_id
    results = rows_of(grid_csv(page, page.locator("[data-testid=stDataFrame]").filter(visible=True).nth(1)))  # under "Run N"
    assert {r["method"] for r in results} == set(MODELS), results
    page.reload()
    heading(page, "Runs")
    page.locator("h3", has_text=f"Run {run_id}:").wait_for()
    clean(page)


def open_sweep_select(page):
    """Open the Sweep selectbox; the job panel's 2-s fragment rerun can close the popup again at once,
    so try a few times (each bounded) before failing."""
    options = page.get_by_role("option")
    for _ in range(6):
        widget(page, "sweep:run").click()
        try:
            options.first.wait_for(timeout=10_000)
            return options
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    options.first.wait_for()
    return options


def sweep_options(page) -> list[str]:
    texts = open_sweep_select(page).all_inner_texts()
    page.keyboard.press("Escape")
    return texts


def test_sweep_submitted_from_the_page_runs_on_the_worker(page, app, shot):
    """Launch a small sweep in the UI, reload while it is queued/running (URL state kept), and wait for the
    worker's result table."""
    open_page(page, app, "Weight sweep")
    # A k no sweep in this workspace used yet, so the new run is told apart (E2E_WORKSPACE may be reused).
    existing = sweep_options(page)
    k = next(k for k in range(5, 100) if not any(f"k={k} " in o for o in existing))
    launch = page.locator("[data-testid=stExpander]", has_text="Launch a sweep")
    if not widget(page, "sweep:weights").is_visible():
        launch.locator("summary").click()
    widget(page, "sweep:weights").locator("input").fill("0, 1, 3")
    widget(page, "sweep:k").locator("input").fill(str(k))
    launch.get_by_role("button", name=re.compile("Start sweep")).click()
    # The confirmation can be gone again at once: the job panel reruns the page when the job ends.
    page.get_by_text(re.compile(r"Sweep of 8 weight vectors queued as job \d+")).or_(
        page.get_by_text(re.compile(r"Job \d+ · sweep"))).or_(
        page.get_by_text(re.compile(rf"weight sweep over 2 models, k={k} "))).first.wait_for()
    settle(page)
    params = query_params(page)
    assert params.get("dataset") == app.dataset, page.url

    page.reload()  # mid-job or just after: the URL keeps the dataset and the sweep shown
    heading(page, "Weight sweep")
    assert query_params(page).get("dataset") == app.dataset
    assert query_params(page).get("sweep") == params.get("sweep"), page.url
    clean(page)

    title = re.compile(rf"weight sweep over 2 models, k={k} ")
    for _ in range(60):  # the worker runs it; a reload shows the finished run (bounded: ~60 reloads)
        page.get_by_text(re.compile(r"Job \d+ · sweep")).first.wait_for(state="hidden", timeout=240_000)
        if any(title.search(o) for o in sweep_options(page)):
            break
        page.reload()
        heading(page, "Weight sweep")
    open_sweep_select(page)
    page.get_by_role("option", name=title).first.click()
    caption = page.get_by_text(re.compile(rf"8 weight vectors over .*k={k};"))
    caption.wait_for()
    settle(page)
    clean(page)
    new_run = query_params(page).get("sweep")
    assert new_run and new_run != params.get("sweep"), page.url
    table = rows_of(grid_csv(page, "sweep:table"))
    weights = [[float(v) for key, v in r.items() if key.startswith("w:")] for r in table]
    assert table and all(0.0 < float(r["map@k"]) <= 1.0 for r in table), table
    assert all(set(w) <= {0.0, 1.0, 3.0} and len(w) == 2 for w in weights), table
    assert any(min(w) > 0 for w in weights), table  # an ensemble of both models
    page.locator(".st-key-sweep-heatmap [data-testid=stPlotlyChart]").wait_for()
    shot("04b-sweep-from-ui")
    page.reload()  # the URL names the chosen sweep: a reload shows the same one
    heading(page, "Weight sweep")
    caption.wait_for()
    assert query_params(page).get("sweep") == new_run
    clean(page)


def test_query_explorer_click_a_thumbnail_changes_the_query(page, app, shot):
    """Clicking a thumbnail's button makes it the query: ?query= and the heading follow, both survive a
    reload, and every method shows k results marked hit/miss."""
    open_page(page, app, "Start")
    nav(page, "Query explorer")
    clean(page)
    first = page.locator("h3", has_text="Query #").inner_text()
    picker = page.locator("[data-testid=stExpander]", has_text="Pick a query")
    if picker.count() and not picker.locator("[class*='st-key-explorer-pick-']").first.is_visible():
        picker.locator("summary").first.click()
    buttons = page.locator("[class*='st-key-explorer-pick-'] button")
    assert buttons.count() >= 20  # a page of the thumbnail grid
    target = buttons.nth(5)
    label = target.inner_text().strip()  # "#<dataset row>"
    row = label.lstrip("#")
    assert f"Query #{row}:" not in first
    target.click()
    page.locator("h3", has_text=f"Query #{row}:").wait_for()
    settle(page)
    assert query_params(page).get("query") == row, page.url
    captions = page.locator("[data-testid=stCaptionContainer]", has_text=re.compile(r"(\d\.\d{3}|rank \d+)\s+#\d+ "))
    assert captions.count() == 10 * 2  # k=10 results for each of the two default methods (a similarity or a rank)
    clean(page)
    shot("06b-explorer-query")
    page.reload()
    heading(page, "Query explorer")
    page.locator("h3", has_text=f"Query #{row}:").wait_for()
    assert query_params(page).get("query") == row
    clean(page)


def test_embedding_map_plots_every_class(page, app):
    open_page(page, app, "Embedding map")
    clean(page)
    chart = page.locator(".st-key-map-chart [data-testid=stPlotlyChart]")
    chart.locator(".legendtext").first.wait_for()
    assert len(chart.locator(".legendtext").all_inner_texts()) == 10  # Fashion-MNIST's ten classes
    assert "200 eval images" in chart.inner_text()


def test_fresh_server_deep_link_uses_the_apps_navigation(browser, e2e_workspace):
    """The first request a freshly started server gets is a bookmarked page, not /: it must still run through
    app.py (its sidebar and st.navigation), not Streamlit's pages/-folder mode listing every file in pages/."""
    with serve(e2e_workspace, worker=False) as fresh:
        page = new_page(browser)
        try:
            open_page(page, fresh, "Leaderboard")
            clean(page)
            titles = [a.split("\n")[-1] for a in page.locator("[data-testid=stSidebarNav] a").all_inner_texts()]
            assert titles == [title for title, _, _ in PAGES]
            assert "Workspace:" in sidebar(page)
        finally:
            page.context.close()


def eval_result_ids(app) -> dict[str, int]:
    """The prepared workspace's evaluate and fuse results at k=10, by method label, from its runs DB."""
    from core import db
    from core.workspace import Workspace
    engine = db.make_engine(Workspace.open(app.workspace).db_url)
    try:
        with db.read_session(engine) as session:
            return {r.method: r.id for r in session.query(db.Result).order_by(db.Result.id).all()
                    if r.run.kind in ("evaluate", "fuse") and (r.metrics or {}).get("k") == 10}
    finally:
        engine.dispose()


def test_query_explorer_shows_rank_fusion_and_lists_from_stored_scores(page, app, shot):
    """A model beside reciprocal rank fusion: rrf shows its ranking (ranks, no similarity); the 'ensemble fixed'
    list says it read the scores stored with both results, i.e. nothing searched the eval set again."""
    ids = eval_result_ids(app)
    single, rrf = ids[MODELS[0]], next(i for label, i in ids.items() if label.startswith("rrf over"))
    open_page(page, app, "Query explorer", params=f"dataset={app.dataset}&methods={single},{rrf}")
    clean(page)
    main = page.locator("[data-testid=stMain]")
    main.locator("h3", has_text="Query #").wait_for()
    ranks = page.locator("[data-testid=stCaptionContainer]", has_text=re.compile(r"rank \d+\s+#\d+ "))
    assert ranks.count() == 10
    widget(page, "explorer:how").get_by_text("ensemble fixed", exact=True).click()
    settle(page)
    main.get_by_text(f"AP@10 stored with result {rrf}").wait_for()
    assert f"AP@10 stored with result {single}" in main.inner_text()
    assert "computed here" not in main.inner_text()
    clean(page)
    shot("06c-explorer-rrf")


def test_leaderboard_exports_a_concatenation_and_explains_rank_fusion(page, app):
    open_page(page, app, "Leaderboard")
    clean(page)
    table = rows_of(grid_csv(page, "lb:table"))
    grid_click_row(page, "lb:table", next(i for i, r in enumerate(table) if r["type"] == "concat"))
    page.get_by_role("button", name=re.compile("Export as an artifact")).click()
    page.get_by_text(re.compile(r"Exported to .*result")).wait_for()
    settle(page)
    with page.expect_download() as download:
        page.get_by_role("button", name=re.compile("Download the artifact")).click()
    with zipfile.ZipFile(download.value.path()) as archive:
        assert any(name.endswith("/manifest.json") for name in archive.namelist()), archive.namelist()
    grid_click_row(page, "lb:table", next(i for i, r in enumerate(table) if r["type"] == "rank"))
    page.get_by_text(re.compile(r"rrf over .* does not export: it merges result lists")).wait_for()
    assert not page.get_by_role("button", name=re.compile("Export as an artifact")).count()
    clean(page)


def test_complementarity_from_the_page_runs_on_the_worker(page, app, shot):
    open_page(page, app, "Complementarity")
    clean(page)
    launch = page.locator("[data-testid=stExpander]", has_text="Compare models")
    if not widget(page, "comp:k").is_visible():
        launch.locator("summary").click()
    launch.get_by_role("button", name=re.compile("Compare the models")).click()
    # The worker runs it; the job panel reruns the page when the job ends (a reused workspace shows it at once).
    page.get_by_text("Upper bound: picking").wait_for(timeout=240_000)
    settle(page)
    charts = page.locator("[data-testid=stPlotlyChart]")
    charts.nth(5).locator(".main-svg").first.wait_for()
    assert charts.count() == 6  # overlap, Jaccard, CKA, two AP correlations, pair oracle
    assert set(rows_of(grid_csv(page, page.locator("[data-testid=stDataFrame]").first))[0]) >= {"model", "map@k"}
    clean(page)
    shot("03c-complementarity")


def test_embedding_map_box_selection_shows_the_images(page, app):
    """Dragging a box over the map selects its points: their thumbnails and links to the explorer appear."""
    open_page(page, app, "Embedding map")
    chart = page.locator(".st-key-map-chart [data-testid=stPlotlyChart]")
    chart.locator(".legendtext").first.wait_for()
    area = chart.locator(".nsewdrag").first.bounding_box()
    page.mouse.move(area["x"] + 2, area["y"] + 2)
    page.mouse.down()
    page.mouse.move(area["x"] + area["width"] - 2, area["y"] + area["height"] - 2, steps=12)
    page.mouse.up()
    page.get_by_text(re.compile(r"200 point\(s\) selected; the first 12 are shown")).wait_for()
    # The caption comes first; each thumbnail and its link follow in the same run, made on first use.
    links = page.get_by_role("link", name=re.compile(r"Open #\d+"))
    links.nth(11).wait_for()
    settle(page)
    assert links.count() == 12
    clean(page)


def choose_option(page, key: str, option: str) -> None:
    """Pick `option` in the selectbox `key`; the job panel's 2-s fragment rerun can close the popup at once,
    so try a few times (each bounded)."""
    for _ in range(6):
        widget(page, key).click()
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=10_000)
            return
        except PlaywrightTimeout:
            page.keyboard.press("Escape")
    raise AssertionError(f"could not choose {option!r} in {key}")


def submitted_job(engine, kind: str, before: int, **params) -> int:
    """The id of the job of `kind` with `params` queued after job `before`: read from the queue, since the
    page's confirmation can be gone at once (the job panel reruns the page when a fast job ends)."""
    from core import jobs

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for job in jobs.list_jobs(engine, kind=kind, limit=20):
            if job.id > before and all(job.params.get(key) == value for key, value in params.items()):
                return job.id
        time.sleep(0.2)  # another process writes the queue: there is no event to wait on
    raise AssertionError(f"no {kind} job with {params} was queued")


def test_every_fusion_method_runs_from_the_fusion_page_and_shows_on_the_leaderboard_and_explorer(page, app):
    """max, combsum, qe and dba from the rank-fusion form, greedy weights chosen on train and learned concat
    ratios from the selection form: each runs on the worker and appears on the leaderboard (with how it was
    chosen) and in the query explorer beside the others. (rrf: the CLI prepared it, see the tests above.)"""
    from core import db, jobs
    from core.workspace import Workspace

    engine = db.make_engine(Workspace.open(app.workspace).db_url)
    before = max((job.id for job in jobs.list_jobs(engine, limit=1)), default=0)
    open_page(page, app, "Fusion heads")
    submitted = {}
    for method in ("max", "combsum", "qe", "dba"):
        choose_option(page, "fusion:fuse_method", FUSE_TEXT[method])
        widget(page, "fusion:fuse_k").locator("input").fill("10")
        page.get_by_role("button", name=re.compile("Run fusion")).click()
        submitted[method] = submitted_job(engine, "fuse", before, method=method, k=10)
        settle(page)
    widget(page, "fusion:select_k").locator("input").fill("10")
    page.get_by_role("button", name=re.compile("Choose weights on train")).click()
    submitted["greedy"] = submitted_job(engine, "select_weights", before, search="greedy", k=10)
    settle(page)
    widget(page, "fusion:select_k").locator("input").fill("10")
    page.get_by_role("button", name=re.compile("Learn concat ratios")).click()
    submitted["learned_ratio"] = submitted_job(engine, "train_head", before, k=10)
    clean(page)

    try:
        deadline = time.monotonic() + 600
        while {jobs.get_job(engine, i).status for i in submitted.values()} - {"done"}:
            failed = {m: jobs.get_job(engine, i).error for m, i in submitted.items() if jobs.get_job(engine, i).status
                      in ("failed", "cancelled")}
            assert not failed and time.monotonic() < deadline, failed or "the worker took over 10 minutes"
            time.sleep(1)  # another process's jobs: there is no event to wait on
        with db.read_session(engine) as session:
            result = {m: db.get_run(session, jobs.get_job(engine, i).run_id).results[0].id for m, i in submitted.items()}
    finally:
        engine.dispose()

    open_page(page, app, "Leaderboard")
    clean(page)
    table = {int(float(r["result_id"])): r for r in rows_of(grid_csv(page, "lb:table"))}
    chosen_on = {m: table[i]["chosen on"] for m, i in result.items()}  # KeyError: a method missing from the board
    assert chosen_on == {"max": "none", "combsum": "none", "qe": "none", "dba": "none", "greedy": "train",
                         "learned_ratio": "validation"}, chosen_on
    assert all(0.0 < float(table[i]["map@k"]) <= 1.0 for i in result.values())

    for group in (("max", "combsum", "qe"), ("dba", "greedy", "learned_ratio")):
        ids = ",".join(str(result[m]) for m in group)
        open_page(page, app, "Query explorer", params=f"dataset={app.dataset}&methods={ids}")
        page.locator("h3", has_text="Query #").wait_for()
        clean(page)
        main = page.locator("[data-testid=stMain]").inner_text()
        for method in group:
            assert table[result[method]]["method"] in main, (method, main[:2000])
        # ten results per method: a similarity, or the rank for methods that merge lists
        assert page.locator("[data-testid=stCaptionContainer]", has_text=re.compile(r"#\d+ ")).count() >= 30
