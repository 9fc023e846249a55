"""The runs database on a real SQLite file: pragmas, write locking, and the functions pages call."""
from __future__ import annotations

import math
import sqlite3
import threading

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from core import db
from core.methods import Method


@pytest.fixture()
def engine(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    db.init_db(engine)
    yield engine
    engine.dispose()


def test_sqlite_connections_get_wal_busy_timeout_and_foreign_keys(engine):
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_MS
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_begin_immediate_takes_the_write_lock_before_the_first_write(engine, tmp_path):
    inside, release = threading.Event(), threading.Event()

    def hold():
        with db.begin_immediate(engine) as session:
            session.execute(text("SELECT 1"))  # a read only: a deferred BEGIN would hold no lock
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    other = sqlite3.connect(tmp_path / "runs.db", timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN")  # readers are not blocked (WAL)
        assert other.execute("SELECT count(*) FROM runs").fetchone() == (0,)
        other.execute("COMMIT")
    finally:
        release.set()
        holder.join()
        other.close()


def test_read_session_does_not_lock_writers(engine):
    with db.read_session(engine) as reader:
        assert db.list_runs(reader) == []
        with db.begin_immediate(engine) as writer:
            db.start_run(writer, kind="evaluate")
    # the writer committed while a reader's transaction was open, without waiting for it
    with db.read_session(engine) as reader:
        assert db.count_runs(reader) == 1


def test_init_db_twice_keeps_rows(engine):
    with db.begin_immediate(engine) as session:
        db.start_run(session, kind="extract")
    db.init_db(engine)
    with db.read_session(engine) as session:
        assert db.count_runs(session) == 1


def test_dataset_and_embedding_set_are_updated_by_their_keys(engine):
    with db.begin_immediate(engine) as s:
        first = db.record_dataset(s, name="demo", source="demo", fingerprint="fp1", n_images=10, n_classes=2)
        again = db.record_dataset(s, name="demo", source="demo", fingerprint="fp1", n_images=12, n_classes=3,
                                  n_skipped=1)
        assert again.id == first.id
        es = db.record_embedding_set(s, dataset_id=first.id, model_name="m", cache_key="k1", path="/a.npy",
                                     n=12, dim=8, dtype="float32")
        es2 = db.record_embedding_set(s, dataset_id=first.id, model_name="m", cache_key="k1", path="/b.npy",
                                      n=12, dim=8, dtype="float16")
        assert es2.id == es.id
        other = db.record_dataset(s, name="other", source="x", fingerprint="fp2", n_images=1, n_classes=1)
        same_model = db.record_embedding_set(s, dataset_id=other.id, model_name="m", cache_key="k1", path="/c.npy",
                                             n=1, dim=8, dtype="float32")
        assert same_model.id != es.id
        db.record_model(s, name="m", source="timm", dim=8)
        db.record_model(s, name="m")
    with db.read_session(engine) as s:
        ds = db.get_dataset(s, "fp1")
        assert (ds.n_images, ds.n_classes, ds.n_skipped) == (12, 3, 1)
        [row] = db.embedding_sets_for_dataset(s, "fp1")
        assert (row.path, row.dtype) == ("/b.npy", "float16")
        assert s.scalar(select(db.Model).where(db.Model.name == "m")).dim == 8
        assert {d.fingerprint for d in db.list_datasets(s)} == {"fp1", "fp2"}


def test_a_run_keeps_its_config_results_and_timing(engine):
    with db.begin_immediate(engine) as s:
        ds = db.record_dataset(s, name="demo", source="demo", fingerprint="fp", n_images=4, n_classes=2)
        run = db.start_run(s, kind="sweep", title="t", config={"k": 5, "models": ["a", "b"]}, dataset_id=ds.id)
    assert run.status == "running"
    with db.begin_immediate(engine) as s:
        db.finish_run(s, run.id, [
            {"method": Method.concat(["a", "b"], (3, 1)), "metrics": {"map@k": 0.5, "map@r": float("nan")},
             "selected_on": "eval"},
            {"method": Method.single("a"), "metrics": {"map@k": 0.4}},
        ])
    with db.read_session(engine) as s:
        got = db.get_run(s, run.id)
    assert got.status == "done" and got.duration_s >= 0 and got.finished >= got.started
    assert got.config == {"k": 5, "models": ["a", "b"]}
    assert [r.method for r in got.results] == ["a(3)+b(1)", "a"]
    assert got.results[0].weights == [3.0, 1.0] and got.results[0].is_oracle
    assert (got.results[0].kind, got.results[0].models, got.results[0].selected_on) == ("concat", ["a", "b"], "eval")
    assert got.results[0].metrics["map@r"] is None  # NaN is stored as null
    assert not got.results[1].is_oracle and got.results[1].split == "eval"


def test_list_runs_newest_first_by_kind_and_page(engine):
    with db.begin_immediate(engine) as s:
        ids = [db.start_run(s, kind="evaluate" if i % 2 else "sweep", title=str(i)).id for i in range(5)]
    with db.read_session(engine) as s:
        assert [r.id for r in db.list_runs(s)] == ids[::-1]
        assert [r.id for r in db.list_runs(s, "evaluate")] == [ids[3], ids[1]]
        assert [r.id for r in db.list_runs(s, limit=2, offset=1)] == [ids[3], ids[2]]
        assert db.count_runs(s, "sweep") == 3


def test_results_for_dataset_are_those_of_finished_runs(engine):
    with db.begin_immediate(engine) as s:
        ds = db.record_dataset(s, name="d", source="demo", fingerprint="fp", n_images=4, n_classes=2)
        other = db.record_dataset(s, name="e", source="demo", fingerprint="other", n_images=4, n_classes=2)
        done = db.start_run(s, kind="evaluate", dataset_id=ds.id)
        db.finish_run(s, done.id, [{"method": Method.single("a"), "metrics": {"map@k": 0.1}}])
        failed = db.start_run(s, kind="evaluate", dataset_id=ds.id)
        db.add_results(s, failed.id, [{"method": Method.single("b"), "metrics": {}}])
        db.fail_run(s, failed.id, "out of memory")
        elsewhere = db.start_run(s, kind="evaluate", dataset_id=other.id)
        db.finish_run(s, elsewhere.id, [{"method": Method.single("c"), "metrics": {}}])
    with db.read_session(engine) as s:
        assert [r.method for r in db.results_for_dataset(s, "fp")] == ["a"]
        assert db.get_run(s, failed.id).error == "out of memory"
        assert db.get_run(s, failed.id).status == "failed"


def test_curve_points_come_back_in_step_order(engine):
    with db.begin_immediate(engine) as s:
        run = db.start_run(s, kind="train_head")
        for step in (2, 0, 1):
            db.add_curve_point(s, run.id, step, {"loss": 1.0 / (step + 1), "map@k": math.nan})
    with db.read_session(engine) as s:
        points = db.curve(s, run.id)
    assert [p.step for p in points] == [0, 1, 2]
    assert points[0].values == {"loss": 1.0, "map@k": None}


def test_foreign_keys_are_enforced(engine):
    with pytest.raises(IntegrityError):
        with db.begin_immediate(engine) as s:
            db.add_results(s, 12345, [{"method": Method.single("orphan"), "metrics": {}}])


def test_deleting_a_run_deletes_its_results_and_curve(engine):
    with db.begin_immediate(engine) as s:
        run = db.start_run(s, kind="evaluate")
        db.finish_run(s, run.id, [{"method": Method.single("a"), "metrics": {}}])
        db.add_curve_point(s, run.id, 0, {"loss": 1})
    with db.begin_immediate(engine) as s:
        s.execute(text("DELETE FROM runs"))
    with db.read_session(engine) as s:
        assert s.execute(text("SELECT count(*) FROM results")).scalar() == 0
        assert s.execute(text("SELECT count(*) FROM run_curves")).scalar() == 0
