"""The pruned sweep must give the numbers of re-concatenating and searching every weight vector."""
import itertools

import numpy as np
import pytest

from core.fusion import weighted_concat
from core.metrics import MetricsError, evaluate
from core.progress import JobCancelled, Reporter
from core.methods import concat_label
from core.sweep import PathCosts, WeightedConcatScorer, grid_sweep, random_sweep, score_once
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


def test_the_scorer_on_every_device_equals_the_float64_reference(device):
    rng = np.random.default_rng(1)
    embeddings, labels = correlated_models(rng, n=600, classes=20, dims=(64, 96, 48))
    weights = np.array([[1, 0, 0], [1, 1, 1], [3, 1, 2], [0, 2, 5]])
    for vector, row in zip(weights, WeightedConcatScorer(embeddings, labels, 20, device=device).score(weights)):
        want = reference_sweep_metrics(embeddings, labels, vector, 20)
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], abs=1e-6), (vector, key)


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


def test_a_scorer_asked_again_keeps_its_similarity_rows_and_stays_exact():
    """Greedy selection scores the same queries again and again: from the second call on, the rows of
    uncertified queries are kept, not recomputed, and every call is still exact."""
    rng = np.random.default_rng(12)
    embeddings, labels = correlated_models(rng, n=80, dims=(6, 6))
    scorer = WeightedConcatScorer(embeddings, labels, k=5, extra=0)
    for weights in (np.array([[1, 0], [1, 1]]), np.array([[1, 3], [2, 1]]), np.array([[3, 1], [1, 1]])):
        for w, row in zip(weights, scorer.score(weights)):
            want = reference_sweep_metrics(embeddings, labels, w, 5)
            for key in KEYS:
                assert row[key] == pytest.approx(want[key], abs=1e-6), (w, key)
    assert scorer.kept and all(t.shape[0] == 2 and t.shape[2] == 80 for t in scorer.kept.values())


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


def disagreeing_models(rng, n=300, classes=30, dims=(8, 12, 16)):
    """Models with independent class centroids and noise: their neighbour lists overlap little, so the
    candidate bound certifies some (query, weights) pairs and not others."""
    labels = rng.permutation(np.repeat(np.arange(classes), n // classes))
    out = []
    for d in dims:
        centres = rng.normal(size=(classes, d))
        out.append((centres[labels] + rng.normal(scale=1.5, size=(n, d))).astype(np.float32))
    return out, labels


class Cycling(PathCosts):
    """Candidates at level 0, dense, then each deeper level, block after block, whatever the timings say."""

    def choose(self, pairs, rows):
        self.calls = getattr(self, "calls", -1) + 1
        options = [("candidates", 0), ("dense", 0)] + [("candidates", level) for level in range(1, len(self.widths))]
        return options[self.calls % len(options)]


def scorer_for(path, embeddings, labels, k, **kwargs):
    """path "cycle" forces every path in turn, one per query block."""
    scorer = WeightedConcatScorer(embeddings, labels, k=k, path="auto" if path == "cycle" else path, **kwargs)
    if path == "cycle":
        c = scorer.costs
        scorer.costs = Cycling(gallery=c.gallery, models=c.models, widths=c.widths)
    return scorer


def assert_like_reference(got, embeddings, labels, weights, k, abs_tol=1e-6):
    for w, row in zip(weights, got):
        want = reference_sweep_metrics(embeddings, labels, w, k)
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], abs=abs_tol), (tuple(w), key)


WEIGHTS_3 = np.array([[1, 0, 0], [0, 0, 2], [1, 1, 1], [1, 3, 5], [5, 2, 1], [2, 5, 3]])


@pytest.mark.parametrize("path", ["candidates", "dense", "cycle", "auto"])
def test_every_path_is_exact_on_disagreeing_models(path):
    rng = np.random.default_rng(21)
    embeddings, labels = disagreeing_models(rng)
    scorer = scorer_for(path, embeddings, labels, 10, extra=4, block_rows=50)
    assert scorer.list_depths == [14, 28, 56]  # depth 10 (k; R = 9) + 4, doubled while 3 lists fit in 300
    got = scorer.score(WEIGHTS_3)
    assert_like_reference(got, embeddings, labels, WEIGHTS_3, 10)
    pairs = len(WEIGHTS_3) * len(labels)
    if path == "dense":
        assert scorer.lists is None and scorer.n_uncertified == 0  # no candidates, so no bounds to check
    else:
        assert 0 < scorer.n_uncertified < pairs  # level 0 certifies some pairs, not all
    expected = {"candidates": ({"candidates": 6, "dense": 0}, [6, 0, 0]),
                "dense": ({"candidates": 0, "dense": 6}, [0, 0, 0]),
                "cycle": ({"candidates": 4, "dense": 2}, [2, 1, 1])}
    if path in expected:
        assert (scorer.blocks, scorer.level_blocks) == expected[path]


