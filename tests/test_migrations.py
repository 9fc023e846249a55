"""Alembic migrations of the runs DB, on SQLite and on PostgreSQL: a new DB gets exactly core.db's tables, a
first-release DB (written here in raw SQL, rows in every table) is upgraded with every row kept and its method
columns read back from its rows, a SQLite file is copied first, concurrent openers migrate once."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, make_url, text

from core import db
from core import leaderboard as lb

ROOT = Path(__file__).resolve().parents[1]
HEAD = "0002"

# The first release's schema as it wrote it ({pk}, {ts}: the dialect's serial key and timestamp types).
FIRST_RELEASE = """
CREATE TABLE datasets (id {pk}, name VARCHAR(200) NOT NULL, source TEXT NOT NULL,
    fingerprint VARCHAR(128) NOT NULL UNIQUE, n_images INTEGER NOT NULL, n_classes INTEGER NOT NULL,
    n_skipped INTEGER NOT NULL, created {ts} NOT NULL);
CREATE TABLE models (id {pk}, name VARCHAR(200) NOT NULL UNIQUE, source TEXT NOT NULL, dim INTEGER);
CREATE TABLE embedding_sets (id {pk}, dataset_id INTEGER NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    model_name VARCHAR(200) NOT NULL, cache_key VARCHAR(256) NOT NULL, path TEXT NOT NULL, n INTEGER NOT NULL,
    dim INTEGER NOT NULL, dtype VARCHAR(32) NOT NULL, created {ts} NOT NULL,
    CONSTRAINT uq_embedding_sets_dataset_key UNIQUE (dataset_id, cache_key));
CREATE TABLE jobs (id {pk}, kind VARCHAR(32) NOT NULL, params JSON NOT NULL, params_hash VARCHAR(64) NOT NULL,
    status VARCHAR(16) NOT NULL, progress FLOAT NOT NULL, message TEXT NOT NULL, attempts INTEGER NOT NULL,
    worker_id VARCHAR(200), heartbeat_at {ts}, cancel_requested BOOLEAN NOT NULL, error TEXT, run_id INTEGER,
    created {ts} NOT NULL, started {ts}, finished {ts});
CREATE TABLE runs (id {pk}, kind VARCHAR(32) NOT NULL, title TEXT NOT NULL, config JSON NOT NULL,
    status VARCHAR(16) NOT NULL, started {ts} NOT NULL, finished {ts}, duration_s FLOAT,
    dataset_id INTEGER REFERENCES datasets (id) ON DELETE SET NULL, error TEXT,
    job_id INTEGER REFERENCES jobs (id) ON DELETE SET NULL);
CREATE TABLE results (id {pk}, run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE, method TEXT NOT NULL,
    weights JSON, metrics JSON NOT NULL, split VARCHAR(32) NOT NULL, is_oracle BOOLEAN NOT NULL, extra JSON);
CREATE TABLE run_curves (id {pk}, run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step INTEGER NOT NULL, "values" JSON NOT NULL, created {ts} NOT NULL);
CREATE TABLE workers (id VARCHAR(200) PRIMARY KEY, host VARCHAR(200) NOT NULL, pid INTEGER NOT NULL, kinds JSON,
    started {ts} NOT NULL, heartbeat_at {ts} NOT NULL, current_job_id INTEGER, stopped {ts});
INSERT INTO datasets VALUES (1, 'toy', '/data/toy', 'fp', 30, 3, 1, '2026-01-01 00:00:00');
INSERT INTO models VALUES (1, 'model_a', 'timm', 64);
INSERT INTO embedding_sets VALUES (1, 1, 'model_a', 'key-a', '/cache/a.npy', 30, 64, 'float32', '2026-01-01 00:00:00');
INSERT INTO jobs VALUES (1, 'evaluate', '{{"k": 10}}', 'hash1', 'done', 1.0, 'done', 1, 'w1', NULL, {false}, NULL, 1,
    '2026-01-01 00:00:00', NULL, NULL);
INSERT INTO runs VALUES (1, 'evaluate', 'evaluate 1 model', '{{}}', 'done', '2026-01-01 00:00:00', NULL, 2.5, 1, NULL, 1);
INSERT INTO runs VALUES (2, 'sweep', '', '{{}}', 'done', '2026-01-01 00:00:01', NULL, NULL, 1, NULL, NULL);
INSERT INTO runs VALUES (3, 'train_head', '', '{{}}', 'done', '2026-01-01 00:00:02', NULL, NULL, 1, NULL, NULL);
INSERT INTO results VALUES (1, 1, 'model_a', NULL, '{{"map@k": 0.5, "k": 10}}', 'eval', {false}, NULL);
INSERT INTO results VALUES (2, 2, 'a(2)+b(1)', '[2, 1]', '{{"map@k": 0.6, "k": 10}}', 'eval', {true},
    '{{"models": ["model_a", "model_b"]}}');
