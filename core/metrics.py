"""Exact retrieval metrics: mAP@k under each convention, mAP@R and P@1, per query and per class.

Conventions (DESIGN.md "Evaluation, exactly"): every row is a query, the gallery is every other
row, cosine similarity, ties ranked by (-similarity, index). For a query with R relevant items:
  map@k       sum_{i<=k} P@i rel_i / min(k, R)     headline; retrieving less cannot raise it
  map@k_hits  sum_{i<=k} P@i rel_i / hits in top k  the reference study authors' later convention
  map@r       the same with k = R, divided by R     metric-learning literature
  p@1         rel_1
A query with R = 0 has no right answer: it is excluded and counted in `n_excluded`, never scored.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.search import SearchBackend, top_k
from core.vectors import l2_normalize



@dataclass(frozen=True)
class Metric:
    """One metric as users read it: its key in results, its per-query array in QueryScores, and its meaning."""

    key: str
    per_query: str
    meaning: str  # may name {k}

    def header(self, k: int) -> str:
        return f"{self.key.replace('@k', f'@{k}')}: {self.meaning.format(k=k)}"


METRICS = (
    Metric("map@k", "ap_at_k", "sum of P@i·rel_i over the top {k}, divided by min({k}, R)"),
    Metric("map@k_hits", "ap_at_k_hits", "divided by the relevant items found in the top {k} "
           "(the reference authors' later code)"),
    Metric("map@r", "ap_at_r", "k = R, divided by R"),
    Metric("p@1", "p_at_1", "the first result has the query's label"),
)
METRIC_KEYS = tuple(m.key for m in METRICS)
PER_QUERY = {m.key: m.per_query for m in METRICS}  # metric key -> QueryScores attribute


class MetricsError(ValueError):
    """Inputs that cannot be scored; the message says what is wrong with them."""


@dataclass(frozen=True)
class QueryScores:
    """Per-query metrics; arrays hold NaN for excluded queries (no relevant item in the gallery)."""

    k: int
    ap_at_k: np.ndarray
    ap_at_k_hits: np.ndarray
    ap_at_r: np.ndarray
    p_at_1: np.ndarray
    n_relevant: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return self.n_relevant > 0

    def summary(self) -> dict:
        valid = self.valid
        n = int(valid.sum())

        def mean(values: np.ndarray) -> float:
            return float(values[valid].mean()) if n else float("nan")

        return {**{key: mean(getattr(self, attr)) for key, attr in PER_QUERY.items()},
                "k": self.k, "n_queries": n, "n_excluded": int((~valid).sum())}


def relevant_counts(labels: np.ndarray) -> np.ndarray:
    """R per query: rows sharing its label, itself excluded."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def depth_needed(n_relevant: np.ndarray, k: int, n_gallery: int) -> int:
    """How deep a ranking must go to score map@k and map@r exactly."""
    return int(min(max(k, int(n_relevant.max(initial=0))), n_gallery))


def scores_from_relevance(relevance, n_relevant, k: int) -> dict[str, torch.Tensor]:
    """The per-query metrics from ranked relevance (..., depth) booleans, best first.

    Leading axes are batch axes (the sweep scores many weight vectors at once). `depth` must reach
    max(k, R) for every query (or the whole gallery); NaN marks queries with R = 0. Runs in float64
    on the relevance's own device (numpy arrays are scored on the CPU), so the sweep never leaves the GPU.
    """
    rel = torch.as_tensor(relevance).to(torch.float64)
    r = torch.as_tensor(n_relevant, device=rel.device).to(torch.float64).expand(rel.shape[:-1])
    depth = rel.shape[-1]
    ranks = torch.arange(1, depth + 1, dtype=torch.float64, device=rel.device)
    precision_hits = torch.cumsum(rel, dim=-1) / ranks * rel  # P@i * rel_i
    kk = min(k, depth)
    sum_k = precision_hits[..., :kk].sum(dim=-1)
    hits_k = rel[..., :kk].sum(dim=-1)
    sum_r = (precision_hits * (ranks <= r[..., None])).sum(dim=-1)
    out = {
        "ap_at_k": sum_k / torch.clamp(r, max=k),
        "ap_at_k_hits": torch.where(hits_k > 0, sum_k / hits_k.clamp(min=1), 0.0),
        "ap_at_r": sum_r / r,
        "p_at_1": rel[..., 0].clone(),
    }
    excluded = r == 0
    for values in out.values():
        values[excluded] = torch.nan
    return out


