"""The pruned sweep must give the numbers of re-concatenating and searching every weight vector."""
import itertools

import numpy as np
import pytest

from core.fusion import weighted_concat
from core.metrics import MetricsError, evaluate
from core.progress import JobCancelled, Reporter
from core.methods import concat_label
from core.sweep import WeightedConcatScorer, grid_sweep, random_sweep
from core.vectors import ratio_class
from tests.reference import quantised_embeddings, reference_sweep_metrics

KEYS = ("map@k", "map@k_hits", "map@r", "p@1", "n_queries", "n_excluded")


def correlated_models(rng, n=150, classes=10, dims=(16, 24, 8)):
    """Models that see the same class structure through different noise, like real backbones."""
    labels = rng.integers(0, classes, size=n)
    out = []
    for d in dims:
        centres = rng.normal(size=(classes, d))
        out.append((centres[labels] + rng.normal(scale=1.3, size=(n, d))).astype(np.float32))
    return out, labels


@pytest.mark.parametrize("k", [5, 20])
def test_grid_sweep_equals_the_float64_reference_for_every_vector(k):
    rng = np.random.default_rng(k)
    embeddings, labels = correlated_models(rng, n=100)
    rows = grid_sweep(embeddings, labels, weights=(0, 1, 2, 3), k=k)
    assert len(rows) == 4 ** 3 - 1
    assert [r["map@k"] for r in rows] == sorted((r["map@k"] for r in rows), reverse=True)
    for row in rows:
        want = reference_sweep_metrics(embeddings, labels, row["weights"], k)
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], abs=1e-6), (row["weights"], key)


@pytest.mark.parametrize("k", [3, 60])
def test_sweep_is_exact_with_ties_singleton_classes_and_k_beyond_the_gallery(k):
    """Quantised vectors make every weighted cosine an exact multiple of 1/4 (real ties, duplicated
    images included); two classes have one image (no relevant item: excluded); k=60 > the 39 others."""
    rng = np.random.default_rng(7)
    embeddings = [quantised_embeddings(rng, 40, d=8, duplicates=4) for _ in range(3)]
    labels = rng.integers(0, 5, size=40)
    labels[[3, 11]] = [97, 98]
    rows = grid_sweep(embeddings, labels, weights=(0, 1, 2), k=k)
    assert len(rows) == 3 ** 3 - 1
    for row in rows:
        want = reference_sweep_metrics(embeddings, labels, row["weights"], k)
        assert row["n_excluded"] == want["n_excluded"] == 2
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], abs=1e-9), (row["weights"], key)


def test_uncertified_queries_fall_back_to_exact_and_stay_exact():
    """With no extra candidates nearly every query's bound is hit: the fallback must carry it."""
    rng = np.random.default_rng(11)
    embeddings, labels = correlated_models(rng, n=80, dims=(6, 6))
    scorer = WeightedConcatScorer(embeddings, labels, k=5, extra=0)
    weights = np.array([[1, 0], [1, 1], [1, 3], [2, 1]])
    got = scorer.score(weights)
    assert scorer.n_uncertified > 0
    for w, row in zip(weights, got):
        want = reference_sweep_metrics(embeddings, labels, w, 5)
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], abs=1e-6)


def test_ratio_equivalent_vectors_share_scores():
    rng = np.random.default_rng(2)
    embeddings, labels = correlated_models(rng, n=60)
    rows = {r["weights"]: r for r in grid_sweep(embeddings, labels, weights=(0, 1, 2, 4), k=5)}
    assert ratio_class((1, 2, 0)) == ratio_class((2, 4, 0)) != ratio_class((1, 1, 0))
    assert rows[(1, 2, 0)]["map@k"] == rows[(2, 4, 0)]["map@k"]
    assert rows[(1, 0, 0)]["map@k"] == rows[(4, 0, 0)]["map@k"] == evaluate(embeddings[0], labels, 5)["map@k"]


def test_random_sweep_scores_are_exact_and_at_least_as_good_as_single_models():
    rng = np.random.default_rng(4)
    embeddings, labels = correlated_models(rng, n=100)
    rows = random_sweep(embeddings, labels, n_samples=20, k=10, refine_rounds=1)
    best = rows[0]
    naive = evaluate(weighted_concat(embeddings, best["weights"]), labels, 10)
    assert best["map@k"] == pytest.approx(naive["map@k"], abs=1e-6)
    assert best["map@k"] >= max(evaluate(e, labels, 10)["map@k"] for e in embeddings)


def test_sweep_reports_progress_and_stops_when_cancelled():
    rng = np.random.default_rng(6)
    embeddings, labels = correlated_models(rng, n=60)
    seen = []
    grid_sweep(embeddings, labels, weights=(0, 1, 2), k=5, reporter=Reporter(on_progress=lambda f, m: seen.append(f)))
    assert seen[-1] == 1.0
    with pytest.raises(JobCancelled):
        grid_sweep(embeddings, labels, weights=(0, 1), k=5, reporter=Reporter(is_cancelled=lambda: True))


def test_mismatched_rows_and_bad_weights_are_clear_errors():
    rng = np.random.default_rng(8)
    embeddings, labels = correlated_models(rng, n=40)
    with pytest.raises(MetricsError, match="same images"):
        grid_sweep([embeddings[0], embeddings[1][:-1]], labels, k=5)
    with pytest.raises(MetricsError, match="non-negative"):
        grid_sweep(embeddings, labels, weights=(-1, 1), k=5)
    scorer = WeightedConcatScorer(embeddings, labels, k=5)
    with pytest.raises(MetricsError, match="non-zero"):
        scorer.score(np.zeros((1, 3)))


def test_labels_name_weighted_concats_like_the_reference_study():
    names = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
    assert concat_label(names, (3, 0, 1)) == "lite0(3)+lite2(1)"


def test_every_subset_is_covered_by_zero_weights():
    rng = np.random.default_rng(9)
    embeddings, labels = correlated_models(rng, n=40)
    rows = grid_sweep(embeddings, labels, weights=(0, 1), k=5)
    subsets = {tuple(w != 0 for w in r["weights"]) for r in rows}
    assert subsets == {s for s in itertools.product([False, True], repeat=3) if any(s)}
