"""The leaderboard read from a real runs DB: which results make the board, gains, promotion, sweep ratio classes."""
from __future__ import annotations

import pytest

from core import db
from core import leaderboard as lb

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
        db.finish_run(s, ev.id, [{"method": A, "metrics": metrics(0.50)}, {"method": B, "metrics": metrics(0.40)},
                                 {"method": A, "metrics": metrics(0.55, k=5)}])
        sw = db.start_run(s, kind="sweep", dataset_id=d.id, config={"models": [A, B]})
        rows = []
        for w, value in [((1, 0), 0.50), ((0, 1), 0.40), ((1, 1), 0.58), ((2, 2), 0.58), ((2, 1), 0.60), ((1, 2), 0.45),
                         ((2, 0), 0.50)]:
            rows.append({"method": f"w{w}", "weights": list(w), "metrics": metrics(value), "is_oracle": True,
                         "extra": {"models": [A, B], "ratio": [x / max(w) for x in w]}})
        db.finish_run(s, sw.id, rows)
        head = db.start_run(s, kind="train_head", dataset_id=d.id)
        db.finish_run(s, head.id, [{"method": "mlp head", "metrics": metrics(0.62),
                                    "extra": {"models": [A, B], "head_path": "/heads/run-3"}}])
        failed = db.start_run(s, kind="evaluate", dataset_id=d.id)
        db.add_results(s, failed.id, [{"method": C, "metrics": metrics(0.99)}])
        db.fail_run(s, failed.id, "crashed")
    return engine


def test_board_has_singles_best_concat_per_subset_and_heads(engine):
    entries = lb.entries_for_dataset(engine, "fp")
    assert lb.available_ks(entries) == [5, 10]
    board = lb.board(entries, 10)
    assert [(e.method, e.kind) for e in board] == [
        ("mlp head", "head"), ("w(2, 1)", "concat"), (A, "single"), (B, "single")]
    assert C not in {e.method for e in board}  # failed runs never count
    concat = board[1]
    assert concat.is_oracle and concat.used_models == (A, B)
    assert not board[2].is_oracle  # a model alone was not tuned


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
    weak = next(e for e in entries if e.method == "w(1, 2)")
    run_id = lb.promote(engine, weak.result_id)
    assert lb.promote(engine, weak.result_id) == run_id  # idempotent
    board = lb.board(lb.entries_for_dataset(engine, "fp"), 10)
    promoted = [e for e in board if e.promoted]
    assert [(e.method, e.kind, e.is_oracle) for e in promoted] == [("w(1, 2)", "concat", True)]
    assert len([e for e in board if e.method == "w(1, 2)"]) == 1


def test_promoting_the_best_row_replaces_it(engine):
    best = next(e for e in lb.entries_for_dataset(engine, "fp") if e.method == "w(2, 1)")
    lb.promote(engine, best.result_id)
    board = lb.board(lb.entries_for_dataset(engine, "fp"), 10)
    assert [e.promoted for e in board if e.method == "w(2, 1)"] == [True]


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
