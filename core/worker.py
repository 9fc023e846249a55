"""The background worker process (`python -m core worker`): claims queued jobs and runs them.

One loop per process: register in the `workers` table, re-queue jobs whose worker died, then claim,
run, record, repeat. A background thread heartbeats the worker and its current job. Start as many
processes (on as many hosts, against one PostgreSQL URL) as there are devices to keep busy.

SIGTERM/SIGINT: stop claiming; the current job gets `--grace` seconds to finish, after which it is
handed back to the queue (another worker starts it over) and the process exits with status 0.

A worker whose runs database goes away stops with one log line, also kept in the workspace's
worker-exit.json for the dashboard (core.jobs.queue_problem), and a non-zero status:
  3  the SQLite file it opened was deleted or replaced: a restart opens the file now at that path;
  4  the database cannot take writes (read-only file or folder, full disk): fix that, then restart.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Protocol, Sequence

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from core import jobs
from core.db import Job, check_same_file, init_db, make_engine
from core.errors import database_unwritable, user_message
from core.progress import JobCancelled, Reporter
from core.ray_executor import RayExecutor, RayUnavailable, connect
from core.tasks import run_job
from core.workspace import Workspace

log = logging.getLogger("core.worker")

EXIT_DB_REPLACED = 3
EXIT_DB_UNWRITABLE = 4


class Executor(Protocol):
    """Where a claimed job's work actually runs. Returns the id of the run holding its results."""

    def run(self, job: Job, reporter: Reporter) -> int | None: ...


class LocalExecutor:
    """Runs the job's handler (core.tasks) in this process, on this host's device.

    The other executor, core.ray_executor.RayExecutor (`--executor ray`), hands extraction and evaluation
    to a Ray cluster; the worker around it does not change: claiming, heartbeats, cancel and the DB rows
    stay with the worker, placement and restarts of the pieces with the engine. Never a home-made
    scheduler that splits work across hosts.
    """

    def __init__(self, workspace: Workspace, engine: Engine):
        self.workspace, self.engine = workspace, engine

    def run(self, job: Job, reporter: Reporter) -> int | None:
        with jobs.running(job.id):
            return run_job(job.kind, dict(job.params), reporter, self.workspace, self.engine)


@dataclass
class WorkerSettings:
    poll_interval_s: float = 1.0
    heartbeat_interval_s: float = 5.0
    stale_after_s: float = 60.0
    max_attempts: int = 3
    grace_s: float = 30.0
    progress_interval_s: float = 0.5
    kinds: list[str] | None = None
    once: bool = False


def describe_error(error: BaseException) -> str:
    """First line for the dashboard (the CLI's one line, core.errors.user_message), then the traceback
    for whoever debugs it."""
    details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return f"{user_message(error)}\n\n{details}"


def stop_on_database_problem(message: str, code: int, engine: Engine, workspace: Workspace | None) -> int:
    """Log why the worker stops in one line, keep it for the dashboard, and return the exit status."""
    log.error("worker stopped: %s", message)
    if workspace is not None and not workspace.record_worker_exit(
            message, db=engine.url.render_as_string(hide_password=True)):
        log.error("could not write %s either", workspace.worker_exit_file)
    return code


