"""Every page through the real app (AppTest on app.py, switched to each page) against real workspaces:
an empty one (fresh install) and one seeded through core with a tiny manifest dataset, random timm test
models, evaluate / sweep / train_head runs and a failed job. No core function is mocked."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from tests.images import write_image
from core import db, jobs, tasks
from core.progress import SILENT
from core.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["random:test_efficientnet", "random:test_vit"]
K = 5
TIMEOUT = 60


@pytest.fixture(scope="session")
def seeded(tmp_path_factory):
    """A workspace with a 3-class manifest dataset (4 eval + 4 train per class), both test models
    extracted, one evaluation, one sweep, one trained head, and one failed job."""
    base = tmp_path_factory.mktemp("pages")
    rows = []
    for c, name in enumerate(["cat", "dog", "fox"]):
        for i in range(8):
            path = write_image(base / "images" / name / f"{i:02d}.png", seed=100 * c + i)
            rows.append((str(path), name, "eval" if i < 4 else "train"))
    manifest = base / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        writer.writerows(rows)
    ws = Workspace.open(base / "workspace")
    engine = db.make_engine(ws.db_url)
    db.init_db(engine)
    params = {"dataset": str(manifest), "models": MODELS}
    tasks.extract(params, SILENT, ws, engine)
    tasks.evaluate({**params, "k": K}, SILENT, ws, engine)
    sweep_run = tasks.sweep({**params, "k": K, "weights": [0, 1, 2]}, SILENT, ws, engine)
    from core.heads import run_training_job
    head_run = run_training_job({**params, "k": K, "head": {"kind": "mlp", "out_dim": 16, "hidden_dim": 32,
                                                              "epochs": 2, "k": K, "batch_size": 8}},
                                SILENT, ws, engine)
    failed = jobs.submit(engine, "evaluate", {"dataset": str(base / "gone"), "models": MODELS, "k": K})
    claimed = jobs.claim(engine, "test-worker")
    assert claimed.id == failed.id
    jobs.fail(engine, failed.id, "Dataset folder /gone does not exist. Choose an existing folder.\nTraceback ...",
              worker_id="test-worker")
    engine.dispose()
    return {"workspace": ws, "source": str(manifest), "sweep_run": sweep_run, "head_run": head_run}


def app(monkeypatch, workspace_root: Path, page: str, **query) -> AppTest:
    monkeypatch.setenv("ENSEMBLE_WORKSPACE", str(workspace_root))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    for key, value in query.items():
        at.query_params[key] = str(value)
    at.run()  # the default page (Start); st.navigation registers the pages (custom url paths) here
    if page == "pages/start.py":
        return at
    # AppTest keeps only the page's elements after a switch (app.py's sidebar still runs, unrecorded).
    at.switch_page(page)
    return at.run()


def texts(at: AppTest) -> str:
    parts = []
    for tree in (at, at.sidebar):
        for kind in ("markdown", "caption", "title", "info", "warning", "error", "success", "subheader"):
            parts += [e.value for e in getattr(tree, kind)]
    return "\n".join(str(p) for p in parts)


def table(at: AppTest, *columns: str):
    """The first table (pandas frame) showing all `columns` (AppTest does not expose dataframe keys)."""
    for frame in at.dataframe:
        value = frame.value
        if all(c in value.columns for c in columns):
            return value
    raise AssertionError(f"no table with columns {columns}; have {[list(f.value.columns) for f in at.dataframe]}")


def no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not [e for e in at.error if "Something went wrong" in str(e.value)], [e.value for e in at.error]


# --- fresh install ----------------------------------------------------------------------------------

@pytest.fixture
def empty(tmp_path):
    return tmp_path / "empty-workspace"


def test_start_page_explains_and_offers_the_demo(monkeypatch, empty):
    at = app(monkeypatch, empty, "pages/start.py")
    no_exception(at)
    assert "Ensemble Explorer" in texts(at)
    assert at.button(key="start:demo").label == "Prepare the offline demo"
    assert "No worker running" in texts(at)


@pytest.mark.parametrize("page", ["pages/leaderboard.py", "pages/sweep.py", "pages/fusion.py",
                                  "pages/query_explorer.py", "pages/embedding_map.py"])
def test_pages_without_a_dataset_point_to_the_data_page(monkeypatch, empty, page):
    at = app(monkeypatch, empty, page)
    no_exception(at)
    assert "No dataset chosen yet" in texts(at)


def test_data_page_with_no_dataset_asks_for_one(monkeypatch, empty):
    at = app(monkeypatch, empty, "pages/data.py")
    no_exception(at)
    assert "Choose a dataset above" in texts(at)


def test_a_bad_dataset_path_shows_what_to_do(monkeypatch, empty):
    at = app(monkeypatch, empty, "pages/data.py", dataset="/no/such/folder")
    no_exception(at)
    assert any("neither 'demo', an existing folder" in e.value for e in at.error)


def test_runs_page_on_an_empty_workspace(monkeypatch, empty):
    at = app(monkeypatch, empty, "pages/runs.py")
    no_exception(at)
    assert "No runs yet" in texts(at)


# --- seeded workspace -------------------------------------------------------------------------------

def test_data_page_shows_classes_models_and_cache(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/data.py", dataset=seeded["source"])
    no_exception(at)
    classes = table(at, "class", "eval", "train")
    assert list(classes["class"]) == ["cat", "dog", "fox"] and list(classes["eval"]) == [4, 4, 4]
    models = table(at, "model", "availability")
    assert {"tf_efficientnet_lite0", *MODELS} <= set(models["model"])
    cached = table(at, "model", "dim", "MB")
    assert sorted(cached["model"]) == sorted(MODELS)
    assert len(at.image) >= 3  # one sample thumbnail per class, made through core.thumbnails
    assert any((seeded["workspace"].thumbnails).rglob("*.png"))


def test_data_page_queues_an_extraction(monkeypatch, tmp_path, seeded):
    # A copy-free second workspace over the same images, so this job does not touch the seeded queue.
    at = app(monkeypatch, tmp_path / "ws2", "pages/data.py", dataset=seeded["source"])
    no_exception(at)
    at.multiselect(key="data:models_to_extract").set_value([])
    at.text_input(key="data:custom_models").input("random:test_vit")
    submit = next(b for b in at.button if b.label == "Extract embeddings")
    at = submit.click().run()
    no_exception(at)
    engine = db.make_engine(Workspace.open(tmp_path / "ws2").db_url)
    queued = jobs.list_jobs(engine, kind="extract")
    assert queued and queued[0].params["models"] == ["random:test_vit"]
    assert queued[0].params["dataset"] == seeded["source"]
    assert any("queued as job" in e.value for e in at.success)


def test_data_page_rejects_an_unknown_model_name(monkeypatch, tmp_path, seeded):
    at = app(monkeypatch, tmp_path / "ws3", "pages/data.py", dataset=seeded["source"])
    at.multiselect(key="data:models_to_extract").set_value([])
    at.text_input(key="data:custom_models").input("no_such_model")
    at = next(b for b in at.button if b.label == "Extract embeddings").click().run()
    no_exception(at)
    assert any("Unknown model 'no_such_model'" in e.value for e in at.error)
    assert not jobs.list_jobs(db.make_engine(Workspace.open(tmp_path / "ws3").db_url), kind="extract")


def test_leaderboard_ranks_methods_with_gain(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/leaderboard.py", dataset=seeded["source"])
    no_exception(at)
    board = table(at, "method", "type", "gain")
    assert set(MODELS) <= set(board["method"])
    assert {"single", "concat", "head"} <= set(board["type"])
    best_single = board[board["type"] == "single"]["map@k"].max()
    for _, row in board.iterrows():
        assert row["gain"] == pytest.approx(row["map@k"] - best_single)
    assert (board[board["type"] == "concat"]["oracle"]).all()
    by_size = table(at, "models in ensemble")
    assert list(by_size["models in ensemble"]) == [1, 2]
    assert "map@5" in texts(at)
    # per-class comparison of two entries
    at.toggle(key="lb:per_class").set_value(True).run()
    no_exception(at)
    per_class = table(at, "class", "B - A")
    assert sorted(per_class["class"]) == ["cat", "dog", "fox"]


def test_sweep_page_shows_ranked_vectors_heatmap_and_promotes(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/sweep.py", dataset=seeded["source"])
    no_exception(at)
    assert "oracle (tuned on eval)" in texts(at)
    assert len(table(at, "rank", "ratio class", "same as")) == 5  # (2,2), (2,0), (0,2) fold into (1,1), (1,0), (0,1)
    at.toggle(key="sweep:distinct").set_value(False).run()
    ranked = table(at, "rank", "ratio class", "same as")
    assert len(ranked) == 3 ** 2 - 1
    # (1, 1) and (2, 2) rank identically: one ratio class, the larger named as the same as the smaller
    twin = ranked[(ranked[f"w:{MODELS[0]}"] == 2) & (ranked[f"w:{MODELS[1]}"] == 2)].iloc[0]
    assert twin["same as"] == "1, 1"
    assert at.query_params["sweep"] == [str(seeded["sweep_run"])] or at.query_params["sweep"] == str(seeded["sweep_run"])
    assert len(at.get("plotly_chart")) == 1  # the 2-model heatmap
    at = at.button(key="sweep:promote").click().run()
    no_exception(at)
    assert any("Promoted" in e.value for e in at.success)
    at = app(monkeypatch, seeded["workspace"].root, "pages/leaderboard.py", dataset=seeded["source"])
    assert table(at, "method", "promoted")["promoted"].any()


def test_fusion_page_lists_heads_with_their_curve(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/fusion.py", dataset=seeded["source"])
    no_exception(at)
    heads = table(at, "run_id", "method", "map@k")
    assert list(heads["run_id"]) == [seeded["head_run"]]
    assert at.button(key="fusion:promote")


def test_query_explorer_shows_methods_side_by_side(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/query_explorer.py", dataset=seeded["source"])
    no_exception(at)
    assert len(at.multiselect(key="explorer:methods").value) == 2
    assert any(s.value.startswith("Query #") for s in at.subheader)
    marks = [c.value for c in at.caption if c.value.startswith((":green[", ":red["))]
    assert len(marks) == 2 * 10 or len(marks) == 2 * 11  # k=10 per method (11 eval neighbours available)
    assert len(at.get("plotly_chart")) == 0
    # pick the query by clicking a thumbnail; the URL keeps it
    at.button(key="explorer:pick:17").click().run()
    assert at.query_params["query"] in ("17", ["17"])
    assert any(s.value.startswith("Query #17: fox") for s in at.subheader)
    # pick the query by id
    at.radio(key="explorer:how").set_value("id").run()
    at.number_input(key="explorer:id").set_value(9).run()
    no_exception(at)
    assert at.query_params["query"] in ("9", ["9"])
    assert any(s.value.startswith("Query #9") for s in at.subheader)
    # where the ensemble fixed / broke the best single model, and the hardest queries
    for how in ("ensemble fixed", "ensemble broke", "hardest"):
        at.radio(key="explorer:how").set_value(how).run()
        no_exception(at)


def test_query_explorer_searches_with_an_uploaded_image(monkeypatch, seeded, tmp_path):
    at = app(monkeypatch, seeded["workspace"].root, "pages/query_explorer.py", dataset=seeded["source"])
    image = write_image(tmp_path / "upload.png", seed=7)
    at.file_uploader(key="explorer:upload").upload(image.name, image.read_bytes(), "image/png") if hasattr(
        at, "file_uploader") else pytest.skip("AppTest cannot upload here")
    at.run()
    no_exception(at)
    assert any(s.value == "Your image" for s in at.subheader)
    sims = [c.value for c in at.caption if re.search(r"\d\.\d{3}  \n#\d+ ", c.value)]
    assert len(sims) == 2 * 10


def test_query_explorer_rejects_a_query_outside_eval(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/query_explorer.py", dataset=seeded["source"], query=7)
    no_exception(at)
    assert any("not in the eval split" in e.value for e in at.error)


def test_embedding_map_projects_every_eval_image(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/embedding_map.py", dataset=seeded["source"])
    no_exception(at)
    assert at.selectbox(key="map:projection").value == "pca"
    assert len(at.get("plotly_chart")) == 1
    # every embedding the explorer offers can be mapped, the fused ones too
    for option in at.selectbox(key="map:method").options:
        at.selectbox(key="map:method").set_value(option).run()
        no_exception(at)


def test_runs_page_opens_compares_and_exports(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/runs.py", run=seeded["sweep_run"], compare=2)
    no_exception(at)
    runs = table(at, "id", "kind", "status", "duration_s")
    assert {"extract", "evaluate", "sweep", "train_head"} <= set(runs["kind"])
    assert any(s.value.startswith(f"Run {seeded['sweep_run']}") for s in at.subheader)
    results = table(at, "method", "weights", "oracle")
    assert len(results) == 8
    compared = table(at, "method", "difference")
    assert set(MODELS) <= set(compared["method"])
    labels = [b.label for b in at.get("download_button")]
    assert "Download CSV" in labels and "Download Markdown" in labels


def test_runs_page_shows_a_failed_job(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/runs.py")
    no_exception(at)
    assert any("failed: Dataset folder /gone does not exist" in e.value for e in at.error)
    failed = table(at, "job", "status", "error")
    assert "failed" in set(failed["status"])


def test_runs_page_with_an_unknown_run(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/runs.py", run=999)
    no_exception(at)
    assert any("Run 999 does not exist" in e.value for e in at.error)


def test_pages_without_cached_embeddings(monkeypatch, tmp_path, seeded):
    """A dataset that is registered but has nothing extracted: every page says what to do."""
    for page, expected in [("pages/leaderboard.py", "No results on this dataset yet"),
                           ("pages/query_explorer.py", "No cached embeddings"),
                           ("pages/embedding_map.py", "No cached embeddings"),
                           ("pages/sweep.py", "at least two models with cached embeddings")]:
        at = app(monkeypatch, tmp_path / "bare", page, dataset=seeded["source"])
        no_exception(at)
        assert expected in texts(at), page


def test_the_demo_is_one_click(monkeypatch, empty):
    """With a worker alive (registered through core.jobs), one click queues extract, evaluate and sweep
    of the four packaged models on the demo, and the dataset becomes the current one."""
    engine = db.make_engine(Workspace.open(empty).db_url)
    db.init_db(engine)
    jobs.register_worker(engine, "test-worker")
    at = app(monkeypatch, empty, "pages/start.py")
    at = at.button(key="start:demo").click().run()
    no_exception(at)
    queued = sorted(jobs.list_jobs(engine), key=lambda j: j.id)
    assert [j.kind for j in queued] == ["extract", "evaluate", "sweep"]
    assert all(j.params["dataset"] == "demo" and len(j.params["models"]) == 4 for j in queued)
    assert at.query_params["dataset"] in ("demo", ["demo"])
    assert any("Demo queued" in e.value for e in at.success)
    at = at.button(key="start:demo").click().run()  # a second click shares the same jobs
    assert len(jobs.list_jobs(engine)) == 3
    for job in queued:  # nothing left behind for a real worker
        jobs.request_cancel(engine, job.id)


def test_start_worker_launches_a_real_worker(monkeypatch, tmp_path):
    import os
    import signal
    import time
    from pages import context
    root = tmp_path / "worker-ws"
    monkeypatch.setenv("ENSEMBLE_WORKSPACE", str(root))
    pid = context.start_worker()
    engine = db.make_engine(Workspace.open(root).db_url)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            db.init_db(engine)
            if jobs.worker_alive(engine):
                break
            time.sleep(0.5)
        assert jobs.worker_alive(engine)
    finally:
        os.kill(pid, signal.SIGTERM)


def test_a_reload_keeps_the_explorer_state_from_the_url(monkeypatch, seeded):
    at = app(monkeypatch, seeded["workspace"].root, "pages/query_explorer.py", dataset=seeded["source"])
    at.multiselect(key="explorer:methods").set_value(list(reversed(at.multiselect(key="explorer:methods").options))[:3])
    at.number_input(key="explorer:k").set_value(4)
    at.button(key="explorer:pick:10").click().run()
    chosen = at.multiselect(key="explorer:methods").value
    url = {key: at.query_params[key] for key in ("dataset", "query", "methods", "k")}
    reloaded = app(monkeypatch, seeded["workspace"].root, "pages/query_explorer.py", **url)
    no_exception(reloaded)
    assert reloaded.multiselect(key="explorer:methods").value == chosen
    assert reloaded.number_input(key="explorer:k").value == 4
    assert any(s.value.startswith("Query #10") for s in reloaded.subheader)


def test_the_dataset_survives_a_restart_through_the_db(monkeypatch, seeded):
    """No ?dataset= and a new session: the most recently used dataset in the DB is the current one."""
    at = app(monkeypatch, seeded["workspace"].root, "pages/leaderboard.py")
    no_exception(at)
    assert at.query_params["dataset"] in (seeded["source"], [seeded["source"]])
    assert at.query_params["k"] in (str(K), [str(K)])


def test_a_running_job_shows_progress_and_can_be_cancelled(monkeypatch, tmp_path, seeded):
    root = tmp_path / "busy"
    engine = db.make_engine(Workspace.open(root).db_url)
    db.init_db(engine)
    job = jobs.submit(engine, "extract", {"dataset": seeded["source"], "models": ["random:test_vit"]})
    jobs.claim(engine, "test-worker")
    jobs.report_progress(engine, job.id, 0.4, "random:test_vit: 8/24 images", worker_id="test-worker")
    at = app(monkeypatch, root, "pages/data.py", dataset=seeded["source"])
    no_exception(at)
    bars = [p for p in at.get("progress")]
    assert bars and abs(bars[0].value - 40) <= 1 or abs(bars[0].value - 0.4) < 1e-6
    at = at.button(key=f"data:jobs:cancel:{job.id}").click().run()
    no_exception(at)
    assert jobs.get_job(engine, job.id).cancel_requested


def test_fusion_page_shows_live_curves_and_stops_training(monkeypatch, tmp_path, seeded):
    root = tmp_path / "training"
    engine = db.make_engine(Workspace.open(root).db_url)
    db.init_db(engine)
    job = jobs.submit(engine, "train_head", {"dataset": seeded["source"], "models": MODELS, "head": {"epochs": 9}})
    jobs.claim(engine, "test-worker")
    with db.begin_immediate(engine) as s:
        run = db.start_run(s, kind="train_head", title="mlp", job_id=job.id)
        for epoch, loss in enumerate([2.0, 1.5, 1.2], start=1):
            db.add_curve_point(s, run.id, epoch, {"epoch": epoch, "loss": loss, "val_map": 0.1 * epoch,
                                                  "eval_map": 0.09 * epoch})
    at = app(monkeypatch, root, "pages/fusion.py", dataset=seeded["source"])
    no_exception(at)
    assert any(m.value.startswith(f"**Live: job {job.id}**") for m in at.markdown)
    assert len(at.get("plotly_chart")) == 1
    assert "No trained heads on this dataset yet" in texts(at)
    at = at.button(key=f"fusion:stop:{job.id}").click().run()
    no_exception(at)
    assert jobs.get_job(engine, job.id).cancel_requested


def test_fusion_form_queues_a_head_with_core_defaults(monkeypatch, tmp_path, seeded):
    from core.heads import HeadConfig
    root = tmp_path / "train"
    at = app(monkeypatch, root, "pages/fusion.py", dataset=seeded["source"])
    # this workspace has no cached embeddings: the form offers no models and says so on submit
    at = next(b for b in at.button if b.label == "Train head").click().run()
    no_exception(at)
    assert any("Choose at least one model" in w.value for w in at.warning)
    at = app(monkeypatch, seeded["workspace"].root, "pages/fusion.py", dataset=seeded["source"])
    assert at.selectbox(key="fusion:kind").value == HeadConfig().kind
    at.number_input(key="fusion:epochs").set_value(3)
    at = next(b for b in at.button if b.label == "Train head").click().run()
    no_exception(at)
    engine = db.make_engine(seeded["workspace"].db_url)
    job = jobs.list_jobs(engine, kind="train_head")[0]
    assert job.params["head"]["epochs"] == 3 and job.params["models"] == MODELS
    jobs.request_cancel(engine, job.id)
