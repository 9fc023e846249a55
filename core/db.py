"""The runs database: typed tables for datasets, embedding sets, runs, results, jobs and live curves.

SQLite by default (one file in the workspace), any SQLAlchemy URL otherwise (PostgreSQL for several
worker hosts). Large arrays never live here: only metadata, metrics and job state.

Every function takes a `Session` and returns ORM rows; callers choose the transaction:
`with begin_immediate(engine) as s:` for anything that writes, `with read_session(engine) as s:`
for pages that only read. Rows come back usable after the session closes (no expiry on commit).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sqlite3
import weakref
from pathlib import Path
from typing import Any, Iterator

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

from core.files import atomic_write_bytes

SQLITE_BUSY_TIMEOUT_MS = 30_000


def utcnow() -> dt.datetime:
    """Naive UTC: SQLite has no time zones, so every timestamp in the DB is UTC without one."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    n_images: Mapped[int] = mapped_column(Integer)
    n_classes: Mapped[int] = mapped_column(Integer)
    n_skipped: Mapped[int] = mapped_column(Integer, default=0)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    embedding_sets: Mapped[list["EmbeddingSetRow"]] = relationship(back_populates="dataset")


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    source: Mapped[str] = mapped_column(Text, default="")
    dim: Mapped[int | None] = mapped_column(Integer, nullable=True)


