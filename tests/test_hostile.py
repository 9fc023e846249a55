"""Every probe of the issue "Hostile and broken inputs: no code execution, no silent wrong number, no raw
traceback", replayed with real files, real SQLite and, where a process boundary matters, real processes.
docs/hostile-inputs.md lists each probe, what happens now, and the test here (or elsewhere, in depth).

Full disks are real where this process may mount a tmpfs (root with CAP_SYS_ADMIN, as in CI): a 1 MiB tmpfs
filled to its last block. Elsewhere (or with ENSEMBLE_TEST_NO_MOUNT=1) file writes under the folder are
refused with ENOSPC at fsync, in this process and, through a generated sitecustomize, in worker processes;
the one probe that needs SQLite itself to meet a full disk is skipped there, with the reason.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import db, jobs
from core.__main__ import main as cli_main
from core.cache import EmbeddingCache
from core.configs import ConfigError, Settings, SweepConfig
from core.datasets import open_dataset
from core.errors import user_message
from core.progress import JobCancelled, Reporter
from core.tasks import job_kind, run_job
from core.worker import EXIT_DB_REPLACED, EXIT_DB_UNWRITABLE, Worker, WorkerSettings
from core.workspace import Workspace
from tests.images import header_only_png, wait_for, write_image
from tests.reference import reference_metrics

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
MODEL = "random:test_efficientnet"  # tiny, random, offline
METRICS = ("map@k", "map@k_hits", "map@r", "p@1")
# Markup, a quote, SQL and a format field: each must come back verbatim and do nothing on the way.
HOSTILE = "<img src=x onerror=alert('x')> <b>b<b> '; DROP TABLE jobs; -- {dataset} **md**"  # no "/": a folder name too


# --- a job kind for worker processes (registered when a worker imports this module) ---------------------


@dataclass(frozen=True)
class Nap(Settings):
    kind = "hostile_nap"
    steps: int
    log: str
    token: str


@job_kind(Nap)
def nap(config: Nap, reporter, workspace, engine):
    """Sleeps in short steps, logging each to `log` (O_APPEND: whole lines from any process)."""
    for step in range(config.steps):
        reporter.check_cancel()
        with open(config.log, "a") as log:
            log.write(f"{config.token} {os.getpid()} {step}\n")
        time.sleep(0.05)
        reporter.progress((step + 1) / config.steps, f"step {step + 1}")
    with open(config.log, "a") as log:
        log.write(f"{config.token} {os.getpid()} done\n")


# --- helpers ------------------------------------------------------------------------------------------


FAST = ["--poll-interval", "0.05", "--heartbeat-interval", "0.2", "--progress-interval", "0.05"]


def start_worker(workspace: Path, *flags: str, log: Path, prefix=(), env=None, db_url=None) -> subprocess.Popen:
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}]; import tests.test_hostile; "
            "from core.worker import main; sys.exit(main(sys.argv[1:]))")
    url = ["--db-url", db_url] if db_url else []
    return subprocess.Popen([*prefix, sys.executable, "-c", code, "--workspace", str(workspace), *url, *FAST, *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "ab"),
                            env={**os.environ, **(env or {})})


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def cli(workspace: Path, *args) -> tuple[int, str, str]:
    """`python -m core --workspace <workspace> <args>` in this process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["--workspace", str(workspace), *map(str, args)])
    return code, out.getvalue(), err.getvalue()


