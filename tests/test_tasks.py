"""Job handlers through `run_job`: typed settings, results stored as methods, runs never left "running"."""
from __future__ import annotations

import numpy as np
import pytest

from core import db
from core.configs import ConfigError, EvaluateConfig, SweepConfig, TrainHeadConfig
from core.progress import JobCancelled, Reporter, SILENT
from core.tasks import UnknownJobKind, run_job
from core.workspace import Workspace
from tests.images import write_image

MODELS = ["random:test_efficientnet", "random:test_resnet"]


def split_folder(root, train_per_class=8, eval_per_class=4):
    """root/{train,eval}/<class>/*.png: two classes of generated images, train and eval kept apart."""
    for split, n in (("train", train_per_class), ("eval", eval_per_class)):
        for c, name in enumerate(["dark", "light"]):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", seed=1000 * c + 100 * (split == "eval") + i)
    return root


@pytest.fixture
def engine(tmp_path):
    workspace = Workspace.open(tmp_path / "ws")
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    return workspace, engine


def runs(engine):
    with db.read_session(engine) as session:
        return db.list_runs(session)


def test_unknown_settings_and_kinds_fail_before_any_run(engine, tmp_path):
    workspace, eng = engine
    with pytest.raises(ConfigError, match="unknown sweep settings"):
        run_job("sweep", {"dataset": "demo", "weightz": [1]}, SILENT, workspace, eng)
    with pytest.raises(ConfigError, match="weight"):
        run_job("sweep", {"dataset": "demo", "weights": [1e20, 1]}, SILENT, workspace, eng)
    with pytest.raises(UnknownJobKind):
        run_job("transmogrify", {}, SILENT, workspace, eng)
    assert runs(eng) == []


def test_a_failing_handler_closes_its_run(engine, tmp_path):
    workspace, eng = engine
    folder = split_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="choose k of at most"):
        run_job("evaluate", EvaluateConfig(dataset=str(folder), models=MODELS, k=500).to_dict(), SILENT, workspace, eng)
    (run,) = runs(eng)
    assert run.status == "failed" and "k=500" in run.error


def test_sweep_results_carry_their_method_and_how_it_was_chosen(engine, tmp_path):
    workspace, eng = engine
    folder = split_folder(tmp_path / "images")
    config = SweepConfig(dataset=str(folder), models=MODELS, k=3, weights=(0, 1, 2), device="cpu")
    run_id = run_job("sweep", config.to_dict(), SILENT, workspace, eng)
    with db.read_session(eng) as session:
        results = db.get_run(session, run_id).results
    assert len(results) == 3 * 3 - 1
    for r in results:
        used = [m for m, w in zip(MODELS, r.extra["vector"]) if w]
        if len(used) == 1:  # one model alone: nothing was tuned
            assert (r.kind, r.models, r.selected_on, r.is_oracle) == ("single", used, "none", False)
        else:
            assert (r.kind, r.models, r.weights, r.selected_on, r.is_oracle) == (
                "concat", MODELS, r.extra["vector"], "eval", True)


def test_head_job_records_curve_result_and_resumes_after_cancel(engine, tmp_path):
    workspace, eng = engine
    config = TrainHeadConfig(
        dataset=str(split_folder(tmp_path / "images")), models=MODELS, k=3, device="cpu",
        head={"kind": "mlp", "out_dim": 8, "hidden_dim": 16, "loss": "normalized_softmax", "epochs": 3,
              "batch_size": 4, "val_fraction": 0.25, "patience": 3},
    )
    seen = []
    with pytest.raises(JobCancelled):
        run_job("train_head", config.to_dict(), Reporter(on_metrics=seen.append, is_cancelled=lambda: len(seen) >= 1),
                workspace, eng)
    assert [r.status for r in runs(eng)] == ["cancelled"]
    checkpoint_files = [p for p in (workspace.heads / "checkpoints").rglob("*") if p.is_file()]
    assert checkpoint_files  # epoch 1 is kept for the resume

    run_id = run_job("train_head", config.to_dict(), Reporter(on_metrics=seen.append), workspace, eng)
    assert [row["epoch"] for row in seen] == [1, 2, 3]  # resumed after epoch 1, not restarted
    with db.read_session(eng) as session:
        run = db.get_run(session, run_id)
        (result,) = run.results
        curve = [p.values["epoch"] for p in db.curve(session, run_id)]
    assert run.status == "done" and run.kind == "train_head" and curve == [2, 3]
    assert (result.kind, result.models, result.selected_on, result.is_oracle) == ("head", MODELS, "validation", False)
    assert result.metrics["n_queries"] == 8 and result.metrics["k"] == 3
    assert run.config["head"].get("k") is None  # one k per job: the head's early stopping uses the job's
    from core.heads import TrainedHead
    head = TrainedHead.load(result.head_path)
    assert head.model_names == MODELS and head.out_dim == 8 and head.config.k == 3
    assert np.isfinite(head.best_val)
    assert not [p for p in (workspace.heads / "checkpoints").rglob("*") if p.is_file()]  # nothing left to resume


