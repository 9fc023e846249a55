"""Worker processes against a real SQLite file: kills, restarts, cancels, failures, many workers.

The job kind used here, "write_chunks", is a real handler (registered by importing this module in
the worker process): it hash-chains blocks into a file written under a temporary name and
os.replace'd at the end, reporting progress and checking cancel once per block.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataclasses import dataclass

from core import db, jobs
from core.configs import Settings
from core.tasks import job_kind
from tests.images import wait_for

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BLOCK = 32  # bytes written per step (one sha256 digest)


def _chain(seed: str, steps: int, rounds: int) -> bytes:
    """The file a write_chunks job must produce; the hashing is the job's real work per step."""
    digest, out = hashlib.sha256(seed.encode()).digest(), []
    for _ in range(steps):
        for _ in range(rounds):
            digest = hashlib.sha256(digest * 16384).digest()
        out.append(digest)
    return b"".join(out)


@dataclass(frozen=True)
class WriteChunks(Settings):
    kind = "write_chunks"
    out: str
    steps: int
    seed: str
    rounds: int = 1
    fail_at: int | None = None
    markers: str | None = None
    token: str | None = None


@job_kind(WriteChunks)
def write_chunks(params: WriteChunks, reporter, workspace, engine):
    out = Path(params.out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    steps, rounds = params.steps, params.rounds
    digest = hashlib.sha256(params.seed.encode()).digest()
    try:
        with open(tmp, "wb") as f:
            for i in range(steps):
                reporter.check_cancel()
                for _ in range(rounds):
                    digest = hashlib.sha256(digest * 16384).digest()
                f.write(digest)
                f.flush()
                with open(f"{out}.steps", "a") as log:
                    log.write(f"{os.getpid()} {i}\n")
                if params.fail_at == i:
                    raise ValueError(f"block {i} is corrupt (asked for by the test)")
                reporter.progress((i + 1) / steps, f"block {i + 1}/{steps}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if params.markers:  # O_APPEND: one whole line per write, from any process
        with open(params.markers, "a") as m:
            m.write(f"{params.token} {jobs.current_job_id()} {os.getpid()}\n")
    return None


FAST = ["--poll-interval", "0.05", "--heartbeat-interval", "0.2", "--progress-interval", "0.05"]


def start_worker(db_url: str, workspace: Path, *flags: str, log: Path) -> subprocess.Popen:
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]; import test_worker; "
        "from core.worker import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, "--db-url", db_url, "--workspace", str(workspace), *FAST, *flags],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, tmp_path):
    """A SQLite file, or an emptied PostgreSQL database (see `postgres_url`)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'runs.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = db.make_engine(url)
    if request.param == "postgresql":
        db.Base.metadata.drop_all(engine)
    db.init_db(engine)
    yield engine, url, tmp_path
    engine.dispose()


def clean_log(path: Path) -> str:
    text = path.read_text() if path.exists() else ""
    assert "database is locked" not in text
    return text


def test_a_job_whose_worker_is_killed_is_redone_by_the_next_worker(env):
    engine, url, tmp = env
    out = tmp / "out.bin"
    params = {"out": str(out), "seed": "kill", "steps": 60, "rounds": 4}
    job = jobs.submit(engine, "write_chunks", params)
    first = start_worker(url, tmp, "--stale-after", "1", log=tmp / "w1.log")
    wait_for(lambda: len(lines(Path(f"{out}.steps"))) >= 3)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert not out.exists()  # only the temporary file, never a final one that looks complete
    assert list(tmp.glob("out.bin.*.tmp"))
    assert jobs.get_job(engine, job.id).status == "running"

    time.sleep(1.2)  # let its heartbeat go stale
    second = start_worker(url, tmp, "--once", "--stale-after", "1", log=tmp / "w2.log")
    assert second.wait(60) == 0
    got = jobs.get_job(engine, job.id)
    assert got.status == "done" and got.attempts == 2 and got.progress == 1.0
    assert out.read_bytes() == _chain("kill", 60, 4)
    assert "re-queued" in clean_log(tmp / "w2.log") or "silent worker" in clean_log(tmp / "w2.log")


def test_four_workers_run_two_hundred_jobs_exactly_once(env):
    engine, url, tmp = env
    markers = tmp / "markers.txt"
    ids = [
        jobs.submit(engine, "write_chunks", {"out": str(tmp / f"o{i}.bin"), "seed": str(i), "steps": 2,
                                             "markers": str(markers), "token": i}).id
        for i in range(200)
    ]
    workers = [start_worker(url, tmp, "--once", log=tmp / f"w{n}.log") for n in range(4)]
    assert [w.wait(120) for w in workers] == [0, 0, 0, 0]

    tokens = sorted(int(line.split()[0]) for line in lines(markers))
    assert tokens == list(range(200))  # none missing, none twice
    done = jobs.list_jobs(engine, limit=1000)
    assert sorted(j.id for j in done) == sorted(ids)
    assert {(j.status, j.attempts, j.error) for j in done} == {("done", 1, None)}
    assert len({line.split()[2] for line in lines(markers)}) > 1  # the work really was shared
    for n in range(4):
        assert "Traceback" not in clean_log(tmp / f"w{n}.log")
    assert not jobs.worker_alive(engine)  # all unregistered on exit


def test_cancel_stops_a_running_job_within_one_step_and_leaves_no_file(env):
    engine, url, tmp = env
    out = tmp / "cancelled.bin"
    steps_log = Path(f"{out}.steps")
    job = jobs.submit(engine, "write_chunks", {"out": str(out), "seed": "c", "steps": 400, "rounds": 4})
    worker = start_worker(url, tmp, log=tmp / "w.log")
    try:
        wait_for(lambda: len(lines(steps_log)) >= 3)
        jobs.request_cancel(engine, job.id)
        at_request = len(lines(steps_log))
        wait_for(lambda: jobs.get_job(engine, job.id).status == "cancelled")
        assert len(lines(steps_log)) <= at_request + 1
        assert not out.exists() and not list(tmp.glob("cancelled.bin.*.tmp"))
        assert wait_for(lambda: jobs.worker_alive(engine, within_s=2))  # the worker goes on
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0


def test_a_job_that_raises_is_recorded_and_the_worker_takes_the_next(env):
    engine, url, tmp = env
    bad = jobs.submit(engine, "write_chunks", {"out": str(tmp / "bad.bin"), "seed": "b", "steps": 5, "fail_at": 2})
    good = jobs.submit(engine, "write_chunks", {"out": str(tmp / "good.bin"), "seed": "g", "steps": 5})
    unknown = jobs.submit(engine, "no_such_kind", {})
    worker = start_worker(url, tmp, "--once", log=tmp / "w.log")
    assert worker.wait(60) == 0

    failed = jobs.get_job(engine, bad.id)
    assert failed.status == "failed"
    assert failed.message == "block 2 is corrupt (asked for by the test)"
    assert "Traceback (most recent call last)" in failed.error and "write_chunks" in failed.error
    assert not (tmp / "bad.bin").exists() and not list(tmp.glob("bad.bin.*.tmp"))
    assert jobs.get_job(engine, good.id).status == "done"
    assert (tmp / "good.bin").read_bytes() == _chain("g", 5, 1)
    orphan = jobs.get_job(engine, unknown.id)
    assert orphan.status == "failed" and "no handler for job kind 'no_such_kind'" in orphan.message
    clean_log(tmp / "w.log")


def test_sigterm_lets_a_short_job_finish_and_exits_cleanly(env):
    engine, url, tmp = env
    out = tmp / "short.bin"
    job = jobs.submit(engine, "write_chunks", {"out": str(out), "seed": "s", "steps": 30, "rounds": 4})
    worker = start_worker(url, tmp, "--grace", "30", log=tmp / "w.log")
    wait_for(lambda: len(lines(Path(f"{out}.steps"))) >= 2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    assert jobs.get_job(engine, job.id).status == "done"
    assert out.read_bytes() == _chain("s", 30, 4)
    assert jobs.claim(engine, "check") is None
    assert not jobs.worker_alive(engine)


def test_sigterm_requeues_a_job_that_cannot_finish_within_the_grace_period(env):
    engine, url, tmp = env
    out = tmp / "long.bin"
    job = jobs.submit(engine, "write_chunks", {"out": str(out), "seed": "l", "steps": 5000, "rounds": 4})
    worker = start_worker(url, tmp, "--grace", "0.3", log=tmp / "w.log")
    wait_for(lambda: len(lines(Path(f"{out}.steps"))) >= 2)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    got = jobs.get_job(engine, job.id)
    assert (got.status, got.worker_id, got.attempts) == ("queued", None, 1)
    assert "was stopped before the job finished" in got.message
    assert not out.exists() and not list(tmp.glob("long.bin.*.tmp"))
    clean_log(tmp / "w.log")


def test_extract_then_evaluate_and_sweep_through_a_worker(env):
    """The real kinds, end to end, on a tiny ImageFolder with timm's random offline test models."""
    import numpy as np
    from PIL import Image

    engine, url, tmp = env
    images = tmp / "images"
    rng = np.random.default_rng(0)
    for c in range(3):
        (images / f"class{c}").mkdir(parents=True)
        for i in range(4):  # each class has its own base colour, so retrieval is better than chance
            pixels = np.clip(rng.normal(60 + 70 * c, 25, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(images / f"class{c}" / f"{i}.png")
    models = ["random:test_efficientnet", "random:test_vit"]
    common = {"dataset": str(images), "models": models, "device": "cpu"}
    extract = jobs.submit(engine, "extract", {**common, "limit_per_class": None})
    evaluate = jobs.submit(engine, "evaluate", {**common, "k": 5})
    sweep = jobs.submit(engine, "sweep", {**common, "k": 5, "weights": [0, 1, 2]})
    worker = start_worker(url, tmp / "ws", "--once", log=tmp / "w.log")
    assert worker.wait(180) == 0, (tmp / "w.log").read_text()[-3000:]

    done = {j.id: j for j in jobs.list_jobs(engine)}
    assert {done[i].status for i in (extract.id, evaluate.id, sweep.id)} == {"done"}, (tmp / "w.log").read_text()
    with db.read_session(engine) as s:
        extract_run = db.get_run(s, done[extract.id].run_id)
        assert extract_run.kind == "extract" and extract_run.status == "done" and extract_run.job_id == extract.id
        dataset = extract_run.dataset
        assert (dataset.n_images, dataset.n_classes, dataset.n_skipped) == (12, 3, 0)
        sets = db.embedding_sets_for_dataset(s, dataset.fingerprint)
        assert sorted(e.model_name for e in sets) == sorted(models)
        assert all(Path(e.path).exists() and e.n == 12 for e in sets)

        scores = db.get_run(s, done[evaluate.id].run_id)
        assert [r.method for r in scores.results] == models
        for r in scores.results:
            assert r.metrics["n_queries"] == 12 and r.metrics["k"] == 5 and not r.is_oracle
            assert 0.0 <= r.metrics["map@k"] <= 1.0

        swept = db.get_run(s, done[sweep.id].run_id).results
        assert len(swept) == 3 * 3 - 1
        assert all(r.is_oracle == (r.kind == "concat") for r in swept)  # one model alone was not tuned
        assert swept[0].metrics["map@k"] == max(r.metrics["map@k"] for r in swept)
        labels = {tuple(r.extra["vector"]): r.method for r in swept}
        assert labels[(2.0, 1.0)] == "test_efficientnet(2)+test_vit(1)"
        alone = {tuple(r.extra["vector"]): r.metrics for r in swept}[(1.0, 0.0)]
        assert alone["map@k"] == pytest.approx(scores.results[0].metrics["map@k"], abs=1e-6)
        assert {r.dataset_id for r in (scores, extract_run)} == {dataset.id}
        assert len(db.results_for_dataset(s, dataset.fingerprint)) == 2 + 8
    clean_log(tmp / "w.log")


def test_workers_starting_together_on_a_new_database_create_it_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    workers = [start_worker(url, tmp_path, "--once", log=tmp_path / f"w{n}.log") for n in range(3)]
    assert [w.wait(60) for w in workers] == [0, 0, 0]
    for n in range(3):
        assert "Traceback" not in clean_log(tmp_path / f"w{n}.log")
    engine = db.make_engine(url)
    assert jobs.list_jobs(engine) == [] and not jobs.worker_alive(engine)
    engine.dispose()
