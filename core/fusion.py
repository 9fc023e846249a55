"""Ways to fuse several models' embeddings into one retrieval: weighted concatenation and friends."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from core.search import top_k
from core.vectors import l2_normalize


def weighted_concat(embeddings: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """normalize(concat(w_i * normalize(x_i))): the reference study's weighted concatenation.

    A zero weight leaves that model out (its columns are dropped, not zero-filled, to save memory).
    """
    if len(embeddings) != len(weights):
        raise ValueError(f"{len(embeddings)} embedding sets but {len(weights)} weights")
    rows = {len(e) for e in embeddings}
    if len(rows) != 1:
        raise ValueError(f"embedding sets have different row counts {sorted(rows)}: they must describe the same images")
    parts = [float(w) * l2_normalize(e) for e, w in zip(embeddings, weights) if w != 0]
    if not parts:
        raise ValueError("all weights are zero: at least one model must take part")
    return l2_normalize(np.concatenate(parts, axis=1))


# --- retrieval fusion: rank/score fusion over per-model results, and re-ranking ----------------------
#
# Everything below takes each model's embeddings for the same rows (query set = gallery set, a query
# never retrieves itself) and returns either an embedding matrix (DBA) or rankings: an n x k array of
# gallery ids, best first, which `core.metrics.metrics_from_ranking` scores. Ties are broken by the
# lower index, as everywhere else in the project. The k-NN search is injected (`search=`), defaulting
# to the project's one search function `core.search.top_k`.

SearchFn = Callable[..., "tuple[np.ndarray, np.ndarray]"]
"""(queries, gallery, k, *, exclude_self) -> (scores n x k float32, ids n x k int64), best first."""


def _search_fn(search: SearchFn | None) -> SearchFn:
    return search if search is not None else top_k


@dataclass(frozen=True)
class Candidates:
    """One model's top-`depth` list for every query: similarity and gallery id, best first."""

    scores: np.ndarray  # n x depth float32
    ids: np.ndarray  # n x depth int64


def candidate_lists(embeddings: Sequence[np.ndarray], depth: int, *, search: SearchFn | None = None) -> list[Candidates]:
    """Each model's exact top-`depth` neighbours of every row among the other rows."""
    _check_same_rows(embeddings)
    top_k = _search_fn(search)
    out = []
    for e in embeddings:
        x = l2_normalize(e)
        scores, ids = top_k(x, x, depth, exclude_self=True)
        out.append(Candidates(np.asarray(scores, np.float32), np.asarray(ids, np.int64)))
    return out


class FusionRule(Protocol):
    """How one entry of a model's candidate list contributes to an item's fused score."""

    reduce: str  # "sum" or "max": how contributions of the same item from several lists combine

    def contributions(self, candidates: Candidates) -> np.ndarray: ...


@dataclass(frozen=True)
class ReciprocalRank:
    """Reciprocal rank fusion (Cormack et al. 2009): sum over lists of 1 / (k + rank), rank from 1."""

    k: float = 60.0
    reduce: str = "sum"

    def contributions(self, candidates: Candidates) -> np.ndarray:
        ranks = np.arange(1, candidates.ids.shape[1] + 1, dtype=np.float64)
        return np.broadcast_to(1.0 / (self.k + ranks), candidates.ids.shape)


@dataclass(frozen=True)
class MaxSimilarity:
    """Result merging: pool every model's list and re-sort each item by its best cosine in any list."""

    reduce: str = "max"

    def contributions(self, candidates: Candidates) -> np.ndarray:
        return candidates.scores.astype(np.float64)


@dataclass(frozen=True)
class SumSimilarity:
    """Result merging by CombSUM of raw cosines over the lists an item appears in (absent counts 0)."""

    reduce: str = "sum"

    def contributions(self, candidates: Candidates) -> np.ndarray:
        return candidates.scores.astype(np.float64)