INSERT INTO results VALUES (3, 2, 'model_b', '[0, 3]', '{{"map@k": 0.4, "k": 10}}', 'eval', {true},
    '{{"models": ["model_a", "model_b"]}}');
INSERT INTO results VALUES (4, 3, 'mlp head', NULL, '{{"map@k": 0.7, "k": 10}}', 'eval', {false},
    '{{"models": ["model_a", "model_b"], "head_path": "/h/run-3"}}');
INSERT INTO run_curves VALUES (1, 3, 0, '{{"epoch": 0, "loss": 1.5}}', '2026-01-01 00:00:03');
INSERT INTO workers VALUES ('w1', 'host', 123, NULL, '2026-01-01 00:00:00', '2026-01-01 00:00:09', NULL, NULL);
"""
# The method of each first-release result, worked out by hand from its run kind, weights and extra.
EXPECTED_METHODS = {
    1: ("single", ["model_a"], None, None, "none"),
    2: ("concat", ["model_a", "model_b"], [2, 1], None, "eval"),
    3: ("single", ["model_b"], None, None, "none"),
    4: ("head", ["model_a", "model_b"], None, "/h/run-3", "validation"),
}
UNTOUCHED_RESULT_COLUMNS = "id, run_id, method, metrics, split, is_oracle"
ADDED_COLUMNS = {"summary", "seconds_per_image", "device"}  # of runs and embedding_sets, after the first release


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    """An empty database: a SQLite file, or a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'runs.db'}"
        return
    server = make_url(request.getfixturevalue("postgres_url"))
    name = f"migrations_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def engines():
    made = []

    def make(url: str):
        made.append(db.make_engine(url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


def write_first_release(engine) -> None:
    sqlite = engine.dialect.name == "sqlite"
    script = FIRST_RELEASE.format(pk="INTEGER PRIMARY KEY" if sqlite else "SERIAL PRIMARY KEY",
                                  ts="DATETIME" if sqlite else "TIMESTAMP",
                                  true="1" if sqlite else "TRUE", false="0" if sqlite else "FALSE")
    with engine.begin() as connection:
        for statement in filter(str.strip, script.split(";")):
            connection.exec_driver_sql(statement)


def rows(engine, table: str, columns: str = "*") -> list[dict]:
    with engine.connect() as connection:
        return [dict(r._mapping) for r in connection.execute(text(f"SELECT {columns} FROM {table} ORDER BY id"))]


def first_release_rows(engine) -> dict[str, list[dict]]:
    """Every row, in the first release's columns (of results: those the upgrade must not touch)."""
    tables = ("datasets", "models", "embedding_sets", "jobs", "runs", "run_curves", "workers")
    with engine.connect() as connection:
        old = {t: [c["name"] for c in inspect(connection).get_columns(t) if c["name"] not in ADDED_COLUMNS] for t in tables}
    return {**{t: rows(engine, t, ", ".join(f'"{c}"' for c in old[t])) for t in tables},
            "results": rows(engine, "results", UNTOUCHED_RESULT_COLUMNS)}


def schema_differences(engine) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), db.Base.metadata)


def backups(url: str) -> list[Path]:
    path = make_url(url).database
    return sorted(Path(path).parent.glob(Path(path).name + ".bak-*")) if make_url(url).drivername == "sqlite" else []


def test_a_new_database_gets_exactly_the_tables_of_core_db(url, engines):
    engine = engines(url)
    assert db.init_db(engine) is None  # nothing existed: nothing to report
    assert db.schema_revision(engine) == HEAD
    assert schema_differences(engine) == []
    assert db.init_db(engine) is None and backups(url) == []


