"""An exported ensemble embeds new images exactly as the dashboard path (cache -> normalise -> fuse) did."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.cache import EmbeddingCache
from core.datasets import open_dataset
from core.export import embed_command, embed_images, export_result, load_artifact, save_method
from core.extract import extract_embeddings
from core.fusion import weighted_concat
from core.heads import HeadConfig, train_fusion_head
from core.methods import Method
from core.workspace import Workspace

MODELS = ["random:test_efficientnet", "random:test_resnet"]


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """A tiny ImageFolder of generated PNGs, embedded the dashboard's way into the embedding cache."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["circles", "stripes"]):
        (root / name).mkdir()
        for i in range(4):
            pixels = (rng.random((40 + 8 * i, 36, 3)) * 80 + 120 * c).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    workspace = Workspace.open(tmp_path_factory.mktemp("ws"))
    imageset = open_dataset(str(root), workspace)
    sets = extract_embeddings(imageset, MODELS, EmbeddingCache(workspace.embeddings), device="cpu", batch_size=3)
    return imageset, [np.array(sets[m].load()) for m in MODELS]


def test_weighted_concat_round_trip(dashboard, tmp_path):
    imageset, cached = dashboard
    artifact = save_method(tmp_path / "ens", Method.concat(MODELS, [3, 1]), metrics={"map@k": 0.5}, selected_on="eval")
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["method"]["models"] == MODELS and manifest["method"]["weights"] == [3.0, 1.0]
    assert manifest["selected_on"] == "eval" and manifest["is_oracle"] is True  # an oracle stays labelled
    loaded = load_artifact(artifact)
    got = embed_images(loaded, list(imageset.paths), device="cpu", batch_size=5)
    np.testing.assert_allclose(got, weighted_concat(cached, [3, 1]), atol=2e-5)
    # PIL images in, same vectors out
    pil = [imageset.load_image(i) for i in range(3)]
    np.testing.assert_allclose(embed_images(loaded, pil, device="cpu"), got[:3], atol=2e-5)


def test_zero_weight_models_are_left_out(dashboard, tmp_path):
    imageset, cached = dashboard
    artifact = save_method(tmp_path / "ens", Method("concat", tuple(MODELS), (0.0, 2.0), label="x"))
    loaded = load_artifact(artifact)
    assert loaded.method.models == tuple(MODELS[1:]) and loaded.method.weights == (2.0,)
    np.testing.assert_allclose(embed_images(loaded, list(imageset.paths[:4]), device="cpu"),
                               weighted_concat(cached, [0, 2])[:4], atol=2e-5)


def test_head_round_trip_and_cli_function(dashboard, tmp_path):
    imageset, cached = dashboard
    head = train_fusion_head(cached, imageset.labels, HeadConfig(kind="mlp", out_dim=16, hidden_dim=32, epochs=2,
                                                                  batch_size=4, val_fraction=0.5, k=3))
    head.save(tmp_path / "trained")
    artifact = save_method(tmp_path / "ens-head", Method.head(MODELS, str(tmp_path / "trained"), "mlp head"),
                           selected_on="validation")
    out = embed_command(artifact, list(imageset.paths), tmp_path / "out" / "vectors.npy", device="cpu")
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (len(imageset), 16)
    np.testing.assert_allclose(vectors, head.embed(cached), atol=2e-5)


def test_artifact_errors(dashboard, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an exported method"):
        load_artifact(tmp_path)
    artifact = save_method(tmp_path / "ens", Method.concat(MODELS, [1, 1]))
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["cache_keys"][MODELS[0]] = "random:test_efficientnet|weights=other"
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="Re-export"):
        load_artifact(artifact)
    (artifact / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable manifest"):
        load_artifact(artifact)


def test_a_stored_sweep_result_exports_and_embeds_like_the_dashboard(dashboard, tmp_path):
    """Random-search sweep job -> its best result in the runs DB -> export_result -> same vectors."""
    from pathlib import Path

    from core import db
    from core.configs import SweepConfig
    from core.progress import SILENT
    from core.tasks import run_job

    imageset, cached = dashboard
    workspace = Workspace.open(tmp_path / "ws")
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    source = str(Path(imageset.paths[0]).parents[1])
    config = SweepConfig(dataset=source, models=MODELS, k=3, search="random", n_samples=8)
    run_id = run_job("sweep", config.to_dict(), SILENT, workspace, engine)
    with db.read_session(engine) as session:
        results = db.get_run(session, run_id).results
        best = max((r for r in results if r.kind == "concat"), key=lambda r: r.metrics["map@k"])
        weights, result_id = list(best.weights), best.id
    assert len(results) > 8 and any(w != int(w) for w in weights)  # continuous weights, not the grid
    loaded = load_artifact(export_result(engine, result_id, tmp_path / "best"))
    assert loaded.manifest["is_oracle"] and loaded.manifest["selected_on"] == "eval"
    np.testing.assert_allclose(embed_images(loaded, list(imageset.paths), device="cpu"),
                               weighted_concat(cached, weights), atol=2e-5)
    with pytest.raises(ValueError, match="does not exist"):
        export_result(engine, 10_000, tmp_path / "nothing")