def one_error_line(stderr: str) -> str:
    """The CLI's failure: exactly one "error:" line, no traceback (progress bars may come before it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0].removeprefix("error: ")


def runs_by_status(workspace: Path) -> dict[str, int]:
    engine = db.make_engine(f"sqlite:///{workspace / 'runs.db'}")
    db.init_db(engine)
    with db.read_session(engine) as session:
        statuses = [run.status for run in db.list_runs(session, limit=1000)]
    engine.dispose()
    return {status: statuses.count(status) for status in set(statuses)}


def open_workspace(path: Path):
    workspace = Workspace.open(path)
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    return workspace, engine


def embeddings_of(workspace: Path, model: str = MODEL):
    """The one cached set of `model` in this workspace."""
    (found,) = [s for s in EmbeddingCache(Path(workspace) / "embeddings").list() if s.model_name == model]
    return found


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """ImageFolder with train/ and eval/: 3 classes x 4 small PNGs each, a base colour per class."""
    root = tmp_path_factory.mktemp("images")
    for split, offset in (("train", 0), ("eval", 100)):
        for c in range(3):
            for i in range(4):
                write_image(root / split / f"c{c}" / f"{i}.png", seed=offset + 10 * c + i, size=24)
    return root


# --- full disks -----------------------------------------------------------------------------------------

_FSYNC_HOOK = '''
import errno, os
_folder, _fsync = os.environ["HOSTILE_FULL_FOLDER"], os.fsync
def _refusing_fsync(fd):
    if os.path.realpath(f"/proc/self/fd/{fd}").startswith(_folder + os.sep):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return _fsync(fd)
os.fsync = _refusing_fsync
'''


class FullDisk:
    """A folder whose disk can be made full: a real tmpfs filled to its last block, or the fsync hook."""

    def __init__(self, folder: Path, tmp_path: Path):
        self.folder, self._patch, self.env = folder, pytest.MonkeyPatch(), {}
        folder.mkdir(parents=True, exist_ok=True)
        refused = "ENSEMBLE_TEST_NO_MOUNT is set" if os.environ.get("ENSEMBLE_TEST_NO_MOUNT") else None
        if refused is None:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
                                  capture_output=True, text=True)
            refused = None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")
        self.real, self.why_not_real = refused is None, refused
        self._hook = tmp_path / "full-disk-hook"
        self._filler = folder / "filler"

    def fill(self) -> None:
        if self.real:
            with open(self._filler, "wb", buffering=0) as handle, contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * 4096)
            return
        self._hook.mkdir(exist_ok=True)
        (self._hook / "sitecustomize.py").write_text(_FSYNC_HOOK)
        self.env = {"PYTHONPATH": str(self._hook), "HOSTILE_FULL_FOLDER": str(self.folder.resolve())}
        real_fsync = os.fsync

        def refusing_fsync(fd):
            if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(self.folder.resolve()) + os.sep):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        self._patch.setattr(os, "fsync", refusing_fsync)

    def free(self) -> None:
        self._filler.unlink(missing_ok=True)
        self.env = {}
        self._patch.undo()

    def files(self) -> list[str]:
        """Every file under the folder except the filler, relative to it."""
        return sorted(str(p.relative_to(self.folder)) for p in self.folder.rglob("*") if p.is_file() and p != self._filler)

    def unmount(self) -> None:
        self._patch.undo()
        if self.real:
            subprocess.run(["umount", "-l", str(self.folder)], check=False)


@pytest.fixture
def full_disk(tmp_path):
    """full_disk(folder) -> FullDisk; unmounted after the test."""
    disks = []

    def make(folder: Path) -> FullDisk:
        disks.append(FullDisk(folder, tmp_path))
        return disks[-1]

    yield make
    for disk in disks:
        disk.unmount()


def without_privileges() -> list[str]:
    """Command prefix under which file permissions apply: root ignores them unless its capabilities are dropped."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: a read-only file would still be writable")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]


# --- code execution ----------------------------------------------------------------------------------


