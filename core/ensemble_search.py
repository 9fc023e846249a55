"""Concat weights for many models, where the 0..5 grid is out of reach (6^10 = 60 million vectors).

Greedy forward selection with replacement (Caruana et al., ICML 2004): start from nothing and, at each
step, add one unit of concat weight to the model whose addition gives the best map@k; a model may be
added again and again, so integer weights fall out of the counts. Then a coordinate search around
the greedy result (each weight +-1 and x/÷ a factor) polishes what the unit steps cannot reach.

Every vector is scored exactly by `WeightedConcatScorer` on the rows given: pass the *train* rows
(DESIGN.md, train/eval discipline) and report the chosen weights on eval. Weights are concat weights,
the same units as the grid sweep, so the results compare directly with `grid_sweep` rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core.metrics import MetricsError
from core.progress import SILENT, Reporter
from core.sweep import WeightedConcatScorer
from core.vectors import plain_weights, ratio_class

# Multiplicative moves of the refinement: the first round tries x/÷ the first factor; a round that
# finds no improvement moves on to the next, finer one.
REFINE_FACTORS = (2.0, 1.5, 1.25, 1.1)


@dataclass(frozen=True)
class SelectionResult:
    """The best weight vector seen, its metrics, the path that led there (one row per step: "step",
    "weights", "map@k"; for a plot of map@k per step) and how many ratio classes were scored to get it."""

    weights: tuple[float, ...]
    map_at_k: float
    metrics: dict
    path: list[dict]
    n_scored: int


class _CachedScores:
    """map@k and the other metrics of weight vectors; each ratio class is scored once (multiples of a
    vector rank identically), every batch of new vectors in one `score` call."""

    def __init__(self, scorer: WeightedConcatScorer, n_models: int):
        self.scorer = scorer
        self.n_models = n_models
        self._known: dict[tuple, dict] = {}

    @property
    def n_scored(self) -> int:
        return len(self._known)

    def __call__(self, vectors: Sequence[Sequence[float]], reporter: Reporter = SILENT) -> list[dict]:
        """Metrics of each vector; `reporter` is only asked whether to stop (between scoring blocks)."""
        classes = [ratio_class(v) for v in vectors]
        new: dict[tuple, Sequence[float]] = {}
        for v, c in zip(vectors, classes):
            if c not in self._known:
                new.setdefault(c, v)
        if new:
            batch = np.array(list(new.values()), dtype=np.float64)
            self._known.update(zip(new, self.scorer.score(batch, Reporter(is_cancelled=reporter.is_cancelled))))
        return [self._known[c] for c in classes]


def _better(a: dict, b: dict) -> bool:
    """a ranks above b: higher map@k, map@k_hits breaking exact ties (as grid_sweep ranks)."""
    return (a["map@k"], a["map@k_hits"]) > (b["map@k"], b["map@k_hits"])


def _scorer(embeddings, labels, k, device) -> _CachedScores:
    return _CachedScores(WeightedConcatScorer(embeddings, labels, k, device=device), len(embeddings))


def greedy_selection(embeddings: Sequence[np.ndarray], labels: np.ndarray, k: int = 50, *, max_steps: int = 30,
                     patience: int = 5, device: str | None = None, reporter: Reporter | None = None) -> SelectionResult:
    """Forward selection with replacement of concat weights on the rows given (pass the train rows).

    Each step adds one unit of weight to the model whose addition scores best (all M additions of a
    step in one exact scoring call) and keeps going even when that is worse than before, as Caruana
    et al. do; it stops after `max_steps` or when the best map@k seen has not improved for `patience`
    steps. Returns the best vector seen (integer weights) and the path of every step.
    """
    return _greedy(_scorer(embeddings, labels, k, device), max_steps, patience, reporter or SILENT)


def refine(embeddings: Sequence[np.ndarray], labels: np.ndarray, weights: Sequence[float], k: int = 50, *,
           rounds: int = 3, device: str | None = None, reporter: Reporter | None = None) -> SelectionResult:
    """Coordinate search from `weights` on the rows given: each round scores, in one call, every
    vector that differs from the current one in one model's weight (+1, -1, x factor, ÷ factor) and
    moves to the best if it beats the current one. Never returns worse than `weights` (step 0 of the path)."""
    return _refine(_scorer(embeddings, labels, k, device), weights, rounds, reporter or SILENT)


def select_weights(embeddings: Sequence[np.ndarray], labels: np.ndarray, k: int = 50, *, max_steps: int = 30,
                   patience: int = 5, rounds: int = 3, device: str | None = None,
                   reporter: Reporter | None = None) -> tuple[SelectionResult, SelectionResult]:
    """Greedy selection then refinement of its result, sharing one scorer (its candidate lists are the
    expensive part). Returns (greedy, refined); refined.weights is the choice."""
    reporter = reporter or SILENT
    scores = _scorer(embeddings, labels, k, device)
    greedy = _greedy(scores, max_steps, patience, _part(reporter, 0.0, 0.8))
    return greedy, _refine(scores, greedy.weights, rounds, _part(reporter, 0.8, 1.0))


def _part(reporter: Reporter, start: float, end: float) -> Reporter:
    """The reporter with progress mapped onto [start, end] of the whole job."""
    return Reporter(on_progress=lambda f, msg: reporter.progress(start + (end - start) * f, msg),
                    is_cancelled=reporter.is_cancelled, on_metrics=reporter.on_metrics)


def _greedy(scores: _CachedScores, max_steps: int, patience: int, reporter: Reporter) -> SelectionResult:
    if max_steps < 1 or patience < 1:
        raise MetricsError(f"max_steps and patience must be at least 1, got {max_steps} and {patience}")
    m, scored_before = scores.n_models, scores.n_scored
    counts = np.zeros(m, dtype=np.int64)
    path: list[dict] = []
    best: tuple[np.ndarray, dict] | None = None
    stale = 0
    for step in range(1, max_steps + 1):
        reporter.check_cancel()
        candidates = counts + np.eye(m, dtype=np.int64)
        rows = scores(candidates, reporter)
        pick = 0
        for i in range(1, m):  # first best: the lowest model index wins an exact tie
            if _better(rows[i], rows[pick]):
                pick = i
        counts = candidates[pick]
        path.append({"step": step, "weights": plain_weights(counts), "map@k": rows[pick]["map@k"]})
        reporter.metrics(stage="greedy", step=step, **{"map@k": rows[pick]["map@k"]})
        reporter.progress(step / max_steps, f"greedy step {step}: map@k {rows[pick]['map@k']:.4f}")
        if best is None or _better(rows[pick], best[1]):
            best, stale = (counts, rows[pick]), 0
        else:
            stale += 1
            if stale >= patience:
                break
    reporter.progress(1.0, f"greedy selection: best map@k {best[1]['map@k']:.4f} after {len(path)} steps")
    return SelectionResult(plain_weights(best[0]), best[1]["map@k"], best[1], path, scores.n_scored - scored_before)


def _moves(weights: np.ndarray, factor: float) -> list[np.ndarray]:
    """Every vector that differs from `weights` in one coordinate by +1, -1, x factor or ÷ factor;
    non-negative, not all zero."""
    out = []
    for i, w in enumerate(weights):
        for new in (w + 1, w - 1, w * factor, w / factor):
            if new < 0 or new == w:
                continue
            v = weights.copy()
            v[i] = new
            if v.any():
                out.append(v)
    return out


def _refine(scores: _CachedScores, weights: Sequence[float], rounds: int, reporter: Reporter) -> SelectionResult:
    current = np.asarray(weights, dtype=np.float64)
    usable = current.shape == (scores.n_models,) and np.isfinite(current).all() and (current >= 0).all()
    if not (usable and current.any()):
        raise MetricsError(f"start weights must be {scores.n_models} non-negative numbers, not all zero; "
                           f"got {list(weights)}")
    if rounds < 0:
        raise MetricsError(f"rounds must be at least 0, got {rounds}")
    scored_before = scores.n_scored
    (now,) = scores([current])
    path = [{"step": 0, "weights": plain_weights(current), "map@k": now["map@k"]}]
    factors = iter(REFINE_FACTORS)
    factor = next(factors)
    for round_ in range(1, rounds + 1):
        reporter.check_cancel()
        candidates = _moves(current, factor)
        rows = scores(candidates, reporter)
        pick = None
        for i, row in enumerate(rows):
            if _better(row, now if pick is None else rows[pick]):
                pick = i
        if pick is None:  # nothing better at this resolution: try finer multiplicative steps
            factor = next(factors, None)
            if factor is None:
                break
        else:
            current, now = candidates[pick], rows[pick]
        path.append({"step": round_, "weights": plain_weights(current), "map@k": now["map@k"]})
        reporter.metrics(stage="refine", step=round_, **{"map@k": now["map@k"]})
        reporter.progress(round_ / rounds, f"refinement round {round_}: map@k {now['map@k']:.4f}")
    reporter.progress(1.0, f"refinement: map@k {now['map@k']:.4f}")
    return SelectionResult(plain_weights(current), now["map@k"], now, path, scores.n_scored - scored_before)
