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

from core.metrics import METRIC_KEYS, PER_QUERY, MetricsError, depth_needed, relevant_counts, scores_from_relevance
from core.progress import SILENT, Reporter
from core.vectors import l2_normalize, ratio_class

# Safety margin on the pruning bound: candidate lists and rescoring are separate float32
# computations, so a similarity can differ between them in the last bits.
BOUND_SLACK = 1e-5
# Candidates kept per model and query: 2 x the depth exact metrics need, plus this. Deeper lists
# certify more (query, weights) pairs without the slow exact fallback; shorter ones cost less per
# weight vector (bench/RESULTS.md has the trade-off on the demo).
DEFAULT_EXTRA = 32
# Elements (queries x candidates x weight vectors) scored in one block, bounding memory.
BLOCK_ELEMENTS = 24_000_000
# Bound on the similarity blocks held while building candidates.
CHUNK_BYTES = 512 * 2**20


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
                 extra: int | None = None, device: str | None = None):
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
        self.n_relevant = relevant_counts(labels)
        self.depth = depth_needed(self.n_relevant, self.k, n - 1)
        extra = self.depth + DEFAULT_EXTRA if extra is None else extra
        self.models = []
        for e in embeddings:
            x = l2_normalize(e)
            if not np.isfinite(x).all():
                raise MetricsError("embeddings contain NaN or infinite values; re-extract them")
            self.models.append(torch.as_tensor(x, device=self.device))
        codes = np.unique(labels, return_inverse=True)[1].reshape(-1)
        self._label_codes = torch.as_tensor(codes, device=self.device)
        self._build_candidates(min(self.depth + extra, n - 1))
        padded = torch.cat([self._label_codes, torch.tensor([-1], device=self.device)])
        self.relevant = padded[self.candidates] == self._label_codes[:, None]
        self.n_uncertified = 0

    def _build_candidates(self, per_model: int) -> None:
        """Per query: the union of each model's top-`per_model` list, and every model's similarity to it.

        Works on query chunks of each model's full similarity block, so candidates and their
        similarities come from one matmul per model (this is why it does not call search.top_k,
        which returns lists without the blocks to read the other models' similarities from).
        """
        n, m_count = self.n, len(self.models)
        full = per_model >= n - 1  # every list holds the whole gallery: nothing lies outside
        width = m_count * per_model
        cand = torch.full((n, width), n, dtype=torch.int64, device=self.device)
        sims = torch.zeros((n, width, m_count), dtype=torch.float32, device=self.device)
        # -2 is below any cosine: the bound of a list that leaves nothing outside.
        tau = torch.full((n, m_count), -2.0, dtype=torch.float32, device=self.device)
        rows = max(1, CHUNK_BYTES // (4 * n * m_count))
        for s in range(0, n, rows):
            e = min(n, s + rows)
            own = torch.arange(s, e, device=self.device)
            blocks = []
            for x in self.models:
                block = x[s:e] @ x.T
                block[own - s, own] = -torch.inf
                blocks.append(block)
            lists = []
            for m, block in enumerate(blocks):
                values, ids = torch.topk(block, per_model, dim=1)
                lists.append(ids)
                if not full:
                    tau[s:e, m] = values[:, -1] + BOUND_SLACK
            # Ascending gallery index, so a stable sort later breaks score ties by index;
            # duplicates become the padding index n, which sorts last.
            union = torch.sort(torch.cat(lists, dim=1), dim=1).values
            dup = torch.zeros_like(union, dtype=torch.bool)
            dup[:, 1:] = union[:, 1:] == union[:, :-1]
            union[dup] = n
            union = torch.sort(union, dim=1).values
            cand[s:e] = union
            safe = union.clamp(max=n - 1)
            for m, block in enumerate(blocks):
                sims[s:e, :, m] = torch.gather(block, 1, safe)
        used = int((cand < n).sum(dim=1).max())
        self.candidates = cand[:, :used]
        self.valid = self.candidates < n
        self.similarities = sims[:, :used] * self.valid[..., None]  # n x C x M, 0 at padding (masked later)
        self.tau = tau

    def score(self, weights: np.ndarray, reporter: Reporter = SILENT) -> list[dict]:
        """Metrics (METRIC_KEYS + n_queries, n_excluded) of each row of `weights` (W x M)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != len(self.models):
            raise MetricsError(f"weights must be W x {len(self.models)}, got shape {w.shape}")
        if (w < 0).any() or (w.sum(axis=1) == 0).any():
            raise MetricsError("weights must be non-negative with at least one non-zero per vector")
        squared = torch.as_tensor(w ** 2, dtype=torch.float32, device=self.device)  # cos weights
        n, width = self.candidates.shape
        budget = BLOCK_ELEMENTS * (16 if self.device.type == "cuda" else 1)
        per_block = max(1, budget // (n * width))
        valid = torch.as_tensor(self.n_relevant > 0, device=self.device)
        results = []
        for start in range(0, len(w), per_block):
            reporter.check_cancel()
            a = squared[start:start + per_block]  # B x M
            rel = self._ranked_relevance(a)  # B x n x depth
            s = scores_from_relevance(rel, self.n_relevant, self.k)
            means = torch.stack([s[key][:, valid].mean(dim=1) for key in PER_QUERY.values()]).T.cpu().tolist()
            for row in means:
                results.append({**dict(zip(METRIC_KEYS, row)), "k": self.k,
                                "n_queries": int(valid.sum()), "n_excluded": int((~valid).sum())})
            reporter.progress((start + len(a)) / len(w), f"scored {start + len(a)}/{len(w)} weight vectors")
        return results

    def _ranked_relevance(self, a: torch.Tensor) -> np.ndarray:
        """Relevance of each query's fused top-`depth`, ordered by (-score, index), for B weight vectors."""
        fused = torch.einsum("ncm,bm->bnc", self.similarities, a)
        fused[:, ~self.valid] = -torch.inf
        width = fused.shape[2]
        take = min(self.depth + 1, width)
        top = torch.topk(fused, take, dim=2).indices
        # topk's order among equal scores is unspecified: re-sort the chosen positions by position
        # (= gallery index), then stably by score.
        top = torch.sort(top, dim=2).values
        order = torch.sort(torch.gather(fused, 2, top), dim=2, descending=True, stable=True).indices
        top = torch.gather(top, 2, order)
        scores = torch.gather(fused, 2, top)
        kth = scores[:, :, self.depth - 1]
        certified = kth > a @ self.tau.T  # beats everything outside the candidates
        if take > self.depth:  # a tie across the cut may have dropped a lower-index candidate
            certified &= kth > scores[:, :, self.depth]
        rel = torch.gather(self.relevant.expand(len(a), -1, -1), 2, top[:, :, :self.depth])
        b_idx, q_idx = torch.nonzero(~certified, as_tuple=True)
        self.n_uncertified += len(q_idx)
        if len(q_idx):
            rel[b_idx, q_idx] = self._exact_relevance(a[b_idx], q_idx)
        return rel

    def _exact_relevance(self, a: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Full-gallery rankings for the (weights, query) pairs the bound could not certify: the
        fallback that keeps every number exact. Each query's per-model similarity rows are computed
        once for all its pairs. Returns P x depth relevance."""
        out = torch.empty((len(queries), self.depth), dtype=torch.bool, device=self.device)
        unique, which = torch.unique(queries, return_inverse=True)
        per_chunk = max(1, CHUNK_BYTES // (4 * self.n * (len(self.models) + 1)))
        for s in range(0, len(unique), per_chunk):
            chunk = unique[s:s + per_chunk]
            rows = torch.stack([x[chunk] @ x.T for x in self.models], dim=1)  # U x M x n
            pairs = torch.nonzero((which >= s) & (which < s + len(chunk))).squeeze(1)
            for p in range(0, len(pairs), per_chunk):
                part = pairs[p:p + per_chunk]
                fused = torch.einsum("pmn,pm->pn", rows[which[part] - s], a[part])
                fused[torch.arange(len(part), device=self.device), queries[part]] = -torch.inf  # not itself
                order = torch.sort(fused, dim=1, descending=True, stable=True).indices[:, :self.depth]
                out[part] = self._label_codes[order] == self._label_codes[queries[part], None]
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
    ratios = [ratio_class(v) for v in vectors]
    first_of_class: dict[tuple, tuple] = {}  # each ratio class is scored once, through its first vector
    for v, c in zip(vectors, ratios):
        first_of_class.setdefault(c, v)
    reporter.progress(0.0, f"preparing candidates for {len(embeddings)} models")
    scorer = WeightedConcatScorer(embeddings, labels, k, device=device)
    scores = dict(zip(first_of_class, scorer.score(np.array(list(first_of_class.values())), reporter)))
    rows = [{"weights": tuple(_plain(x) for x in v), "ratio": c, **scores[c]} for v, c in zip(vectors, ratios)]
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

