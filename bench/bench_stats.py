"""Benchmark: core.stats.paired_difference (bootstrap interval, sign-flip p-value) on synthetic scores.

Times the whole call, best of --repeats, for each query count, and records the machine it ran on.
Run it on a quiet machine (the CPU is the whole cost):

    python bench/bench_stats.py --queries 50000,5000 --resamples 10000 --json-out bench/results/stats_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time

import numpy as np


from core.stats import paired_difference
from bench.machine import cpu_name, write_result

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def synthetic_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """AP-like scores in [0, 1] for two methods on the same queries: A a little better on average,
    per-query noise much larger than the gain, and 1 % of queries NaN (no relevant item)."""
    rng = np.random.default_rng(seed)
    b = rng.random(n)
    a = np.clip(b + rng.normal(0.01, 0.1, n), 0, 1)
    excluded = rng.random(n) < 0.01
    a[excluded] = b[excluded] = np.nan
    return a, b


def blas_threads() -> list[dict] | None:
    """Thread pools numpy's BLAS and OpenMP will use (the sign-flip test runs a BLAS mat-vec)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{"api": p["internal_api"], "threads": p["num_threads"]} for p in threadpool_info()]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", default="50000,5000", help="comma-separated query counts")
    p.add_argument("--resamples", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per size")
    p.add_argument("--json-out", default="bench/results/stats_cpu.json")
    args = p.parse_args(argv)

    runs = []
    for n in (int(q) for q in args.queries.split(",")):
        a, b = synthetic_scores(n)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = paired_difference(a, b, n_resamples=args.resamples, seed=0)
            times.append(time.perf_counter() - t0)
        runs.append({
            "queries": n, "resamples": args.resamples, "best_s": round(min(times), 3),
            "all_s": [round(t, 3) for t in times],
            "ns_per_query_resample": round(min(times) / (n * args.resamples) * 1e9, 2),
            "result": out,
        })
        print(f"{n} queries x {args.resamples} resamples: best {min(times):.3f} s of {args.repeats}",
              flush=True)

    result = {
        "benchmark": "stats.paired_difference",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu: {cpu_name()}",
        "cpu_count": os.cpu_count(),
        "threads": {"blas": blas_threads(), **{k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ}},
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs": runs,
    }
    if args.json_out:
        write_result(result, args.json_out)
    else:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
