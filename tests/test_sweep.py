"""The pruned sweep must give the numbers of re-concatenating and searching every weight vector."""
import itertools

import numpy as np
import pytest

from core.fusion import weighted_concat
from core.metrics import MetricsError, evaluate
from core.progress import JobCancelled, Reporter
from core.methods import concat_label
from core.sweep import PathCosts, WeightedConcatScorer, grid_sweep, random_sweep
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


def disagreeing_models(rng, n=240, classes=6, dims=(8, 12, 16)):
    """Models with independent class centroids and noise: their neighbour lists overlap little, so the
    candidate bound certifies some (query, weights) pairs and not others."""
    labels = rng.integers(0, classes, size=n)
    out = []
    for d in dims:
        centres = rng.normal(size=(classes, d))
        out.append((centres[labels] + rng.normal(scale=1.5, size=(n, d))).astype(np.float32))
    return out, labels


class Alternating(PathCosts):
    """Candidates on even query blocks, dense on odd ones, whatever the timings say."""

    def choose(self, pairs, rows):
        self.calls = getattr(self, "calls", -1) + 1
        return ("candidates", "dense")[self.calls % 2]


def assert_like_reference(got, embeddings, labels, weights, k, abs_tol=1e-6):
    for w, row in zip(weights, got):
        want = reference_sweep_metrics(embeddings, labels, w, k)
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], abs=abs_tol), (tuple(w), key)


WEIGHTS_3 = np.array([[1, 0, 0], [0, 0, 2], [1, 1, 1], [1, 3, 5], [5, 2, 1], [2, 5, 3]])


@pytest.mark.parametrize("path", ["candidates", "dense", "mixed", "auto"])
def test_every_path_is_exact_on_disagreeing_models(path):
    rng = np.random.default_rng(21)
    embeddings, labels = disagreeing_models(rng)
    scorer = WeightedConcatScorer(embeddings, labels, k=10, path="auto" if path == "mixed" else path,
                                  extra=4, block_rows=50)
    if path == "mixed":
        scorer.costs = Alternating(gallery=scorer.n, width=scorer.costs.width)
    got = scorer.score(WEIGHTS_3)
    assert_like_reference(got, embeddings, labels, WEIGHTS_3, 10)
    pairs = len(WEIGHTS_3) * len(labels)
    assert 0 < scorer.n_uncertified < pairs  # both certified pairs and full-gallery fallbacks ran
    expected_blocks = {"candidates": {"candidates": 5, "dense": 0}, "dense": {"candidates": 0, "dense": 5},
                       "mixed": {"candidates": 3, "dense": 2}}
    if path in expected_blocks:
        assert scorer.blocks == expected_blocks[path]


@pytest.mark.parametrize("path", ["candidates", "dense", "mixed"])
@pytest.mark.parametrize("k", [3, 60])
def test_every_path_ranks_ties_by_index(path, k):
    """Quantised vectors: every weighted cosine is a multiple of 1/4, so topk meets real ties inside its
    top and across its cut, duplicated rows included; k=60 reaches past the 39 others."""
    rng = np.random.default_rng(5)
    embeddings = [quantised_embeddings(rng, 40, d=8, duplicates=4) for _ in range(3)]
    labels = rng.integers(0, 4, size=40)
    labels[7] = 99  # a singleton class: excluded, never scored
    weights = np.array([[1, 0, 0], [1, 1, 1], [2, 1, 0], [1, 2, 2], [0, 1, 1]])
    scorer = WeightedConcatScorer(embeddings, labels, k=k, path="auto" if path == "mixed" else path,
                                  extra=0, block_rows=7)
    if path == "mixed":
        scorer.costs = Alternating(gallery=scorer.n, width=scorer.costs.width)
    got = scorer.score(weights)
    assert {row["n_excluded"] for row in got} == {1}
    assert_like_reference(got, embeddings, labels, weights, k, abs_tol=1e-9)


def test_the_cheaper_path_is_chosen_from_measured_costs():
    """Hand-computed: a block of 100 queries and 1,000 pairs; a candidate pair costs 1, a full-gallery
    pair 10, a query's similarity rows 20 (per pair: candidates 1 + u * 10, dense 10)."""
    costs = PathCosts(gallery=1000, width=100)
    assert costs.choose(1000, 100) == "candidates"  # nothing measured yet
    costs.add("candidate", 1000.0, 1000)
    costs.add("fallback", 1000.0, 100)
    costs.add("similarity", 2000.0, 100)
    costs.observe(100, 1000, 50, 100)  # u = 0.1, half the queries hit
    # candidates 1000 * (1 + 0.1 * 10) + 2000 * 0.5 = 3000; dense 1000 * 10 + 2000 = 12000
    assert costs.choose(1000, 100) == "candidates"
    costs.observe(1000, 1000, 100, 100)  # this block: all uncertified; running u = (0.1 + 1) / 2 = 0.55
    # candidates 1000 * (1 + 5.5) + 2000 * 0.75 = 8000 < 12000
    assert costs.choose(1000, 100) == "candidates"
    costs.observe(1000, 1000, 100, 100)  # u = 0.775: 1000 * 8.75 + 2000 * 0.875 = 10500 < 12000
    assert costs.choose(1000, 100) == "candidates"
    costs.observe(1000, 1000, 100, 100)  # u = 0.8875: 1000 * 9.875 + 2000 * 0.9375 = 11750 < 12000
    assert costs.choose(1000, 100) == "candidates"
    costs.observe(1000, 1000, 100, 100)  # u = 0.94375: 1000 * 10.4375 + 2000 * 0.96875 = 12375 > 12000
    assert costs.choose(1000, 100) == "dense"
    costs.add("dense", 1000.0, 1000)  # dense measured at 1 per pair: now far cheaper than a fallback pair
    assert costs.choose(1000, 100) == "dense"
    costs.observe(0, 1000, 0, 100)  # an agreeing block: u = 0.471875; 1000 * 5.71875 + 2000 * 0.484375 = 6687.5
    # against dense 1000 + 2000 = 3000: still dense, because dense pairs cost what candidate pairs do
    assert costs.choose(1000, 100) == "dense"


def test_unknown_path_is_a_clear_error():
    rng = np.random.default_rng(3)
    embeddings, labels = correlated_models(rng, n=30)
    with pytest.raises(MetricsError, match="unknown sweep path 'fast'"):
        WeightedConcatScorer(embeddings, labels, k=5, path="fast")