def test_honest_headline_with_per_query_scores_and_paired_interval(engine, tmp_path):
    """evaluate + sweep (oracle) + select_weights (chosen on train) -> the headline's ensemble is the
    train-selected one, its per-query scores are stored and its interval is computed from them."""
    from core import leaderboard as lb
    from core.configs import SelectWeightsConfig
    from core.scores import load_query_scores
    from core.stats import paired_difference

    workspace, eng = engine
    common = {"dataset": str(split_folder(tmp_path / "images", 8, 8)), "models": MODELS, "k": 3, "device": "cpu"}
    for config in (EvaluateConfig(**common), SweepConfig(**common, weights=(0, 1, 2)), SelectWeightsConfig(**common, weights=(0, 1, 2))):
        run_job(config.kind, config.to_dict(), SILENT, workspace, eng)
    with db.read_session(eng) as session:
        fingerprint = db.list_datasets(session)[0].fingerprint
    entries = lb.entries_for_dataset(eng, fingerprint)
    head = lb.headline(entries, 3, workspace=workspace)
    assert head.best_ensemble.run_kind == "select_weights" and head.best_ensemble.selected_on == "train"
    assert head.best_oracle.is_oracle and head.best_oracle.run_kind == "sweep"
    a = load_query_scores(workspace, head.best_ensemble.result_id)
    b = load_query_scores(workspace, head.best_single.result_id)
    # the stored per-query scores average to the stored metric, and the interval is theirs
    assert np.nanmean(a.ap_at_k) == pytest.approx(head.best_ensemble.score("map@k"), abs=1e-6)
    want = paired_difference(a.ap_at_k, b.ap_at_k)
    assert head.ensemble_vs_single == want
    assert head.ensemble_vs_single["n"] == 16
    text = lb.headline_text(head)
    assert "chosen on train" in text and "oracle (tuned on eval)" in text and "95 % CI" in text


def test_class_disjoint_protocol_keeps_eval_classes_out_of_training(engine, tmp_path):
    from core.datasets import open_dataset

    workspace, eng = engine
    root = tmp_path / "classes"
    for c, name in enumerate(["ant", "bee", "cat", "dog", "eel"]):
        for i in range(6):
            write_image(root / name / f"{i}.png", seed=100 * c + i)
    imageset = open_dataset(str(root), workspace)
    train_rows, eval_rows = imageset.protocol_rows("class")
    names = np.array(imageset.class_names)
    assert set(names[imageset.labels[train_rows]]) == {"ant", "bee"}
    assert set(names[imageset.labels[eval_rows]]) == {"cat", "dog", "eel"}
    config = EvaluateConfig(dataset=str(root), models=MODELS[:1], k=3, device="cpu", protocol="class")
    run_id = run_job("evaluate", config.to_dict(), SILENT, workspace, eng)
    with db.read_session(eng) as session:
        (result,) = db.get_run(session, run_id).results
    assert result.split == "eval-new-classes" and result.metrics["n_queries"] == 18


@pytest.mark.parametrize("method, kind", [("rrf", "rank"), ("max", "rank"), ("combsum", "rank"), ("qe", "qe"),
                                          ("dba", "dba")])
def test_every_fusion_method_is_a_job_scored_from_its_ranking(engine, tmp_path, method, kind):
    """A fuse job's stored metrics equal the float64 metrics of the ranking its method produces."""
    from core.cache import EmbeddingCache
    from core.configs import FuseConfig
    from core.datasets import open_dataset
    from core.extract import extract_embeddings
    from core.leaderboard import entries_for_dataset
    from core.methods import Method
    from tests.reference import metrics_from_similarities

    workspace, eng = engine
    folder = split_folder(tmp_path / "images", 4, 8)
    config = FuseConfig(dataset=str(folder), models=MODELS, k=3, device="cpu", method=method)
    run_id = run_job("fuse", config.to_dict(), SILENT, workspace, eng)
    with db.read_session(eng) as session:
        (result,) = db.get_run(session, run_id).results
    stored = Method.from_result(result)
    assert (stored.kind, result.selected_on, result.is_oracle) == (kind, "none", False)
    assert stored.exportable is False if kind != "dba" else stored.yields_embedding
    imageset = open_dataset(str(folder), workspace)
    sets = extract_embeddings(imageset, MODELS, EmbeddingCache(workspace.embeddings))
    rows = imageset.split("eval")
    labels = imageset.labels[rows]
    depth = max(3, int(max((labels == label).sum() - 1 for label in labels)))  # exact for map@k and map@R
    ranking = stored.ranking({m: sets[m].load() for m in MODELS}, rows, depth)
    # the ranking as similarities (earlier = higher; the unranked rest below it), so the reference ranks it the same way
    sims = np.full((len(rows), len(rows)), -1e9)
    for q, order in enumerate(ranking):
        sims[q, order] = -np.arange(len(order), dtype=float)
        sims[q, q] = -np.inf
    want = metrics_from_similarities(sims, labels, 3)
    for key in ("map@k", "map@k_hits", "map@r", "p@1"):
        assert result.metrics[key] == pytest.approx(want[key], abs=1e-9), key
    assert [e.kind for e in entries_for_dataset(eng, imageset.fingerprint)] == [kind]