class EmbeddingSetRow(Base):
    """Where one model's embeddings of one dataset are cached (the arrays live in `path`)."""

    __tablename__ = "embedding_sets"
    __table_args__ = (UniqueConstraint("dataset_id", "cache_key", name="uq_embedding_sets_dataset_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(String(200))
    cache_key: Mapped[str] = mapped_column(String(256))  # the model's cache key (weights + transform)
    path: Mapped[str] = mapped_column(Text)
    n: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String(32))
    # What one image cost to embed, measured while extracting (model load excluded), and where.
    seconds_per_image: Mapped[float | None] = mapped_column(Float, nullable=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

    dataset: Mapped[Dataset] = relationship(back_populates="embedding_sets")


class Run(Base):
    """One piece of finished (or failed) work: its config and, in `results`, what it measured."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    title: Mapped[str] = mapped_column(Text, default="")
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|done|failed|cancelled
    started: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True, index=True
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True, index=True
    )
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # a run's findings that are no method

    dataset: Mapped[Dataset | None] = relationship()
    results: Mapped[list["Result"]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="Result.id"
    )


class Result(Base):
    """One method's metrics in a run. The method is stored as data (core.methods.Method: kind, models,
    weights, head_path; its label in `method`), with how its parameters were chosen (`selected_on`:
    none | train | validation | eval). `is_oracle` = selected_on == "eval": tuned on the split it is
    reported on."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    method: Mapped[str] = mapped_column(Text)  # the method's label, e.g. "lite0(3)+lite2(1)"
    kind: Mapped[str] = mapped_column(String(16), default="single")
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    weights: Mapped[list[float] | None] = mapped_column(JSON, nullable=True)
    head_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    selected_on: Mapped[str] = mapped_column(String(16), default="none")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    split: Mapped[str] = mapped_column(String(32), default="eval")
    is_oracle: Mapped[bool] = mapped_column(Boolean, default=False)
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    run: Mapped[Run] = relationship(back_populates="results")


class RunCurve(Base):
    """One row of a live training curve (epoch, loss, eval map@k ...) written while the run goes."""

    __tablename__ = "run_curves"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """Work queued for the background worker; see core.jobs for the only code that changes it."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    params_hash: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # use_alter: runs.job_id and jobs.run_id point at each other; PostgreSQL needs one added later.
    run_id: Mapped[int | None] = mapped_column(
        ForeignKey("runs.id", ondelete="SET NULL", use_alter=True, name="fk_jobs_run_id"),
        nullable=True,
    )
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    finished: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class WorkerRow(Base):
    """A live (or recently live) worker process; the dashboard says "no worker running" from this."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    kinds: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    started: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    current_job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    stopped: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


# --- engine and sessions -------------------------------------------------------------------------

_IMMEDIATE = "ensemble_begin_immediate"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """One engine per process. SQLite gets WAL, a 30 s busy timeout, synchronous=NORMAL,
    foreign keys, and SQLAlchemy's pysqlite recipe so that `begin_immediate` really emits
    BEGIN IMMEDIATE. Other URLs (PostgreSQL) are used as they are."""
    engine = create_engine(url, **kwargs)
    if engine.dialect.name != "sqlite":
        return engine

    path = sqlite_file(engine)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, connection_record):  # noqa: ARG001
        # pysqlite must not emit its own BEGIN (it would defer the lock and skip SELECTs);
        # SQLAlchemy emits it in the "begin" hook below instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()
        if path is not None and engine not in _opened_files:
            with contextlib.suppress(OSError):
                _opened_files[engine] = (path, _file_identity(path))

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # A writer takes the write lock up front (waiting up to busy_timeout); a deferred
        # transaction that reads and then writes can fail at once with "database is locked".
        immediate = conn.get_execution_options().get(_IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def sqlite_file(engine: Engine) -> str | None:
    """The absolute path of the SQLite file behind `engine`; None for other URLs and in-memory databases."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database in (None, "", ":memory:") or database.startswith("file:"):
        return None
    return os.path.abspath(database)


# engine -> (path, (st_dev, st_ino)) of the SQLite file it first opened. Every connection of an engine
# must reach the same file: after the file is deleted or replaced, the connections already open still use
# the old one while new ones open (or create) the new one, and processes silently stop seeing each other.
_opened_files: weakref.WeakKeyDictionary[Engine, tuple[str, tuple[int, int]]] = weakref.WeakKeyDictionary()


def _file_identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def check_same_file(engine: Engine) -> str | None:
    """None while the SQLite file `engine` first opened is still the one at its path (always None for other
    URLs, or before the first connection); else what happened, as a sentence for the log or the dashboard.
    One stat call: cheap enough for every poll of a worker and every rerun of a page."""
    first = _opened_files.get(engine)
    if first is None:
        return None
    path, opened = first
    try:
        now = _file_identity(path)
    except FileNotFoundError:
        return f"The runs database {path} was deleted after this process opened it"
    except OSError as error:
        return f"The runs database {path} cannot be checked any more ({error.strerror or error})"
    if now != opened:
        return f"The runs database {path} was replaced by another file after this process opened it"
    return None


MIGRATIONS = Path(__file__).with_name("migrations")  # Alembic's env.py and versions/, shipped in the package
_MIGRATION_LOCK = 7207  # PostgreSQL advisory lock key: any fixed number of ours

log = logging.getLogger("core.db")


def init_db(engine: Engine) -> str | None:
    """Create the tables of a new runs DB, or upgrade an older one to this release's schema (the Alembic
    revisions in core/migrations) keeping every row; a SQLite file is first copied beside itself.

    Returns what was done, naming the copy, when an existing DB was upgraded (also logged), else None.
    Several processes may open the DB at once: the first migrates inside one transaction holding the write
    lock (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), the others wait and find nothing to do.
    A failed upgrade is rolled back and leaves the DB as it was."""
    bind = engine.execution_options(**{_IMMEDIATE: True}) if engine.dialect.name == "sqlite" else engine
    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    with bind.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        current = MigrationContext.configure(connection).get_current_revision()
        ours = set(inspect(connection).get_table_names()) & set(Base.metadata.tables)
        if current == head and ours:
            return None
        config = AlembicConfig()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        existing = _columns_of_our_tables(connection, ours)
        if current is not None and not existing:
            # A version row without any of our tables (emptied with drop_all, say): build the schema afresh.
            command.stamp(config, "base", purge=True)
            current = None
        if current is None and _is_newest_schema(existing):
            # Made by this release's create_all before migrations existed: already the newest schema.
            command.stamp(config, head)
            return None
        path = sqlite_file(engine)
        backup = _backup_sqlite(path, current or "unversioned") if path is not None and existing else None
        command.upgrade(config, head)
    if not existing:
        return None
    where = engine.url.render_as_string(hide_password=True) if path is None else path
    saved = (f"; the database as it was is kept in {backup}" if backup is not None else
             "; no copy was made by this program (keep your own backups of a server database)")
    message = f"Upgraded the runs database {where} from schema {current or 'unversioned'} to {head}{saved}."
    log.warning(message)
    return message


def schema_revision(engine: Engine) -> str | None:
    """The Alembic revision the runs DB is at (its alembic_version row); None before init_db has run."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _columns_of_our_tables(connection, names: set[str]) -> dict[str, set[str]]:
    """Table name -> column names, for `names`: the tables of this schema that the DB has."""
    inspector = inspect(connection)
    return {name: {column["name"] for column in inspector.get_columns(name)} for name in names}


