"""Metrics and exact search against a brute-force float64 reference, ties included."""
import numpy as np
import pytest

from core.metrics import (MetricsError, evaluate, metrics_from_ranking, per_class_ap, per_query_scores)
from core.search import FaissSearch, TorchSearch, top_k
from tests.reference import brute_top_k, quantised_embeddings, reference_metrics


@pytest.mark.parametrize("k", [1, 5, 50])
def test_evaluate_matches_brute_force_with_ties(k):
    rng = np.random.default_rng(k)
    x = quantised_embeddings(rng, 90)
    labels = rng.integers(0, 6, size=90)
    got = evaluate(x, labels, k)
    want = reference_metrics(x, labels, k)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_evaluate_matches_brute_force_continuous_with_singletons():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    labels = rng.integers(0, 12, size=120)
    labels[:3] = [100, 101, 102]  # classes with a single image: no relevant item, must be excluded
    got = evaluate(x, labels, 10)
    want = reference_metrics(x, labels, 10)
    assert got["n_excluded"] == want["n_excluded"] >= 3
    for key in ("map@k", "map@k_hits", "map@r", "p@1", "n_queries"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("backend", [FaissSearch(), TorchSearch("cpu")], ids=["faiss", "torch"])
def test_top_k_orders_ties_by_index(backend):
    rng = np.random.default_rng(3)
    x = quantised_embeddings(rng, 70)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores, ids = top_k(x, x, 20, exclude_self=True, backend=backend)
    sims = x.astype(np.float64) @ x.T.astype(np.float64)
    for q in range(len(x)):
        want = [j for j in sorted(range(len(x)), key=lambda j: (-sims[q, j], j)) if j != q][:20]
        assert ids[q].tolist() == want
        assert q not in ids[q]
        np.testing.assert_allclose(scores[q], sims[q, want], atol=1e-6)


def test_torch_search_on_every_device_equals_the_float64_reference_with_ties(device):
    """Blocks of queries (1,500 > one block) over quantised vectors: real ties, ordered by index on every device."""
    rng = np.random.default_rng(0)
    x = quantised_embeddings(rng, 1500, d=16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # top_k ranks by inner product: cosine for unit rows
    scores, ids = top_k(x, x, 30, exclude_self=True, backend=TorchSearch(device))
    want_scores, want_ids = brute_top_k(x, x, 30, exclude_self=True)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)


def test_duplicate_of_query_is_retrieved_not_dropped():
    """The query is removed by index: its exact duplicate must still come back first."""
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    _, ids = top_k(x, x, 2, exclude_self=True)
    assert ids[0].tolist() == [1, 2] and ids[1].tolist() == [0, 2]


def test_per_query_and_per_class_scores_agree_with_summary():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 8))
    labels = np.repeat(np.arange(6), 10)
    s = per_query_scores(x, labels, 5)
    assert np.nanmean(s.ap_at_k) == pytest.approx(evaluate(x, labels, 5)["map@k"])
    per_class = per_class_ap(s, labels)
    assert set(per_class) == set(range(6))
    assert np.mean(list(per_class.values())) == pytest.approx(np.nanmean(s.ap_at_k))


def test_per_class_ap_equals_a_slow_loop_leaving_excluded_queries_out():
    from core.metrics import QueryScores
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 7, 300) * 3  # sparse class ids
    n_relevant = rng.integers(0, 4, 300)
    n_relevant[labels == 6] = 0  # a class whose queries are all excluded
    ap = np.where(n_relevant > 0, rng.random(300), np.nan)
    scores = QueryScores(5, ap, ap, ap, ap, n_relevant)
    expected = {}
    for c in sorted(set(labels.tolist())):
        kept = [float(ap[i]) for i in range(300) if labels[i] == c and n_relevant[i] > 0]
        expected[c] = sum(kept) / len(kept) if kept else float("nan")
    got = per_class_ap(scores, labels)
    assert list(got) == list(expected) and np.isnan(got[6])
    assert [got[c] for c in expected if c != 6] == pytest.approx([expected[c] for c in expected if c != 6], abs=1e-12)


def test_map_at_k_hits_is_not_below_map_at_k_and_perfect_embeddings_score_one():
    labels = np.repeat(np.arange(4), 5)
    perfect = np.eye(4)[labels] + 1e-3 * np.random.default_rng(0).normal(size=(20, 4))
    got = evaluate(perfect, labels, 10)
    assert got["map@k"] == pytest.approx(1.0) and got["map@r"] == pytest.approx(1.0) and got["p@1"] == 1.0
    noisy = evaluate(np.random.default_rng(1).normal(size=(20, 4)), labels, 10)
    assert noisy["map@k_hits"] >= noisy["map@k"]


def test_metrics_from_ranking_matches_evaluate():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    labels = rng.integers(0, 5, size=50)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    _, ids = top_k(xn, xn, 49, exclude_self=True)
    assert metrics_from_ranking(ids, labels, 10) == pytest.approx(evaluate(x, labels, 10))
    with pytest.raises(MetricsError, match="deep"):
        metrics_from_ranking(ids[:, :3], labels, 10)
    with pytest.raises(MetricsError, match="itself"):
        metrics_from_ranking(np.tile(np.arange(49), (50, 1)), labels, 10)


@pytest.mark.parametrize("bad, message", [
    (lambda x, y: (x[:-1], y), "embedding rows"),
    (lambda x, y: (x[:, 0], y), "2-D"),
    (lambda x, y: (np.where(np.eye(10, 4, dtype=bool), np.nan, x), y), "NaN"),
    (lambda x, y: (x[:1], y[:1]), "at least 2"),
])
def test_bad_input_gets_a_clear_error(bad, message):
    x = np.random.default_rng(0).normal(size=(10, 4))
    y = np.arange(10) % 2
    with pytest.raises(MetricsError, match=message):
        evaluate(*bad(x, y), 5)
