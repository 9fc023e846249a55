"""The job queue on a real SQLite file, in one process: submit, claim, cancel, ownership, staleness."""
from __future__ import annotations

import time

import pytest

from core import db, jobs
from core.progress import JobCancelled


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """Every test on a SQLite file and on an emptied PostgreSQL database (see `postgres_url`)."""
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    else:
        engine = db.make_engine(request.getfixturevalue("postgres_url"))
        db.Base.metadata.drop_all(engine)
    db.init_db(engine)
    yield engine
    engine.dispose()


def test_identical_submissions_attach_to_the_active_job(engine):
    a = jobs.submit(engine, "evaluate", {"models": ("a", "b"), "k": 5, "dataset": "demo"})
    b = jobs.submit(engine, "evaluate", {"dataset": "demo", "k": 5, "models": ["a", "b"]})
    assert b.id == a.id and a.status == "queued"
    assert a.params == {"dataset": "demo", "k": 5, "models": ["a", "b"]}
    assert jobs.submit(engine, "evaluate", {"dataset": "demo", "k": 10, "models": ["a", "b"]}).id != a.id
    assert jobs.submit(engine, "sweep", {"dataset": "demo", "k": 5, "models": ["a", "b"]}).id != a.id

    claimed = jobs.claim(engine, "w1", ["evaluate"])
    assert claimed.id == a.id
    assert jobs.submit(engine, "evaluate", a.params).id == a.id  # running: still attaches
    jobs.request_cancel(engine, a.id)
    again = jobs.submit(engine, "evaluate", a.params)  # stopping: a fresh job
    assert again.id != a.id
    jobs.mark_cancelled(engine, a.id, "w1")
    assert jobs.submit(engine, "evaluate", a.params).id == again.id


def test_claim_takes_the_oldest_job_of_the_kinds_asked_for_once(engine):
    first = jobs.submit(engine, "extract", {"i": 1})
    second = jobs.submit(engine, "evaluate", {"i": 2})
    third = jobs.submit(engine, "extract", {"i": 3})
    got = jobs.claim(engine, "w1", ["evaluate"])
    assert got.id == second.id and got.status == "running" and got.worker_id == "w1" and got.attempts == 1
    assert jobs.claim(engine, "w1", ["evaluate"]) is None
    assert jobs.claim(engine, "w2").id == first.id
    assert jobs.claim(engine, "w3").id == third.id
    assert jobs.claim(engine, "w3") is None
    assert {j.status for j in jobs.list_jobs(engine)} == {"running"}
    assert [j.id for j in jobs.list_jobs(engine, kind="extract")] == [third.id, first.id]
    assert jobs.list_jobs(engine, status="queued") == []


def test_cancel_of_a_queued_job_is_immediate_and_of_a_running_job_reaches_its_reporter(engine):
    running = jobs.submit(engine, "evaluate", {"i": 1})
    waiting = jobs.submit(engine, "evaluate", {"i": 2})
    assert jobs.claim(engine, "w1").id == running.id
    assert jobs.request_cancel(engine, waiting.id).status == "cancelled"
    assert jobs.claim(engine, "w2") is None

    reporter = jobs.reporter_for(engine, running.id, "w1")
    reporter.check_cancel()  # not asked yet
    assert jobs.request_cancel(engine, running.id).cancel_requested
    with pytest.raises(JobCancelled):
        reporter.check_cancel()
    assert jobs.mark_cancelled(engine, running.id, "w1")
    assert jobs.get_job(engine, running.id).status == "cancelled"
    assert jobs.request_cancel(engine, running.id).status == "cancelled"  # finished jobs stay as they are


def test_progress_writes_are_throttled_but_the_end_is_always_written(engine):
    job = jobs.submit(engine, "evaluate", {})
    jobs.claim(engine, "w1")
    reporter = jobs.reporter_for(engine, job, "w1", min_interval_s=60)
    reporter.progress(0.1, "first")
    reporter.progress(0.5, "too soon")
    got = jobs.get_job(engine, job.id)
    assert (got.progress, got.message) == (0.1, "first")
    reporter.progress(1.0, "all done")
    assert jobs.get_job(engine, job.id).message == "all done"