def test_greedy_selection_job_keeps_its_path_and_complementarity_job_its_summary(engine, tmp_path):
    from core.configs import ComplementarityConfig, SelectWeightsConfig

    workspace, eng = engine
    common = {"dataset": str(split_folder(tmp_path / "images", 8, 6)), "models": MODELS, "k": 3, "device": "cpu"}
    run_id = run_job("select_weights", SelectWeightsConfig(**common, search="greedy", max_steps=4).to_dict(), SILENT,
                     workspace, eng)
    with db.read_session(eng) as session:
        (result,) = db.get_run(session, run_id).results
    path = result.extra["path"]
    assert result.selected_on == "train" and 1 <= len(path["greedy"]) <= 4 and path["refined"]
    assert max(step["map@k"] for step in path["greedy"]) <= result.extra["train_metrics"]["map@k"] + 1e-12
    run_id = run_job("complementarity", ComplementarityConfig(**common).to_dict(), SILENT, workspace, eng)
    with db.read_session(eng) as session:
        summary = db.get_run(session, run_id).summary
    assert summary["models"] == MODELS and summary["split"] == "eval"
    assert len(summary["cka"]) == 2 and summary["cka"][0][0] == pytest.approx(1.0)


def test_eval_only_jobs_score_the_same_queries_and_extraction_records_each_models_cost(engine, tmp_path):
    workspace, eng = engine
    common = {"dataset": str(split_folder(tmp_path / "images", 4, 6)), "models": MODELS[:1], "device": "cpu"}
    first = run_job("evaluate", EvaluateConfig(**common, k=3, eval_only=True).to_dict(), SILENT, workspace, eng)
    full = run_job("evaluate", EvaluateConfig(**common, k=3).to_dict(), SILENT, workspace, eng)
    with db.read_session(eng) as session:
        a, b = (db.get_run(session, r).results[0] for r in (first, full))
    assert a.metrics == pytest.approx(b.metrics) and a.metrics["n_queries"] == 12
    from core.configs import ExtractConfig

    run_job("extract", ExtractConfig(**common).to_dict(), SILENT, workspace, eng)
    with db.read_session(eng) as session:
        (row,) = db.embedding_sets_for_dataset(session, db.list_datasets(session)[0].fingerprint)
    assert row.n == 20 and row.seconds_per_image > 0 and row.device.startswith("cpu")
    with pytest.raises(ConfigError, match="eval_only"):
        TrainHeadConfig(**common, eval_only=True)


def test_map_job_draws_cached_embeddings_only_and_keeps_the_map(engine, tmp_path):
    from core.cache import EmbeddingCache, files_state
    from core.configs import MapConfig
    from core.datasets import open_dataset
    from core.extract import MissingEmbeddings, query_arrays
    from core.methods import Method
    from core.projection import load_map, map_key

    workspace, eng = engine
    folder = str(split_folder(tmp_path / "images", 4, 6))
    method = Method.single(MODELS[0])
    params = MapConfig(dataset=folder, method=method, projection="pca", max_points=100).to_dict()
    with pytest.raises(MissingEmbeddings, match="Extract them"):  # a map never starts an extraction
        run_job("embedding_map", params, SILENT, workspace, eng)
    assert not list(workspace.folder("maps").iterdir())
    # the first look's eval-only embeddings are enough
    run_job("evaluate", EvaluateConfig(dataset=folder, models=MODELS[:1], k=3, eval_only=True).to_dict(),
            SILENT, workspace, eng)
    seen = []
    assert run_job("embedding_map", params, Reporter(on_progress=lambda f, m: seen.append(f)), workspace, eng) is None
    imageset = open_dataset(folder, workspace)
    arrays, rows = query_arrays(EmbeddingCache(workspace.embeddings), imageset, [MODELS[0]])
    key = map_key(imageset.fingerprint, method.to_dict(), files_state(arrays), "pca", 100)
    positions, coords = load_map(workspace, key)
    assert list(positions) == list(range(12)) and coords.shape == (12, 2) and np.isfinite(coords).all()
    assert seen[-1] == 1.0
    assert len(runs(eng)) == 1  # the evaluation's: a map is a picture, not a run


@pytest.mark.parametrize("method, message", [
    ({"kind": "rank", "models": MODELS, "options": {"rule": "rrf"}}, "nothing to map"),
    ({"kind": "single", "models": MODELS}, "not a method"),
    ({"kind": "__import__('os')", "models": ["x"]}, "not a method"),
    ("rm -rf /", "needs the method"),
    (None, "needs the method"),
])
def test_map_settings_reject_what_cannot_be_drawn(method, message):
    from core.configs import MapConfig
    with pytest.raises(ConfigError, match=message):
        MapConfig.from_dict({"dataset": "demo", "method": method})
    with pytest.raises(ConfigError, match="max_points"):
        MapConfig.from_dict({"dataset": "demo", "method": {"kind": "single", "models": ["m"]}, "max_points": 10**9})