class Worker:
    def __init__(self, engine: Engine, executor: Executor, settings: WorkerSettings | None = None,
                 worker_id: str | None = None, workspace: Workspace | None = None):
        self.engine, self.executor, self.workspace = engine, executor, workspace
        self.settings = settings or WorkerSettings()
        self.id = worker_id or jobs.new_worker_id()
        self._stopping = threading.Event()
        self._deadline: float | None = None
        self._current: int | None = None
        self._last_sweep: float | None = None
        self._stopped_on: int | None = None  # the exit status, once a database problem stopped this worker
        self._stop_lock = threading.Lock()
        self._done = threading.Event()

    def stop(self) -> None:
        """Stop claiming; the current job has `grace_s` seconds to finish (safe from a signal handler)."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.settings.grace_s
        self._stopping.set()

    def run(self) -> int:
        """Returns the process's exit status: 0, or EXIT_DB_REPLACED / EXIT_DB_UNWRITABLE."""
        s = self.settings
        try:
            jobs.register_worker(self.engine, self.id, s.kinds)
        except OperationalError as error:
            code = self._stop_if_fatal(error)
            if not code:
                raise
            return code
        if self.workspace is not None:
            self.workspace.clear_worker_exit()
        log.info("worker %s started (kinds: %s)", self.id, ", ".join(s.kinds) if s.kinds else "all")
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        code = 0
        try:
            while not self._stopping.is_set():
                replaced = check_same_file(self.engine)
                if replaced:
                    code = self._stop(replaced, EXIT_DB_REPLACED)
                    break
                try:
                    if self._claim_and_run():
                        continue
                    if s.once:
                        break
                except OperationalError as error:
                    code = self._stop_if_fatal(error)
                    if code:
                        break
                    log.warning("the runs database failed; trying again: %s", user_message(error))
                self._stopping.wait(s.poll_interval_s)
        finally:
            self._done.set()
            beat.join(timeout=5)
            if code == 0:  # a replaced database is not this worker's any more; an unwritable one takes nothing
                jobs.unregister_worker(self.engine, self.id)
            log.info("worker %s stopped", self.id)
        return code

    def _claim_and_run(self) -> bool:
        """Re-queue the jobs of dead workers when due, then claim a job and run it. False: nothing to claim."""
        if self._last_sweep is None or time.monotonic() - self._last_sweep >= self.settings.stale_after_s:
            self._requeue_stale()
            self._last_sweep = time.monotonic()
        job = jobs.claim(self.engine, self.id, self.settings.kinds)
        if job is None:
            return False
        self._run_one(job)
        return True

    def _stop(self, problem: str, code: int) -> int:
        """Say once why this worker stops (its main loop and its heartbeat thread may both notice)."""
        with self._stop_lock:
            if self._stopped_on is not None:
                return self._stopped_on
            self._stopped_on = code
        if code == EXIT_DB_REPLACED:
            problem += "; restart the worker so it opens the database now at that path"
        return stop_on_database_problem(problem, code, self.engine, self.workspace)

    def _stop_if_fatal(self, error: OperationalError) -> int:
        """The exit status for a database error that waiting will not fix (logged and recorded), else 0
        when it may pass (a locked database, a database server restarting)."""
        replaced = check_same_file(self.engine)
        if replaced:
            return self._stop(replaced, EXIT_DB_REPLACED)
        if database_unwritable(error):
            return self._stop(user_message(error), EXIT_DB_UNWRITABLE)
        return 0

    def _requeue_stale(self) -> None:
        for job in jobs.requeue_stale(self.engine, self.settings.stale_after_s, self.settings.max_attempts):
            log.warning("job %s (%s) had a silent worker: now %s", job.id, job.kind, job.status)

    def _run_one(self, job: Job) -> None:
        log.info("job %s (%s) claimed, attempt %s", job.id, job.kind, job.attempts)
        self._current = job.id
        reporter = jobs.reporter_for(self.engine, job, self.id, min_interval_s=self.settings.progress_interval_s)
        try:
            run_id = self.executor.run(job, reporter)
        except jobs.JobLost as lost:
            log.warning("job %s abandoned: %s", job.id, lost)
        except JobCancelled:
            jobs.mark_cancelled(self.engine, job.id, self.id)
            log.info("job %s cancelled", job.id)
        except Exception as error:  # a failing job must not take the worker down
            jobs.fail(self.engine, job.id, describe_error(error), self.id)
            log.error("job %s failed: %s", job.id, user_message(error))
        else:
            if jobs.finish(self.engine, job.id, run_id, self.id):
                log.info("job %s done (run %s)", job.id, run_id)
            else:
                log.warning("job %s finished after it was handed to another worker; result dropped", job.id)
        finally:
            self._current = None

    def _heartbeat_loop(self) -> None:
        s = self.settings
        while not self._done.is_set():
            wait = s.heartbeat_interval_s
            if self._deadline is not None and self._current is not None:
                wait = max(0.01, min(wait, self._deadline - time.monotonic()))
            if self._done.wait(wait):
                return
            job_id = self._current
            if job_id is not None:
                replaced = check_same_file(self.engine)
                if replaced:
                    # The job's row is in the old file and everything the handler writes goes there too, where
                    # no one looks: stop now, as if killed. Its cache writes are atomic and its finished shards
                    # are kept, so a worker on the new file redoes it cheaply once it is queued there.
                    self._stop(replaced, EXIT_DB_REPLACED)
                    _exit_now(EXIT_DB_REPLACED)
            try:
                if job_id is not None and self._deadline is not None and time.monotonic() >= self._deadline:
                    self._give_back(job_id)
                    return
                if job_id is not None and not jobs.heartbeat(self.engine, job_id, self.id) and self._current == job_id:
                    log.warning("job %s was taken from this worker (heartbeat too late?)", job_id)
                jobs.worker_heartbeat(self.engine, self.id, job_id)
            except OperationalError as error:
                log.warning("heartbeat failed: %s", user_message(error))

    def _give_back(self, job_id: int) -> None:
        """Grace period over: the job goes back to the queue now; the handler learns it at its next
        check (JobLost). A handler that never checks is not waited for."""
        reason = f"worker {self.id} was stopped before the job finished"
        if jobs.requeue(self.engine, job_id, reason, self.id):
            log.warning("job %s re-queued: not finished within the %g s grace period", job_id, self.settings.grace_s)
        if not self._done.wait(max(2.0, self.settings.heartbeat_interval_s)):
            log.warning("the handler of job %s did not stop; exiting without it", job_id)
            jobs.unregister_worker(self.engine, self.id)
            _exit_now(0)


