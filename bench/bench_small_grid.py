"""Benchmark: small weight grids at 50,000 queries, where building candidate lists costs more than it saves.

Two models (the synthetic study's embeddings, bench/synthetic_study.py: 1,000 classes of 50, dims 64 and
48), k = 50. For each grid size W, in one process on the same data:
  default   score_once(), what a grid sweep runs: at most DENSE_VECTORS_PER_MODEL vectors per model are
            ranked densely, a larger grid builds candidates and takes the adaptive path;
  built     prepare() (the candidate lists) + score(), the adaptive path whatever the grid;
  dense     path="dense": every pair ranked over the gallery, no candidates.
Every side is exact (tests/test_sweep.py checks each path against float64); the JSON records the largest
metric difference between the sides.

    python bench/bench_small_grid.py --json-out bench/results/small_grid_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import numpy as np
import torch

from bench.machine import cpu_name, timed, write_result
from bench.synthetic_study import DIMS, embeddings
from core.metrics import METRIC_KEYS
from core.sweep import DENSE_VECTORS_PER_MODEL, WeightedConcatScorer, WeightGrid, score_once


def run_case(embs: list[np.ndarray], labels: np.ndarray, weights: np.ndarray, k: int) -> dict:
    rows = {}
    seconds = {}
    rows["default"], seconds["default"] = timed(lambda: score_once(embs, labels, weights, k))
    built = WeightedConcatScorer(embs, labels, k)
    _, build_s = timed(built.prepare)
    rows["built"], score_s = timed(lambda: built.score(weights))
    seconds["built"] = build_s + score_s
    dense = WeightedConcatScorer(embs, labels, k, path="dense")
    rows["dense"], seconds["dense"] = timed(lambda: dense.score(weights))
    diff = max(abs(a[key] - b[key]) for side in ("built", "dense")
               for a, b in zip(rows["default"], rows[side]) for key in METRIC_KEYS)
    return {
        "weight_vectors": len(weights),
        "default_path": "dense" if len(weights) <= DENSE_VECTORS_PER_MODEL * len(embs) else "adaptive",
        "seconds": {side: round(s, 2) for side, s in seconds.items()},
        "built_candidate_lists_s": round(build_s, 2),
        "max_abs_metric_diff_between_sides": diff,
        "map@k": [round(r["map@k"], 6) for r in rows["default"]],
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--grid-sizes", default="3,8", help="weight vectors scored, the first W ratio classes of 0..5")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    labels = np.repeat(np.arange(args.classes), args.per_class)
    embs = [embeddings(labels, args.classes, dim, 1 + i) for i, dim in enumerate(DIMS)]
    grid = np.array(WeightGrid(range(6), len(embs)).scored, dtype=float)
    result = {
        "benchmark": "small_grid",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": cpu_name(), "device": "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "n_queries": len(labels), "models": len(embs), "dims": list(DIMS), "k": args.k,
        "dense_vectors_per_model": DENSE_VECTORS_PER_MODEL,
        "cases": [],
    }
    for size in (int(s) for s in args.grid_sizes.split(",")):
        result["cases"].append(run_case(embs, labels, grid[:size], args.k))
        print(result["cases"][-1], flush=True)
    if args.json_out:
        write_result(result, args.json_out, summary="")
    return result


if __name__ == "__main__":
    main()
