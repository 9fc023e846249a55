"""The job queue: what pages submit, what workers claim, and how progress, cancel and failure flow.

The only code that changes rows of the `jobs` and `workers` tables. Every write is one short
immediate transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: row locks, claims with
SELECT ... FOR UPDATE SKIP LOCKED), so any number of worker processes can share one database.

Writes made on behalf of a worker carry its `worker_id` and only apply while that worker still
owns the job: a worker that stalled long enough to have its job re-queued cannot overwrite the
next owner's state (it learns this from `heartbeat` returning False, or `JobLost` on a check).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import json
import os
import socket
import time
from typing import Any, Iterable

from sqlalchemy import Engine, select, text, update

from core.db import Job, Run, WorkerRow, begin_immediate, check_same_file, fail_run, read_session, utcnow
from core.progress import JobCancelled, Reporter
from core.workspace import Workspace

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)


class JobLost(JobCancelled):
    """This worker no longer owns the job (it was re-queued or failed as stale): stop, write nothing."""


_current_job_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("current_job_id", default=None)


def current_job_id() -> int | None:
    """The id of the job the calling handler runs for (None outside a worker), so that a handler
    can pass it to `core.db.start_run(..., job_id=...)` and its run shows up while it runs."""
    return _current_job_id.get()


@contextlib.contextmanager
def running(job_id: int):
    """Within this block `current_job_id()` is `job_id` (the executor wraps each handler call)."""
    token = _current_job_id.set(job_id)
    try:
        yield
    finally:
        _current_job_id.reset(token)


def canonical_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """Params as they will be stored: JSON types only (tuples become lists), keys sorted."""
    return json.loads(json.dumps(params or {}, sort_keys=True, default=str))


def params_hash(kind: str, params: dict[str, Any] | None) -> str:
    blob = json.dumps([kind, canonical_params(params)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _owned(query, job_id: int, worker_id: str | None):
    query = query.where(Job.id == job_id, Job.status == RUNNING)
    return query.where(Job.worker_id == worker_id) if worker_id is not None else query


# --- what pages and the CLI call -----------------------------------------------------------------


def submit(engine: Engine, kind: str, params: dict[str, Any] | None = None) -> Job:
    """Queue a job, or return the queued/running job with the same kind and params (so a double
    click or two users asking for the same extraction share one job). A running job the user asked
    to cancel is not reused."""
    params = canonical_params(params)
    digest = params_hash(kind, params)
    with begin_immediate(engine) as session:
        if engine.dialect.name == "postgresql":
            # Rows that do not exist yet cannot be locked: serialise identical submissions instead.
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": int(digest[:15], 16)})
        existing = session.scalar(
            select(Job)
            .where(Job.params_hash == digest, Job.kind == kind, Job.status.in_(ACTIVE))
            .where(Job.cancel_requested.is_(False))
            .order_by(Job.id)
            .limit(1)
        )
        if existing is not None:
            return existing
        job = Job(kind=kind, params=params, params_hash=digest, status=QUEUED, message="waiting for a worker")
        session.add(job)
        session.flush()
        return job


def request_cancel(engine: Engine, job_id: int) -> Job:
    """A queued job is cancelled at once; a running one stops at its next check (within one step)."""
    with begin_immediate(engine) as session:
        job = session.get_one(Job, job_id)
        if job.status == QUEUED:
            job.status, job.finished, job.message = CANCELLED, utcnow(), "cancelled before it started"
        elif job.status == RUNNING:
            job.cancel_requested = True
            job.message = "stopping at the user's request"
        return job


def get_job(engine: Engine, job_id: int) -> Job | None:
    with read_session(engine) as session:
        return session.get(Job, job_id)


def list_jobs(
    engine: Engine,
    *,
    status: str | Iterable[str] | None = None,
    kind: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[Job]:
    """Newest first."""
    query = select(Job).order_by(Job.id.desc()).limit(limit).offset(offset)
    if status is not None:
        query = query.where(Job.status.in_([status] if isinstance(status, str) else list(status)))
    if kind is not None:
        query = query.where(Job.kind == kind)
    with read_session(engine) as session:
        return list(session.scalars(query))


def worker_alive(engine: Engine, within_s: float = 30.0) -> bool:
    """Whether some worker heartbeated within `within_s` seconds (the dashboard warns if not)."""
    cutoff = utcnow() - dt.timedelta(seconds=within_s)
    with read_session(engine) as session:
        return (
            session.scalar(
                select(WorkerRow.id).where(WorkerRow.heartbeat_at >= cutoff, WorkerRow.stopped.is_(None)).limit(1)
            )
            is not None
        )


def queue_problem(engine: Engine, workspace: Workspace) -> str | None:
    """Why queued jobs may never run, as one message for the dashboard (shown above "Worker running"), or
    None: the runs database this process opened was deleted or replaced (jobs submitted now would land where
    no worker looks), or the last worker on this workspace stopped on a problem (read-only database, full
    disk) that a restart alone does not fix."""
    replaced = check_same_file(engine)
    if replaced:
        return (f"{replaced}: jobs submitted now would never reach a worker, and workers stop when they notice. "
                "Restart the dashboard so it opens the database now at that path, then start a worker.")
    last = workspace.last_worker_exit()
    if last:
        return (f"The last worker (pid {last.pid} on {last.host}) stopped at {last.at}: {last.message}. "
                "Queued jobs wait until a worker runs again.")
    return None


# --- what workers call ---------------------------------------------------------------------------


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def register_worker(engine: Engine, worker_id: str, kinds: list[str] | None = None) -> None:
    now = utcnow()
    with begin_immediate(engine) as session:
        session.merge(
            WorkerRow(
                id=worker_id, host=socket.gethostname(), pid=os.getpid(), kinds=kinds,
                started=now, heartbeat_at=now, stopped=None,
            )
        )


def worker_heartbeat(engine: Engine, worker_id: str, current_job_id: int | None = None) -> None:
    with begin_immediate(engine) as session:
        session.execute(
            update(WorkerRow)
            .where(WorkerRow.id == worker_id)
            .values(heartbeat_at=utcnow(), current_job_id=current_job_id)
        )


def unregister_worker(engine: Engine, worker_id: str) -> None:
    with begin_immediate(engine) as session:
        session.execute(
            update(WorkerRow).where(WorkerRow.id == worker_id).values(stopped=utcnow(), current_job_id=None)
        )


def claim(engine: Engine, worker_id: str, kinds: Iterable[str] | None = None) -> Job | None:
    """Take the oldest queued job (of `kinds`, if given) in one immediate transaction, or None."""
    query = select(Job).where(Job.status == QUEUED).order_by(Job.id).limit(1)
    if kinds:
        query = query.where(Job.kind.in_(list(kinds)))
    if engine.dialect.name != "sqlite":
        query = query.with_for_update(skip_locked=True)
    now = utcnow()
    with begin_immediate(engine) as session:
        job = session.scalar(query)
        if job is None:
            return None
        job.status, job.worker_id = RUNNING, worker_id
        job.attempts += 1
        job.started = job.heartbeat_at = now
        job.progress, job.message, job.error, job.run_id = 0.0, "started", None, None
        return job


def heartbeat(engine: Engine, job_id: int, worker_id: str) -> bool:
    """Keep the job alive; False if this worker no longer owns it."""
    with begin_immediate(engine) as session:
        result = session.execute(_owned(update(Job), job_id, worker_id).values(heartbeat_at=utcnow()))
        return result.rowcount == 1


def report_progress(
    engine: Engine, job_id: int, fraction: float, message: str = "", worker_id: str | None = None
) -> bool:
    """Store progress (also a heartbeat); False if this worker no longer owns the job."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    with begin_immediate(engine) as session:
        result = session.execute(
            _owned(update(Job), job_id, worker_id).values(progress=fraction, message=message, heartbeat_at=utcnow())
        )
        return result.rowcount == 1


