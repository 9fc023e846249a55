"""Weight sweeps over weighted concatenations, exact and never slower than re-concatenating.

With each model's rows L2-normalised, normalize(concat(w_i * x_i)) ranks exactly like
sum_i w_i^2 cos_i(q, j) (the concatenation's norm is the same for every row). So:
  * weight vectors that are multiples of each other rank identically: one score per ratio class;
  * nothing is re-concatenated: each model's similarities are computed once and combined.

`WeightedConcatScorer.score` walks the queries in blocks and scores each block by one exact path:
  * candidates at level l: each model's top-K_l list per query (K_l = K_0 * 2^l) and its K_l-th
    similarity tau_i(q). Anything outside every list scores at most sum_i w_i^2 tau_i(q), so when the
    depth-th best candidate beats that bound the candidates' ranking *is* the exact top; a
    (query, weights) pair that is not certified is ranked over the whole gallery instead. Level 0 is
    built once per scorer (`prepare`), with every level's bound; deeper levels are built per block from
    its similarity rows. Costs |candidates| per pair, plus a full row per uncertified pair.
  * dense: each model's block x N similarity block once, fused by every weight vector, exact top over
    the gallery. Costs N per pair, whatever the models do.
When models agree, level 0 certifies nearly every pair. When they disagree, few pairs certify at
level 0 and paying the candidates *and* a full row for most pairs costs more than dense; deeper
lists certify most pairs again, at a fraction of N per pair.

Choosing per block, by measured cost (`PathCosts`): blocks time their parts (seconds per candidate
and per gallery element fused and ranked, per ranked pair scored, per fallback pair, per query for
similarity rows and for building deeper lists) and every pair's exact depth-th score gives, for
every level l at once, the fraction u_l of pairs its bound leaves uncertified and the fraction h_l
of queries with one. With C_l candidates per query the next block is predicted to cost
    level 0:   pairs * (C_0 * t_candidate + t_pair + u_0 * t_fallback) + rows * h_0 * t_similarity
    level l:   pairs * (C_l * t_candidate + t_pair + u_l * t_fallback) + rows * (t_similarity + t_lists)
    dense:     pairs * (N * t_gallery + t_pair) + rows * t_similarity
and takes the cheapest. u and h are running estimates that weigh the latest block by half, so a
sweep follows data whose agreement changes between blocks; a cost not measured yet is estimated from
the others (a fallback pair costs what a dense pair does; M selections over the gallery build a
query's deeper lists; a gallery element costs what a candidate does). The first block runs level 0
and there are at least MIN_BLOCKS blocks, so what it teaches is used. Every path is exact, so the
choice changes the time, never a number.

A small grid scored once (`score_once`) builds no candidates: building them costs each model about what
ranking DENSE_VECTORS_PER_MODEL weight vectors over the gallery does, so a grid with no more vectors than
that per model (an oracle sweep of weights (0, 1) over two models: three vectors) is ranked densely.

Ties are ranked by (-score, gallery index) on every path, as everywhere (DESIGN.md).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from core.devices import resolve_device
from core.metrics import METRIC_KEYS, PER_QUERY, MetricsError, depth_needed, relevant_counts, scores_from_relevance
from core.progress import SILENT, Reporter
from core.vectors import l2_normalize, plain_weights, ratio_class

# Safety margin on the pruning bound: candidate lists and rescoring are separate float32
# computations, so a similarity can differ between them in the last bits.
BOUND_SLACK = 1e-5
# Candidates kept per model and query at level 0: 2 x the depth exact metrics need, plus this.
# Deeper lists certify more (query, weights) pairs without the exact fallback; shorter ones cost
# less per weight vector (bench/RESULTS.md has the trade-off on the demo).
DEFAULT_EXTRA = 32
# Deeper candidate levels (each doubling the lists) while every model's lists fit in the gallery.
MAX_LEVELS = 3
# Elements (weight vectors x queries x candidates or gallery items) fused at once. On the CPU 16 MB:
# large enough that per-operation overhead stays small, below glibc's 32 MB mmap threshold so
# temporaries are reused instead of page-faulted in afresh (100 MB ones ran several times slower on
# 2 cores); a GPU wants large launches.
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}
# Query x gallery elements per query block: the unit of the path choice and of each model's
# similarity block (M of them are held at once); and the fewest blocks a sweep is cut into.
QUERY_BLOCK_ELEMENTS = 2_000_000
MIN_BLOCKS = 8
# Bound on the similarity blocks held while building candidates.
CHUNK_BYTES = 512 * 2**20
# Query blocks' full similarity rows a scorer keeps once it is asked to score again: greedy selection
# scores the same queries tens of times, and recomputing the rows of their uncertified pairs each time
# was half of its work. A one-call grid sweep keeps nothing.
KEEP_BYTES = {"cpu": 2 * 2**30, "cuda": 8 * 2**30}
# A query's similarity to itself in a block's rows: below any cosine, so it never ranks, and finite,
# so a zero weight times it is 0 (not NaN).
SELF_SCORE = -4.0
# A grid scored once with at most this many weight vectors per model is ranked densely (score_once):
# at 50,000 queries on 2 cores building candidates cost about 20 s per model and dense ranking 7-9 s
# per vector; dense was still ahead at 4 vectors per model (bench/RESULTS.md, "Small grids").
DENSE_VECTORS_PER_MODEL = 2
PATHS = ("auto", "candidates", "dense")
PARTS = ("candidate", "dense", "pair", "fallback", "similarity", "lists")  # the timed parts of PathCosts


@dataclass
class PathCosts:
    """Measured seconds per unit of work of each path, and running estimates of how much of a block
    each candidate level leaves uncertified; picks the cheapest path for the next query block
    (module docstring). Units: candidate and dense = one element fused and ranked (a candidate, or a
    gallery item, of one pair); pair = scoring one ranked pair; fallback = one pair, all included;
    similarity and lists = one query."""

    gallery: int  # N
    models: int  # M
    widths: list[float]  # C_l: candidates per query at each level (deeper ones estimated until built)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    units: dict = field(default_factory=lambda: dict.fromkeys(PARTS, 0))
    uncertified: list[float] | None = None  # u_l: fraction of (query, weights) pairs, per level
    queries_hit: list[float] | None = None  # h_l: fraction of queries with an uncertified pair

    def add(self, part: str, seconds: float, units: int) -> None:
        self.seconds[part] += seconds
        self.units[part] += units

    def observe(self, uncertified: list[float], queries_hit: list[float]) -> None:
        """Fold in one block's fractions; the latest block weighs half, so estimates follow the data."""
        if self.uncertified is None:
            self.uncertified, self.queries_hit = list(uncertified), list(queries_hit)
            return
        self.uncertified = [(old + new) / 2 for old, new in zip(self.uncertified, uncertified)]
        self.queries_hit = [(old + new) / 2 for old, new in zip(self.queries_hit, queries_hit)]

    def rate(self, part: str) -> float | None:
        return self.seconds[part] / self.units[part] if self.units[part] else None

    def predict(self, pairs: int, rows: int) -> dict[tuple[str, int], float]:
        """Predicted seconds of each path for a block: ("candidates", level) and ("dense", 0)."""
        candidate, dense, fallback = self.rate("candidate"), self.rate("dense"), self.rate("fallback")
        pair = self.rate("pair") or 0.0
        if dense is None:  # a fallback pair is a dense pair; else an element costs what a candidate does
            dense = (fallback - pair) / self.gallery if fallback is not None else candidate
        candidate = candidate if candidate is not None else dense
        dense_pair = self.gallery * dense + pair
        fallback = fallback if fallback is not None else dense_pair
        similarity = self.rate("similarity") or 0.0
        lists = self.rate("lists")
        lists = lists if lists is not None else self.models * self.gallery * dense  # M selections per query
        out = {}
        for level, (width, u) in enumerate(zip(self.widths, self.uncertified)):
            build = rows * similarity * self.queries_hit[0] if level == 0 else rows * (similarity + lists)
            out[("candidates", level)] = pairs * (width * candidate + pair + u * fallback) + build
        out[("dense", 0)] = pairs * dense_pair + rows * similarity
        return out

    def choose(self, pairs: int, rows: int) -> tuple[str, int]:
        if self.uncertified is None or self.rate("candidate") is None and self.rate("dense") is None:
            return ("candidates", 0)  # nothing measured yet: the path that is cheap when models agree
        predicted = self.predict(pairs, rows)
        return min(predicted, key=predicted.get)