def _exit_now(code: int) -> None:
    """End the process from a background thread, without waiting for a handler that may never return."""
    logging.shutdown()
    os._exit(code)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core worker", description=__doc__.splitlines()[0])
    p.add_argument("--workspace", help="workspace folder (default: $ENSEMBLE_WORKSPACE or ./workspace)")
    p.add_argument("--db-url", help="SQLAlchemy URL (default: $ENSEMBLE_DB_URL or the workspace's SQLite file)")
    p.add_argument("--once", action="store_true", help="run until the queue is empty, then exit")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between looks at an empty queue")
    p.add_argument("--kinds", help="comma-separated job kinds this worker takes (default: all)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0, help="seconds between heartbeats")
    p.add_argument("--stale-after", type=float, default=60.0,
                   help="a running job without a heartbeat for this long is re-queued")
    p.add_argument("--max-attempts", type=int, default=3, help="a job whose worker died this often is failed")
    p.add_argument("--grace", type=float, default=30.0,
                   help="on SIGTERM, seconds the current job may take to finish before it is re-queued")
    p.add_argument("--progress-interval", type=float, default=0.5, help="least seconds between progress writes")
    p.add_argument("--worker-id", help="name in the workers table (default: host:pid:random)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: run each job in this process (default); ray: extraction and evaluation on a Ray "
                        "cluster, other kinds here (docs/scaling.md)")
    p.add_argument("--ray-address", help="with --executor ray: the cluster's head, e.g. 10.0.0.1:6379 or auto "
                                         "(default: $RAY_ADDRESS, else a Ray instance started on this host)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ray_address and args.executor != "ray":
        parser.error("--ray-address needs --executor ray")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    workspace = Workspace.open(args.workspace)
    engine = make_engine(args.db_url or workspace.db_url)
    try:
        init_db(engine)
    except OperationalError as error:
        if not database_unwritable(error):
            raise
        return stop_on_database_problem(user_message(error), EXIT_DB_UNWRITABLE, engine, workspace)
    settings = WorkerSettings(
        poll_interval_s=args.poll_interval,
        heartbeat_interval_s=args.heartbeat_interval,
        stale_after_s=args.stale_after,
        max_attempts=args.max_attempts,
        grace_s=args.grace,
        progress_interval_s=args.progress_interval,
        kinds=[k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None,
        once=args.once,
    )
    if args.executor == "ray":
        try:
            connect(args.ray_address)
        except RayUnavailable as error:
            log.error("worker not started: %s", error)
            return 2
        executor: Executor = RayExecutor(workspace, engine)
    else:
        executor = LocalExecutor(workspace, engine)
    worker = Worker(engine, executor, settings, args.worker_id, workspace)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: worker.stop())
    try:
        return worker.run()
    finally:
        engine.dispose()


if __name__ == "__main__":
    raise SystemExit(main())
