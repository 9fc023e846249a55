"""The leaderboard read from a real runs DB: which results make the board, gains, promotion, sweep ratio classes."""
from __future__ import annotations

import pytest

from core import db
from core import leaderboard as lb
from core.methods import Method

A, B, C = "model_a", "model_b", "model_c"


def metrics(value: float, k: int = 10) -> dict:
    return {"map@k": value, "map@k_hits": value + 0.01, "map@r": value - 0.01, "p@1": value + 0.02, "k": k,
            "n_queries": 30, "n_excluded": 0}


@pytest.fixture
def engine(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    db.init_db(engine)
    with db.begin_immediate(engine) as s:
        d = db.record_dataset(s, name="toy", source="toy", fingerprint="fp", n_images=30, n_classes=3)
        ev = db.start_run(s, kind="evaluate", dataset_id=d.id)
        db.finish_run(s, ev.id, [{"method": Method.single(A), "metrics": metrics(0.50)},
                                 {"method": Method.single(B), "metrics": metrics(0.40)},
                                 {"method": Method.single(A), "metrics": metrics(0.55, k=5)}])
        sw = db.start_run(s, kind="sweep", dataset_id=d.id, config={"models": [A, B]})
        rows = []
        for w, value in [((1, 0), 0.50), ((0, 1), 0.40), ((1, 1), 0.58), ((2, 2), 0.58), ((2, 1), 0.60), ((1, 2), 0.45),
                         ((2, 0), 0.50)]:
            method = Method.concat([A, B], w, label=f"w{w}")
            rows.append({"method": method, "metrics": metrics(value),
                         "selected_on": "eval" if method.kind == "concat" else "none", "extra": {"vector": list(w)}})
        db.finish_run(s, sw.id, rows)
        head = db.start_run(s, kind="train_head", dataset_id=d.id)
        db.finish_run(s, head.id, [{"method": Method.head([A, B], "/heads/run-3", "mlp head"),
                                    "metrics": metrics(0.62), "selected_on": "validation"}])
        failed = db.start_run(s, kind="evaluate", dataset_id=d.id)
        db.add_results(s, failed.id, [{"method": Method.single(C), "metrics": metrics(0.99)}])
        db.fail_run(s, failed.id, "crashed")
    return engine


def test_board_has_singles_best_concat_per_subset_and_heads(engine):
    entries = lb.entries_for_dataset(engine, "fp")
    assert lb.available_ks(entries) == [5, 10]
    board = lb.board(entries, 10)
    assert [(e.label, e.kind) for e in board] == [
        ("mlp head", "head"), ("w(2, 1)", "concat"), (A, "single"), (B, "single")]
    assert C not in {e.label for e in board}  # failed runs never count
    concat = board[1]
    assert concat.is_oracle and concat.method.used_models == (A, B)
    assert not board[2].is_oracle  # a model alone was not tuned


def test_headline_separates_the_honest_ensemble_from_the_oracle(engine):
    head = lb.headline(lb.entries_for_dataset(engine, "fp"), 10)
    assert head.best_single.label == A
    assert head.best_ensemble.label == "mlp head" and not head.best_ensemble.is_oracle
    assert head.best_oracle.label == "w(2, 1)" and head.best_oracle.is_oracle
    assert head.gain(head.best_ensemble) == pytest.approx(0.62 - 0.50)
    assert head.gain(head.best_oracle) == pytest.approx(0.60 - 0.50)


def test_an_old_runs_db_is_upgraded_with_every_row_kept(tmp_path):
    """A DB with the first release's results table (no method columns) opens, and its rows read as methods."""
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE datasets (id INTEGER PRIMARY KEY, name VARCHAR(200), source TEXT, fingerprint VARCHAR(128) UNIQUE,
            n_images INTEGER, n_classes INTEGER, n_skipped INTEGER, created DATETIME);
        CREATE TABLE runs (id INTEGER PRIMARY KEY, kind VARCHAR(32), title TEXT, config JSON, status VARCHAR(16),
            started DATETIME, finished DATETIME, duration_s FLOAT, dataset_id INTEGER, error TEXT, job_id INTEGER);
        CREATE TABLE results (id INTEGER PRIMARY KEY, run_id INTEGER, method TEXT, weights JSON, metrics JSON,
            split VARCHAR(32), is_oracle BOOLEAN, extra JSON);
        INSERT INTO datasets VALUES (1, 'toy', 'toy', 'fp', 30, 3, 0, '2026-01-01 00:00:00');
        INSERT INTO runs VALUES (1, 'evaluate', '', '{}', 'done', '2026-01-01 00:00:00', NULL, NULL, 1, NULL, NULL);
        INSERT INTO runs VALUES (2, 'sweep', '', '{}', 'done', '2026-01-01 00:00:01', NULL, NULL, 1, NULL, NULL);
        INSERT INTO runs VALUES (3, 'train_head', '', '{}', 'done', '2026-01-01 00:00:02', NULL, NULL, 1, NULL, NULL);
        INSERT INTO results VALUES (1, 1, 'model_a', NULL, '{"map@k": 0.5, "k": 10}', 'eval', 0, NULL);
        INSERT INTO results VALUES (2, 2, 'a(2)+b(1)', '[2, 1]', '{"map@k": 0.6, "k": 10}', 'eval', 1,
            '{"models": ["model_a", "model_b"]}');
        INSERT INTO results VALUES (3, 2, 'model_b', '[0, 3]', '{"map@k": 0.4, "k": 10}', 'eval', 1,
            '{"models": ["model_a", "model_b"]}');
        INSERT INTO results VALUES (4, 3, 'mlp head', NULL, '{"map@k": 0.7, "k": 10}', 'eval', 0,
            '{"models": ["model_a", "model_b"], "head_path": "/h/run-3"}');
    """)
    con.close()
    engine = db.make_engine(f"sqlite:///{path}")
    db.init_db(engine)
    db.init_db(engine)  # a second open finds nothing to do
    got = {e.result_id: (e.kind, e.method.models, e.method.weights, e.method.head_path, e.selected_on)
           for e in lb.entries_for_dataset(engine, "fp")}
    assert got == {
        1: ("single", ("model_a",), None, None, "none"),
        2: ("concat", ("model_a", "model_b"), (2.0, 1.0), None, "eval"),
        3: ("single", ("model_b",), None, None, "none"),
        4: ("head", ("model_a", "model_b"), None, "/h/run-3", "validation"),
    }
    sweep = next(r for r in lb.runs_for_dataset(engine, "fp", "sweep"))
    _, swept = lb.run_results(engine, sweep.id)
    assert [r["same as"] for r in lb.sweep_rows(swept, ["model_a", "model_b"])] == ["", ""]
    assert {e.extra["vector"][1] for e in swept} == {1, 3}  # each row's weights as swept


def test_rows_measure_gain_over_the_best_single_model(engine):
    table = lb.rows(lb.board(lb.entries_for_dataset(engine, "fp"), 10))
    by_method = {r["method"]: r for r in table}
    assert by_method["mlp head"]["gain"] == pytest.approx(0.12)
    assert by_method["w(2, 1)"]["gain_%"] == pytest.approx(20.0)
    assert by_method[A]["gain"] == pytest.approx(0.0)
    assert list(table[0]) == list(lb.COLUMNS)


def test_reference_layout_best_of_each_size(engine):
    table = lb.best_by_model_count(lb.entries_for_dataset(engine, "fp"), 10)
    assert [(r["models in ensemble"], r["method"]) for r in table] == [(1, A), (2, "w(2, 1)")]
    assert table[1]["gain"] == pytest.approx(0.10)


def test_promoting_a_sweep_row_puts_it_on_the_board_once(engine):
    entries = lb.entries_for_dataset(engine, "fp")
    weak = next(e for e in entries if e.label == "w(1, 2)")
    run_id = lb.promote(engine, weak.result_id)
    assert lb.promote(engine, weak.result_id) == run_id  # idempotent
    board = lb.board(lb.entries_for_dataset(engine, "fp"), 10)
    promoted = [e for e in board if e.promoted]
    assert [(e.label, e.kind, e.is_oracle) for e in promoted] == [("w(1, 2)", "concat", True)]
    assert len([e for e in board if e.label == "w(1, 2)"]) == 1


def test_promoting_the_best_row_replaces_it(engine):
    best = next(e for e in lb.entries_for_dataset(engine, "fp") if e.label == "w(2, 1)")
    lb.promote(engine, best.result_id)
    board = lb.board(lb.entries_for_dataset(engine, "fp"), 10)
    assert [e.promoted for e in board if e.label == "w(2, 1)"] == [True]


def test_promoting_a_missing_result_says_so(engine):
    with pytest.raises(ValueError, match="does not exist"):
        lb.promote(engine, 12345)


def test_sweep_rows_mark_ratio_equivalent_weights(engine):
    sweep = next(r for r in lb.runs_for_dataset(engine, "fp", "sweep"))
    run, entries = lb.run_results(engine, sweep.id)
    table = lb.sweep_rows(entries, run.config["models"])
    assert [r["rank"] for r in table] == list(range(1, 8))
    by_weights = {(r[f"w:{A}"], r[f"w:{B}"]): r for r in table}
    assert by_weights[(2, 2)]["same as"] == "1, 1"
    assert by_weights[(1, 1)]["same as"] == ""
    assert by_weights[(2, 2)]["ratio class"] == by_weights[(1, 1)]["ratio class"]
    assert by_weights[(1, 0)]["method"] == A and by_weights[(1, 0)]["same as"] == ""
    assert by_weights[(2, 0)]["method"] == A and by_weights[(2, 0)]["same as"] == "1, 0"


def test_markdown_export():
    text = lb.to_markdown([{"method": "a|b", "map@k": 0.5}, {"method": "c", "map@k": float("nan")}])
    assert text.splitlines() == ["| method | map@k |", "|---|---|", "| a\\|b | 0.5000 |", "| c |  |"]


def test_pareto_front_and_best_under_a_budget(engine):
    entries = lb.board(lb.entries_for_dataset(engine, "fp"), 10)  # head .62, w(2,1) .60, A .50, B .40
    costs = {A: (0.02, 1280), B: (0.01, 1024)}
    front = lb.pareto_front(entries, costs)
    # B is cheapest; A beats it for more; the concat and the head (both A+B: 0.03 s) — only the better one stays
    assert [e.label for e in front] == [B, A, "mlp head"]
    assert lb.method_cost(front[-1], costs) == lb.Cost(pytest.approx(0.03), 2304)
    assert lb.best_under_budget(entries, costs, 0.02).label == A
    assert lb.best_under_budget(entries, costs, 0.005) is None
    assert lb.best_under_budget(entries, {A: (None, 1280), B: (0.01, 1024)}, 0.05).label == B  # unmeasured A
    assert lb.best_under_budget(entries, costs, 2304, by="dims").label == "mlp head"