@dataclass
class _Lists:
    """Candidate lists of a run of queries: each row the union of every model's top-K list in
    ascending gallery index (padding n last), so a stable sort breaks score ties by index."""

    sims: torch.Tensor  # M x rows x C, 0 at padding
    valid: torch.Tensor  # rows x C
    relevant: torch.Tensor  # rows x C: same label as the query
    tau: torch.Tensor  # rows x M: K-th similarity + slack (-2 where the lists hold the whole gallery)

    def rows(self, lo: int, hi: int) -> "_Lists":
        return _Lists(self.sims[:, lo:hi], self.valid[lo:hi], self.relevant[lo:hi], self.tau[lo:hi])


def _union(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Each row's distinct ids in ascending order, then the padding id n for the duplicates."""
    union = torch.sort(ids, dim=1).values
    dup = torch.zeros_like(union, dtype=torch.bool)
    dup[:, 1:] = union[:, 1:] == union[:, :-1]
    return torch.sort(union.masked_fill(dup, n), dim=1).values


def _gather_lists(union: torch.Tensor, blocks: Sequence[torch.Tensor], labels: torch.Tensor,
                  queries: torch.Tensor, tau: torch.Tensor) -> _Lists:
    """`_Lists` of `queries` from their candidate ids and every model's similarity rows (rows x N)."""
    n = len(labels)
    width = int((union < n).sum(dim=1).max())
    union = union[:, :width]
    valid = union < n
    safe = union.clamp(max=n - 1)
    sims = torch.stack([torch.gather(block, 1, safe) for block in blocks]) * valid
    return _Lists(sims, valid, valid & (labels[safe] == labels[queries, None]), tau)


class WeightedConcatScorer:
    """Scores any number of weight vectors for a fixed set of models, labels and k, exactly.

    One per (embeddings, labels, k). `score` chooses per query block between candidate levels and
    dense streaming (module docstring); the level-0 candidate lists, their per-model similarities and
    every level's bound are built once (`prepare`), by the first call. `path` forces one path:
    "candidates" (level 0 with full-gallery fallbacks) or "dense" (which builds no candidates);
    `block_rows` sets the queries per block (default: QUERY_BLOCK_ELEMENTS / N, at most N / MIN_BLOCKS).
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
        first = min(self.depth + extra, n - 1)
        self.list_depths = [first]  # K_l per level; deeper ones only while they leave something outside
        while (len(self.list_depths) <= MAX_LEVELS and 2 * self.list_depths[-1] * len(self.models) <= n
               and 2 * self.list_depths[-1] < n - 1):
            self.list_depths.append(2 * self.list_depths[-1])
        self.lists: _Lists | None = None  # level 0, built by prepare()
        scale = 16 if self.device.type == "cuda" else 1  # a GPU wants bigger blocks and has the memory
        self.chunk_elements = CHUNK_ELEMENTS[self.device.type]
        self.block_rows = int(block_rows or max(1, min(-(-n // MIN_BLOCKS), scale * QUERY_BLOCK_ELEMENTS // n)))
        # Candidates per query at each level: at most every model's list, until prepare() counts level 0.
        self.costs = PathCosts(gallery=n, models=len(self.models),
                               widths=[min(n - 1.0, len(self.models) * d) for d in self.list_depths])
        self.kept: dict[int, torch.Tensor] = {}  # query block start -> M x b x N similarity rows (KEEP_BYTES)
        self.scored_before = False
        self.n_uncertified = 0  # (query, weights) pairs whose level-0 candidates could not be certified
        self.blocks = {"candidates": 0, "dense": 0}  # query blocks scored by each path
        self.level_blocks = [0] * len(self.list_depths)  # candidate blocks at each level

    def prepare(self, reporter: Reporter = SILENT) -> None:
        """Build level 0 for every query, once: the union of each model's top-K_0 list and every model's
        similarity to it; and every level's bound tau (the K_l-th similarity of each model).

        Works on query chunks of each model's full similarity block, so candidates and their
        similarities come from one matmul per model (this is why it does not call search.top_k,
        which returns lists without the blocks to read the other models' similarities from).
        """
        if self.lists is not None:
            return
        reporter.progress(0.0, f"preparing candidates for {len(self.models)} models")
        n, m_count = self.n, len(self.models)
        full = self.list_depths[0] >= n - 1  # every list holds the whole gallery: nothing lies outside
        # -2 is below any cosine: the bound of a list that leaves nothing outside.
        tau = torch.full((n, m_count, len(self.list_depths)), -2.0, dtype=torch.float32, device=self.device)
        chunks = []
        rows = max(1, CHUNK_BYTES // (4 * n * m_count))
        for s in range(0, n, rows):
            reporter.check_cancel()
            queries = torch.arange(s, min(n, s + rows), device=self.device)
            blocks = []
            ids = []
            for m, x in enumerate(self.models):
                block = x[queries] @ x.T
                block[queries - s, queries] = -torch.inf
                values, top = torch.topk(block, self.list_depths[-1], dim=1)
                if not full:
                    for level, d in enumerate(self.list_depths):
                        tau[queries, m, level] = values[:, d - 1] + BOUND_SLACK
                blocks.append(block)
                ids.append(top[:, :self.list_depths[0]])
            union = _union(torch.cat(ids, dim=1), n)
            chunks.append(_gather_lists(union, blocks, self._label_codes, queries, tau[queries, :, 0]))
        width = max(c.valid.shape[1] for c in chunks)

        def padded(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)

        # M x n x C, so one matmul fuses a block for many weight vectors; 0 at padding (masked later).
        valid = torch.cat([padded(c.valid, False) for c in chunks])
        self.tau_levels = tau
        self.lists = _Lists(torch.cat([padded(c.sims, 0.0) for c in chunks], dim=1).contiguous(), valid,
                            torch.cat([padded(c.relevant, False) for c in chunks]), tau[:, :, 0].contiguous())
        width = float(valid.sum()) / n
        # In place: the costs object may be one a caller chose (tests force paths through it).
        self.costs.widths[:] = [min(n - 1.0, width * d / self.list_depths[0]) for d in self.list_depths]

    def score(self, weights: np.ndarray, reporter: Reporter = SILENT) -> list[dict]:
        """Metrics (METRIC_KEYS + n_queries, n_excluded) of each row of `weights` (W x M)."""
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 2 or w.shape[1] != len(self.models):
            raise MetricsError(f"weights must be W x {len(self.models)}, got shape {w.shape}")
        if (w < 0).any() or (w.sum(axis=1) == 0).any():
            raise MetricsError("weights must be non-negative with at least one non-zero per vector")
        squared = torch.as_tensor(w ** 2, dtype=torch.float32, device=self.device)  # cos weights
        totals = torch.zeros((len(w), len(METRIC_KEYS)), dtype=torch.float64, device=self.device)
        if self.path != "dense":
            self.prepare(reporter)
        for start in range(0, self.n, self.block_rows):
            reporter.check_cancel()
            stop = min(self.n, start + self.block_rows)
            if self.path == "auto":
                path, level = self.costs.choose(len(w) * (stop - start), stop - start)
            else:
                path, level = self.path, 0
            block = _QueryBlock(self, squared, totals, start, stop)
            if path == "dense":
                block.dense()
            else:
                block.candidates(level)
                self.level_blocks[level] += 1
            self.blocks[path] += 1
            if self.lists is not None:  # the bounds come with the candidates
                self._observe(block)
            reporter.progress(stop / self.n, f"scored {stop}/{self.n} queries for {len(w)} weight vectors")
        self.scored_before = True
        n_valid = int((self.n_relevant > 0).sum())
        means = (totals / n_valid if n_valid else torch.full_like(totals, torch.nan)).cpu().tolist()
        return [{**dict(zip(METRIC_KEYS, row)), "k": self.k, "n_queries": n_valid, "n_excluded": self.n - n_valid}
                for row in means]

    def may_keep(self, rows: int) -> bool:
        """Whether a block of `rows` queries may keep its similarity rows for the next score() calls."""
        held = sum(t.numel() * t.element_size() for t in self.kept.values())
        return self.scored_before and held + 4 * len(self.models) * rows * self.n <= KEEP_BYTES[self.device.type]

    def _observe(self, block: "_QueryBlock") -> None:
        """Which pairs of the block each level's bound would have certified, from their exact
        depth-th scores: a pair certifies exactly when that score beats the bound."""
        tau = self.tau_levels[block.start:block.stop]  # b x M x levels
        bounds = torch.einsum("wm,bml->lwb", block.a, tau)
        missed = block.kth[None] <= bounds  # levels x W x b
        self.n_uncertified += int(missed[0].sum())
        self.costs.observe(missed.float().mean(dim=(1, 2)).tolist(), missed.any(dim=1).float().mean(dim=1).tolist())

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
    """Queries [start, stop) of a scorer, scored for every weight vector by one exact path into
    `totals` (W x metric sums), with every pair's exact depth-th score kept in `kth`; the parts are
    timed into the scorer's costs."""

    def __init__(self, scorer: WeightedConcatScorer, squared: torch.Tensor, totals: torch.Tensor,
                 start: int, stop: int):
        self.s, self.a, self.totals = scorer, squared, totals
        self.start, self.stop = start, stop
        self.queries = torch.arange(start, stop, device=scorer.device)
        self.kth = torch.empty((len(squared), stop - start), dtype=torch.float32, device=scorer.device)
        self._sims: torch.Tensor | None = None

    def _clock(self) -> float:
        if self.s.device.type == "cuda":
            torch.cuda.synchronize(self.s.device)  # time the work, not its queueing
        return time.perf_counter()

    def _chunks(self, width: int) -> Iterator[tuple[slice, slice]]:
        """(weights, block-local queries) slices covering the block, each about chunk_elements wide."""
        rows = max(1, min(self.stop - self.start, self.s.chunk_elements // width))
        per_chunk = max(1, self.s.chunk_elements // (rows * width))
        for lo in range(0, self.stop - self.start, rows):
            for w0 in range(0, len(self.a), per_chunk):
                yield slice(w0, w0 + per_chunk), slice(lo, min(self.stop - self.start, lo + rows))

    def _similarities(self, queries: torch.Tensor) -> torch.Tensor:
        """M x len(queries) x N: every model's similarity of `queries` to the whole gallery, each
        query's own column at SELF_SCORE."""
        t0 = self._clock()
        sims = torch.stack([x[queries] @ x.T for x in self.s.models])
        sims[:, torch.arange(len(queries), device=sims.device), queries] = SELF_SCORE
        self.s.costs.add("similarity", self._clock() - t0, len(queries))
        return sims

    def similarities(self) -> torch.Tensor:
        """M x b x N for the whole block, computed once (and kept by the scorer when it may)."""
        if self._sims is None:
            self._sims = self.s.kept.get(self.start)
        if self._sims is None:
            self._sims = self._similarities(self.queries)
            if self.s.may_keep(self.stop - self.start):
                self.s.kept[self.start] = self._sims
        return self._sims

    def candidates(self, level: int) -> None:
        """Rank among the level's candidates, keep the pairs the bound certifies, then rank the
        others over the whole gallery."""
        sc = self.s
        if level == 0:
            lists = sc.lists.rows(self.start, self.stop)
        else:
            sims = self.similarities()
            t0 = self._clock()
            ids = torch.cat([torch.topk(s, sc.list_depths[level], dim=1).indices for s in sims], dim=1)
            lists = _gather_lists(_union(ids, sc.n), sims, sc._label_codes, self.queries,
                                  sc.tau_levels[self.start:self.stop, :, level])
            sc.costs.add("lists", self._clock() - t0, len(self.queries))
            sc.costs.widths[level] = float(lists.valid.sum()) / len(self.queries)
        uncertified = self._rank(lists)
        hit = torch.nonzero(uncertified.any(dim=0)).squeeze(1)
        if len(hit):
            # Level 0 needs only the rows of queries it could not certify; deeper levels have them all, and so
            # does a scorer that scores again (whose block rows are then computed once and kept).
            if self.start in sc.kept or sc.may_keep(self.stop - self.start):
                self.similarities()
            sims, rows = (self._sims, hit) if self._sims is not None else (self._similarities(self.queries[hit]), None)
            self._fallback(sims, hit, rows, uncertified[:, hit])

    def _rank(self, lists: _Lists) -> torch.Tensor:
        """Score every pair among its candidates; add the certified ones to the totals. Returns the
        W x b uncertified pairs."""
        sc, depth = self.s, self.s.depth
        uncertified = torch.zeros(self.kth.shape, dtype=torch.bool, device=sc.device)
        m_count, _, width = lists.sims.shape
        for ws, qs in self._chunks(width):
            t0 = self._clock()
            a, part = self.a[ws], lists.rows(qs.start, qs.stop)
            rows = qs.stop - qs.start
            fused = (a @ part.sims.reshape(m_count, rows * width)).view(len(a), rows, width)
            fused.masked_fill_(~part.valid, -torch.inf)
            top, scores = _ranked(fused, depth)
            kth = scores[:, :, depth - 1]
            # Beats everything outside the candidates (whose ties _ranked has already ordered).
            certified = kth > a @ part.tau.T
            t1 = self._clock()
            rel = torch.gather(part.relevant.expand(len(a), -1, -1), 2, top[:, :, :depth])
            self.totals[ws] += sc._metric_sums(rel, self.queries[qs], certified).sum(dim=1)
            self.kth[ws, qs] = kth
            uncertified[ws, qs] = ~certified
            sc.costs.add("candidate", t1 - t0, fused.numel())
            sc.costs.add("pair", self._clock() - t1, certified.numel())
        return uncertified

    def _fallback(self, sims: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor | None,
                  pairs: torch.Tensor) -> None:
        """Exact ranking over the whole gallery for the uncertified weight vectors of block-local
        `queries` (`pairs`: W x len(queries) booleans); their similarity rows are `sims[:, rows]`
        (rows None: sims holds exactly these queries)."""
        sc, depth = self.s, self.s.depth
        t0 = self._clock()
        local, weights = torch.nonzero(pairs.T, as_tuple=True)  # grouped by query
        at = local if rows is None else rows[local]
        ranked, kth = [], []
        # Pairs of many queries per chunk: few large operations, whatever the pairs per query.
        per_chunk = max(1, sc.chunk_elements // sc.n)
        for p in range(0, len(local), per_chunk):
            w, r = weights[p:p + per_chunk], at[p:p + per_chunk]
            a = self.a[w]
            fused = a[:, :1] * sims[0, r]
            for m in range(1, len(sims)):
                fused.addcmul_(a[:, m:m + 1], sims[m, r])
            top, scores = _ranked(fused, depth)
            ranked.append(top[:, :depth])
            kth.append(scores[:, depth - 1])
        owners = self.queries[queries[local]]
        self.kth[weights, queries[local]] = torch.cat(kth)
        rel = sc._relevance(torch.cat(ranked), owners)
        self.totals.index_add_(0, weights, sc._metric_sums(rel, owners))
        sc.costs.add("fallback", self._clock() - t0, len(weights))

    def dense(self) -> None:
        """Rank every pair over the whole gallery from the block's similarity rows."""
        sc, depth = self.s, self.s.depth
        sims = self.similarities()  # M x b x N
        for ws, qs in self._chunks(sc.n):
            t0 = self._clock()
            a, part = self.a[ws], sims[:, qs]
            m_count, rows, n = part.shape
            fused = (a @ part.reshape(m_count, rows * n)).view(len(a), rows, n)
            top, scores = _ranked(fused, depth)
            t1 = self._clock()
            self.kth[ws, qs] = scores[:, :, depth - 1]
            queries = self.queries[qs]
            self.totals[ws] += sc._metric_sums(sc._relevance(top[:, :, :depth], queries), queries).sum(dim=1)
            sc.costs.add("dense", t1 - t0, fused.numel())
            sc.costs.add("pair", self._clock() - t1, len(a) * rows)


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
    grid = WeightGrid(weights, len(embeddings))
    return grid.rows(score_once(embeddings, labels, np.array(grid.scored), k, reporter=reporter, device=device))


def score_once(embeddings: Sequence[np.ndarray], labels: np.ndarray, weights: np.ndarray, k: int, *,
               reporter: Reporter = SILENT, device: str | None = None) -> list[dict]:
    """Metrics of each row of `weights` (W x M), from a scorer used for this one call: a grid of at most
    DENSE_VECTORS_PER_MODEL vectors per model is ranked densely, as its candidates would cost more than
    they save; a larger one takes the adaptive path."""
    path = "dense" if len(weights) <= DENSE_VECTORS_PER_MODEL * len(embeddings) else "auto"
    return WeightedConcatScorer(embeddings, labels, k, device=device, path=path).score(weights, reporter)


class WeightGrid:
    """The vectors of a weight grid over `n_models` (all but the all-zero one) and the ones actually scored:
    the first vector of each ratio class, since multiples of a vector rank identically."""

    def __init__(self, weights, n_models: int):
        values = sorted({float(v) for v in weights})
        if any(v < 0 for v in values):
            raise MetricsError("weights must be non-negative")
        self.vectors = [v for v in itertools.product(values, repeat=n_models) if any(v)]
        self.ratios = [ratio_class(v) for v in self.vectors]
        first_of_class: dict[tuple, tuple] = {}
        for v, c in zip(self.vectors, self.ratios):
            first_of_class.setdefault(c, v)
        self.classes, self.scored = list(first_of_class), list(first_of_class.values())

    def rows(self, scores: Sequence[dict]) -> list[dict]:
        """Every vector's row, best first, from the metrics of `scored` (in that order)."""
        by_class = dict(zip(self.classes, scores))
        return _ranked_rows([{"weights": plain_weights(v), "ratio": c, **by_class[c]}
                             for v, c in zip(self.vectors, self.ratios)])


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
