"""Weight sweeps over weighted concatenations, exact and fast.

With each model's rows L2-normalised, normalize(concat(w_i * x_i)) ranks exactly like
sum_i w_i^2 cos_i(q, j) (the concatenation's norm is the same for every row). So:
  * weight vectors that are multiples of each other rank identically: one score per ratio class;
  * nothing is re-concatenated: each model's similarities are computed once and combined;
  * each model keeps a top-K' list per query with its K'-th similarity tau_i(q). Anything outside
    every list scores at most sum_i w_i^2 tau_i(q), so when the K-th best candidate beats that bound
    the candidates' ranking *is* the exact top-K; the few (query, weights) pairs that are not
    certified are re-ranked over the whole gallery. Numbers equal re-concatenating and searching.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from core.fusion import l2_normalize
from core.metrics import METRIC_KEYS, MetricsError, depth_needed, relevant_counts, scores_from_relevance
from core.progress import SILENT, Reporter
from core.search import SearchBackend, top_k

# Safety margin on the pruning bound: candidate lists and rescoring are separate float32
# computations, so a similarity can differ between them in the last bits.
BOUND_SLACK = 1e-5
# Beyond the depth needed for exact metrics, candidates kept per model and query; more means
# fewer uncertified queries, fewer means less work per weight vector.
DEFAULT_EXTRA = 32
# Elements (queries x candidates x weight vectors) scored in one block, bounding memory.
BLOCK_ELEMENTS = 24_000_000


def ratio_class(weights: Sequence[float]) -> tuple[float, ...]:
    """The same key for weight vectors that are multiples of each other (they rank identically)."""
    w = np.abs(np.asarray(weights, dtype=np.float64))
    return tuple(np.round(w / w.max(), 9).tolist())


def label_weights(weights: Sequence[float], names: Sequence[str]) -> str:
    """'lite0(3)+lite2(1)': the reference study's way of naming a weighted concatenation."""
    parts = [f"{n}({w:g})" for n, w in zip(names, weights) if w != 0]
    return "+".join(parts) if len(parts) > 1 else names[int(np.flatnonzero(weights)[0])]


