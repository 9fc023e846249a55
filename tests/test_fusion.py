"""Fusion and re-ranking against brute-force float64 references and hand-checked tiny cases."""
from __future__ import annotations

import numpy as np
import pytest

from core import fusion
from tests.reference import brute_top_k
from core.fusion import (
    AlphaQueryExpansion,
    Candidates,
    DatabaseAugmentation,
    MaxSimilarity,
    ReciprocalRank,
    SumSimilarity,
    combsum_zscore,
    fuse_candidates,
    rank_fusion,
    similarity_zscore_stats,
    weighted_concat,
)


def full_ranking(x):
    return brute_top_k(x, x, len(x) - 1, exclude_self=True)


def random_models(n=40, dims=(8, 5, 6), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, d)).astype(np.float32) for d in dims]


def test_rrf_hand_checked():
    # one query; list A = [1, 2, 3], list B = [3, 1, 4]
    a = Candidates(np.array([[0.9, 0.8, 0.7]], np.float32), np.array([[1, 2, 3]]))
    b = Candidates(np.array([[0.9, 0.8, 0.7]], np.float32), np.array([[3, 1, 4]]))
    # 1: 1/61+1/62, 3: 1/63+1/61, 2: 1/62, 4: 1/63
    assert fuse_candidates([a, b], 3, ReciprocalRank(60)).tolist() == [[1, 3, 2]]
    # with a tiny constant the rank-1 of list B outweighs two good ranks: 3: 1/1.01+1/3.01 > 1: 1/1.01+... no,
    # 1: 1/(0.01+1)+1/(0.01+2) = 1.4876, 3: 1/3.01+1/1.01 = 1.3223
    assert fuse_candidates([a, b], 4, ReciprocalRank(0.01)).tolist() == [[1, 3, 2, 4]]


def test_merge_by_max_and_sum_hand_checked():
    a = Candidates(np.array([[0.9, 0.5]], np.float32), np.array([[7, 2]]))
    b = Candidates(np.array([[0.95, 0.6]], np.float32), np.array([[2, 5]]))
    assert fuse_candidates([a, b], 3, MaxSimilarity()).tolist() == [[2, 7, 5]]  # 0.95, 0.9, 0.6
    assert fuse_candidates([a, b], 3, SumSimilarity()).tolist() == [[2, 7, 5]]  # 1.45, 0.9, 0.6
    c = Candidates(np.array([[0.5, 0.5]], np.float32), np.array([[9, 3]]))
    assert fuse_candidates([c], 2, MaxSimilarity()).tolist() == [[3, 9]]  # tie -> lower id first


def test_fuse_refuses_lists_shallower_than_k():
    a = Candidates(np.zeros((1, 2), np.float32), np.array([[0, 1]]))
    with pytest.raises(ValueError, match="fewer than k"):
        fuse_candidates([a], 3, ReciprocalRank())


@pytest.mark.parametrize("rule", [ReciprocalRank(60), ReciprocalRank(1), MaxSimilarity(), SumSimilarity()])
def test_rank_fusion_matches_brute_force(rule):
    models = random_models()
    k, depth = 5, 9
    got = rank_fusion(models, k, rule, depth=depth, search=brute_top_k)
    lists = [full_ranking(m) for m in models]
    for q in range(len(models[0])):
        score = {}
        for scores, ids in lists:
            for r in range(depth):
                j = int(ids[q, r])
                c = 1.0 / (rule.k + r + 1) if isinstance(rule, ReciprocalRank) else float(scores[q, r])
                if rule.reduce == "sum":
                    score[j] = score.get(j, 0.0) + c
                else:
                    score[j] = max(score.get(j, -np.inf), c)
        expected = sorted(score, key=lambda j: (-score[j], j))[:k]
        assert got[q].tolist() == expected


def test_rank_fusion_chunking_is_invisible():
    models = random_models(n=30)
    cands = fusion.candidate_lists(models, 6, search=brute_top_k)
    whole = fuse_candidates(cands, 4, ReciprocalRank())
    chunked = fuse_candidates(cands, 4, ReciprocalRank(), chunk_rows=7)
    np.testing.assert_array_equal(whole, chunked)


