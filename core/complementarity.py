"""Which models complement each other, at a glance: per model pair, how much their neighbours and
representations agree, how their per-query successes correlate, and what picking the better model per
query would reach: the ceiling of any method that answers each query with one of the models (a fusion
mixes their lists, so it can pass it on some queries, rarely by much on average).

Models that agree everywhere (high overlap, CKA near 1, AP correlation near 1, pair oracle barely
above the better single model) leave an ensemble little to gain; a low-agreement pair with a high
pair oracle is where fusion can help.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from core.metrics import MetricsError, depth_needed, query_scores_from_ranking, relevant_counts
from core.search import default_backend, top_k
from core.vectors import l2_normalize

# Rows of the seeded sample CKA is computed on: each model holds a rows x rows float64 Gram matrix
# (32 MB at 2,000 rows) and builds it in rows^2 x dims operations.
CKA_ROWS = 2000


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al., ICML 2019) of two representations of the same rows, in float64:
    <Kc, Lc> / (||Kc||_F ||Lc||_F) with Kc, Lc the Gram matrices of the column-centred rows. 1 for
    identical representations up to rotation and isotropic scaling; NaN when either is constant."""
    if len(x) != len(y):
        raise MetricsError(f"CKA needs the same rows in both representations, got {len(x)} and {len(y)}")
    return _cka(_centred_gram(x), _centred_gram(y))


def _centred_gram(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Gram matrix of the column-centred rows (= H X X^T H) and its Frobenius norm."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0)
    gram = x @ x.T
    return gram, float(np.linalg.norm(gram))


def _cka(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> float:
    (gram_a, norm_a), (gram_b, norm_b) = a, b
    if norm_a == 0 or norm_b == 0:
        return float("nan")
    return float(np.vdot(gram_a, gram_b) / (norm_a * norm_b))


def topk_overlap(ids_a: np.ndarray, ids_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query, for two top-k lists of distinct ids: |A ∩ B| / k and the Jaccard |A ∩ B| / |A ∪ B|."""
    ids_a, ids_b = np.asarray(ids_a), np.asarray(ids_b)
    if ids_a.shape != ids_b.shape or ids_a.ndim != 2:
        raise MetricsError(f"neighbour lists must have the same queries x k shape, got {ids_a.shape} and {ids_b.shape}")
    k = ids_a.shape[1]
    both = np.sort(np.concatenate([ids_a, ids_b], axis=1), axis=1)
    common = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # each list holds an id once, so a repeat is in both
    return common / k, common / (2 * k - common)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing their mean rank (Spearman's convention)."""
    ranks = np.empty(len(x))
    ranks[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, tie_group, sizes = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(tie_group, weights=ranks) / sizes)[tie_group]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denominator) if denominator > 0 else float("nan")


def _plain(matrix: np.ndarray) -> list[list[float | None]]:
    """Nested lists of floats for JSON; NaN (undefined, e.g. a correlation with a constant) as None."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def complementarity(embeddings: Sequence[np.ndarray], labels: np.ndarray, k: int = 50, *,
                    names: Sequence[str] | None = None, cka_rows: int = CKA_ROWS, seed: int = 0,
                    device: str | None = None) -> dict:
    """Pairwise complementarity of models embedding the same rows, as a JSON-able dict.

    Every query is a row, the gallery every other row (DESIGN.md). Matrices are models x models
    nested lists, rows and columns in the order of "models":
      overlap@k   mean over queries of |top-k(A) ∩ top-k(B)| / k
      jaccard@k   mean over queries of |A ∩ B| / |A ∪ B|
      cka         linear CKA on `cka_rows` rows sampled with `seed` (all rows when fewer)
      ap_pearson, ap_spearman   correlation over queries of per-query AP@k (map@k convention)
      oracle_pair mean over queries of max(AP@k of A, AP@k of B); the diagonal is the model's map@k
    plus "map@k" per model, "oracle_all" (best model per query, over all models: an upper bound of any
    per-query choice of model) and "best_single". Queries with no relevant item are left out (counted
    in "n_excluded"); an undefined value (a correlation with constant AP) is None.
    """
    labels = np.asarray(labels)
    m = len(embeddings)
    names = [f"model {i}" for i in range(m)] if names is None else [str(n) for n in names]
    if m < 2:
        raise MetricsError("complementarity compares models: choose at least two")
    if len(names) != m:
        raise MetricsError(f"{len(names)} names for {m} models")
    if {len(e) for e in embeddings} != {len(labels)}:
        raise MetricsError(f"embedding sets have {sorted({len(e) for e in embeddings})} rows but there are "
                           f"{len(labels)} labels: every model must be extracted on the same images")
    if cka_rows < 2:
        raise MetricsError(f"cka_rows must be at least 2, got {cka_rows}")

    backend = default_backend(device)
    n_relevant = relevant_counts(labels)
    depth = depth_needed(n_relevant, k, len(labels) - 1)
    neighbours, ap = [], []
    for e in embeddings:
        x = l2_normalize(e)
        _, ids = top_k(x, x, depth, exclude_self=True, backend=backend)
        neighbours.append(ids[:, :k])
        ap.append(query_scores_from_ranking(ids, labels, k).ap_at_k)
    valid = n_relevant > 0
    if not valid.any():
        raise MetricsError("no query has another row with its label, so there is nothing to retrieve; "
                           "use a labelled set with at least two images per class")
    ap = np.stack(ap)[:, valid]  # models x scored queries

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(labels), size=min(cka_rows, len(labels)), replace=False))
    grams = [_centred_gram(e[sample]) for e in embeddings]
    ranks = [_average_ranks(a) for a in ap]

    overlap, jaccard, cka, pearson, spearman, oracle = (np.eye(m) for _ in range(6))
    for i in range(m):
        oracle[i, i] = ap[i].mean()
        cka[i, i] = 1.0 if grams[i][1] > 0 else np.nan
        pearson[i, i] = _pearson(ap[i], ap[i])
        spearman[i, i] = _pearson(ranks[i], ranks[i])
        for j in range(i + 1, m):
            share, jac = topk_overlap(neighbours[i], neighbours[j])
            overlap[i, j] = overlap[j, i] = share.mean()
            jaccard[i, j] = jaccard[j, i] = jac.mean()
            cka[i, j] = cka[j, i] = _cka(grams[i], grams[j])
            pearson[i, j] = pearson[j, i] = _pearson(ap[i], ap[j])
            spearman[i, j] = spearman[j, i] = _pearson(ranks[i], ranks[j])
            oracle[i, j] = oracle[j, i] = np.maximum(ap[i], ap[j]).mean()
    return {
        "models": names,
        "k": int(k),
        "n_queries": int(valid.sum()),
        "n_excluded": int((~valid).sum()),
        "cka_rows": len(sample),
        "seed": seed,
        "map@k": [float(v) for v in np.diag(oracle)],
        "best_single": float(np.diag(oracle).max()),
        "oracle_all": float(ap.max(axis=0).mean()),
        "overlap@k": _plain(overlap),
        "jaccard@k": _plain(jaccard),
        "cka": _plain(cka),
        "ap_pearson": _plain(pearson),
        "ap_spearman": _plain(spearman),
        "oracle_pair": _plain(oracle),
    }
