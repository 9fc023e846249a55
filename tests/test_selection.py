"""Weights chosen on train and reported on eval, against a toy sweep and the real one."""
from __future__ import annotations

import numpy as np
import pytest

from core.fusion import weighted_concat
from core.selection import check_disjoint, weights_chosen_on_train
from tests.reference import brute_top_k, reference_metrics


def test_check_disjoint():
    check_disjoint(np.array([0, 1, 2]), np.array([3, 4]))
    with pytest.raises(ValueError, match="eval-split rows"):
        check_disjoint(np.array([0, 1, 2]), np.array([2, 4]))


def _toy_map(embeddings, labels, k):
    """Tiny stand-in for core.metrics.evaluate: mean precision@k of cosine neighbours."""
    _, ids = brute_top_k(embeddings, embeddings, k, exclude_self=True)
    return {"map@k": float((labels[ids] == labels[:, None]).mean())}


def _toy_sweep(embeddings, labels, weights, k, reporter=None):
    rows = []
    for w0 in weights:
        for w1 in weights:
            if w0 == w1 == 0:
                continue
            rows.append({"weights": (w0, w1), **_toy_map(weighted_concat(embeddings, (w0, w1)), labels, k)})
    return sorted(rows, key=lambda r: -r["map@k"])


def test_weights_are_chosen_on_train_rows_only():
    # model 0 separates classes on train rows only, model 1 on eval rows only: a choice on train picks model 0
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 20)
    centroids = rng.normal(size=(4, 16)) * 4
    train_rows, eval_rows = np.arange(0, 80, 2), np.arange(1, 80, 2)
    m0 = rng.normal(size=(80, 16))
    m1 = rng.normal(size=(80, 16))
    m0[train_rows] += centroids[labels[train_rows]]
    m1[eval_rows] += centroids[labels[eval_rows]]
    chosen = weights_chosen_on_train([m0, m1], labels, train_rows, eval_rows, (0, 1), k=5, sweep=_toy_sweep)
    assert chosen["weights"] == (1, 0)
    assert _toy_sweep([m0[eval_rows], m1[eval_rows]], labels[eval_rows], (0, 1), 5)[0]["weights"] == (0, 1)
    with pytest.raises(ValueError, match="eval-split rows"):
        weights_chosen_on_train([m0, m1], labels, train_rows, np.array([0, 1]), (0, 1), k=5, sweep=_toy_sweep)


def test_weights_chosen_with_the_real_sweep_score_as_their_concat_on_train():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(5), 16)
    centroids = rng.normal(size=(5, 8)) * 2
    good = (centroids[labels] + rng.normal(size=(80, 8))).astype(np.float32)
    noise = rng.normal(size=(80, 6)).astype(np.float32)
    rows = rng.permutation(80)
    train_rows, eval_rows = np.sort(rows[:50]), np.sort(rows[50:])
    chosen = weights_chosen_on_train([good, noise], labels, train_rows, eval_rows, (0, 1, 2), k=5)
    assert chosen["weights"][0] > 0 and chosen["weights"][0] >= chosen["weights"][1]
    want = reference_metrics(weighted_concat([good[train_rows], noise[train_rows]], chosen["weights"]),
                             labels[train_rows], 5)
    assert chosen["map@k"] == pytest.approx(want["map@k"], abs=1e-6)
