"""Greedy selection and refinement against float64 brute force (tests.reference): each greedy step
must take the best single addition, nothing may beat an exhaustive enumeration, and refinement may
only improve on its start."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.ensemble_search import greedy_selection, refine, select_weights
from core.metrics import MetricsError
from core.progress import JobCancelled, Reporter
from tests.reference import reference_sweep_metrics

K = 5


def _models(seed: int = 0, n_models: int = 3) -> tuple[list[np.ndarray], np.ndarray]:
    """Models that each see the classes through their own noise, so mixing them helps."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(6), 8)
    out = []
    for i in range(n_models):
        centroids = rng.normal(size=(6, 10))
        out.append((centroids[labels] * (1.0 - 0.2 * i) + rng.normal(size=(len(labels), 10))).astype(np.float32))
    return out, labels


def _truth(embeddings, labels, weights) -> float:
    return reference_sweep_metrics(embeddings, labels, [float(w) for w in weights], K)["map@k"]


def test_greedy_path_takes_the_best_single_addition_at_each_step():
    embeddings, labels = _models()
    result = greedy_selection(embeddings, labels, K, max_steps=6, patience=6, device="cpu")
    assert [row["step"] for row in result.path] == list(range(1, 7))
    previous = np.zeros(3)
    for row in result.path:
        additions = {}
        for i in range(3):
            candidate = previous.copy()
            candidate[i] += 1
            additions[tuple(candidate)] = _truth(embeddings, labels, candidate)
        chosen = tuple(float(w) for w in row["weights"])
        assert chosen in additions, f"step {row['step']} did not add one unit to one model"
        assert additions[chosen] >= max(additions.values()) - 1e-9
        assert row["map@k"] == pytest.approx(additions[chosen], abs=1e-6)
        previous = np.array(chosen)
    best = max(result.path, key=lambda r: r["map@k"])
    assert result.map_at_k == pytest.approx(best["map@k"], abs=1e-12)
    assert result.map_at_k == pytest.approx(_truth(embeddings, labels, result.weights), abs=1e-6)
    assert all(isinstance(w, int) for w in result.weights)


def test_greedy_against_every_integer_vector_up_to_the_same_total():
    embeddings, labels = _models(seed=1)
    steps = 6
    result = greedy_selection(embeddings, labels, K, max_steps=steps, patience=steps, device="cpu")
    every = {v: _truth(embeddings, labels, v)
             for v in itertools.product(range(steps + 1), repeat=3) if 0 < sum(v) <= steps}
    # Greedy explores one path, so the enumeration bounds it; with one unit it is the enumeration.
    assert result.map_at_k <= max(every.values()) + 1e-6
    singles = {v: s for v, s in every.items() if sum(v) == 1}
    assert result.path[0]["map@k"] == pytest.approx(max(singles.values()), abs=1e-6)
    assert result.map_at_k >= max(singles.values()) - 1e-6


def test_greedy_stops_after_patience_steps_without_improvement():
    # Model 0 separates the classes perfectly (map@k = 1): nothing can improve on it.
    embeddings, labels = _models(seed=2)
    embeddings[0] = np.eye(6, dtype=np.float32)[labels]
    result = greedy_selection(embeddings, labels, K, max_steps=20, patience=2, device="cpu")
    assert result.weights == (1, 0, 0)
    assert result.map_at_k == 1.0
    assert len(result.path) == 3
    # Step 1 scores the 3 single models; then (2, 0, 0) and (3, 0, 0) rank as (1, 0, 0), scored once.
    assert result.n_scored == 3 + 2 + 2


def _neighbours(weights) -> list[tuple[float, ...]]:
    """Vectors one coordinate move away: +1, -1, x2, ÷2 (the first refinement round's factor)."""
    out = set()
    for i, w in enumerate(weights):
        for new in (w + 1, w - 1, w * 2, w / 2):
            v = list(weights)
            v[i] = new
            if new >= 0 and new != w and any(v):
                out.add(tuple(v))
    return sorted(out)


@pytest.mark.parametrize("start", [(1, 0, 0), (0, 1, 3), (2, 2, 1)])
def test_refine_never_returns_worse_than_its_start(start):
    embeddings, labels = _models(seed=3)
    result = refine(embeddings, labels, start, K, rounds=3, device="cpu")
    start_map = _truth(embeddings, labels, start)
    assert result.path[0]["weights"] == start
    assert result.path[0]["map@k"] == pytest.approx(start_map, abs=1e-6)
    assert result.map_at_k >= start_map - 1e-6
    assert result.map_at_k == pytest.approx(_truth(embeddings, labels, result.weights), abs=1e-6)
    maps = [row["map@k"] for row in result.path]
    assert maps == sorted(maps)
    # The first round moves to the best neighbour when one beats the start, else stays.
    around = {v: _truth(embeddings, labels, v) for v in _neighbours([float(w) for w in start])}
    best_move = max(around.values())
    moved = tuple(float(w) for w in result.path[1]["weights"])
    if best_move > start_map + 1e-6:
        assert around[moved] == pytest.approx(best_move, abs=1e-6)
    elif best_move < start_map - 1e-6:
        assert moved == tuple(float(w) for w in start)


def test_select_weights_refines_the_greedy_choice_and_reports_progress():
    embeddings, labels = _models(seed=4)
    fractions = []
    greedy, refined = select_weights(embeddings, labels, K, max_steps=4, patience=4, rounds=2, device="cpu",
                                     reporter=Reporter(on_progress=lambda f, msg: fractions.append(f)))
    assert refined.path[0]["weights"] == greedy.weights
    assert refined.map_at_k >= greedy.map_at_k
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_cancel_and_bad_arguments():
    embeddings, labels = _models()
    stop = Reporter(is_cancelled=lambda: True)
    with pytest.raises(JobCancelled):
        greedy_selection(embeddings, labels, K, device="cpu", reporter=stop)
    with pytest.raises(JobCancelled):
        refine(embeddings, labels, (1, 1, 1), K, device="cpu", reporter=stop)
    with pytest.raises(MetricsError, match="max_steps"):
        greedy_selection(embeddings, labels, K, max_steps=0, device="cpu")
    with pytest.raises(MetricsError, match="not all zero"):
        refine(embeddings, labels, (0, 0, 0), K, device="cpu")
    with pytest.raises(MetricsError, match="3 non-negative"):
        refine(embeddings, labels, (1, 1), K, device="cpu")
    with pytest.raises(MetricsError, match="3 non-negative"):
        refine(embeddings, labels, (1, float("nan"), 1), K, device="cpu")