def is_cancel_requested(engine: Engine, job_id: int, worker_id: str | None = None) -> bool:
    """Whether the user asked to stop the job. Raises JobLost if `worker_id` no longer owns it."""
    with read_session(engine) as session:
        row = session.execute(select(Job.status, Job.worker_id, Job.cancel_requested).where(Job.id == job_id)).one()
    if worker_id is not None and (row.status != RUNNING or row.worker_id != worker_id):
        raise JobLost(f"job {job_id} is no longer owned by this worker (now {row.status})")
    return bool(row.cancel_requested)


def _close_job_run(session, job: Job, status: str, error: str) -> None:
    """A job that ends without finishing also ends the run its handler started."""
    if job.run_id is None:
        return
    run = session.get(Run, job.run_id)
    if run is not None and run.status == "running":
        fail_run(session, run.id, error, status=status)


def finish(engine: Engine, job_id: int, run_id: int | None = None, worker_id: str | None = None) -> bool:
    """Mark the job done, linked to the run holding its results. False if no longer owned."""
    with begin_immediate(engine) as session:
        job = session.scalar(_owned(select(Job), job_id, worker_id))
        if job is None:
            return False
        job.status, job.progress, job.finished = DONE, 1.0, utcnow()
        job.message = "done"
        if run_id is not None:
            job.run_id = run_id
            run = session.get(Run, run_id)
            if run is not None and run.job_id is None:
                run.job_id = job_id
        return True