def test_zscore_stats_exact():
    x = random_models(n=25, dims=(7,))[0]
    mean, std = similarity_zscore_stats(x, chunk_rows=6)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn.astype(np.float64) @ xn.T.astype(np.float64)
    others = ~np.eye(len(x), dtype=bool)
    ref = [sims[i][others[i]] for i in range(len(x))]
    np.testing.assert_allclose(mean, [r.mean() for r in ref], atol=1e-6)
    np.testing.assert_allclose(std, [r.std() for r in ref], atol=1e-5)


def test_combsum_zscore_matches_brute_force():
    models = random_models(n=35)
    weights = [1.0, 2.0, 0.5]
    got = combsum_zscore(models, 6, weights=weights, search=brute_top_k)
    fused = 0.0
    for m, w in zip(models, weights):
        xn = m / np.linalg.norm(m, axis=1, keepdims=True)
        sims = xn.astype(np.float64) @ xn.T.astype(np.float64)
        np.fill_diagonal(sims, np.nan)
        fused = fused + w * (sims - np.nanmean(sims, 1, keepdims=True)) / np.nanstd(sims, 1, keepdims=True)
    np.fill_diagonal(fused, -np.inf)
    expected = np.array([np.lexsort((np.arange(len(r)), -r))[:6] for r in fused])
    np.testing.assert_array_equal(got, expected)


def test_combsum_differs_from_plain_sum_when_spreads_differ():
    # a model whose similarities are tightly spread must count as much as a widely spread one
    rng = np.random.default_rng(3)
    wide = rng.normal(size=(30, 4))
    tight = np.hstack([np.full((30, 1), 10.0), 0.3 * rng.normal(size=(30, 4))])
    z = combsum_zscore([wide, tight], 5, search=brute_top_k)
    plain = brute_top_k(*(2 * [weighted_concat([wide, tight], [1, 1])]), 5, exclude_self=True)[1]
    assert not np.array_equal(z, plain)


def _neighbour_average_reference(x, n, alpha):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores, ids = full_ranking(xn)
    out = xn.copy().astype(np.float64)
    for i in range(len(x)):
        for r in range(n):
            out[i] += max(float(scores[i, r]), 0.0) ** alpha * xn[ids[i, r]]
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_dba_matches_reference():
    x = random_models(n=20, dims=(6,))[0]
    got = DatabaseAugmentation(n=3, alpha=2.0)(x, search=brute_top_k)
    np.testing.assert_allclose(got, _neighbour_average_reference(x, 3, 2.0), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_alpha_qe_matches_reference():
    x = random_models(n=20, dims=(6,))[0]
    got = AlphaQueryExpansion(n=2, alpha=3.0)(x, 5, search=brute_top_k)
    expanded = _neighbour_average_reference(x, 2, 3.0)
    _, expected = brute_top_k(np.vstack([expanded]), x, 5, exclude_self=True)
    np.testing.assert_array_equal(got, expected)


def test_qe_with_zero_neighbours_is_plain_search():
    x = random_models(n=20, dims=(6,))[0]
    got = AlphaQueryExpansion(n=0)(x, 4, search=brute_top_k)
    np.testing.assert_array_equal(got, brute_top_k(x, x, 4, exclude_self=True)[1])


def test_default_search_gives_the_brute_force_answers():
    models = random_models(n=30)
    np.testing.assert_array_equal(rank_fusion(models, 5, depth=8), rank_fusion(models, 5, depth=8, search=brute_top_k))
    np.testing.assert_array_equal(combsum_zscore(models, 5), combsum_zscore(models, 5, search=brute_top_k))
    x = models[0]
    np.testing.assert_array_equal(AlphaQueryExpansion(3, 2.0)(x, 5), AlphaQueryExpansion(3, 2.0)(x, 5, search=brute_top_k))
