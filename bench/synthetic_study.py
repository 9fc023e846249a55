"""A study at the users' scale without extraction: 50,000 queries, 1,000 classes, stored results.

Writes small ImageNet-like JPEGs (bench.imagenet_like at --scale, thumbnails only) as an ImageFolder with
eval/ (--per-class a class) and train/ (TRAIN_PER_CLASS a class) splits, puts synthetic class-structured
embeddings for two models straight into the workspace's embedding cache (as if extracted), then runs the
real evaluate and weights-chosen-on-train jobs (core.tasks.run_job) on them, so results, per-query scores
and the dashboard's caches are what a 50,000-query study leaves behind.

The two models see each class with their own strength (one is better on some classes, the other on
others) and with independent noise, so the concatenation beats both and the explorer's "fixed",
"broke" and per-class lists have content. The model names are the offline `random:` test models
(the cache and the pages need registry names); their embeddings here are synthetic, not theirs.

    python bench/synthetic_study.py WORKSPACE [--classes 1000] [--per-class 50]

Used by the browser test of the explorer lists and the map at 50,000 points (tests/e2e) and by
bench/bench_pages.py --synthetic.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from bench.imagenet_like import write_imagenet_like
from core import catalog, db
from core.cache import EmbeddingCache
from core.configs import EvaluateConfig, SelectWeightsConfig
from core.datasets import open_dataset
from core.models import cache_key_for
from core.progress import SILENT
from core.tasks import run_job
from core.workspace import Workspace

MODELS = ("random:test_efficientnet", "random:test_resnet")
DIMS = (64, 48)
K = 50
WEIGHTS = (0, 1)  # the two models and their concatenation: what the lists compare
TRAIN_PER_CLASS = 10
CONCAT = "test_efficientnet(1)+test_resnet(1)"  # the concatenation's method label


def embeddings(labels: np.ndarray, classes: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows: a class centre scaled by the model's strength on that class, plus independent noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    strength = rng.uniform(0.6, 1.4, size=classes)
    x = centres[labels] * strength[labels, None] + rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(workspace: Path, classes: int = 1000, per_class: int = 50, seed: int = 0, scale: float = 0.1,
          workers: int = 2) -> str:
    """The prepared workspace's dataset source (its image folder); a workspace built with the same
    arguments (marker file) is reused as it is."""
    ws = Workspace.open(workspace)
    source = ws.root / f"images-{classes}x{per_class}+{TRAIN_PER_CLASS}-s{seed}"
    marker = ws.root / f".synthetic-{source.name}-k{K}"
    if marker.exists():
        return str(source)
    if not source.is_dir():
        # One class field per class for both splits: write them together, then move each class's last
        # TRAIN_PER_CLASS images to train/ (the same seed and index would repeat an eval image).
        partial = ws.root / f"{source.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # an interrupted build starts over
        write_imagenet_like(partial / "eval", classes, per_class + TRAIN_PER_CLASS, seed=seed, scale=scale,
                            workers=workers)
        for folder in sorted((partial / "eval").iterdir()):
            (partial / "train" / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[per_class:]:
                image.rename(partial / "train" / folder.name / image.name)
        partial.rename(source)
    imageset = open_dataset(str(source), ws)
    engine = db.make_engine(ws.db_url)
    db.init_db(engine)
    catalog.register_dataset(engine, imageset, str(source))
    cache = EmbeddingCache(ws.embeddings)
    labels = np.asarray(imageset.labels)
    for i, (model, dim) in enumerate(zip(MODELS, DIMS)):
        cache.put(imageset.fingerprint, model, cache_key_for(model), embeddings(labels, classes, dim, seed + 1 + i))
    common = {"dataset": str(source), "models": MODELS, "k": K}
    run_job("evaluate", EvaluateConfig(**common).to_dict(), SILENT, ws, engine)
    run_job("select_weights", SelectWeightsConfig(**common, weights=WEIGHTS).to_dict(), SILENT, ws, engine)
    marker.touch()
    return str(source)


def result_ids(workspace: Path) -> dict[str, int]:
    """The first result of each method label."""
    engine = db.make_engine(Workspace.open(workspace).db_url)
    try:
        with db.read_session(engine) as session:
            ids: dict[str, int] = {}
            for result in session.query(db.Result).order_by(db.Result.id).all():
                ids.setdefault(result.method, result.id)
            return ids
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.workspace, args.classes, args.per_class, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
