"""Paired comparison against a slow pure-Python reference that makes the same documented random draws.

The reference shares only the draws (the seeds and the order of the integers drawn, as the docstring of
`paired_difference` documents them, one resample at a time). It averages bootstrap resamples with
`math.fsum` (correctly rounded) and takes the percentile by hand, so the interval must match to float64
rounding; it reads the flip bits with Python ints and sums the flipped differences in exact decimal
arithmetic on the scores as written, so the p-value must match exactly, ties included.
"""
import decimal
import math
import subprocess
import sys
from decimal import Decimal

import numpy as np
import pytest

from core import stats
from core.stats import paired_difference


def reference(a, b, n_resamples, seed):
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
    d = [x - y for x, y in pairs]
    n = len(d)
    boot, flip = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    means = []
    for _ in range(n_resamples):
        picks = boot.integers(0, n, size=n, dtype=np.int32)
        means.append(math.fsum(d[int(i)] for i in picks) / n)
    means.sort()

    def percentile(q):  # numpy's default "linear": interpolate at position q * (m - 1) of the sorted list
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    extreme = 0
    with decimal.localcontext(prec=60):  # enough digits that no sum of these scores rounds
        d_exact = [Decimal(repr(x)) - Decimal(repr(y)) for x, y in pairs]
        observed = abs(sum(d_exact))
        for _ in range(n_resamples):
            words = [int(w) for w in flip.integers(0, 2**64, size=-(-n // 64), dtype=np.uint64)]
            flipped = sum(-x if (words[i // 64] >> (i % 64)) & 1 else x for i, x in enumerate(d_exact))
            extreme += abs(flipped) >= observed
    return {
        "mean_diff": math.fsum(d) / n, "ci_low": percentile(0.025), "ci_high": percentile(0.975),
        "p_value": (extreme + 1) / (n_resamples + 1),
        "wins": sum(x > 0 for x in d), "ties": sum(x == 0 for x in d), "losses": sum(x < 0 for x in d),
        "n": n, "n_excluded": len(a) - n,
    }


def assert_matches_reference(a, b, n_resamples=2000, seed=0):
    got = paired_difference(a, b, n_resamples=n_resamples, seed=seed)
    want = reference(a, b, n_resamples, seed)
    for key in ("mean_diff", "ci_low", "ci_high"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
    for key in ("p_value", "wins", "ties", "losses", "n", "n_excluded"):
        assert got[key] == want[key], key
    return got


def shifted(n=200, shift=0.1, seed=1):
    rng = np.random.default_rng(seed)
    b = rng.random(n)
    return b + shift + rng.normal(0, 0.05, n), b


def test_constant_shift_with_noise_is_better_and_matches_reference():
    a, b = shifted()
    got = assert_matches_reference(a, b)
    assert 0 < got["ci_low"] < got["mean_diff"] < got["ci_high"]
    assert got["p_value"] == 1 / 2001  # no flip comes near a +0.1 shift on 200 queries
    assert got["verdict"] == "better"
    assert got["relative_diff"] == pytest.approx(got["mean_diff"] / np.mean(b))
    assert (got["mean_a"], got["mean_b"]) == (pytest.approx(np.mean(a)), pytest.approx(np.mean(b)))


def test_swapped_methods_are_worse():
    a, b = shifted()
    got = paired_difference(b, a, n_resamples=500)
    assert got["ci_high"] < 0 and got["verdict"] == "worse"


def test_symmetric_zero_mean_difference_contains_zero():
    rng = np.random.default_rng(2)
    x = rng.random(100) * 0.3
    b = np.full(200, 0.5)
    a = b + np.concatenate([x, -x])
    got = assert_matches_reference(a, b)
    assert got["ci_low"] < 0 < got["ci_high"]
    assert got["p_value"] > 0.5
    assert got["verdict"] == "not distinguishable from zero"


def test_identical_inputs_give_zero_interval_and_p_one():
    a = np.random.default_rng(3).random(300)
    got = paired_difference(a, a.copy(), n_resamples=1000)
    assert (got["ci_low"], got["ci_high"], got["mean_diff"]) == (0.0, 0.0, 0.0)
    assert got["p_value"] == 1.0
    assert (got["wins"], got["ties"], got["losses"]) == (0, 300, 0)
    assert got["verdict"] == "not distinguishable from zero"


@pytest.mark.parametrize("a, b", [
    ([0.6, 0.0, 0.0, 0.4, 0.9, 0.4, 0.8, 0.3], [0.2, 0.8, 0.9, 0.0, 0.0, 0.7, 0.3, 0.6]),
    ([0.4, 1.0, 0.2, 1.0, 0.0, 0.6, 0.6], [0.9, 0.3, 0.9, 0.7, 0.9, 0.2, 0.8]),
])
def test_decimal_ties_in_flipped_sums_count_as_extreme(a, b):
    # Few queries and one-decimal scores: many flips give a sum whose magnitude equals the observed one
    # as decimals (0.6 - 0.2 against 0.9 - 0.5) but not in float64, where a plain >= would miss them.
    assert_matches_reference(a, b, n_resamples=3000, seed=7)


def test_wins_ties_losses_and_nan_counted_by_hand():
    a = [0.5, 0.2, 0.3, float("nan"), 0.9, float("nan")]
    b = [0.4, 0.2, 0.6, 0.1, float("nan"), float("nan")]
    got = assert_matches_reference(a, b, n_resamples=500)
    assert (got["wins"], got["ties"], got["losses"], got["n"], got["n_excluded"]) == (1, 1, 1, 3, 3)
    assert got["mean_diff"] == pytest.approx((0.1 + 0.0 - 0.3) / 3)


def test_nan_queries_are_dropped_before_resampling():
    a, b = shifted(n=120, shift=0.02)
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[[3, 50]] = np.nan
    b_nan[[50, 77, 119]] = np.nan
    keep = np.ones(120, bool)
    keep[[3, 50, 77, 119]] = False
    with_nan = assert_matches_reference(a_nan, b_nan, n_resamples=1000)
    assert with_nan["n_excluded"] == 4
    without = paired_difference(a[keep], b[keep], n_resamples=1000)
    assert {k: v for k, v in with_nan.items() if k != "n_excluded"} == \
        {k: v for k, v in without.items() if k != "n_excluded"}


def test_blocks_of_resamples_give_the_same_numbers(monkeypatch):
    a, b = shifted(n=150, shift=0.005, seed=4)
    whole = paired_difference(a, b, n_resamples=1001, seed=5)
    monkeypatch.setattr(stats, "_BLOCK_CELLS", 7 * 150 + 3)  # blocks of 7 rows, a short last one
    assert paired_difference(a, b, n_resamples=1001, seed=5) == whole
    assert_matches_reference(a, b, n_resamples=1001, seed=5)


def test_deterministic_for_a_seed():
    a, b = shifted(n=80, shift=0.01, seed=6)
    first = paired_difference(a, b, n_resamples=400, seed=11)
    assert paired_difference(a, b, n_resamples=400, seed=11) == first
    other = paired_difference(a, b, n_resamples=400, seed=12)
    assert (other["ci_low"], other["ci_high"]) != (first["ci_low"], first["ci_high"])
    assert (first["n_resamples"], first["seed"]) == (400, 11)


def test_one_query_is_never_a_verdict():
    # The bootstrap of one value is that value (the interval excludes 0), but no sign flip can reject.
    got = paired_difference([0.9], [0.1], n_resamples=200)
    assert got["ci_low"] == got["ci_high"] == pytest.approx(0.8)
    assert got["p_value"] == 1.0
    assert got["verdict"] == "not distinguishable from zero"


def test_relative_diff_is_none_when_b_averages_zero():
    assert paired_difference([0.2, 0.4], [0.0, 0.0], n_resamples=50)["relative_diff"] is None


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="3 per-query scores and b has 2"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="No query has a score under both"):
        paired_difference([np.nan, 0.2], [0.1, np.nan])
    with pytest.raises(ValueError, match="No query has a score under both"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="1-D"):
        paired_difference(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="infinity"):
        paired_difference([np.inf, 0.2], [0.1, 0.2])
    with pytest.raises(ValueError, match="n_resamples"):
        paired_difference([0.1], [0.2], n_resamples=0)


def test_importing_stats_loads_nothing_heavy():
    code = "import sys, core.stats; print(sorted({'torch', 'timm', 'streamlit', 'faiss'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
