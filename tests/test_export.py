"""An exported ensemble embeds new images exactly as the dashboard path (cache -> normalise -> fuse) did."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.cache import EmbeddingCache
from core.datasets import open_dataset
from core.export import embed_command, load_ensemble, save_ensemble
from core.extract import extract_embeddings
from core.fusion import weighted_concat
from core.heads import HeadConfig, train_fusion_head
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
    artifact = save_ensemble(tmp_path / "ens", MODELS, weights=[3, 1], metrics={"map@k": 0.5})
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == MODELS and manifest["weights"] == [3.0, 1.0]
    ensemble = load_ensemble(artifact, device="cpu")
    got = ensemble.embed_images(list(imageset.paths), batch_size=5)
    np.testing.assert_allclose(got, weighted_concat(cached, [3, 1]), atol=2e-5)
    assert got.shape[1] == ensemble.dim
    # PIL images in, same vectors out
    pil = [imageset.load_image(i) for i in range(3)]
    np.testing.assert_allclose(ensemble.embed_images(pil), got[:3], atol=2e-5)


def test_zero_weight_models_are_left_out(dashboard, tmp_path):
    imageset, cached = dashboard
    artifact = save_ensemble(tmp_path / "ens", MODELS, weights=[0, 2])
    ensemble = load_ensemble(artifact, device="cpu")
    assert ensemble.models == MODELS[1:] and ensemble.weights == [2.0]
    np.testing.assert_allclose(ensemble.embed_images(list(imageset.paths[:4])), weighted_concat(cached, [0, 2])[:4], atol=2e-5)


def test_head_round_trip_and_cli_function(dashboard, tmp_path):
    imageset, cached = dashboard
    head = train_fusion_head(cached, imageset.labels, HeadConfig(kind="mlp", out_dim=16, hidden_dim=32, epochs=2,
                                                                  batch_size=4, val_fraction=0.25, k=3))
    artifact = save_ensemble(tmp_path / "ens-head", MODELS, head=head)
    out = embed_command(artifact, list(imageset.paths), tmp_path / "out" / "vectors.npy", device="cpu")
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (len(imageset), 16)
    np.testing.assert_allclose(vectors, head.embed(cached), atol=2e-5)


def test_artifact_errors(dashboard, tmp_path):
    with pytest.raises(ValueError, match="either concat weights or a trained head"):
        save_ensemble(tmp_path / "x", MODELS)
    with pytest.raises(ValueError, match="2 models but 3 weights"):
        save_ensemble(tmp_path / "x", MODELS, weights=[1, 2, 3])
    with pytest.raises(FileNotFoundError, match="not an ensemble artifact"):
        load_ensemble(tmp_path)
    artifact = save_ensemble(tmp_path / "ens", MODELS, weights=[1, 1])
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["models"][0]["cache_key"] = "random:test_efficientnet|weights=other"
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="Re-export"):
        load_ensemble(artifact)


def test_a_stored_sweep_result_exports_and_embeds_like_the_dashboard(dashboard, tmp_path):
    """Random-search sweep job -> its best result in the runs DB -> export_result -> same vectors."""
    from pathlib import Path

    from core import db, tasks
    from core.export import export_result
    from core.progress import SILENT

    imageset, cached = dashboard
    workspace = Workspace.open(tmp_path / "ws")
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    source = str(Path(imageset.paths[0]).parents[1])
    run_id = tasks.sweep({"dataset": source, "models": MODELS, "k": 3, "search": "random", "n_samples": 8},
                         SILENT, workspace, engine)
    with db.read_session(engine) as session:
        results = db.get_run(session, run_id).results
        best = max((r for r in results if sum(1 for w in r.weights if w) == 2), key=lambda r: r.metrics["map@k"])
        weights, result_id = list(best.weights), best.id
    assert len(results) > 8 and any(w != int(w) for w in weights)  # continuous weights, not the grid
    ensemble = load_ensemble(export_result(engine, result_id, tmp_path / "best"), device="cpu")
    np.testing.assert_allclose(ensemble.embed_images(list(imageset.paths)), weighted_concat(cached, weights), atol=2e-5)
    with pytest.raises(ValueError, match="does not exist"):
        export_result(engine, 10_000, tmp_path / "nothing")
