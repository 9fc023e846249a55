"""What the workspace holds for the dashboard: registered datasets, their summaries and which models are cached."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from sqlalchemy import Engine, select

from core import db
from core.cache import EmbeddingCache, EmbeddingSet
from core.datasets import ImageSet
from core.models import ModelError, ModelInfo, cache_key_for, list_models, model_info


@dataclass(frozen=True)
class DatasetSummary:
    name: str
    fingerprint: str
    n_images: int
    n_eval: int
    n_train: int
    n_skipped: int
    class_rows: list[dict]  # class, eval, train, total


def summarise(imageset: ImageSet) -> DatasetSummary:
    eval_counts, train_counts = imageset.class_counts("eval"), imageset.class_counts("train")
    rows = [{"class": c, "eval": eval_counts[c], "train": train_counts[c], "total": eval_counts[c] + train_counts[c]}
            for c in imageset.class_names]
    return DatasetSummary(imageset.name, imageset.fingerprint, len(imageset), len(imageset.split("eval")),
                          len(imageset.split("train")), len(imageset.skipped), rows)


def register_dataset(engine: Engine, imageset: ImageSet, source: str) -> int:
    """Record the opened dataset (same images = same row) so runs and the leaderboard can find it; its id."""
    with db.begin_immediate(engine) as session:
        row = db.record_dataset(session, name=imageset.name, source=source, fingerprint=imageset.fingerprint,
                                n_images=len(imageset), n_classes=len(imageset.class_names),
                                n_skipped=len(imageset.skipped))
        return row.id


def known_sources(engine: Engine) -> list[str]:
    """Dataset sources ("demo", folders, manifests) in the DB, most recently used first."""
    with db.read_session(engine) as session:
        used = session.execute(
            select(db.Dataset.source, db.Run.started).join(db.Run, db.Run.dataset_id == db.Dataset.id, isouter=True)
            .order_by(db.Run.started.desc().nulls_last(), db.Dataset.created.desc())
        ).all()
    return list(dict.fromkeys(source for source, _ in used))


def last_used_source(engine: Engine) -> str | None:
    sources = known_sources(engine)
    return sources[0] if sources else None


@dataclass(frozen=True)
class ModelStatus:
    info: ModelInfo
    cached: EmbeddingSet | None

    @property
    def size_mb(self) -> float:
        if self.cached is None:
            return 0.0
        try:
            return os.path.getsize(self.cached.path) / 2**20
        except OSError:
            return 0.0


def model_statuses(cache: EmbeddingCache, fingerprint: str | None, extra_names: list[str] = ()) -> list[ModelStatus]:
    """Every registry model (plus `extra_names`, e.g. timm or random names already extracted) with its
    availability and, for this dataset, its cached embedding set if there is one."""
    infos = list_models()
    names = {info.name for info in infos}
    for name in extra_names:
        if name not in names:
            try:
                infos.append(model_info(name))
                names.add(name)
            except ModelError:
                continue
    out = []
    for info in infos:
        found = None
        if fingerprint is not None:
            try:
                found = cache.get(fingerprint, cache_key_for(info.name))
            except ModelError:
                found = None
        out.append(ModelStatus(info, found))
    return out


def cached_sets(cache: EmbeddingCache, fingerprint: str) -> list[EmbeddingSet]:
    """This dataset's cached embedding sets, by model name."""
    return sorted((s for s in cache.list() if s.dataset_fingerprint == fingerprint), key=lambda s: s.model_name)


def sample_rows(imageset: ImageSet, per_class: int = 2, split: str | None = "eval") -> list[int]:
    """The first `per_class` rows of each class (in `split`), for a glance at the data."""
    rows = imageset.split(split) if split else np.arange(len(imageset))
    labels = imageset.labels[rows]
    out = []
    for label in range(len(imageset.class_names)):
        out.extend(int(r) for r in rows[labels == label][:per_class])
    return out