class WeightedConcatScorer:
    """Scores any number of weight vectors for a fixed set of models, labels and k, exactly.

    Built once per (embeddings, labels, k): the per-model candidate lists and the candidates'
    per-model similarities; then `score` costs queries x candidates per weight vector.
    """

    def __init__(self, embeddings: Sequence[np.ndarray], labels: np.ndarray, k: int = 50, *,
                 extra: int = DEFAULT_EXTRA, device: str | None = None,
                 backend: SearchBackend | None = None):
        if len(embeddings) == 0:
            raise MetricsError("choose at least one model")
        labels = np.asarray(labels)
        rows = {len(e) for e in embeddings}
        if rows != {len(labels)}:
            raise MetricsError(f"embedding sets have {sorted(rows)} rows but there are {len(labels)} labels: "
                               "every model must be extracted on the same images")
        if len(labels) < 2:
            raise MetricsError("retrieval needs at least 2 images")
        if int(k) < 1:
            raise MetricsError(f"k must be at least 1, got {k}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.k = int(k)
        self.n = n = len(labels)
        self.labels = labels
        self.n_relevant = relevant_counts(labels)
        self.depth = depth_needed(self.n_relevant, self.k, n - 1)
        per_model = min(self.depth + extra, n - 1)

        self.models = []
        lists, taus = [], []
        for e in embeddings:
            x = l2_normalize(e)
            if not np.isfinite(x).all():
                raise MetricsError("embeddings contain NaN or infinite values; re-extract them")
            self.models.append(torch.as_tensor(x, device=self.device))
            scores, ids = top_k(x, x, per_model, exclude_self=True, backend=backend)
            lists.append(ids)
            # An item missing from a list that covers the whole gallery does not exist: bound -2 < any cosine.
            taus.append(scores[:, -1] + BOUND_SLACK if per_model < n - 1 else np.full(n, -2.0, np.float32))
        self.tau = torch.as_tensor(np.stack(taus, axis=1), device=self.device)  # n x M

        # Union of the lists, ascending gallery index so a stable sort breaks ties by index;
        # padding uses index n (sorts last, scores -inf).
        cand = np.sort(np.concatenate(lists, axis=1), axis=1)
        dup = np.zeros_like(cand, dtype=bool)
        dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
        cand[dup] = n
        cand = np.sort(cand, axis=1)
        width = int((cand < n).sum(axis=1).max())
        self.candidates = torch.as_tensor(cand[:, :width], device=self.device)
        self.valid = self.candidates < n
        self.similarities = self._candidate_similarities()  # n x C x M, 0 at padding (masked later)
        codes = np.unique(labels, return_inverse=True)[1].reshape(-1)
        padded_labels = torch.as_tensor(np.append(codes, -1), device=self.device)
        own = padded_labels[:n]
        self.relevant = padded_labels[self.candidates] == own[:, None]
        self._label_codes = own
        self.n_uncertified = 0

    def _candidate_similarities(self) -> torch.Tensor:
        n, width = self.candidates.shape
        out = torch.empty((n, width, len(self.models)), dtype=torch.float32, device=self.device)
        idx = self.candidates.clamp(max=n - 1)
        rows = max(1, BLOCK_ELEMENTS // max(1, width * max(x.shape[1] for x in self.models)))
        for m, x in enumerate(self.models):
            for s in range(0, n, rows):
                block = idx[s:s + rows]
                out[s:s + rows, :, m] = torch.einsum("bd,bcd->bc", x[s:s + rows], x[block])
        out[~self.valid] = 0.0
        return out

    def score(self, weights: np.ndarray, reporter: Reporter = SILENT) -> list[dict]:
        """Metrics (METRIC_KEYS + n_queries, n_excluded) of each row of `weights` (W x M)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != len(self.models):
            raise MetricsError(f"weights must be W x {len(self.models)}, got shape {w.shape}")
        if (w < 0).any() or (w.sum(axis=1) == 0).any():
            raise MetricsError("weights must be non-negative with at least one non-zero per vector")
        squared = torch.as_tensor(w ** 2, dtype=torch.float32, device=self.device)  # cos weights
        n, width = self.candidates.shape
        per_block = max(1, BLOCK_ELEMENTS // (n * width))
        results = []
        for start in range(0, len(w), per_block):
            reporter.check_cancel()
            a = squared[start:start + per_block]  # B x M
            rel = self._ranked_relevance(a)  # B x n x depth (bool, numpy)
            s = scores_from_relevance(rel, self.n_relevant, self.k)
            for b in range(len(a)):
                results.append(_summary({key: v[b] for key, v in s.items()}, self.n_relevant, self.k))
            reporter.progress((start + len(a)) / len(w), f"scored {start + len(a)}/{len(w)} weight vectors")
        return results

    def _ranked_relevance(self, a: torch.Tensor) -> np.ndarray:
        fused = torch.einsum("ncm,bm->bnc", self.similarities, a)
        fused[:, ~self.valid] = -torch.inf
        order = torch.sort(fused, dim=2, descending=True, stable=True).indices[:, :, :self.depth]
        kth = torch.gather(fused, 2, order[:, :, -1:]).squeeze(2)  # B x n
        bound = a @ self.tau.T  # B x n
        rel = torch.gather(self.relevant.expand(len(a), -1, -1), 2, order)
        uncertified = torch.nonzero(~(kth > bound))
        self.n_uncertified += len(uncertified)
        for b, q in uncertified.tolist():
            rel[b, q] = self._exact_relevance(a[b], q)
        return rel.cpu().numpy()

    def _exact_relevance(self, a: torch.Tensor, q: int) -> torch.Tensor:
        """Full-gallery ranking of one query under one weight vector: the fallback that keeps it exact."""
        fused = sum(a[m] * (x @ x[q]) for m, x in enumerate(self.models))
        fused[q] = -torch.inf
        order = torch.sort(fused, descending=True, stable=True).indices[:self.depth]
        return self._label_codes[order] == self._label_codes[q]


def _summary(per_query: dict[str, np.ndarray], n_relevant: np.ndarray, k: int) -> dict:
    valid = n_relevant > 0
    names = {"ap_at_k": "map@k", "ap_at_k_hits": "map@k_hits", "ap_at_r": "map@r", "p_at_1": "p@1"}
    out = {names[key]: float(v[valid].mean()) if valid.any() else float("nan") for key, v in per_query.items()}
    out.update(k=k, n_queries=int(valid.sum()), n_excluded=int((~valid).sum()))
    return out


def _ranked(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (-r["map@k"], -r["map@k_hits"], r["weights"]))


def grid_sweep(embeddings: list[np.ndarray], labels: np.ndarray, weights=(0, 1, 2, 3, 4, 5), k: int = 50, *,
               reporter: Reporter | None = None, device: str | None = None) -> list[dict]:
    """Every weight vector in product(weights, repeat=len(embeddings)) except all-zero, best map@k first.

    Zero means "model left out", so one call covers every subset. Each dict: "weights" (tuple),
    "ratio" (its ratio class; equal ratios rank identically) and the metric keys of `evaluate`.
    """
    reporter = reporter or SILENT
    values = sorted({float(v) for v in weights})
    if any(v < 0 for v in values):
        raise MetricsError("weights must be non-negative")
    vectors = [v for v in itertools.product(values, repeat=len(embeddings)) if any(v)]
    classes: dict[tuple, int] = {}
    for v in vectors:
        classes.setdefault(ratio_class(v), len(classes))
    reporter.progress(0.0, f"preparing candidates for {len(embeddings)} models")
    scorer = WeightedConcatScorer(embeddings, labels, k, device=device)
    representatives = np.array([next(v for v in vectors if ratio_class(v) == c) for c in classes])
    scores = scorer.score(representatives, reporter)
    rows = []
    for v in vectors:
        c = ratio_class(v)
        rows.append({"weights": tuple(_plain(x) for x in v), "ratio": c, **scores[classes[c]]})
    return _ranked(rows)


def random_sweep(embeddings: list[np.ndarray], labels: np.ndarray, n_samples: int = 256, k: int = 50, *,
                 refine_rounds: int = 3, seed: int = 0, reporter: Reporter | None = None,
                 device: str | None = None) -> list[dict]:
    """Continuous weights: random points of the simplex, then rounds of shrinking jitter around the best.

    Finds finer optima than a 0..5 grid. Weights are reported scaled so the largest is 1.
    """
    reporter = reporter or SILENT
    rng = np.random.default_rng(seed)
    scorer = WeightedConcatScorer(embeddings, labels, k, device=device)
    m = len(embeddings)
    # Sample the squared weights (the cosine mixture) uniformly; include each single model and equal weights.
    points = [np.eye(m), np.ones((1, m)), np.sqrt(rng.dirichlet(np.ones(m), size=n_samples))]
    rows: list[dict] = []
    spread = 0.25
    for round_ in range(refine_rounds + 1):
        batch = np.concatenate(points) if round_ == 0 else points[0]
        batch = batch / batch.max(axis=1, keepdims=True)
        for v, s in zip(batch, scorer.score(batch)):
            rows.append({"weights": tuple(round(float(x), 4) for x in v), "ratio": ratio_class(v), **s})
        reporter.progress((round_ + 1) / (refine_rounds + 1), f"random search round {round_ + 1}")
        best = np.array([r["weights"] for r in _ranked(rows)[:4]])
        jitter = np.exp(rng.normal(0.0, spread, size=(len(best), max(1, n_samples // 16), m)))
        points = [np.clip(best[:, None, :] * jitter, 1e-3, None).reshape(-1, m)]
        spread /= 2
    return _ranked(rows)


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


__all__ = ["grid_sweep", "random_sweep", "WeightedConcatScorer", "ratio_class", "label_weights", "METRIC_KEYS"]