def test_the_run_a_handler_starts_is_linked_to_its_job_while_it_runs(engine):
    job = jobs.submit(engine, "train_head", {})
    jobs.claim(engine, "w1")
    with jobs.running(job.id), db.begin_immediate(engine) as s:
        run = db.start_run(s, kind="train_head", job_id=jobs.current_job_id())
    assert jobs.current_job_id() is None
    assert jobs.get_job(engine, job.id).run_id == run.id  # visible while the job runs
    assert jobs.finish(engine, job.id, run.id, "w1")
    with db.read_session(engine) as s:
        assert db.get_run(s, run.id).job_id == job.id


def test_failing_a_job_keeps_the_error_and_fails_its_run(engine):
    job = jobs.submit(engine, "evaluate", {})
    jobs.claim(engine, "w1")
    with db.begin_immediate(engine) as s:
        run = db.start_run(s, kind="evaluate", job_id=job.id)
    assert jobs.fail(engine, job.id, "ValueError: no such model 'x'\n\nTraceback ...", "w1")
    got = jobs.get_job(engine, job.id)
    assert got.status == "failed" and got.message == "ValueError: no such model 'x'"
    assert "Traceback" in got.error
    with db.read_session(engine) as s:
        assert db.get_run(s, run.id).status == "failed"


def test_a_stale_job_is_requeued_and_its_old_worker_can_no_longer_touch_it(engine):
    job = jobs.submit(engine, "evaluate", {})
    jobs.claim(engine, "w1")
    reporter = jobs.reporter_for(engine, job, "w1", min_interval_s=0)
    assert jobs.heartbeat(engine, job.id, "w1")
    assert jobs.requeue_stale(engine, stale_after_s=60) == []  # fresh heartbeat
    time.sleep(0.05)
    [requeued] = jobs.requeue_stale(engine, stale_after_s=0.01, max_attempts=3)
    assert requeued.status == "queued" and requeued.worker_id is None and "stopped responding" in requeued.message

    assert not jobs.heartbeat(engine, job.id, "w1")
    assert not jobs.finish(engine, job.id, None, "w1")
    with pytest.raises(jobs.JobLost):
        reporter.check_cancel()
    with pytest.raises(jobs.JobLost):
        reporter.progress(0.5, "late")
    again = jobs.claim(engine, "w2")
    assert again.id == job.id and again.attempts == 2
    assert jobs.finish(engine, job.id, None, "w2")


def test_a_job_whose_worker_keeps_dying_fails_after_max_attempts(engine):
    job = jobs.submit(engine, "extract", {})
    for attempt in (1, 2):
        assert jobs.claim(engine, f"w{attempt}").attempts == attempt
        time.sleep(0.05)
        [changed] = jobs.requeue_stale(engine, stale_after_s=0.01, max_attempts=2)
    assert changed.status == "failed"
    got = jobs.get_job(engine, job.id)
    assert got.status == "failed" and "Gave up after 2 attempts" in got.error
    assert jobs.claim(engine, "w3") is None


def test_a_stale_job_the_user_cancelled_ends_cancelled(engine):
    job = jobs.submit(engine, "extract", {})
    jobs.claim(engine, "w1")
    jobs.request_cancel(engine, job.id)
    time.sleep(0.05)
    jobs.requeue_stale(engine, stale_after_s=0.01)
    assert jobs.get_job(engine, job.id).status == "cancelled"


def test_worker_alive_follows_worker_heartbeats(engine):
    assert not jobs.worker_alive(engine)
    jobs.register_worker(engine, "w1", ["extract"])
    assert jobs.worker_alive(engine)
    time.sleep(0.05)
    assert not jobs.worker_alive(engine, within_s=0.01)
    jobs.worker_heartbeat(engine, "w1", None)
    assert jobs.worker_alive(engine, within_s=1)
    jobs.unregister_worker(engine, "w1")
    assert not jobs.worker_alive(engine)


def test_params_hash_ignores_key_order_and_tuple_vs_list():
    assert jobs.params_hash("k", {"a": 1, "b": (1, 2)}) == jobs.params_hash("k", {"b": [1, 2], "a": 1})
    assert jobs.params_hash("k", {"a": 1}) != jobs.params_hash("j", {"a": 1})
