"""The Ray executor on a real local Ray cluster: two nodes on this machine (ray.cluster_utils.Cluster), started
once per session. Extraction through Ray writes the embeddings a local extraction writes, even when one of its
actors is killed mid-job; evaluation through Ray gives the local executor's metrics bit for bit; a worker killed
mid-job has its job re-queued, and the next attempt computes only the missing shards; a cancel shuts the
pipeline down and keeps the shards committed; a grid sweep split across the nodes gives the local rows.

Where no Ray cluster can start, CI fails (CI=true) and elsewhere these tests are skipped with the reason."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from core import db, jobs
from core.cache import EmbeddingCache
from core.configs import EvaluateConfig, ExtractConfig
from core.datasets import DatasetError, open_image_folder
from core.extract import extract_embeddings
from core.models import cache_key_for
from core.progress import JobCancelled, Reporter
from core.ray_executor import RAY_REQUIREMENT, RayExecutor, connect, extract_on_ray, sweep_on_ray
from core.scores import load_query_scores
from core.sweep import grid_sweep
from core.tasks import run_job
from core.worker import Worker, WorkerSettings
from core.workspace import Workspace
from tests.images import write_image
from tests.reference import quantised_embeddings, reference_metrics

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["random:test_efficientnet"]
SHARD = 4  # rows per shard: 12 shards over 48 images, so a job can be interrupted between them


@pytest.fixture(scope="session")
def ray_address():
    """A two-node Ray cluster on this machine (2 logical CPUs each), this process connected to it."""
    reason, cluster = None, None
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError:
        reason = f"Ray is not installed: pip install '{RAY_REQUIREMENT}'"
    else:
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
            cluster.add_node(num_cpus=2)
            connect(cluster.address)
        except Exception as error:  # noqa: BLE001 - any failure to start is the reason reported
            reason = f"a local Ray cluster could not start here: {type(error).__name__}: {error}"
    if reason and os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must run the Ray tests, but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    yield cluster.address
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """ImageFolder layout: 4 classes x 12 PNGs, all in the eval split."""
    root = tmp_path_factory.mktemp("ray-images")
    for c in range(4):
        for i in range(12):
            write_image(root / f"class{c}" / f"{i:02d}.png", seed=100 * c + i)
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> dict[str, np.ndarray]:
    """The embeddings of a local extraction (the local executor's code path), on the same shard grid."""
    cache = EmbeddingCache(tmp_path_factory.mktemp("local-cache"))
    found = extract_embeddings(open_image_folder(images), MODELS, cache, device="cpu", shard_size=SHARD)
    return {name: np.array(found[name].load()) for name in MODELS}


def open_workspace(tmp_path) -> tuple[Workspace, object]:
    workspace = Workspace.open(tmp_path / "workspace")
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    return workspace, engine


def cached(workspace: Workspace, images: Path) -> dict[str, np.ndarray]:
    fingerprint, cache = open_image_folder(images).fingerprint, EmbeddingCache(workspace.embeddings)
    with db.read_session(db.make_engine(workspace.db_url)) as session:
        rows = db.embedding_sets_for_dataset(session, fingerprint)
    assert sorted(r.model_name for r in rows) == sorted(MODELS)
    return {r.model_name: np.array(cache.get(fingerprint, r.cache_key).load()) for r in rows}


def assert_same_embeddings(got: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    # Equal up to float rounding: an actor runs torch on one thread, this process on two, and a convolution
    # sums in another order with another thread count.
    assert got.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-5, atol=1e-6)


def embedding_actors() -> list[int]:
    """Pids of the processes running the extraction actor (Ray names its worker processes after the actor)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"_EmbedShards" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def committed_shards(workspace: Workspace) -> int:
    return len(list(workspace.embeddings.glob("*.parts/*.json")))


class KillsAnActor:
    """The Ray executor, with one extraction actor killed (SIGKILL) as soon as the first shard is reported."""

    def __init__(self, executor: RayExecutor, workspace: Workspace):
        self.executor, self.workspace, self.killed_at = executor, workspace, None

    def run(self, job, reporter: Reporter):
        def on_progress(fraction: float, message: str) -> None:
            if self.killed_at is None and "on Ray" in message:
                self.killed_at = committed_shards(self.workspace)
                os.kill(embedding_actors()[0], signal.SIGKILL)
            reporter.progress(fraction, message)

        return self.executor.run(job, Reporter(on_progress=on_progress, is_cancelled=reporter.is_cancelled))


def test_an_extract_job_writes_what_a_local_extraction_writes_even_when_an_actor_dies(
        ray_address, images, reference, tmp_path):
    workspace, engine = open_workspace(tmp_path)
    job = ExtractConfig(dataset=str(images), models=tuple(MODELS)).submit(engine)
    executor = KillsAnActor(RayExecutor(workspace, engine, shard_size=SHARD), workspace)

    Worker(engine, executor, WorkerSettings(once=True, poll_interval_s=0.1), workspace=workspace).run()

    assert executor.killed_at is not None and executor.killed_at < 48 // SHARD  # killed mid-job
    done = jobs.get_job(engine, job.id)
    assert (done.status, done.attempts, done.progress) == ("done", 1, 1.0), done.error
    with db.read_session(engine) as session:
        run = db.get_run(session, done.run_id)
    assert (run.kind, run.status) == ("extract", "done") and run.title.endswith("(on Ray)")
    assert_same_embeddings(cached(workspace, images), reference)


def test_an_evaluate_job_on_ray_scores_exactly_as_the_local_executor(ray_address, images, tmp_path):
    workspace, engine = open_workspace(tmp_path)
    extract_embeddings(open_image_folder(images), MODELS, EmbeddingCache(workspace.embeddings), device="cpu")
    config = EvaluateConfig(dataset=str(images), models=tuple(MODELS), k=5)
    local_run = run_job("evaluate", config.to_dict(), Reporter(), workspace, engine)
    config.submit(engine)
    messages = []

    ray_run = RayExecutor(workspace, engine).run(jobs.claim(engine, "test-worker"),
                                                 Reporter(on_progress=lambda f, m: messages.append(m)))

    with db.read_session(engine) as session:
        local, on_ray = db.get_run(session, local_run), db.get_run(session, ray_run)
    assert on_ray.title.endswith("(on Ray)")
    assert [r.method for r in on_ray.results] == [r.method for r in local.results] == MODELS
    for a, b in zip(local.results, on_ray.results):
        assert a.metrics == b.metrics  # floats compared exactly
        ours, theirs = load_query_scores(workspace, a.id), load_query_scores(workspace, b.id)
        for field in ("ap_at_k", "ap_at_k_hits", "ap_at_r", "p_at_1", "n_relevant"):
            np.testing.assert_array_equal(getattr(ours, field), getattr(theirs, field))
    assert "query blocks on Ray (2 nodes)" in messages[-1]  # one block on each node


def test_any_job_extracts_on_ray_what_it_misses(ray_address, images, reference, tmp_path):
    """An eval-only evaluation (what the demo queues) of a model not cached yet: the job runs core.tasks'
    handler, which embeds the eval split's own set through Ray and scores it there."""
    workspace, engine = open_workspace(tmp_path)
    EvaluateConfig(dataset=str(images), models=tuple(MODELS), k=5, eval_only=True).submit(engine)
    messages = []

    run_id = RayExecutor(workspace, engine, shard_size=SHARD).run(jobs.claim(engine, "test-worker"),
                                                                  Reporter(on_progress=lambda f, m: messages.append(m)))

    eval_split = open_image_folder(images).only("eval")  # every image here is in eval, in the same order
    on_ray = EmbeddingCache(workspace.embeddings).get(eval_split.fingerprint, cache_key_for(MODELS[0]))
    assert_same_embeddings({MODELS[0]: np.array(on_ray.load())}, reference)
    assert any("images on Ray" in m for m in messages), messages
    with db.read_session(engine) as session:
        run = db.get_run(session, run_id)
        assert run.title.endswith("(on Ray)") and len(run.results) == 1
        got = run.results[0].metrics
    want = reference_metrics(reference[MODELS[0]], eval_split.labels, 5)
    for key in ("map@k", "map@r", "p@1"):
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_a_grid_sweep_on_ray_gives_the_local_sweeps_rows(ray_address):
    """Quantised vectors: every weighted cosine is exact in float32, ties are real ties (broken by index), so
    the rows must be equal, not just close, whichever process scored which vectors."""
    rng = np.random.default_rng(5)
    embeddings = [quantised_embeddings(rng, 120, d=12, duplicates=6) for _ in range(3)]
    labels = rng.integers(0, 8, size=120)
    messages = []

    on_ray = sweep_on_ray(embeddings, labels, (0, 1, 2), 10, reporter=Reporter(on_progress=lambda f, m: messages.append(m)))

    assert on_ray == grid_sweep(embeddings, labels, weights=(0, 1, 2), k=10)
    assert len(on_ray) == 3 ** 3 - 1
    assert "on Ray (2 nodes)" in messages[-1], messages  # one share on each node


WORKER = """
import sys
from core import db
from core.ray_executor import RayExecutor, connect
from core.worker import Worker, WorkerSettings
from core.workspace import Workspace

workspace = Workspace.open(sys.argv[1])
engine = db.make_engine(workspace.db_url)
connect(sys.argv[2])
Worker(engine, RayExecutor(workspace, engine, shard_size=int(sys.argv[3])),
       WorkerSettings(once=True, heartbeat_interval_s=0.5)).run()
"""


def test_a_worker_killed_mid_job_has_its_job_requeued_and_finished_from_the_shards_left(
        ray_address, images, reference, tmp_path):
    workspace, engine = open_workspace(tmp_path)
    job = ExtractConfig(dataset=str(images), models=tuple(MODELS)).submit(engine)
    worker = subprocess.Popen([sys.executable, "-c", WORKER, str(workspace.root), ray_address, str(SHARD)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while committed_shards(workspace) == 0 and worker.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.kill()  # SIGKILL: no goodbye, the job stays "running" under a silent worker
    _, stderr = worker.communicate(timeout=60)
    left = committed_shards(workspace)
    assert 0 < left < 48 // SHARD, stderr.decode()[-3000:]
    assert jobs.get_job(engine, job.id).status == "running"
    time.sleep(1.0)  # longer than the next worker's stale_after_s: the dead worker's last heartbeat is stale

    progress = []
    reporter_seen = RecordsProgress(RayExecutor(workspace, engine, shard_size=SHARD), progress)
    Worker(engine, reporter_seen, WorkerSettings(once=True, stale_after_s=0.5, poll_interval_s=0.1),
           workspace=workspace).run()

    done = jobs.get_job(engine, job.id)
    assert (done.status, done.attempts) == ("done", 2), done.error
    first = next(fraction for fraction, message in progress if "on Ray" in message)
    assert first > left * SHARD / 48 - 1e-9  # the second attempt started from the shards the first committed
    assert_same_embeddings(cached(workspace, images), reference)


class RecordsProgress:
    """The Ray executor, with every progress report also kept in a list."""

    def __init__(self, executor: RayExecutor, progress: list):
        self.executor, self.progress = executor, progress

    def run(self, job, reporter: Reporter):
        def on_progress(fraction: float, message: str) -> None:
            self.progress.append((fraction, message))
            reporter.progress(fraction, message)

        return self.executor.run(job, Reporter(on_progress=on_progress, is_cancelled=reporter.is_cancelled))


def test_a_cancel_stops_the_pipeline_and_keeps_the_committed_shards(ray_address, images, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    imageset = open_image_folder(images)
    seen = []
    reporter = Reporter(on_progress=lambda f, m: seen.append(m), is_cancelled=lambda: any("on Ray" in m for m in seen))
    with pytest.raises(JobCancelled):
        extract_on_ray(imageset, MODELS, cache, reporter=reporter, shard_size=SHARD)
    key = cache_key_for(MODELS[0])
    assert cache.get(imageset.fingerprint, key) is None  # nothing assembled
    assert 0 < len(cache.shards(imageset.fingerprint, key)) < 48 // SHARD
    deadline = time.monotonic() + 60
    while embedding_actors() and time.monotonic() < deadline:  # the pipeline's actors are shut down
        time.sleep(0.2)
    assert embedding_actors() == []


def test_an_image_broken_after_the_dataset_was_opened_fails_with_its_path(ray_address, tmp_path):
    for c in range(2):
        for i in range(2):
            write_image(tmp_path / "images" / f"class{c}" / f"{i}.png", seed=10 * c + i)
    imageset = open_image_folder(tmp_path / "images")
    Path(imageset.paths[1]).write_bytes(b"not a PNG any more")
    with pytest.raises(DatasetError, match=rf"Image {re.escape(imageset.paths[1])} \(row 1\) could not be decoded"):
        extract_on_ray(imageset, MODELS, EmbeddingCache(tmp_path / "cache"))


CLI = """
import sys
from core.worker import main

sys.modules["ray"] = None  # as if Ray were not installed
print("without ray:", main(sys.argv[2:]), flush=True)
del sys.modules["ray"]
print("no cluster:", main([*sys.argv[2:], "--ray-address", "127.0.0.1:1"]), flush=True)
print("cluster:", main([*sys.argv[2:], "--ray-address", sys.argv[1]]), flush=True)
"""


def test_the_ray_worker_says_how_to_install_ray_or_start_a_cluster_and_runs_with_one(ray_address, tmp_path):
    done = subprocess.run([sys.executable, "-c", CLI, ray_address, "--workspace", str(tmp_path / "workspace"),
                           "--once", "--executor", "ray"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.splitlines() == ["without ray: 2", "no cluster: 2", "cluster: 0"], done.stderr[-3000:]
    assert f"pip install '{RAY_REQUIREMENT}'" in done.stderr
    assert "No Ray cluster answers at 127.0.0.1:1" in done.stderr and "ray start --head" in done.stderr
