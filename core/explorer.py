"""Query-level views of methods: a query's neighbours, per-query and per-class AP, where an ensemble
fixed or broke a single model, and searching with a new image.

Positions here are positions in the eval split (0..n_eval-1); `rows` maps them back to dataset rows,
which are the ids the dashboard shows and puts in URLs.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from core.datasets import to_rgb
from core.methods import Method
from core.metrics import PER_QUERY, QueryScores, depth_needed, per_class_ap, per_query_scores, scores_from_relevance
from core.search import TorchSearch, top_k

def query_scores(embeddings: np.ndarray, labels: np.ndarray, k: int) -> QueryScores:
    """Per-query AP (each convention) and P@1 of every eval query."""
    return per_query_scores(embeddings, labels, k)


# One query at a time: a matrix-vector product beats building a faiss index, which copies the whole
# gallery on every call (~1 s against a few ms at 50k rows); top_k still certifies the order exactly.
ONE_QUERY = TorchSearch("cpu")


def neighbours(embeddings: np.ndarray, position: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, positions) of the top-k for one query, the query itself left out by index."""
    scores, ids = top_k(embeddings[position:position + 1], embeddings, min(k + 1, len(embeddings)), backend=ONE_QUERY)
    keep = ids[0] != position
    return scores[0][keep][:k], ids[0][keep][:k]


def search(embeddings: np.ndarray, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a new (already embedded) image among all eval rows."""
    scores, ids = top_k(np.asarray(vector, dtype=np.float32).reshape(1, -1), embeddings, k, backend=ONE_QUERY)
    return scores[0], ids[0]


def ap_values(scores: QueryScores, metric: str = "map@k") -> np.ndarray:
    return getattr(scores, PER_QUERY[metric])


def changed_queries(ensemble: QueryScores, single: QueryScores, metric: str = "map@k",
                    *, improved: bool = True, limit: int = 50) -> list[tuple[int, float]]:
    """(position, AP difference) of queries the ensemble improved (or, improved=False, worsened) most
    against the single model; excluded queries (no relevant item) are left out."""
    diff = ap_values(ensemble, metric) - ap_values(single, metric)
    valid = np.flatnonzero(ensemble.valid & np.isfinite(diff))
    diff_valid = diff[valid]
    picked = valid[diff_valid > 0] if improved else valid[diff_valid < 0]
    order = np.argsort(-diff[picked] if improved else diff[picked], kind="stable")
    return [(int(p), float(diff[p])) for p in picked[order][:limit]]


def hardest_queries(scores: QueryScores, metric: str = "map@k", limit: int = 50) -> list[tuple[int, float]]:
    """(position, AP) of the lowest-scoring queries."""
    values = ap_values(scores, metric)
    valid = np.flatnonzero(scores.valid)
    order = valid[np.argsort(values[valid], kind="stable")]
    return [(int(p), float(values[p])) for p in order[:limit]]


def per_class_difference(a: QueryScores, b: QueryScores, labels: np.ndarray, class_names: Sequence[str],
                         metric: str = "map@k") -> list[dict]:
    """Mean AP per class of two methods and their difference (b - a), biggest gain first."""
    pa, pb = per_class_ap(a, labels, PER_QUERY[metric]), per_class_ap(b, labels, PER_QUERY[metric])
    rows = [{"class": class_names[int(c)], "A": pa[c], "B": pb.get(c, float("nan")),
             "B - A": pb.get(c, float("nan")) - pa[c]} for c in pa]
    return sorted(rows, key=lambda r: -(r["B - A"] if r["B - A"] == r["B - A"] else -np.inf))


def embed_image(image, method: Method, loaded: Mapping[str, object]) -> np.ndarray:
    """A new PIL image in the method's embedding space (1 x dim, L2-normalised), using `loaded`
    (model name -> core.models.EmbeddingModel on the CPU)."""
    image = to_rgb(image)
    parts = {}
    with torch.inference_mode():
        for name in method.used_models:
            model = loaded[name]
            batch = model.preprocess(image).unsqueeze(0).to(model.device)
            parts[name] = model.embed(batch).float().cpu().numpy()
    return method.embeddings(parts, np.array([0]))


def query_view(embeddings: np.ndarray, labels: np.ndarray, position: int, k: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """One query's top-k (similarities, positions) and its AP@k (each convention) and P@1, from one search
    deep enough for exact map@r, so a page shows a query without scoring the whole eval set. NaN metrics
    when the query has no relevant item."""
    labels = np.asarray(labels)
    n_relevant = np.array([int((labels == labels[position]).sum()) - 1])
    depth = max(depth_needed(n_relevant, k, len(labels) - 1), min(k, len(labels) - 1))
    sims, ids = neighbours(embeddings, position, depth)
    relevance = (labels[ids] == labels[position])[None, :]
    values = scores_from_relevance(relevance, n_relevant, k)
    names = {v: key for key, v in PER_QUERY.items()}
    return sims[:k], ids[:k], {names[key]: float(v[0]) for key, v in values.items()}


def query_ap(embeddings: np.ndarray, labels: np.ndarray, position: int, k: int) -> dict:
    """AP@k (each convention) and P@1 of one query (see query_view)."""
    return query_view(embeddings, labels, position, k)[2]
