"""Weight sweeps over weighted concatenations, exact and never slower than re-concatenating.

With each model's rows L2-normalised, normalize(concat(w_i * x_i)) ranks exactly like
sum_i w_i^2 cos_i(q, j) (the concatenation's norm is the same for every row). So:
  * weight vectors that are multiples of each other rank identically: one score per ratio class;
  * nothing is re-concatenated: each model's similarities are computed once and combined.

`WeightedConcatScorer.score` walks the queries in blocks and scores each block by one of two exact paths:
  * candidates: each model keeps a top-K' list per query with its K'-th similarity tau_i(q).
    Anything outside every list scores at most sum_i w_i^2 tau_i(q), so when the depth-th best
    candidate beats that bound the candidates' ranking *is* the exact top; a (query, weights) pair
    that is not certified is re-ranked over the whole gallery from the block's similarity rows.
    Costs |candidates| per pair, plus a full row per uncertified pair.
  * dense: each model's block x N similarity block once, fused by every weight vector, exact top over
    the gallery. Costs N per pair, whatever the models do.
When models agree their lists overlap and nearly every pair certifies; when they disagree few do,
and paying the candidates *and* a full row for most pairs costs more than the dense path.

Choosing per block, by measured cost (`PathCosts`): every block times its parts (candidate fusion
per pair, dense fusion per pair, a fallback pair, similarity rows per query) and records the
fraction u of its pairs that the bound does not certify (the dense path measures u too: a pair
certifies exactly when its true depth-th score beats the bound). The next block is predicted to cost
    candidates:  pairs * (t_candidate + u * t_fallback) + (rows * t_similarity if u > 0)
    dense:       pairs * t_dense + rows * t_similarity
and takes the cheaper path. u is a running estimate that weights the latest block by half, so a
sweep follows data whose agreement changes between blocks. Before a cost is measured it is estimated
from the other path's, scaled by the elements each touches (N against |candidates|). Both paths are
exact, so the choice changes the time, never a number.

Ties are ranked by (-score, gallery index) on both paths, as everywhere (DESIGN.md).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from core.devices import resolve_device
from core.metrics import METRIC_KEYS, PER_QUERY, MetricsError, depth_needed, relevant_counts, scores_from_relevance
from core.progress import SILENT, Reporter
from core.vectors import l2_normalize, ratio_class

# Safety margin on the pruning bound: candidate lists and rescoring are separate float32
# computations, so a similarity can differ between them in the last bits.
BOUND_SLACK = 1e-5
# Candidates kept per model and query: 2 x the depth exact metrics need, plus this. Deeper lists
# certify more (query, weights) pairs without the exact fallback; shorter ones cost less per
# weight vector (bench/RESULTS.md has the trade-off on the demo).
DEFAULT_EXTRA = 32
# Elements (weight vectors x queries x candidates or gallery items) fused at once. On the CPU 16 MB:
# large enough that per-operation overhead stays small, below glibc's 32 MB mmap threshold so
# temporaries are reused instead of page-faulted in afresh (100 MB ones ran several times slower on
# 2 cores); a GPU wants large launches.
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}
# Query x gallery elements per query block: the unit of the path choice and of each model's
# similarity block (M of them are held at once).
QUERY_BLOCK_ELEMENTS = 2_000_000
# Bound on the similarity blocks held while building candidates.
CHUNK_BYTES = 512 * 2**20
PATHS = ("auto", "candidates", "dense")
PARTS = ("candidate", "fallback", "dense", "similarity")  # the timed parts of PathCosts


@dataclass
class PathCosts:
    """Measured seconds per unit of work of each path, and running estimates of how much of a block
    the bound leaves uncertified; picks the cheaper path for the next query block (module docstring)."""

    gallery: int  # N: elements a dense pair touches
    width: float  # mean candidates per query: elements a candidate pair touches
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    units: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    uncertified: float | None = None  # fraction of (query, weights) pairs
    queries_hit: float | None = None  # fraction of queries with at least one uncertified pair

    def add(self, part: str, seconds: float, units: int) -> None:
        self.seconds[part] += seconds
        self.units[part] += units

    def observe(self, uncertified_pairs: int, pairs: int, queries_hit: int, queries: int) -> None:
        """Fold in one block; the latest block weighs half, so the estimate follows changing data."""
        u, q = uncertified_pairs / max(1, pairs), queries_hit / max(1, queries)
        first = self.uncertified is None
        self.uncertified = u if first else (self.uncertified + u) / 2
        self.queries_hit = q if first else (self.queries_hit + q) / 2

    def rate(self, part: str) -> float | None:
        return self.seconds[part] / self.units[part] if self.units[part] else None

    def choose(self, pairs: int, rows: int) -> str:
        """ "candidates" or "dense" for a block of `rows` queries and `pairs` (query, weights) pairs."""
        candidate, dense, fallback = self.rate("candidate"), self.rate("dense"), self.rate("fallback")
        if self.uncertified is None or candidate is None and dense is None:
            return "candidates"  # nothing measured yet: the path that is cheap when models agree
        # A path not run yet: the other's cost per element touched (a fallback pair is a dense pair).
        if candidate is None:
            candidate = dense * self.width / self.gallery
        if dense is None:
            dense = fallback if fallback is not None else candidate * self.gallery / self.width
        fallback = fallback if fallback is not None else dense
        similarity = (self.rate("similarity") or 0.0) * rows
        by_candidates = pairs * (candidate + self.uncertified * fallback) + similarity * self.queries_hit
        by_dense = pairs * dense + similarity
        return "candidates" if by_candidates <= by_dense else "dense"


class WeightedConcatScorer:
    """Scores any number of weight vectors for a fixed set of models, labels and k, exactly.

    Built once per (embeddings, labels, k): the per-model candidate lists and the candidates'
    per-model similarities; then `score` chooses per query block between the candidates and dense
    streaming (module docstring). `path` forces one path ("candidates" or "dense"); `block_rows`
    sets the queries per block (default: QUERY_BLOCK_ELEMENTS / N).
    """

    def __init__(self, embeddings: Sequence[np.ndarray], labels: np.ndarray, k: int = 50, *,
                 extra: int | None = None, device: str | None = None, path: str = "auto",
                 block_rows: int | None = None):
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
        if path not in PATHS:
            raise MetricsError(f"unknown sweep path {path!r}; use one of {', '.join(PATHS)}")
        self.device = torch.device(resolve_device(device))
        self.k = int(k)
        self.n = n = len(labels)
        self.path = path
        self.n_relevant = relevant_counts(labels)
        self._n_relevant = torch.as_tensor(self.n_relevant, device=self.device)
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
        scale = 16 if self.device.type == "cuda" else 1  # a GPU wants bigger blocks and has the memory
        self.chunk_elements = CHUNK_ELEMENTS[self.device.type]
        self.block_rows = int(block_rows or max(1, min(n, scale * QUERY_BLOCK_ELEMENTS // n)))
        self.costs = PathCosts(gallery=n, width=float(self.valid.sum()) / n)
        self.n_uncertified = 0  # (query, weights) pairs whose candidates could not be certified
        self.blocks = {"candidates": 0, "dense": 0}  # query blocks scored by each path

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
        sims = torch.zeros((m_count, n, width), dtype=torch.float32, device=self.device)
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
                sims[m, s:e] = torch.gather(block, 1, safe)
        used = int((cand < n).sum(dim=1).max())
        self.candidates = cand[:, :used]
        self.valid = self.candidates < n
        # M x n x C, so one matmul fuses a block for many weight vectors; 0 at padding (masked later).
        self.similarities = (sims[:, :, :used] * self.valid).contiguous()
        self.tau = tau

    def score(self, weights: np.ndarray, reporter: Reporter = SILENT) -> list[dict]:
        """Metrics (METRIC_KEYS + n_queries, n_excluded) of each row of `weights` (W x M)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != len(self.models):
            raise MetricsError(f"weights must be W x {len(self.models)}, got shape {w.shape}")
        if (w < 0).any() or (w.sum(axis=1) == 0).any():
            raise MetricsError("weights must be non-negative with at least one non-zero per vector")
        squared = torch.as_tensor(w ** 2, dtype=torch.float32, device=self.device)  # cos weights
        totals = torch.zeros((len(w), len(METRIC_KEYS)), dtype=torch.float64, device=self.device)
        for start in range(0, self.n, self.block_rows):
            reporter.check_cancel()
            stop = min(self.n, start + self.block_rows)
            path = self.path if self.path != "auto" else self.costs.choose(len(w) * (stop - start), stop - start)
            self.blocks[path] += 1
            block = _QueryBlock(self, squared, totals, start, stop)
            block.dense() if path == "dense" else block.candidates()
            self.n_uncertified += block.uncertified_pairs
            self.costs.observe(block.uncertified_pairs, len(w) * (stop - start), block.queries_hit, stop - start)
            reporter.progress(stop / self.n, f"scored {stop}/{self.n} queries for {len(w)} weight vectors")
        n_valid = int((self.n_relevant > 0).sum())
        means = (totals / n_valid if n_valid else torch.full_like(totals, torch.nan)).cpu().tolist()
        return [{**dict(zip(METRIC_KEYS, row)), "k": self.k, "n_queries": n_valid, "n_excluded": self.n - n_valid}
                for row in means]

    def _metric_sums(self, rel: torch.Tensor, queries: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """... x len(METRIC_KEYS) float64: the metrics of ranked relevance `rel` (... x depth) of
        `queries` (broadcast over the leading axes), 0 where a query is excluded (R = 0) or `keep` is False."""
        s = scores_from_relevance(rel, self._n_relevant[queries], self.k)
        part = torch.stack([s[key] for key in PER_QUERY.values()], dim=-1)
        drop = self._n_relevant[queries] == 0 if keep is None else (self._n_relevant[queries] == 0) | ~keep
        return part.masked_fill(drop[..., None], 0.0)

    def _relevance(self, ids: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Whether each ranked gallery row (... x depth) shares the label of its query (broadcast)."""
        return self._label_codes[ids] == self._label_codes[queries][..., None]


class _QueryBlock:
    """Queries [start, stop) of a scorer, scored for every weight vector by one of the two exact paths,
    into `totals` (W x metrics sums); the parts are timed into the scorer's costs."""

    def __init__(self, scorer: WeightedConcatScorer, squared: torch.Tensor, totals: torch.Tensor,
                 start: int, stop: int):
        self.s, self.a, self.totals = scorer, squared, totals
        self.start, self.stop = start, stop
        self.uncertified_pairs = 0
        self.queries_hit = 0  # queries with at least one uncertified pair

    def _clock(self) -> float:
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)  # time the work, not its queueing
        return time.perf_counter()

    def _chunks(self, width: int):
        """(weights slice, query slice) pairs covering the block, each about chunk_elements wide."""
        rows = max(1, min(self.stop - self.start, self.s.chunk_elements // width))
        per_chunk = max(1, self.s.chunk_elements // (rows * width))
        for lo in range(self.start, self.stop, rows):
            for w0 in range(0, len(self.a), per_chunk):
                yield slice(w0, w0 + per_chunk), slice(lo, min(self.stop, lo + rows))

    def _similarities(self, queries: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every model's similarity of `queries` to the whole gallery, models stacked along `dim`
        (M x Q x N, or Q x M x N with dim=1)."""
        t0 = self._clock()
        sims = torch.stack([x[queries] @ x.T for x in self.s.models], dim=dim)
        self.s.costs.add("similarity", self._clock() - t0, len(queries))
        return sims

    def _bound(self, a: torch.Tensor, queries: slice) -> torch.Tensor:
        """B x rows: the most any item outside every candidate list of `queries` can score."""
        return a @ self.s.tau[queries].T

    def candidates(self) -> None:
        """Rank among the candidates, keep the pairs the bound certifies, then rank the others over
        the whole gallery, query by query (each query's similarity rows computed once)."""
        sc, depth = self.s, self.s.depth
        uncertified = torch.zeros((len(self.a), self.stop - self.start), dtype=torch.bool, device=sc.device)
        t0 = self._clock()
        for ws, qs in self._chunks(sc.candidates.shape[1]):
            a = self.a[ws]
            sims = sc.similarities[:, qs]  # M x rows x C
            m_count, rows, width = sims.shape
            fused = (a @ sims.reshape(m_count, rows * width)).view(len(a), rows, width)
            fused.masked_fill_(~sc.valid[qs], -torch.inf)
            top, scores = _ranked(fused, depth)
            kth = scores[:, :, depth - 1]
            certified = kth > self._bound(a, qs)  # beats everything outside the candidates
            if scores.shape[2] > depth:  # a tie across the cut may have dropped a lower-index candidate
                certified &= kth > scores[:, :, depth]
            rel = torch.gather(sc.relevant[qs].expand(len(a), -1, -1), 2, top[:, :, :depth])
            queries = torch.arange(qs.start, qs.stop, device=sc.device)
            self.totals[ws] += sc._metric_sums(rel, queries, certified).sum(dim=1)
            uncertified[ws, qs.start - self.start:qs.stop - self.start] = ~certified
        sc.costs.add("candidate", self._clock() - t0, uncertified.numel())
        self.uncertified_pairs = int(uncertified.sum())
        hit = torch.nonzero(uncertified.any(dim=0)).squeeze(1)
        self.queries_hit = len(hit)
        if len(hit):
            self._fallback(hit + self.start, uncertified[:, hit])

    def _fallback(self, queries: torch.Tensor, pairs: torch.Tensor) -> None:
        """Exact ranking over the whole gallery for each query's uncertified weight vectors
        (`pairs`: W x len(queries) booleans)."""
        sc = self.s
        sims = self._similarities(queries, dim=1)  # Q x M x N
        t0 = self._clock()
        local, weights = torch.nonzero(pairs.T, as_tuple=True)  # grouped by query
        owners = queries[local]
        ranked = []
        # Pairs of many queries per chunk: few large operations, whatever the pairs per query.
        per_chunk = max(1, sc.chunk_elements // (sims.shape[1] * sc.n))
        for p in range(0, len(local), per_chunk):
            part = slice(p, p + per_chunk)
            fused = torch.bmm(self.a[weights[part], None, :], sims[local[part]])[:, 0]  # P x N
            fused[torch.arange(len(fused), device=fused.device), owners[part]] = -torch.inf  # not itself
            ranked.append(_ranked(fused, sc.depth)[0][:, :sc.depth])
        rel = sc._relevance(torch.cat(ranked), owners)
        self.totals.index_add_(0, weights, sc._metric_sums(rel, owners))
        sc.costs.add("fallback", self._clock() - t0, len(weights))

    def dense(self) -> None:
        """Rank every pair over the whole gallery from the block's similarity rows; also measure which
        pairs the candidates would have certified (true depth-th score above the bound)."""
        sc, depth = self.s, self.s.depth
        sims = self._similarities(torch.arange(self.start, self.stop, device=sc.device))  # M x b x N
        hit = torch.zeros(self.stop - self.start, dtype=torch.bool, device=sc.device)
        t0 = self._clock()
        for ws, qs in self._chunks(sc.n):
            a = self.a[ws]
            block = sims[:, qs.start - self.start:qs.stop - self.start]
            m_count, rows, n = block.shape
            fused = (a @ block.reshape(m_count, rows * n)).view(len(a), rows, n)
            queries = torch.arange(qs.start, qs.stop, device=sc.device)
            fused[:, queries - qs.start, queries] = -torch.inf  # not itself
            top, scores = _ranked(fused, depth)
            missed = scores[:, :, depth - 1] <= self._bound(a, qs)
            self.uncertified_pairs += int(missed.sum())
            hit[qs.start - self.start:qs.stop - self.start] |= missed.any(dim=0)
            self.totals[ws] += sc._metric_sums(sc._relevance(top[:, :, :depth], queries), queries).sum(dim=1)
        sc.costs.add("dense", self._clock() - t0, len(self.a) * (self.stop - self.start))
        self.queries_hit = int(hit.sum())


def _ranked(fused: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top of each row of `fused` (... x width) in (-score, position) order: positions and
    scores, depth + 1 of them where the row is wider than depth (the extra one shows ties at the cut).

    topk orders equal scores arbitrarily, and may keep the wrong ones of a tie across its cut. Rows
    with no equal scores among those kept are right as they are (nearly all rows of real data);
    the others are re-ranked: a tie inside the kept ones by sorting them by position and then stably
    by score, a tie across the cut by a full stable sort, which keeps the lowest positions."""
    take = min(depth + 1, fused.shape[-1])
    scores, top = torch.topk(fused, take, dim=-1)
    tied = (scores[..., 1:] == scores[..., :-1]).any(dim=-1)
    if tied.any():
        rows, kept = fused[tied], top[tied]
        kept = torch.sort(kept, dim=-1).values
        order = torch.sort(torch.gather(rows, -1, kept), dim=-1, descending=True, stable=True).indices
        kept = torch.gather(kept, -1, order)
        values = torch.gather(rows, -1, kept)
        if take > depth:
            cut = values[:, depth - 1] == values[:, depth]
            kept[cut] = torch.sort(rows[cut], dim=-1, descending=True, stable=True).indices[:, :take]
            values[cut] = torch.gather(rows[cut], -1, kept[cut])
        top[tied], scores[tied] = kept, values
    return top, scores


def _ranked_rows(rows: list[dict]) -> list[dict]:
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
    return _ranked_rows(rows)


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
        best = np.array([r["weights"] for r in _ranked_rows(rows)[:4]])
        jitter = np.exp(rng.normal(0.0, spread, size=(len(best), max(1, n_samples // 16), m)))
        points = [np.clip(best[:, None, :] * jitter, 1e-3, None).reshape(-1, m)]
        spread /= 2
    return _ranked_rows(rows)


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
