"""What the Data page reads: dataset summaries, registration, model availability and cache status, the demo plan."""
from __future__ import annotations

from core import catalog, db
from core.cache import EmbeddingCache
from core.datasets import open_image_folder
from core.extract import extract_embeddings


def test_summary_and_registration(image_folder, workspace):
    imageset = open_image_folder(image_folder)
    summary = catalog.summarise(imageset)
    assert (summary.n_images, summary.n_eval, summary.n_train) == (12, 12, 0)
    assert summary.class_rows[0] == {"class": "cat", "eval": 4, "train": 0, "total": 4}
    assert catalog.sample_rows(imageset, per_class=2) == [0, 1, 4, 5, 8, 9]
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    assert catalog.last_used_source(engine) is None
    first = catalog.register_dataset(engine, imageset, str(image_folder))
    assert catalog.register_dataset(engine, imageset, str(image_folder)) == first  # same images, same row
    assert catalog.known_sources(engine) == [str(image_folder)]


def test_model_status_knows_what_is_cached(image_folder, workspace):
    imageset = open_image_folder(image_folder)
    cache = EmbeddingCache(workspace.embeddings)
    extract_embeddings(imageset, ["random:test_efficientnet"], cache, device="cpu")
    statuses = {s.info.name: s for s in catalog.model_statuses(cache, imageset.fingerprint,
                                                                ["random:test_efficientnet", "not a model"])}
    assert {"tf_efficientnet_lite0", "open_nsfw_resnet50_thin", "random:test_efficientnet"} <= set(statuses)
    assert statuses["random:test_efficientnet"].cached is not None
    assert statuses["random:test_efficientnet"].size_mb > 0
    assert statuses["tf_efficientnet_lite0"].cached is None
    assert [s.model_name for s in catalog.cached_sets(cache, imageset.fingerprint)] == ["random:test_efficientnet"]


def test_demo_plan_fills_the_leaderboard_model_by_model_before_the_train_split():
    from core.configs import DEMO_MODELS, demo_jobs

    plan = demo_jobs()
    assert [c.kind for c in plan] == ["evaluate"] * 4 + ["sweep", "extract", "select_weights", "train_head"]
    assert [c.models for c in plan[:4]] == [(m,) for m in DEMO_MODELS]  # one leaderboard row per model
    assert all(c.eval_only for c in plan[:5]) and not any(c.eval_only for c in plan[5:])
    assert all(c.dataset == "demo" for c in plan) and plan[4].weights == (0, 1, 2, 3, 4, 5)  # the study's grid
