"""python -m core as a user runs it: real subprocesses, a real workspace, clear errors, no tracebacks."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODELS = "random:test_efficientnet,random:test_vit"


def cli(workspace, *args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "core", "--workspace", str(workspace), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "eval"):
        for c in range(3):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(4):
                pixels = np.clip(rng.normal(60 + 60 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    (root / "eval" / "class0" / "broken.png").write_bytes(b"not an image")
    return root


def test_models_lists_the_offline_four(tmp_path):
    listed = json.loads(cli(tmp_path, "models", "--json").stdout)
    offline = {m["name"] for m in listed if m["availability"] == "offline"}
    assert {"tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "open_nsfw_resnet50_thin"} <= offline


def test_evaluate_sweep_report_and_export_on_a_folder(folder, tmp_path):
    rows = json.loads(cli(tmp_path, "evaluate", "--dataset", str(folder), "--models", MODELS, "--k", "3", "--json").stdout)
    assert [r["method"] for r in rows] == MODELS.split(",")
    assert all(r["n_queries"] == 12 and 0 <= r["map@k"] <= 1 for r in rows)  # the corrupt file is skipped
    swept = json.loads(cli(tmp_path, "sweep", "--dataset", str(folder), "--models", MODELS, "--k", "3",
                           "--weights", "0,1,2", "--json", "--top", "0").stdout)
    assert len(swept) == 8
    assert sorted(r["chosen on"] for r in swept) == ["eval"] * 4 + ["none"] * 4  # one model alone is not tuned
    report = cli(tmp_path, "report", "--dataset", str(folder), "--k", "3").stdout
    assert "## Single models" in report and "## Best 2-model concatenations" in report and "map@k_hits" in report
    out = tmp_path / "artifact"
    best_id = None
    from core import db
    engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    with db.read_session(engine) as session:
        best_id = max((r for r in session.query(db.Result) if r.weights and all(r.weights)),
                      key=lambda r: r.metrics["map@k"]).id
    cli(tmp_path, "export", str(best_id), "--out", str(out))
    cli(tmp_path, "embed", str(out), str(next((folder / "eval" / "class1").glob("*.png"))), "--out", str(tmp_path / "v.npy"))
    vector = np.load(tmp_path / "v.npy")
    assert vector.shape[0] == 1 and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("args, message", [
    (("evaluate", "--dataset", "/no/such/folder", "--models", MODELS), "neither 'demo', an existing folder"),
    (("evaluate", "--dataset", "{folder}", "--models", "no_such_model", "--k", "3"), "no_such_model"),
    (("report", "--dataset", "{folder}"), "No results"),
    (("sweep", "--dataset", "{folder}", "--models", MODELS, "--weights", "1e20,1", "--k", "3"), "out of range"),
    (("sweep", "--dataset", "{folder}", "--models", MODELS, "--weights", "nan,1"), "not a finite number"),
    (("sweep", "--dataset", "{folder}", "--models", MODELS, "--weights", "1e-25,1"), "out of range"),
    (("sweep", "--dataset", "{folder}", "--models", MODELS, "--weights", ",".join(str(0.25 * i) for i in range(401))),
     "weight vectors"),
    (("evaluate", "--dataset", "{folder}", "--models", MODELS, "--k", "0"), "k must be between"),
    (("evaluate", "--dataset", "{folder}", "--models", MODELS, "--k", "100000"), "k must be between"),
    (("evaluate", "--dataset", "{folder}", "--models", MODELS, "--k", "500"), "choose k of at most"),
    (("embed", "{folder}", "x.png", "--out", "v.npy"), "no such file"),
])
def test_user_errors_are_one_clear_line_and_leave_no_run_running(folder, tmp_path, args, message):
    proc = cli(tmp_path, *(a.format(folder=folder) for a in args), ok=False)
    assert proc.returncode in (1, 2) and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    from core import db
    engine = db.make_engine(f"sqlite:///{tmp_path / 'runs.db'}")
    db.init_db(engine)
    with db.read_session(engine) as session:
        assert [r.status for r in db.list_runs(session) if r.status == "running"] == []


@pytest.mark.parametrize("method, kind, chosen", [("rrf", "rank", "none"), ("select-weights", "concat", "train")])
def test_fuse_runs_a_fusion_method_and_reports_how_it_was_chosen(folder, tmp_path, method, kind, chosen):
    rows = json.loads(cli(tmp_path, "fuse", "--method", method, "--dataset", str(folder), "--models", MODELS,
                          "--k", "3", "--weights", "0,1,2" if method == "select-weights" else "1,1", "--json").stdout)
    (row,) = rows
    assert row["chosen on"] == chosen and 0 <= row["map@k"] <= 1 and row["n_queries"] == 12