def _is_newest_schema(existing: dict[str, set[str]]) -> bool:
    """Whether the DB has every table and column of this release's schema."""
    return all({column.name for column in table.columns} <= existing.get(name, set())
               for name, table in Base.metadata.tables.items())


def _backup_sqlite(path: str, revision: str) -> Path:
    """A consistent copy of the SQLite file (sqlite3's backup API, then one atomic write beside it)."""
    target = Path(f"{path}.bak-{revision}-{utcnow():%Y%m%dT%H%M%SZ}")
    source = sqlite3.connect(f"{Path(path).as_uri()}?mode=ro", uri=True)
    copy = sqlite3.connect(":memory:")
    try:
        source.backup(copy)
        data = copy.serialize()
    finally:
        source.close()
        copy.close()
    atomic_write_bytes(target, data)
    return target


@contextlib.contextmanager
def begin_immediate(engine: Engine) -> Iterator[Session]:
    """A write transaction, committed on leaving the block and rolled back on an exception.
    On SQLite it starts with BEGIN IMMEDIATE; elsewhere it is an ordinary transaction."""
    bind = engine.execution_options(**{_IMMEDIATE: True}) if engine.dialect.name == "sqlite" else engine
    with Session(bind, expire_on_commit=False) as session, session.begin():
        yield session


@contextlib.contextmanager
def read_session(engine: Engine) -> Iterator[Session]:
    """A session for reading; nothing it does is committed."""
    with Session(engine, expire_on_commit=False) as session:
        yield session


# --- datasets, models, embedding sets ------------------------------------------------------------


def record_dataset(
    session: Session,
    *,
    name: str,
    source: str,
    fingerprint: str,
    n_images: int,
    n_classes: int,
    n_skipped: int = 0,
) -> Dataset:
    """The dataset with this fingerprint, created or refreshed (same images = same row)."""
    row = session.scalar(select(Dataset).where(Dataset.fingerprint == fingerprint))
    if row is None:
        row = Dataset(fingerprint=fingerprint)
        session.add(row)
    row.name, row.source = name, source
    row.n_images, row.n_classes, row.n_skipped = n_images, n_classes, n_skipped
    session.flush()
    return row


def record_model(session: Session, *, name: str, source: str = "", dim: int | None = None) -> Model:
    row = session.scalar(select(Model).where(Model.name == name))
    if row is None:
        row = Model(name=name)
        session.add(row)
    row.source = source or row.source or ""
    row.dim = dim if dim is not None else row.dim
    session.flush()
    return row


def record_embedding_set(
    session: Session,
    *,
    dataset_id: int,
    model_name: str,
    cache_key: str,
    path: str,
    n: int,
    dim: int,
    dtype: str,
    seconds_per_image: float | None = None,
    device: str | None = None,
) -> EmbeddingSetRow:
    """This dataset's embeddings by the model with `cache_key`, created or refreshed (a cache hit keeps
    the cost measured when the embeddings were made)."""
    row = session.scalar(
        select(EmbeddingSetRow).where(EmbeddingSetRow.dataset_id == dataset_id, EmbeddingSetRow.cache_key == cache_key)
    )
    if row is None:
        row = EmbeddingSetRow(cache_key=cache_key)
        session.add(row)
    row.dataset_id, row.model_name, row.path = dataset_id, model_name, path
    row.n, row.dim, row.dtype = n, dim, dtype
    if seconds_per_image is not None:
        row.seconds_per_image, row.device = seconds_per_image, device
    session.flush()
    return row


def get_dataset(session: Session, fingerprint: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.fingerprint == fingerprint))


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.created.desc(), Dataset.id.desc())))


def embedding_sets_for_dataset(session: Session, fingerprint: str) -> list[EmbeddingSetRow]:
    return list(
        session.scalars(
            select(EmbeddingSetRow)
            .join(Dataset)
            .where(Dataset.fingerprint == fingerprint)
            .order_by(EmbeddingSetRow.model_name)
        )
    )


# --- runs and results ----------------------------------------------------------------------------


def start_run(
    session: Session,
    *,
    kind: str,
    title: str = "",
    config: dict[str, Any] | None = None,
    dataset_id: int | None = None,
    job_id: int | None = None,
) -> Run:
    """A run in status "running". With `job_id`, the job points at it at once, so the dashboard
    can show its live curves while the job is still going."""
    run = Run(kind=kind, title=title, config=config or {}, dataset_id=dataset_id, job_id=job_id)
    session.add(run)
    session.flush()
    if job_id is not None:
        job = session.get(Job, job_id)
        if job is not None:
            job.run_id = run.id
    return run