def fuse_candidates(candidates: Sequence[Candidates], k: int, rule: FusionRule, *, chunk_rows: int = 4096) -> np.ndarray:
    """Merge per-model candidate lists into one n x k ranking by the rule's fused score.

    Exact for the given lists: an item outside a list contributes nothing from that list. The lists of
    each row must hold at least k distinct items between them (always true when each is >= k deep).
    """
    if not candidates:
        raise ValueError("no candidate lists to fuse")
    n = candidates[0].ids.shape[0]
    if rule.reduce not in ("sum", "max"):
        raise ValueError(f"unknown reduce {rule.reduce!r}; use 'sum' or 'max'")
    ids_all = np.concatenate([c.ids for c in candidates], axis=1)  # n x (M*depth)
    contrib_all = np.concatenate([np.asarray(rule.contributions(c), np.float64) for c in candidates], axis=1)
    base = int(ids_all.max()) + 1  # (row, id) packed into one int64 key so np.unique groups per row
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        ids = ids_all[start:stop]
        rows = np.broadcast_to(np.arange(stop - start, dtype=np.int64)[:, None], ids.shape)
        keys, inverse = np.unique((rows * base + ids).ravel(), return_inverse=True)
        if rule.reduce == "sum":
            fused = np.bincount(inverse, weights=contrib_all[start:stop].ravel(), minlength=len(keys))
        else:
            fused = np.full(len(keys), -np.inf)
            np.maximum.at(fused, inverse, contrib_all[start:stop].ravel())
        key_rows, key_ids = np.divmod(keys, base)
        order = np.lexsort((key_ids, -fused, key_rows))  # by row, then best score, then lower id
        key_rows, key_ids = key_rows[order], key_ids[order]
        first = np.searchsorted(key_rows, np.arange(stop - start))
        if np.diff(np.append(first, len(key_rows))).min() < k:
            raise ValueError(f"some rows have fewer than k={k} distinct candidates: search each model with depth >= k")
        take = first[:, None] + np.arange(k)[None, :]
        out[start:stop] = key_ids[take]
    return out


def rank_fusion(
    embeddings: Sequence[np.ndarray],
    k: int = 50,
    rule: FusionRule | None = None,
    *,
    depth: int | None = None,
    search: SearchFn | None = None,
) -> np.ndarray:
    """Each model retrieves its top-`depth` (default 2k), the lists are merged by `rule`
    (default reciprocal rank fusion, k=60) and cut to k. Returns n x k gallery ids."""
    rule = rule or ReciprocalRank()
    return fuse_candidates(candidate_lists(embeddings, depth or 2 * k, search=search), k, rule)