def test_a_grid_scored_once_builds_candidates_only_above_two_vectors_a_model(monkeypatch):
    """score_once (what grid_sweep and the Ray sweep's tasks call): up to 2 vectors a model (here 6 over 3
    models) are ranked densely without candidate lists, 7 build them; both exact."""
    rng = np.random.default_rng(21)
    embeddings, labels = disagreeing_models(rng)
    built = []
    prepare = WeightedConcatScorer.prepare
    monkeypatch.setattr(WeightedConcatScorer, "prepare", lambda self, *a: (built.append(self.path), prepare(self, *a)))
    more = np.vstack([WEIGHTS_3, [[3, 1, 2]]])
    assert_like_reference(score_once(embeddings, labels, WEIGHTS_3, 10), embeddings, labels, WEIGHTS_3, 10)
    assert built == []
    assert_like_reference(score_once(embeddings, labels, more, 10), embeddings, labels, more, 10)
    assert built == ["auto"]


@pytest.mark.parametrize("path", ["candidates", "dense", "cycle"])
@pytest.mark.parametrize("k", [3, 60])
def test_every_path_ranks_ties_by_index(path, k):
    """Quantised vectors: every weighted cosine is a multiple of 1/4, so topk meets real ties inside its
    top and across its cut, duplicated rows included; k=60 reaches the depth of the whole gallery."""
    rng = np.random.default_rng(5)
    embeddings = [quantised_embeddings(rng, 80, d=8, duplicates=4) for _ in range(3)]
    labels = rng.permutation(np.repeat(np.arange(8), 10))
    labels[7] = 99  # a singleton class: excluded, never scored
    weights = np.array([[1, 0, 0], [1, 1, 1], [2, 1, 0], [1, 2, 2], [0, 1, 1]])
    scorer = scorer_for(path, embeddings, labels, k, extra=0, block_rows=7)
    assert len(scorer.list_depths) == (2 if k == 3 else 1)
    got = scorer.score(weights)
    assert {row["n_excluded"] for row in got} == {1}
    assert_like_reference(got, embeddings, labels, weights, k, abs_tol=1e-9)


def test_the_cheapest_path_is_chosen_from_measured_costs():
    """Hand-computed, for a block of 100 queries and 1,000 pairs, 1,000 gallery items, 2 models and
    100 / 200 candidates per query at levels 0 / 1. Measured: 0.01 per candidate element, 1 to score
    a ranked pair, 10 per fallback pair (so a gallery element costs (10 - 1) / 1000 = 0.009 until
    dense runs), 20 per query for similarity rows; building deeper lists is not measured yet, so it
    is taken as 2 selections over the gallery per query (2 * 1000 * 0.009 = 18)."""
    costs = PathCosts(gallery=1000, models=2, widths=[100.0, 200.0])
    assert costs.choose(1000, 100) == ("candidates", 0)  # nothing measured yet
    costs.add("candidate", 10.0, 1000)
    costs.add("pair", 1000.0, 1000)
    costs.add("fallback", 100.0, 10)
    costs.add("similarity", 200.0, 10)
    costs.observe([0.5, 0.05], [1.0, 0.5])
    # level 0: 1000 * (100 * 0.01 + 1 + 0.5 * 10) + 100 * 20 * 1.0 = 9000
    # level 1: 1000 * (200 * 0.01 + 1 + 0.05 * 10) + 100 * (20 + 18) = 7300
    # dense: 1000 * (1000 * 0.009 + 1) + 100 * 20 = 12000
    assert costs.predict(1000, 100) == pytest.approx({("candidates", 0): 9000, ("candidates", 1): 7300,
                                                      ("dense", 0): 12000})
    assert costs.choose(1000, 100) == ("candidates", 1)
    costs.observe([0.9, 0.9], [1.0, 1.0])  # running u = [0.7, 0.475], h = [1.0, 0.75]
    # level 0: 1000 * (1 + 1 + 7) + 2000 = 11000; level 1: 1000 * (2 + 1 + 4.75) + 3800 = 11550
    assert costs.predict(1000, 100) == pytest.approx({("candidates", 0): 11000, ("candidates", 1): 11550,
                                                      ("dense", 0): 12000})
    assert costs.choose(1000, 100) == ("candidates", 0)
    costs.add("dense", 2.0, 1000)  # measured at 0.002 per element: 1000 * (2 + 1) + 2000 = 5000
    assert costs.predict(1000, 100)[("dense", 0)] == pytest.approx(5000)
    assert costs.choose(1000, 100) == ("dense", 0)


def test_unknown_path_is_a_clear_error():
    rng = np.random.default_rng(3)
    embeddings, labels = correlated_models(rng, n=30)
    with pytest.raises(MetricsError, match="unknown sweep path 'fast'"):
        WeightedConcatScorer(embeddings, labels, k=5, path="fast")