def _close_run(run: Run, status: str) -> None:
    run.status = status
    run.finished = utcnow()
    run.duration_s = (run.finished - run.started).total_seconds()


def _json_safe(value: Any) -> Any:
    """NaN (e.g. a metric with no valid query) becomes null: PostgreSQL's JSON has no NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _json_safe(value.item())
    return value


def add_results(session: Session, run_id: int, results: list[dict[str, Any]]) -> list[Result]:
    """Each dict: "method" (a core.methods.Method), "metrics", "selected_on" (none | train | validation
    | eval), and optionally "split" (default eval) and "extra"."""
    rows = []
    for r in results:
        method, selected_on = r["method"], r.get("selected_on", "none")
        rows.append(
            Result(
                run_id=run_id,
                method=method.label,
                kind=method.kind,
                models=list(method.models),
                weights=[float(w) for w in method.weights] if method.weights is not None else None,
                head_path=method.head_path,
                options=dict(method.options) or None,
                selected_on=selected_on,
                metrics=_json_safe(dict(r.get("metrics", {}))),
                split=r.get("split", "eval"),
                is_oracle=selected_on == "eval",
                extra=_json_safe(r.get("extra")),
            )
        )
    session.add_all(rows)
    session.flush()
    return rows


def finish_run(session: Session, run_id: int, results: list[dict[str, Any]] | None = None,
               summary: dict[str, Any] | None = None) -> Run:
    """Store the run's results (and its summary, for findings that are no method) and mark it done."""
    run = session.get_one(Run, run_id)
    if results:
        add_results(session, run_id, results)
    if summary is not None:
        run.summary = _json_safe(summary)
    _close_run(run, "done")
    session.flush()
    return run


def fail_run(session: Session, run_id: int, error: str, *, status: str = "failed") -> Run:
    """Mark a run failed (or "cancelled") with the reason a user will read."""
    run = session.get_one(Run, run_id)
    run.error = error
    _close_run(run, status)
    session.flush()
    return run


def list_runs(
    session: Session, kind: str | None = None, *, limit: int = 50, offset: int = 0
) -> list[Run]:
    """Newest first."""
    query = select(Run).order_by(Run.started.desc(), Run.id.desc()).limit(limit).offset(offset)
    if kind is not None:
        query = query.where(Run.kind == kind)
    return list(session.scalars(query))


def count_runs(session: Session, kind: str | None = None) -> int:
    query = select(func.count()).select_from(Run)
    if kind is not None:
        query = query.where(Run.kind == kind)
    return int(session.scalar(query) or 0)


def get_run(session: Session, run_id: int) -> Run | None:
    """The run with its results loaded."""
    return session.scalar(select(Run).where(Run.id == run_id).options(selectinload(Run.results)))


def results_version(session: Session) -> tuple[int, ...]:
    """Changes whenever a result is added or deleted or a run finishes or is deleted (results are written
    once, never edited): the key of anything a reader computes from the stored results."""
    results = session.execute(select(func.count(Result.id), func.max(Result.id))).one()
    runs = session.execute(select(func.count(Run.id), func.max(Run.id)).where(Run.status == "done")).one()
    return tuple(int(v or 0) for v in (*results, *runs))


def results_for_dataset(session: Session, fingerprint: str, *, kind: str | None = None) -> list[Result]:
    """Every result measured on this dataset by a finished run, newest run first (the leaderboard)."""
    query = (
        select(Result)
        .join(Run)
        .join(Dataset, Run.dataset_id == Dataset.id)
        .where(Dataset.fingerprint == fingerprint, Run.status == "done")
        .options(selectinload(Result.run))
        .order_by(Run.started.desc(), Result.id)
    )
    if kind is not None:
        query = query.where(Run.kind == kind)
    return list(session.scalars(query))


def add_curve_point(session: Session, run_id: int, step: int, values: dict[str, Any]) -> RunCurve:
    row = RunCurve(run_id=run_id, step=int(step), values=_json_safe(dict(values)))
    session.add(row)
    session.flush()
    return row


def curve(session: Session, run_id: int) -> list[RunCurve]:
    return list(
        session.scalars(select(RunCurve).where(RunCurve.run_id == run_id).order_by(RunCurve.step, RunCurve.id))
    )
