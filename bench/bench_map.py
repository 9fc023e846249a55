"""Benchmark: the embedding map's projections at the users' scale, time and how well each keeps classes together.

For each --points N, the concatenation of bench.synthetic_study's two models (N / 50 classes of 50, unit rows,
112 dims) is projected to 2-D with core.projection: PCA (what the page computes at once) and UMAP (what the
embedding_map job runs: umap-learn on 50 PCA components here, seeded, so single-threaded). Reported per
projection: seconds (best of --repeats; UMAP once, after a first call on 5,000 points
that compiles umap-learn's numba code, timed apart) and
`same_class_10nn`, the share of each point's 10 nearest 2-D neighbours in its own class (exact, by brute
force), next to the same share in the 112-dim space (the ceiling a map could keep).

    python bench/bench_map.py --points 5000,20000,50000 --json-out bench/results/map_cpu.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from importlib import metadata

import numpy as np
import torch

from bench.machine import cpu_name, write_result
from bench.synthetic_study import DIMS, embeddings
from core.projection import methods, project

NEIGHBOURS = 10
WARM_UP_POINTS = 5000


def same_class_share(x: np.ndarray, labels: np.ndarray, k: int = NEIGHBOURS, block: int = 2048) -> float:
    """Share of each row's k nearest rows (euclidean, itself left out) with its label: exact, in blocks."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    norms = (t * t).sum(1)
    hits = 0
    for start in range(0, len(t), block):
        q = t[start:start + block]
        d = norms[start:start + block, None] - 2 * q @ t.T + norms[None, :]
        d[torch.arange(len(q)), torch.arange(start, start + len(q))] = float("inf")
        nearest = torch.topk(d, k, largest=False).indices.numpy()
        hits += int((labels[nearest] == labels[start:start + len(q), None]).sum())
    return hits / (len(t) * k)


def study(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    classes = n // 50
    labels = np.repeat(np.arange(classes), 50)
    parts = [embeddings(labels, classes, dim, seed + 1 + i) for i, dim in enumerate(DIMS)]
    x = np.hstack(parts) / np.sqrt(len(parts))  # the (1, 1) concatenation of unit rows, itself a unit row
    return x.astype(np.float32), labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="5000,20000,50000")
    parser.add_argument("--repeats", type=int, default=3, help="PCA timings (best of); UMAP runs once")
    parser.add_argument("--json-out", default="bench/results/map_cpu.json")
    args = parser.parse_args()
    have_umap = "umap" in methods()
    compile_s = None
    if have_umap:
        start = time.perf_counter()
        project(study(WARM_UP_POINTS)[0], "umap")  # above 4,096 points: the NN-descent path compiles too
        compile_s = round(time.perf_counter() - start, 2)
    runs = []
    for n in (int(v) for v in args.points.split(",")):
        x, labels = study(n)
        row = {"points": n, "classes": n // 50, "dims": int(x.shape[1]),
               "same_class_10nn_full_dims": round(same_class_share(x, labels), 4)}
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            coords = project(x, "pca")
            times.append(time.perf_counter() - start)
        row["pca"] = {"best_s": round(min(times), 3), "same_class_10nn": round(same_class_share(coords, labels), 4)}
        if have_umap:
            start = time.perf_counter()
            coords = project(x, "umap")
            row["umap"] = {"s": round(time.perf_counter() - start, 2),
                           "same_class_10nn": round(same_class_share(coords, labels), 4)}
        runs.append(row)
        print(row, flush=True)
    result = {"benchmark": "map", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "device": f"cpu: {cpu_name()}", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
              "umap_learn": metadata.version("umap-learn") if have_umap else None,
              "umap_first_call_s": compile_s, "umap_first_call_points": WARM_UP_POINTS, "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
              "runs": runs}
    write_result(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