def test_a_first_release_database_is_upgraded_with_every_row_kept(url, engines):
    engine = engines(url)
    write_first_release(engine)
    before = first_release_rows(engine)

    message = db.init_db(engine)

    assert db.schema_revision(engine) == HEAD
    assert first_release_rows(engine) == before
    methods = {r["id"]: (r["kind"], _json(r["models"]), _json(r["weights"]), r["head_path"], r["selected_on"])
               for r in rows(engine, "results")}
    assert methods == EXPECTED_METHODS
    assert [_json(r["extra"]).get("vector") for r in rows(engine, "results")] == [None, [2, 1], [0, 3], None]
    assert {r["summary"] for r in rows(engine, "runs")} == {None}
    assert {(r["seconds_per_image"], r["device"]) for r in rows(engine, "embedding_sets")} == {(None, None)}
    assert "from schema unversioned to 0002" in message
    # Today's code reads the old rows as methods (the leaderboard's view of them).
    assert {e.result_id: e.kind for e in lb.entries_for_dataset(engine, "fp")} == {1: "single", 2: "concat",
                                                                                   3: "single", 4: "head"}
    if engine.dialect.name == "sqlite":
        (backup,) = backups(url)
        assert backup.name.startswith("runs.db.bak-unversioned-") and str(backup) in message
        old = sqlite3.connect(backup)
        assert "kind" not in {c[1] for c in old.execute("PRAGMA table_info(results)")}
        assert old.execute("SELECT id, method FROM results ORDER BY id").fetchall() == [
            (1, "model_a"), (2, "a(2)+b(1)"), (3, "model_b"), (4, "mlp head")]
        old.close()
    else:
        assert "no copy was made" in message
    assert db.init_db(engine) is None  # a second open finds nothing to do
    assert len(backups(url)) == (1 if engine.dialect.name == "sqlite" else 0)


def test_a_database_at_the_first_revision_is_upgraded_and_its_copy_named_after_it(tmp_path, engines):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    engine = engines(url)
    with engine.begin() as connection:
        config = AlembicConfig()
        config.set_main_option("script_location", str(db.MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(text("INSERT INTO runs (id, kind, title, config, status, started) "
                                "VALUES (1, 'evaluate', '', '{}', 'done', '2026-01-01 00:00:00')"))
        connection.execute(text("INSERT INTO results (id, run_id, method, metrics, split, is_oracle) "
                                "VALUES (1, 1, 'model_a', '{}', 'eval', 0)"))
    assert db.schema_revision(engine) == "0001"
    message = db.init_db(engine)
    (backup,) = backups(url)
    assert backup.name.startswith("runs.db.bak-0001-") and str(backup) in message and "from schema 0001" in message
    assert [(r["id"], r["kind"], _json(r["models"])) for r in rows(engine, "results")] == [(1, "single", ["model_a"])]
    assert schema_differences(engine) == []


def test_an_unversioned_database_with_todays_tables_is_stamped_without_a_copy(url, engines):
    engine = engines(url)
    db.Base.metadata.create_all(engine)
    with db.begin_immediate(engine) as session:
        db.record_dataset(session, name="toy", source="toy", fingerprint="fp", n_images=3, n_classes=1)
    assert db.init_db(engine) is None
    assert db.schema_revision(engine) == HEAD
    assert [r["fingerprint"] for r in rows(engine, "datasets")] == ["fp"]
    assert backups(url) == []


def test_a_database_emptied_of_its_tables_is_built_again(url, engines):
    engine = engines(url)
    db.init_db(engine)
    db.Base.metadata.drop_all(engine)  # the alembic_version row stays behind
    assert db.init_db(engine) is None
    assert db.schema_revision(engine) == HEAD and schema_differences(engine) == []


def test_openers_starting_together_migrate_once(url, engines):
    write_first_release(engines(url))
    openers = [engines(url) for _ in range(4)]
    barrier, messages, errors = threading.Barrier(len(openers)), [], []

    def open_db(engine):
        barrier.wait()
        try:
            messages.append(db.init_db(engine))
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=open_db, args=(engine,)) for engine in openers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(m is not None for m in messages) == 1
    assert len(backups(url)) == (1 if url.startswith("sqlite") else 0)
    assert [r["id"] for r in rows(openers[0], "results")] == [1, 2, 3, 4]


def test_a_failed_upgrade_leaves_the_database_as_it_was(tmp_path, engines):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    engine = engines(url)
    write_first_release(engine)
    with engine.begin() as connection:  # a row whose method cannot be read back
        connection.exec_driver_sql("UPDATE results SET extra = '{not json' WHERE id = 4")
    before = first_release_rows(engine)
    with pytest.raises(json.JSONDecodeError):
        db.init_db(engine)
    assert db.schema_revision(engine) is None
    assert "kind" not in {c["name"] for c in inspect(engine).get_columns("results")}
    assert first_release_rows(engine) == before


def test_the_upgrade_command_names_the_copy_then_finds_nothing_to_do(tmp_path, engines):
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    write_first_release(engines(url))

    def upgrade():
        return subprocess.run([sys.executable, "-m", "core", "--db-url", url, "db", "upgrade"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    first = upgrade()
    assert first.returncode == 0, first.stderr
    (backup,) = backups(url)
    assert f"kept in {backup}" in first.stderr and "at schema 0002" in first.stdout
    second = upgrade()
    assert second.returncode == 0 and "nothing to do" in second.stdout and len(backups(url)) == 1


def _json(value):
    return json.loads(value) if isinstance(value, str) else value