class TouchMarker:
    """Unpickling this runs a shell command that creates `marker`: what a crafted checkpoint.pt can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_heads_checkpoint_runs_no_code(tmp_path, images):
    """In depth: tests/test_head_checkpoints.py. Here the whole train-head job: stopped after one epoch, a
    crafted checkpoint.pt planted beside its real checkpoint, then resumed."""
    workspace, engine = open_workspace(tmp_path / "ws")
    params = {"dataset": str(images), "models": [MODEL], "device": "cpu", "k": 3,
              "head": {"epochs": 3, "val_fraction": 0.5, "out_dim": 8, "hidden_dim": 0, "batch_size": 16}}
    epochs = []
    stop_after_one = Reporter(is_cancelled=lambda: len(epochs) >= 1, on_metrics=lambda row: epochs.append(row["epoch"]))
    with pytest.raises(JobCancelled):
        run_job("train_head", params, stop_after_one, workspace, engine)
    (planted,) = (workspace.heads / "checkpoints").iterdir()
    marker = tmp_path / "pwned"
    (planted / "checkpoint.pt").write_bytes(pickle.dumps(TouchMarker(marker)))
    messages = []
    resumed = Reporter(on_progress=lambda f, m: messages.append(m), on_metrics=lambda row: epochs.append(row["epoch"]))
    run_id = run_job("train_head", params, resumed, workspace, engine)
    assert not marker.exists() and not (planted / "checkpoint.pt").exists()
    assert any("checkpoint.pt unread" in m and "never loaded" in m for m in messages)
    assert epochs == [1, 2, 3]  # the real checkpoint was resumed
    with db.read_session(engine) as session:
        assert db.get_run(session, run_id).status == "done"


# --- weights, k and other values -----------------------------------------------------------------------


@pytest.mark.parametrize("weights, message", [
    ("1e20,1", "weight 1e+20 is out of range: use 0 (leave the model out) or a value between 0.01 and 100"),
    ("nan,1", "weight 'nan' is not a finite number"),
    ("inf,1", "weight 'inf' is not a finite number"),
    ("1e-25,1", "weight 1e-25 is out of range: use 0 (leave the model out) or a value between 0.01 and 100"),
    (",".join(str(w) for w in range(101)),
     "101 weight values over 4 models make 104,060,401 weight vectors; the limit is 100,000."),
], ids=["1e20", "nan", "inf", "1e-25", "0..100 over 4 models"])
def test_hostile_sweep_weights_are_refused_by_the_cli_and_the_form_layer(tmp_path, images, weights, message):
    models = ["random:test_efficientnet", "random:test_vit", "random:test_convnext", "random:test_byobnet"]
    code, _, stderr = cli(tmp_path, "sweep", "--dataset", images, "--models", ",".join(models), "--weights", weights)
    assert code == 2 and one_error_line(stderr).startswith(message)
    with pytest.raises(ConfigError) as refused:  # what the Sweep form builds
        SweepConfig.from_dict({"dataset": str(images), "models": models, "weights": weights})
    assert str(refused.value).startswith(message)
    assert runs_by_status(tmp_path) == {}  # refused before any dataset was opened or run started


@pytest.mark.parametrize("args, message, runs", [
    (("evaluate", "--dataset", "{images}", "--models", "no_such_model", "--k", "3"), "no_such_model", {"failed": 1}),
    (("evaluate", "--dataset", "{images}", "--models", MODEL, "--k", "0"), "k must be between 1 and 10,000, got 0", {}),
    (("embed", "{tmp}/no-such-artifact", "{images}/eval/c0/0.png", "--out", "{tmp}/v.npy"),
     "no-such-artifact is not an exported method (no manifest.json)", {}),
], ids=["unknown model", "k=0", "missing artifact"])
def test_cli_failures_are_one_line_and_leave_no_run_running(tmp_path, images, args, message, runs):
    """In depth (every CLI failure as a real subprocess): tests/test_cli.py."""
    code, _, stderr = cli(tmp_path, *(a.format(tmp=tmp_path, images=images) for a in args))
    assert code == 2 and message in one_error_line(stderr)
    assert runs_by_status(tmp_path) == runs
    assert not (tmp_path / "v.npy").exists()


def test_a_full_disk_fails_the_cli_with_one_line_and_closes_its_run(tmp_path, images, full_disk):
    disk = full_disk(tmp_path / "ws" / "embeddings")
    disk.fill()
    code, _, stderr = cli(tmp_path / "ws", "extract", "--dataset", images, "--models", MODEL)
    assert code == 2
    assert one_error_line(stderr) == "the disk is full; free some space and run it again: nothing half-written was kept"
    assert runs_by_status(tmp_path / "ws") == {"failed": 1}
    assert disk.files() == []  # no shard, set, marker or temp file: nothing half-written is visible
    disk.free()
    assert cli(tmp_path / "ws", "extract", "--dataset", images, "--models", MODEL)[0] == 0
    assert embeddings_of(tmp_path / "ws").n == 24


# --- datasets --------------------------------------------------------------------------------------------


def _manifest(path: Path, rows) -> Path:
    path.write_text("path,label,split\n" + "".join(f"{p},{label},eval\n" for p, label in rows))
    return path


def _evaluate(workspace: Path, dataset, k: int = 3) -> dict:
    code, stdout, stderr = cli(workspace, "evaluate", "--dataset", dataset, "--models", MODEL, "--k", k, "--json")
    assert code == 0, stderr
    return json.loads(stdout)[0]


def test_duplicate_manifest_rows_score_like_the_deduplicated_brute_force(tmp_path, images):
    """In depth: tests/test_dataset_guards.py (duplicates by path, spelling, symlink and content)."""
    originals = [(images / "eval" / f"c{c}" / f"{i}.png", f"c{c}") for c in range(3) for i in range(4)]
    shutil.copy(originals[0][0], tmp_path / "copy.png")  # the same bytes under another name
    clean = _manifest(tmp_path / "clean.csv", originals)
    repeated = _manifest(tmp_path / "repeated.csv", originals + [
        originals[0], originals[5], (images / "eval" / "c1" / ".." / "c1" / "1.png", "c1"), (tmp_path / "copy.png", "c0")])
    got = _evaluate(tmp_path / "ws", repeated)
    assert got["n_queries"] == 12

    vectors, labels = np.asarray(embeddings_of(tmp_path / "ws").load()), [label for _, label in originals]
    assert open_dataset(str(clean), None).fingerprint == open_dataset(str(repeated), None).fingerprint
    expected = reference_metrics(vectors, labels, 3)
    for key in METRICS:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    # Had the duplicates been kept, each would be its twin's perfect neighbour: a different, inflated number.
    keep = list(range(12)) + [0, 5, 5, 0]
    inflated = reference_metrics(vectors[keep], [labels[i] for i in keep], 3)
    assert inflated["map@k"] != pytest.approx(expected["map@k"], abs=1e-3)


def test_one_path_with_two_labels_and_a_one_class_eval_set_are_one_line_each(tmp_path, images):
    """In depth: tests/test_dataset_guards.py."""
    a, b = images / "eval" / "c0" / "0.png", images / "eval" / "c1" / "0.png"
    conflicting = _manifest(tmp_path / "conflict.csv", [(a, "x"), (b, "y"), (a, "y")])
    code, _, stderr = cli(tmp_path, "evaluate", "--dataset", conflicting, "--models", MODEL, "--k", "1")
    line = one_error_line(stderr)
    assert code == 2 and f"{a}: labelled x, y" in line and "fix or delete the conflicting rows" in line
    one_class = _manifest(tmp_path / "one.csv", [(a, "x"), (b, "x")])
    code, _, stderr = cli(tmp_path, "evaluate", "--dataset", one_class, "--models", MODEL, "--k", "1")
    assert code == 2 and "only class 'x'" in one_error_line(stderr) and "at least two classes" in stderr
    assert runs_by_status(tmp_path) == {}


def test_a_sixteen_bit_png_embeds_like_its_eight_bit_twin(tmp_path, images):
    """In depth (every mode, hand-computed pixels): tests/test_dataset_guards.py."""
    values = np.random.default_rng(3).integers(300, 65536, (24, 24), dtype=np.uint16)
    twin = np.round(values / 257).astype(np.uint8)  # by hand: 0..65535 onto 0..255
    folder = tmp_path / "set"
    for name in "xy":
        (folder / name).mkdir(parents=True)
    Image.fromarray(values).save(folder / "x" / "deep.png")
    Image.fromarray(twin).convert("RGB").save(folder / "y" / "twin.png")
    for c, name in enumerate("xy"):
        shutil.copy(images / "eval" / f"c{c}" / "0.png", folder / name / "other.png")
    with Image.open(folder / "x" / "deep.png") as deep:
        assert deep.mode == "I;16" and (np.asarray(deep.convert("RGB")) == 255).all()  # what convert() alone gives
    assert cli(tmp_path / "ws", "extract", "--dataset", folder, "--models", MODEL)[0] == 0
    imageset = open_dataset(str(folder), None)
    rows = {Path(p).name: i for i, p in enumerate(imageset.paths)}
    vectors = np.asarray(embeddings_of(tmp_path / "ws").load())
    np.testing.assert_allclose(vectors[rows["deep.png"]], vectors[rows["twin.png"]], rtol=0, atol=1e-6)
    assert not np.allclose(vectors[rows["deep.png"]], vectors[rows["other.png"]], atol=1e-3)


def _decompression_bomb(path: Path, side: int = 100_000) -> Path:
    """A PNG header claiming side x side pixels (10 gigapixels) with a few bytes of data: PIL refuses to open it."""
    path.write_bytes(header_only_png(side, side, data=b"\0" * 64, colour_type=0))
    return path


def test_a_truncated_jpeg_and_a_decompression_bomb_are_skipped_and_listed_and_the_rest_extracted(tmp_path, images):
    """In depth: tests/test_dataset_guards.py (truncated JPEG/PNG), tests/test_datasets.py (broken files)."""
    folder = tmp_path / "set"
    shutil.copytree(images / "eval", folder)
    jpeg = write_image(tmp_path / "good.jpg", seed=5, size=24, fmt="JPEG").read_bytes()
    (folder / "c0" / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    _decompression_bomb(folder / "c1" / "bomb.png")
    assert cli(tmp_path / "ws", "extract", "--dataset", folder, "--models", MODEL)[0] == 0
    reasons = {Path(s.path).name: s.reason for s in open_dataset(str(folder), None).skipped}
    assert set(reasons) == {"cut.jpg", "bomb.png"}
    assert reasons["cut.jpg"].startswith("truncated JPEG")
    assert reasons["bomb.png"].startswith("not a readable image: DecompressionBombError")
    assert embeddings_of(tmp_path / "ws").n == 12
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ws' / 'runs.db'}")
    with db.read_session(engine) as session:
        (dataset,) = db.list_datasets(session)
        assert (dataset.n_images, dataset.n_skipped) == (12, 2)


# --- the embedding cache -----------------------------------------------------------------------------------


def test_cached_embeddings_changed_on_disk_are_refused_or_recomputed_never_used(tmp_path, images):
    """In depth: tests/test_cache.py, tests/test_extract.py."""
    ws, dataset = tmp_path / "ws", images / "eval"
    before = _evaluate(ws, dataset)
    found = embeddings_of(ws)
    for damage in ("other numbers of the same shape", "NaN"):
        stored = np.load(found.path, mmap_mode="r+")
        if damage == "NaN":
            stored[3, 0] = np.nan
        else:
            stored[:] = np.random.default_rng(1).normal(size=stored.shape)
        stored.flush()
        del stored
        code, _, stderr = cli(ws, "evaluate", "--dataset", dataset, "--models", MODEL, "--k", "3")
        line = one_error_line(stderr)
        assert code == 2 and "do not match their checksum" in line and "--force" in line, damage
        assert cli(ws, "extract", "--dataset", dataset, "--models", MODEL, "--force")[0] == 0
        assert _evaluate(ws, dataset) == before
    with open(found.path, "r+b") as handle:  # cut short, as by a crash of something other than this app
        handle.truncate(os.path.getsize(found.path) // 2)
    assert _evaluate(ws, dataset) == before  # not a cache entry any more: extracted again
    assert runs_by_status(ws).get("running", 0) == 0


# --- values stored in the runs database -----------------------------------------------------------------


def test_markup_and_sql_in_names_and_params_are_stored_verbatim(tmp_path, images):
    folder = tmp_path / HOSTILE
    shutil.copytree(images / "eval", folder)
    assert cli(tmp_path / "ws", "extract", "--dataset", folder, "--models", MODEL)[0] == 0
    workspace, engine = open_workspace(tmp_path / "ws")
    job = jobs.submit(engine, "evaluate", {"dataset": HOSTILE, "models": [HOSTILE], "note": [HOSTILE, {HOSTILE: 1}]})
    assert jobs.get_job(engine, job.id).params == {"dataset": HOSTILE, "models": [HOSTILE], "note": [HOSTILE, {HOSTILE: 1}]}
    with db.read_session(engine) as session:
        (dataset,) = db.list_datasets(session)
        (run,) = db.list_runs(session)
        assert dataset.name == HOSTILE and run.title.endswith(f" on {HOSTILE}")
        assert run.config["dataset"] == str(folder)
    tables = set(db.Base.metadata.tables)
    with engine.connect() as connection:
        present = {row[0] for row in connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables <= present  # nothing was dropped


# --- the job queue and worker processes ------------------------------------------------------------------


def test_kill_9_duplicates_cancel_two_workers_and_hostile_params(tmp_path):
    """In depth: tests/test_worker.py and tests/test_jobs.py. Two workers share one database; the one running
    the long job is killed -9 mid-job, and the other re-queues and completes it; every job runs exactly once;
    an identical submission joins the queued job; a cancelled queued job never runs; a job with hostile
    params fails in one line."""
    workspace, engine = open_workspace(tmp_path / "ws")
    log = tmp_path / "nap.log"
    long = jobs.submit(engine, "hostile_nap", {"steps": 30, "log": str(log), "token": "long"})
    assert jobs.submit(engine, "hostile_nap", {"token": "long", "log": str(log), "steps": 30}).id == long.id
    short = [jobs.submit(engine, "hostile_nap", {"steps": 2, "log": str(log), "token": f"s{i}"}).id for i in range(6)]
    doomed = jobs.submit(engine, "hostile_nap", {"steps": 2, "log": str(log), "token": "cancelled"})
    assert jobs.request_cancel(engine, doomed.id).status == "cancelled"
    hostile = jobs.submit(engine, "evaluate", {"dataset": HOSTILE, "models": [MODEL], "k": 3, "device": "cpu"})
    workers = {w.pid: w for w in (start_worker(workspace.root, "--stale-after", "1", log=tmp_path / f"w{n}.log")
                                  for n in (1, 2))}
    def long_job_owner():
        steps = [line.split() for line in lines(log) if line.startswith("long ")]
        return int(steps[0][1]) if len(steps) >= 3 else None

    try:
        workers.pop(wait_for(long_job_owner)).send_signal(signal.SIGKILL)
        (survivor,) = workers.values()
        wait_for(lambda: {jobs.get_job(engine, i).status for i in [long.id, *short, hostile.id]} <= {"done", "failed"})
    finally:
        for worker in workers.values():
            worker.send_signal(signal.SIGTERM)
    assert survivor.wait(30) == 0

    done = [line.split()[0] for line in lines(log) if line.endswith(" done")]
    assert sorted(done) == sorted(["long"] + [f"s{i}" for i in range(6)])  # each exactly once
    assert f"long {survivor.pid} done" in lines(log)
    assert not any(line.startswith("cancelled ") for line in lines(log))
    got = jobs.get_job(engine, long.id)
    assert (got.status, got.attempts) == ("done", 2)
    assert {jobs.get_job(engine, i).status for i in short} == {"done"}
    failed = jobs.get_job(engine, hostile.id)
    assert failed.status == "failed" and failed.message.startswith(repr(HOSTILE))
    assert failed.message == failed.error.split("\n\n")[0] and "\n" not in failed.message
    assert "Traceback" not in "".join(p.read_text() for p in tmp_path.glob("w*.log"))


def test_deleting_the_runs_database_under_a_busy_worker_stops_it_and_the_dashboard_says_so(tmp_path):
    workspace, engine = open_workspace(tmp_path / "ws")  # `engine` plays the dashboard's
    log = tmp_path / "nap.log"
    jobs.submit(engine, "hostile_nap", {"steps": 600, "log": str(log), "token": "long"})
    worker = start_worker(workspace.root, log=tmp_path / "w.log")
    wait_for(lambda: len(lines(log)) >= 2)
    assert jobs.queue_problem(engine, workspace) is None
    for path in workspace.root.glob("runs.db*"):
        path.unlink()
    assert worker.wait(30) == EXIT_DB_REPLACED
    steps = len(lines(log))
    time.sleep(0.3)
    assert len(lines(log)) == steps  # the job stopped with its worker

    text = (tmp_path / "w.log").read_text()
    assert "Traceback" not in text
    (stopped,) = [line for line in text.splitlines() if " ERROR " in line]
    path = workspace.root / "runs.db"
    assert stopped.endswith(f"worker stopped: The runs database {path} was deleted after this process opened it; "
                            "restart the worker so it opens the database now at that path")
    shown = jobs.queue_problem(engine, workspace)
    assert shown.startswith(f"The runs database {path} was deleted after this process opened it: jobs submitted now "
                            "would never reach a worker")
    dashboard_restarted = db.make_engine(workspace.db_url)
    db.init_db(dashboard_restarted)
    shown = jobs.queue_problem(dashboard_restarted, workspace)
    assert shown.startswith(f"The last worker (pid {worker.pid} on ") and "was deleted after" in shown
    assert not jobs.worker_alive(dashboard_restarted)


class _NoJobs:
    def run(self, job, reporter):
        raise AssertionError("no job should run")


def test_an_idle_worker_stops_when_its_database_is_replaced(tmp_path):
    workspace, engine = open_workspace(tmp_path / "ws")
    other = db.make_engine(f"sqlite:///{tmp_path / 'other.db'}")
    db.init_db(other)
    other.dispose()
    os.replace(tmp_path / "other.db", workspace.root / "runs.db")
    settings = WorkerSettings(poll_interval_s=0.01, heartbeat_interval_s=0.05)
    assert Worker(engine, _NoJobs(), settings, workspace=workspace).run() == EXIT_DB_REPLACED
    message = f"The runs database {workspace.root / 'runs.db'} was replaced by another file after this process opened it"
    assert workspace.last_worker_exit().message.startswith(message)
    assert jobs.queue_problem(engine, workspace).startswith(message)


READ_ONLY = "the runs database is read-only: check the permissions of its file and folder (or ENSEMBLE_DB_URL) and try again"


def test_a_worker_in_a_read_only_folder_exits_with_one_line_the_dashboard_can_show(tmp_path):
    """Real file permissions, in a real worker process (as root, with its capabilities dropped)."""
    workspace = Workspace.open(tmp_path / "ws")
    url = f"sqlite:///{tmp_path / 'db' / 'runs.db'}"  # a folder of its own: the workspace stays writable
    (tmp_path / "db").mkdir()
    engine = db.make_engine(url)
    db.init_db(engine)
    job = jobs.submit(engine, "hostile_nap", {"steps": 1, "log": str(tmp_path / "nap.log"), "token": "t"})
    engine.dispose()  # the last connection out folds the WAL back into the file
    (tmp_path / "db" / "runs.db").chmod(0o444)
    (tmp_path / "db").chmod(0o555)
    try:
        worker = start_worker(workspace.root, db_url=url, log=tmp_path / "w.log", prefix=without_privileges())
        assert worker.wait(120) == EXIT_DB_UNWRITABLE
    finally:
        (tmp_path / "db").chmod(0o755)
        (tmp_path / "db" / "runs.db").chmod(0o644)
    text = (tmp_path / "w.log").read_text()
    assert "Traceback" not in text
    assert [line.split(" ERROR ", 1)[1] for line in text.splitlines() if " ERROR " in line] == [f"worker stopped: {READ_ONLY}"]
    recorded = workspace.last_worker_exit()
    assert (recorded.message, recorded.pid, recorded.db) == (READ_ONLY, worker.pid, url)
    engine = db.make_engine(url)
    assert jobs.get_job(engine, job.id).status == "queued"
    assert READ_ONLY in jobs.queue_problem(engine, workspace)


def test_a_worker_on_a_read_only_database_file_exits_with_one_line(tmp_path):
    """The same through SQLite's own read-only mode, in this process: the worker's register step fails."""
    workspace, engine = open_workspace(tmp_path / "ws")
    engine.dispose()
    read_only = db.make_engine(f"sqlite:///file:{workspace.root / 'runs.db'}?mode=ro&uri=true")
    assert Worker(read_only, _NoJobs(), WorkerSettings(poll_interval_s=0.01), workspace=workspace).run() == EXIT_DB_UNWRITABLE
    assert workspace.last_worker_exit().message == READ_ONLY


def test_a_worker_whose_database_disk_is_full_exits_with_one_line(tmp_path, full_disk):
    disk = full_disk(tmp_path / "disk")
    if not disk.real:
        pytest.skip(f"needs SQLite on a really full disk: a tmpfs cannot be mounted here ({disk.why_not_real})")
    workspace = Workspace.open(tmp_path / "ws")
    url = f"sqlite:///{disk.folder / 'runs.db'}"
    engine = db.make_engine(url)
    db.init_db(engine)
    jobs.submit(engine, "hostile_nap", {"steps": 1, "log": str(tmp_path / "nap.log"), "token": "t"})
    held = engine.raw_connection()  # keeps the WAL files in place, emptied: the next write must grow one
    worker_engine = db.make_engine(url)
    try:
        held.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        disk.fill()
        db.init_db(worker_engine)
        code = Worker(worker_engine, _NoJobs(), WorkerSettings(poll_interval_s=0.01), workspace=workspace).run()
    finally:
        held.close()
        worker_engine.dispose()
    assert code == EXIT_DB_UNWRITABLE
    expected = "the disk holding the runs database is full; free some space and try again"
    assert workspace.last_worker_exit().message == expected
    assert expected in jobs.queue_problem(engine, workspace)


def test_a_job_that_fills_the_disk_fails_with_one_line_and_leaves_nothing_half_written(tmp_path, images, full_disk):
    workspace, engine = open_workspace(tmp_path / "ws")
    disk = full_disk(workspace.embeddings)
    params = {"dataset": str(images / "eval"), "models": [MODEL], "device": "cpu"}
    job = jobs.submit(engine, "extract", params)
    disk.fill()
    worker = start_worker(workspace.root, log=tmp_path / "w.log", env=disk.env)
    try:
        failed = wait_for(lambda: (j := jobs.get_job(engine, job.id)).status == "failed" and j, timeout=120)
        assert failed.message == ("the disk is full; free some space and run it again: nothing half-written was "
                                  "kept")
        assert failed.error.startswith(failed.message + "\n\nTraceback")  # details for whoever debugs it
        with db.read_session(engine) as session:
            assert db.get_run(session, failed.run_id).status == "failed"
        assert disk.files() == [] and EmbeddingCache(workspace.embeddings).list() == []

    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    assert "Traceback" not in (tmp_path / "w.log").read_text()
    disk.free()  # and the cache and the database are consistent: the same extraction now just works
    assert cli(workspace.root, "extract", "--dataset", images / "eval", "--models", MODEL)[0] == 0
    assert embeddings_of(workspace.root).n == 12


def test_user_message_names_every_storage_failure():
    """The lines above come from here; each case built from the real error type."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    def sqlite_error(text):
        return OperationalError("INSERT ...", {}, sqlite3.OperationalError(text))

    assert user_message(OSError(errno.ENOSPC, "No space left on device", "/w/x.npy")) == (
        "the disk holding /w/x.npy is full; free some space and run it again: nothing half-written was kept")
    assert user_message(sqlite_error("database or disk is full")) == (
        "the disk holding the runs database is full; free some space and try again")
    assert user_message(sqlite_error("attempt to write a readonly database")).startswith("the runs database is read-only")
    assert user_message(sqlite_error("database is locked")) == "the runs database failed: (sqlite3.OperationalError) database is locked"
