"""Independent references the tests compare production code with: float64 brute force, slow loops."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def cosines(x: np.ndarray) -> np.ndarray:
    """All-pairs cosine in float64."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    return x @ x.T


def brute_top_k(queries, gallery, k, *, exclude_self=False):
    """Reference search: float64 cosine, rank by (-similarity, index), self dropped by index."""
    q = np.asarray(queries, np.float64)
    g = np.asarray(gallery, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    g = g / np.linalg.norm(g, axis=1, keepdims=True).clip(1e-12)
    sims = q @ g.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    ids = np.array([np.lexsort((np.arange(len(g)), -row))[:k] for row in sims])
    return np.take_along_axis(sims, ids, 1).astype(np.float32), ids.astype(np.int64)


def metrics_from_similarities(sims: np.ndarray, labels: np.ndarray, k: int) -> dict:
    """Straight from DESIGN.md, one query at a time: rank by (-similarity, index), drop the query by
    index, score map@k (/ min(k, R)), map@k_hits, map@R and P@1; queries with R = 0 are excluded."""
    labels = np.asarray(labels)
    n = len(labels)
    rows = {"map@k": [], "map@k_hits": [], "map@r": [], "p@1": []}
    excluded = 0
    for q in range(n):
        order = [j for j in sorted(range(n), key=lambda j: (-sims[q, j], j)) if j != q]
        rel = [labels[j] == labels[q] for j in order]
        r = sum(rel)
        if r == 0:
            excluded += 1
            continue
        hits, sum_k, sum_r = 0, 0.0, 0.0
        for i, is_rel in enumerate(rel, start=1):
            if is_rel:
                hits += 1
                if i <= k:
                    sum_k += hits / i
                if i <= r:
                    sum_r += hits / i
        hits_k = sum(rel[:k])
        rows["map@k"].append(sum_k / min(k, r))
        rows["map@k_hits"].append(sum_k / hits_k if hits_k else 0.0)
        rows["map@r"].append(sum_r / r)
        rows["p@1"].append(float(rel[0]))
    out = {key: float(np.mean(v)) if v else float("nan") for key, v in rows.items()}
    out.update(n_queries=n - excluded, n_excluded=excluded)
    return out


def reference_metrics(embeddings, labels, k):
    """Metrics of one embedding matrix by float64 brute force."""
    return metrics_from_similarities(cosines(embeddings), labels, k)


def reference_sweep_metrics(embeddings: Sequence[np.ndarray], labels, weights: Sequence[float], k: int) -> dict:
    """A weighted concatenation scored by the DESIGN.md identity in float64: sum_i w_i^2 cos_i."""
    sims = sum(float(w) ** 2 * cosines(e) for e, w in zip(embeddings, weights) if w)
    return metrics_from_similarities(sims, labels, k)


def quantised_embeddings(rng, n, d=12, duplicates=5):
    """Vectors with exactly 4 entries of +-1: all cosines are multiples of 1/4, exact in any float
    order, so ties are real ties for every backend; duplicated rows add exact ties with the query."""
    x = np.zeros((n, d), dtype=np.float32)
    for i in range(n):
        cols = rng.choice(d, size=4, replace=False)
        x[i, cols] = rng.choice([-1.0, 1.0], size=4)
    x[n // 2:n // 2 + duplicates] = x[:duplicates]
    return x
