"""Model complementarity against slow direct formulas: CKA from centred Gram matrices with the
centring matrix H, overlap from Python sets, per-query AP from a loop over rankings, correlations and
oracles from their definitions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.complementarity import complementarity, linear_cka, topk_overlap
from core.metrics import MetricsError
from tests.reference import brute_top_k, cosines


def _direct_cka(x, y) -> float:
    """HSIC(K, L) = tr(K H L H) with K = X X^T, H = I - 11^T / n (Kornblith et al. 2019, eq. 3)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a, b):
        return np.trace(a @ h @ b @ h)

    return hsic(k, l_) / np.sqrt(hsic(k, k) * hsic(l_, l_))


@pytest.mark.parametrize("n, dx, dy", [(30, 8, 5), (12, 40, 25)])  # fewer dims than rows, and more
def test_linear_cka_matches_the_direct_formula(n, dx, dy):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, dx))
    y = x[:, :min(dx, dy)] @ rng.normal(size=(min(dx, dy), dy)) + rng.normal(size=(n, dy))
    assert linear_cka(x, y) == pytest.approx(_direct_cka(x, y), abs=1e-10)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_is_invariant_to_rotation_and_isotropic_scaling():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 6)), rng.normal(size=(40, 9))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(x, x @ q * 3.5) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x @ q * 0.2, y) == pytest.approx(linear_cka(x, y), abs=1e-12)
    assert np.isnan(linear_cka(np.ones((5, 3)), y[:5]))


def test_topk_overlap_matches_set_intersection():
    rng = np.random.default_rng(6)
    a = np.stack([rng.choice(30, size=7, replace=False) for _ in range(20)])
    b = np.stack([rng.choice(30, size=7, replace=False) for _ in range(20)])
    share, jaccard = topk_overlap(a, b)
    for q in range(20):
        sa, sb = set(a[q].tolist()), set(b[q].tolist())
        assert share[q] == pytest.approx(len(sa & sb) / 7)
        assert jaccard[q] == pytest.approx(len(sa & sb) / len(sa | sb))


def _ap_at_k_loop(embeddings, labels, k) -> list[float]:
    """Per-query AP@k (/ min(k, R)) by float64 brute force, one query at a time; None when R = 0."""
    sims = cosines(embeddings)
    out = []
    for q in range(len(labels)):
        order = [j for j in sorted(range(len(labels)), key=lambda j: (-sims[q, j], j)) if j != q]
        rel = [labels[j] == labels[q] for j in order]
        if not any(rel):
            out.append(None)
            continue
        hits, total = 0, 0.0
        for i, is_rel in enumerate(rel[:k], start=1):
            if is_rel:
                hits += 1
                total += hits / i
        out.append(total / min(k, sum(rel)))
    return out


def _ranks_loop(values) -> list[float]:
    """Rank 1..n, ties sharing their mean rank."""
    return [sum(w < v for w in values) + (sum(w == v for w in values) + 1) / 2 for v in values]


def _pearson_loop(a, b) -> float | None:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    var = sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b)
    return cov / var ** 0.5 if var > 0 else None


def _models():
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(5), 8)
    labels[-1] = 99  # a query with no relevant item: excluded everywhere
    centroids = rng.normal(size=(100, 12))
    embeddings = [(centroids[labels] * s + rng.normal(size=(40, 12))).astype(np.float32) for s in (1.5, 1.0, 0.7)]
    embeddings.append(np.eye(12, dtype=np.float32)[labels % 12])  # perfect: every AP is 1, constant
    return embeddings, labels


def test_complementarity_against_loops():
    embeddings, labels = _models()
    k, m = 6, len(embeddings)
    out = complementarity(embeddings, labels, k, names=list("abcd"), cka_rows=1000, device="cpu")
    json.dumps(out, allow_nan=False)  # storable as a job result as it is
    assert out["models"] == list("abcd") and out["k"] == k
    assert (out["n_queries"], out["n_excluded"], out["cka_rows"]) == (39, 1, 40)

    lists = [brute_top_k(e, e, k, exclude_self=True)[1] for e in embeddings]
    aps = [[a for a in _ap_at_k_loop(e, labels, k) if a is not None] for e in embeddings]
    assert out["map@k"] == pytest.approx([sum(a) / len(a) for a in aps], abs=1e-9)
    assert out["best_single"] == pytest.approx(1.0)
    oracle_all = sum(max(a[q] for a in aps) for q in range(39)) / 39
    assert out["oracle_all"] == pytest.approx(oracle_all, abs=1e-9)
    for i in range(m):
        for j in range(m):
            shares = [len(set(lists[i][q]) & set(lists[j][q])) for q in range(40)]
            unions = [len(set(lists[i][q]) | set(lists[j][q])) for q in range(40)]
            assert out["overlap@k"][i][j] == pytest.approx(np.mean(shares) / k, abs=1e-9)
            assert out["jaccard@k"][i][j] == pytest.approx(np.mean(np.array(shares) / unions), abs=1e-9)
            assert out["cka"][i][j] == pytest.approx(_direct_cka(embeddings[i], embeddings[j]), abs=1e-9)
            assert out["oracle_pair"][i][j] == pytest.approx(np.mean(np.maximum(aps[i], aps[j])), abs=1e-9)
            pearson = _pearson_loop(aps[i], aps[j])
            spearman = _pearson_loop(_ranks_loop(aps[i]), _ranks_loop(aps[j]))
            for key, want in (("ap_pearson", pearson), ("ap_spearman", spearman)):
                if want is None:  # model d's AP is constant: correlation undefined
                    assert out[key][i][j] is None
                else:
                    assert out[key][i][j] == pytest.approx(want, abs=1e-9)
    assert out["ap_pearson"][3][0] is None


def test_cka_sample_is_seeded_and_bounded():
    embeddings, labels = _models()
    first = complementarity(embeddings[:2], labels, 4, cka_rows=20, seed=3, device="cpu")
    again = complementarity(embeddings[:2], labels, 4, cka_rows=20, seed=3, device="cpu")
    assert first["cka_rows"] == 20 and first["cka"] == again["cka"]
    assert first["models"] == ["model 0", "model 1"]


def test_complementarity_refuses_bad_inputs():
    embeddings, labels = _models()
    with pytest.raises(MetricsError, match="at least two"):
        complementarity(embeddings[:1], labels, 4, device="cpu")
    with pytest.raises(MetricsError, match="2 names for 3 models"):
        complementarity(embeddings[:3], labels, 4, names=["a", "b"], device="cpu")
    with pytest.raises(MetricsError, match="same images"):
        complementarity([embeddings[0], embeddings[1][:30]], labels, 4, device="cpu")