def similarity_zscore_stats(embeddings: np.ndarray, *, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each row's cosine to every *other* row, exactly, without the
    N x N matrix: with S = sum of rows and G = X^T X, row q's sum of cosines is q.S - q.q and its sum
    of squared cosines q^T G q - (q.q)^2. Costs N d^2 instead of N^2 d."""
    x = l2_normalize(embeddings)
    n = len(x)
    if n < 3:
        raise ValueError("z-scoring similarities needs at least 3 rows")
    total = x.sum(axis=0, dtype=np.float64)
    gram = np.zeros((x.shape[1], x.shape[1]), dtype=np.float64)
    for start in range(0, n, chunk_rows):
        block = x[start : start + chunk_rows].astype(np.float64)
        gram += block.T @ block
    mean = np.empty(n)
    sq = np.empty(n)
    for start in range(0, n, chunk_rows):
        block = x[start : start + chunk_rows].astype(np.float64)
        self_sim = np.einsum("ij,ij->i", block, block)
        mean[start : start + len(block)] = (block @ total - self_sim) / (n - 1)
        sq[start : start + len(block)] = (np.einsum("ij,ij->i", block @ gram, block) - self_sim**2) / (n - 1)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    return mean, std


def combsum_zscore(
    embeddings: Sequence[np.ndarray],
    k: int = 50,
    *,
    weights: Sequence[float] | None = None,
    search: SearchFn | None = None,
    eps: float = 1e-6,
) -> np.ndarray:
    """CombSUM over the whole gallery of per-model, per-query z-scored cosines:
    score(q, j) = sum_i w_i (cos_i(q, j) - mean_i(q)) / std_i(q). Returns n x k gallery ids.

    Exact and needs one search: the means are constant per query, so the ranking is that of
    sum_i (w_i / std_i(q)) cos_i(q, j), a dot product of concat(w_i x_i(q) / std_i(q)) with the
    gallery's concat(x_i); a positive per-query scale of the query vector changes nothing.
    """
    _check_same_rows(embeddings)
    weights = [1.0] * len(embeddings) if weights is None else list(weights)
    if len(weights) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embedding sets but {len(weights)} weights")
    q_parts, g_parts = [], []
    for e, w in zip(embeddings, weights):
        if w == 0:
            continue
        x = l2_normalize(e)
        _, std = similarity_zscore_stats(x)
        q_parts.append((float(w) / np.maximum(std, eps))[:, None].astype(np.float32) * x)
        g_parts.append(x)
    queries = l2_normalize(np.concatenate(q_parts, axis=1))
    gallery = l2_normalize(np.concatenate(g_parts, axis=1))
    _, ids = _search_fn(search)(queries, gallery, k, exclude_self=True)
    return np.asarray(ids, np.int64)


# --- re-ranking on top of any embedding -------------------------------------------------------------


def _neighbour_average(
    queries: np.ndarray, gallery: np.ndarray, n: int, alpha: float, *, exclude_self: bool, search: SearchFn | None, chunk_rows: int = 4096
) -> np.ndarray:
    """normalize(q + sum_{i<=n} max(cos(q, g_i), 0)^alpha g_i) over q's top-n gallery neighbours."""
    q = l2_normalize(queries)
    g = l2_normalize(gallery)
    if n <= 0:
        return q
    scores, ids = _search_fn(search)(q, g, n, exclude_self=exclude_self)
    out = np.empty_like(q)
    for start in range(0, len(q), chunk_rows):
        stop = start + chunk_rows
        w = np.maximum(np.asarray(scores[start:stop], np.float32), 0.0) ** alpha  # rows x n
        out[start:stop] = q[start:stop] + np.einsum("rn,rnd->rd", w, g[ids[start:stop]])
    return l2_normalize(out)


@dataclass(frozen=True)
class DatabaseAugmentation:
    """DBA: every database vector becomes the similarity^alpha-weighted mean of itself and its top-n
    neighbours (Radenovic et al.). Unsupervised: uses no labels. Returns an embedding matrix."""

    n: int = 2
    alpha: float = 3.0

    def __call__(self, embeddings: np.ndarray, *, search: SearchFn | None = None) -> np.ndarray:
        return _neighbour_average(embeddings, embeddings, self.n, self.alpha, exclude_self=True, search=search)


@dataclass(frozen=True)
class AlphaQueryExpansion:
    """alpha-QE: each query is replaced by the similarity^alpha-weighted mean of itself and its top-n
    results, then searched again. Returns an n x k ranking (the gallery is left as it is)."""

    n: int = 2
    alpha: float = 3.0

    def __call__(self, embeddings: np.ndarray, k: int = 50, *, search: SearchFn | None = None) -> np.ndarray:
        x = l2_normalize(embeddings)
        expanded = _neighbour_average(x, x, self.n, self.alpha, exclude_self=True, search=search)
        _, ids = _search_fn(search)(expanded, x, k, exclude_self=True)
        return np.asarray(ids, np.int64)


def _check_same_rows(embeddings: Sequence[np.ndarray]) -> None:
    if not embeddings:
        raise ValueError("no embedding sets given")
    rows = {len(e) for e in embeddings}
    if len(rows) != 1:
        raise ValueError(f"embedding sets have different row counts {sorted(rows)}: they must describe the same images")