def _check(embeddings: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2:
        raise MetricsError(f"embeddings must be a 2-D array (images x dims), got shape {embeddings.shape}")
    if labels.ndim != 1 or len(labels) != len(embeddings):
        raise MetricsError(f"{len(embeddings)} embedding rows but {labels.shape[0] if labels.ndim else 0} labels: "
                           "they must describe the same images in the same order")
    if len(embeddings) < 2:
        raise MetricsError("retrieval needs at least 2 images (one query and one gallery item)")
    if not np.isfinite(embeddings).all():
        raise MetricsError("embeddings contain NaN or infinite values; re-extract them")
    if int(k) < 1:
        raise MetricsError(f"k must be at least 1, got {k}")
    return embeddings, labels


def per_query_scores(embeddings: np.ndarray, labels: np.ndarray, k: int = 50, *,
                     backend: SearchBackend | None = None) -> QueryScores:
    """Per-query AP@k (both conventions), AP@R and P@1 of one embedding set."""
    embeddings, labels = _check(embeddings, labels, k)
    n_relevant = relevant_counts(labels)
    depth = depth_needed(n_relevant, k, len(labels) - 1)
    _, ids = top_k(l2_normalize(embeddings), l2_normalize(embeddings), depth, exclude_self=True, backend=backend)
    return _query_scores(ids, labels, n_relevant, k)


def _query_scores(ranked_ids: np.ndarray, labels: np.ndarray, n_relevant: np.ndarray, k: int) -> QueryScores:
    relevance = labels[ranked_ids] == labels[:, None]
    s = scores_from_relevance(relevance, n_relevant, k)
    return QueryScores(k=int(k), n_relevant=n_relevant, **{key: v.numpy() for key, v in s.items()})


def evaluate(embeddings: np.ndarray, labels: np.ndarray, k: int = 50, *,
             backend: SearchBackend | None = None) -> dict:
    """map@k, map@k_hits, map@r, p@1, n_queries, n_excluded (and k) of one embedding set."""
    return per_query_scores(embeddings, labels, k, backend=backend).summary()


def metrics_from_ranking(ranked_ids: np.ndarray, labels: np.ndarray, k: int = 50) -> dict:
    """The same metrics for a method that ranks instead of embeds (rank fusion, re-ranking).

    `ranked_ids`: n x depth gallery rows, best first, the query itself already left out; depth must
    reach max(k, R) for every query (or cover the whole gallery).
    """
    return query_scores_from_ranking(ranked_ids, labels, k).summary()


def query_scores_from_ranking(ranked_ids: np.ndarray, labels: np.ndarray, k: int = 50) -> QueryScores:
    labels = np.asarray(labels)
    ranked_ids = np.asarray(ranked_ids)
    if ranked_ids.ndim != 2 or len(ranked_ids) != len(labels):
        raise MetricsError(f"ranking has shape {ranked_ids.shape} but there are {len(labels)} queries")
    n_relevant = relevant_counts(labels)
    need = depth_needed(n_relevant, k, len(labels) - 1)
    if ranked_ids.shape[1] < need:
        raise MetricsError(f"rankings are {ranked_ids.shape[1]} deep but exact map@k/map@r need {need}")
    if (ranked_ids == np.arange(len(labels))[:, None]).any():
        raise MetricsError("a query retrieves itself: leave each query out of its own ranking")
    return _query_scores(ranked_ids, labels, n_relevant, k)


def per_class_ap(scores: QueryScores, labels: np.ndarray, metric: str = "ap_at_k") -> dict:
    """Mean per-query AP of each class (excluded queries left out; NaN for a class with none)."""
    values = getattr(scores, metric)
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    valid = scores.valid
    # One pass over the queries (bincount), not one per class: 1,000 classes x 50,000 queries took 0.1 s a call.
    counts = np.bincount(inverse[valid], minlength=len(classes))
    sums = np.bincount(inverse[valid], weights=values[valid].astype(np.float64), minlength=len(classes))
    means = np.divide(sums, counts, out=np.full(len(classes), np.nan), where=counts > 0)
    return {label.item(): float(mean) for label, mean in zip(classes, means)}