def fail(engine: Engine, job_id: int, error: str, worker_id: str | None = None) -> bool:
    """Mark the job failed; `error` is what the user reads (first line) plus details (traceback)."""
    with begin_immediate(engine) as session:
        job = session.scalar(_owned(select(Job), job_id, worker_id))
        if job is None:
            return False
        job.status, job.finished, job.error = FAILED, utcnow(), error
        job.message = error.strip().splitlines()[0][:500] if error.strip() else "failed"
        _close_job_run(session, job, FAILED, error)
        return True


def mark_cancelled(engine: Engine, job_id: int, worker_id: str | None = None) -> bool:
    """The handler stopped after a cancel request."""
    with begin_immediate(engine) as session:
        job = session.scalar(_owned(select(Job), job_id, worker_id))
        if job is None:
            return False
        job.status, job.finished, job.message = CANCELLED, utcnow(), "cancelled at the user's request"
        _close_job_run(session, job, CANCELLED, "cancelled at the user's request")
        return True


def requeue(engine: Engine, job_id: int, reason: str, worker_id: str | None = None) -> bool:
    """Give a running job back to the queue (worker shutting down); it starts over from scratch."""
    with begin_immediate(engine) as session:
        job = session.scalar(_owned(select(Job), job_id, worker_id))
        if job is None:
            return False
        _back_to_queue(session, job, reason)
        return True


def _back_to_queue(session, job: Job, reason: str) -> None:
    _close_job_run(session, job, FAILED, f"interrupted: {reason}")
    job.status, job.worker_id, job.heartbeat_at = QUEUED, None, None
    job.progress, job.message, job.run_id = 0.0, f"re-queued: {reason}", None


def requeue_stale(engine: Engine, stale_after_s: float, max_attempts: int = 3) -> list[Job]:
    """Running jobs whose heartbeat is older than `stale_after_s` (their worker died): back to the
    queue, or failed once they have been tried `max_attempts` times. Returns the jobs changed."""
    cutoff = utcnow() - dt.timedelta(seconds=stale_after_s)
    changed = []
    with begin_immediate(engine) as session:
        stale = list(
            session.scalars(
                select(Job).where(Job.status == RUNNING, (Job.heartbeat_at < cutoff) | Job.heartbeat_at.is_(None))
            )
        )
        for job in stale:
            silent = f"worker {job.worker_id} stopped responding (no heartbeat for {stale_after_s:g} s)"
            if job.cancel_requested:
                job.status, job.finished, job.message = CANCELLED, utcnow(), "cancelled (its worker stopped)"
                _close_job_run(session, job, CANCELLED, silent)
            elif job.attempts >= max_attempts:
                job.status, job.finished = FAILED, utcnow()
                job.error = (
                    f"Gave up after {job.attempts} attempts: {silent} each time. The job may be killing "
                    "its worker (out of memory?); check the worker's log, then submit it again."
                )
                job.message = job.error.splitlines()[0][:500]
                _close_job_run(session, job, FAILED, job.error)
            else:
                _back_to_queue(session, job, silent)
            changed.append(job)
    return changed


# --- the Reporter a handler sees -----------------------------------------------------------------


class _JobChannel:
    """Progress (throttled) and cancel checks of one job, through the DB."""

    def __init__(self, engine: Engine, job_id: int, worker_id: str | None, min_interval_s: float):
        self.engine, self.job_id, self.worker_id = engine, job_id, worker_id
        self.min_interval_s = min_interval_s
        self._last_write = 0.0

    def progress(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last_write < self.min_interval_s:
            return
        self._last_write = now
        if not report_progress(self.engine, self.job_id, fraction, message, self.worker_id):
            raise JobLost(f"job {self.job_id} is no longer owned by this worker")

    def is_cancelled(self) -> bool:
        return is_cancel_requested(self.engine, self.job_id, self.worker_id)


def reporter_for(
    engine: Engine, job: Job | int, worker_id: str | None = None, *, min_interval_s: float = 0.5
) -> Reporter:
    """A Reporter whose progress lands in the job row (at most every `min_interval_s`, and always
    at 100 %) and whose check_cancel reads the cancel flag (and raises JobLost if `worker_id` no
    longer owns the job). Curves are written by the handler into its own run."""
    job_id = job if isinstance(job, int) else job.id
    channel = _JobChannel(engine, job_id, worker_id, min_interval_s)
    return Reporter(on_progress=channel.progress, is_cancelled=channel.is_cancelled)
