"""Is method A really better than method B on the same queries? Paired difference, interval, p-value."""
from __future__ import annotations

import numpy as np

# Resample x query cells handled at once: 2 MB of float64 (and 1 MB of int32 indexes) stays in cache,
# and memory stays bounded however many resamples or queries there are.
_BLOCK_CELLS = 1 << 18
ALPHA = 0.05  # the interval is 1 - ALPHA; the verdict also asks p < ALPHA


def paired_difference(a, b, *, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Compare two aligned per-query score arrays (the same queries in the same order, e.g. AP@k of
    method A and of method B). The difference is `a - b`: positive means A scores higher.

    Queries where either score is NaN (no relevant item) are dropped pairwise before anything and
    counted in `n_excluded`. Returns plain Python numbers:
    - `mean_diff`, `mean_a`, `mean_b`; `relative_diff` = mean_diff / mean_b (None when mean_b is 0);
    - `ci_low`, `ci_high`: 95 % paired bootstrap percentile interval of the mean difference;
    - `p_value`: two-sided paired sign-flip permutation test of "mean difference = 0", as
      (count + 1) / (n_resamples + 1) so it is never 0; a flipped mean equal to the observed one up to
      the float64 rounding of the scores counts as extreme (scores written as 0.6 and 0.2 tie as decimals);
    - `wins` (a > b), `ties` (a == b), `losses` (a < b), `n` (queries compared), `n_excluded`,
      `n_resamples`, `seed`;
    - `verdict`: "better" (A over B) or "worse" when the interval excludes 0 and p < 0.05 agree,
      otherwise "not distinguishable from zero" (with a handful of queries the percentile interval
      can exclude 0 while the sign-flip test cannot reject; then neither claim is made).

    Random draws, documented so the numbers can be reproduced: `np.random.SeedSequence(seed).spawn(2)`
    seeds two `np.random.default_rng` generators, the first for the bootstrap, the second for the sign
    flips. Bootstrap resample r takes the query indexes `integers(0, n, size=n, dtype=np.int32)`;
    sign-flip resample r draws `integers(0, 2**64, size=ceil(n / 64), dtype=np.uint64)` and negates
    query i's difference when bit i % 64 of word i // 64 is set. Resamples are drawn in blocks of
    rows, which yields exactly the same streams as drawing them one after another.
    """
    a, b, n_excluded = _aligned(a, b)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}.")
    d = a - b
    n = len(d)
    boot_rng, flip_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    rows = max(1, _BLOCK_CELLS // n)

    boot_means = np.concatenate([d[boot_rng.integers(0, n, size=(m, n), dtype=np.int32)].sum(axis=1)
                                 for m in _block_sizes(n_resamples, rows)]) / n
    ci_low, ci_high = np.percentile(boot_means, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])

    total = d.sum()
    # Sums equal in exact arithmetic on the scores (flipping 0.6 - 0.2 together with 0.9 - 0.5) differ in
    # float64 by the rounding of the scores, of a - b and of the sums: at most about
    # n * eps * (sum|a| + sum|b|). A flip that close to the observed sum counts as extreme, so no tie is lost.
    tol = 4 * n * np.finfo(np.float64).eps * (np.abs(a).sum() + np.abs(b).sum())
    words = -(-n // 64)
    extreme = 0
    for m in _block_sizes(n_resamples, rows):
        raw = flip_rng.integers(0, 2**64, size=(m, words), dtype=np.uint64).astype("<u8", copy=False)
        flipped = np.unpackbits(raw.view(np.uint8), axis=1, count=n, bitorder="little")
        extreme += int(np.count_nonzero(np.abs(total - 2 * (flipped @ d)) >= abs(total) - tol))
    p_value = (extreme + 1) / (n_resamples + 1)

    mean_a, mean_b, mean_diff = float(a.mean()), float(b.mean()), float(d.mean())
    if ci_low > 0 and p_value < ALPHA:
        verdict = "better"
    elif ci_high < 0 and p_value < ALPHA:
        verdict = "worse"
    else:
        verdict = "not distinguishable from zero"
    return {
        "mean_diff": mean_diff, "ci_low": float(ci_low), "ci_high": float(ci_high), "p_value": p_value,
        "verdict": verdict, "mean_a": mean_a, "mean_b": mean_b,
        "relative_diff": mean_diff / mean_b if mean_b != 0 else None,
        "wins": int(np.count_nonzero(d > 0)), "ties": int(np.count_nonzero(d == 0)),
        "losses": int(np.count_nonzero(d < 0)), "n": n, "n_excluded": n_excluded,
        "n_resamples": n_resamples, "seed": seed,
    }


def _aligned(a, b) -> tuple[np.ndarray, np.ndarray, int]:
    """Both score arrays as float64 with the queries that are NaN in either dropped, and how many were."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"Expected one score per query (1-D arrays), got shapes {a.shape} and {b.shape}.")
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} per-query scores and b has {len(b)}: pass the scores of both "
                         "methods on the same queries, in the same order.")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("Per-query scores must be finite (NaN marks an excluded query); got infinity.")
    if len(a) == 0:
        raise ValueError(f"No query has a score under both methods ({len(keep)} given, all NaN in a or b, "
                         "e.g. no query has a relevant item): there is nothing to compare.")
    return a, b, int(len(keep) - len(a))


def _block_sizes(total: int, rows: int):
    """Sizes of the consecutive blocks of at most `rows` resamples that make up `total`."""
    for start in range(0, total, rows):
        yield min(rows, total - start)
