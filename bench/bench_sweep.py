"""Benchmark: three exact weight sweeps on the same data, in one process.

  naive     for each weight vector: concatenate, build a faiss IndexFlatIP, search, score
            (torch matmul + topk on CUDA), as the reference study ran it;
  dense     WeightedConcatScorer(path="dense"): per query block, each model's similarity block once,
            fused by every weight vector, exact top over the gallery (no pruning);
  adaptive  WeightedConcatScorer(path="auto"), what grid_sweep runs: per query block, certified
            candidate lists (level 0, or deeper lists built from the block) or dense, whichever the
            measured costs say is cheapest.

Two kinds of models, at each size:
  agree     the reference study's four dims (2048+2560+1536+1024); shared class and per-image
            content seen through different projections and noise (real backbones agree like this);
  disagree  low dims (64, 96, 128, 160); independent class centroids and noise per model, so their
            neighbour lists overlap little and few (query, weights) pairs certify.

Weights: every vector of [1..5]^4, each ratio class scored once by both scorers (the naive sweep
would rank multiples identically too). The naive sweep is timed on a fixed random subset of them and
its per-vector time multiplied by the number of ratio classes (it needs hours for all of them on
2 cores); the JSON says so. Exactness: on a sample of vectors, every metric of every side against a
float64 ranking by (-score, index) (float32 sides can flip a near-tie that float64 resolves: all
three then differ alike). Full run (the numbers in bench/results/sweep_cpu.json), and a quick check:

    python bench/bench_sweep.py --sizes 2000,5000 --json-out bench/results/sweep_cpu.json
    python bench/bench_sweep.py --sizes 1000 --max-vectors 40 --naive-sample 3 --check-sample 2
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform

import numpy as np
import torch

from bench.machine import timed, write_result
from core.devices import resolve_device
from core.fusion import weighted_concat
from core.metrics import METRIC_KEYS, PER_QUERY, evaluate, relevant_counts, scores_from_relevance
from core.search import default_backend
from core.sweep import WeightedConcatScorer
from core.vectors import ratio_class

try:
    import faiss
except ImportError:  # the lent GPU machines have no faiss: every side searches with torch on CUDA there
    faiss = None

DIMS = (2048, 2560, 1536, 1024)  # the reference study's four models (resnet101, b7, swin-L, vit-L)
LOW_DIMS = (64, 96, 128, 160)


def synthetic_models(n: int, classes: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Four 'models' that agree: a shared class + per-image latent (what is in the picture), seen
    through a different random projection with its own noise by each model."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    shared = rng.normal(size=(classes, 64))
    image = rng.normal(size=(len(labels), 64))
    out = []
    for i, d in enumerate(DIMS):
        proj = rng.normal(size=(64, d)) / 8
        own = rng.normal(scale=0.6 + 0.1 * i, size=(len(labels), 64))  # what this model gets wrong
        out.append(((shared[labels] + image + own) @ proj + rng.normal(scale=0.3, size=(len(labels), d))).astype(np.float32))
    return out, labels


def disagreeing_models(n: int, classes: int, seed: int = 0, noise: float = 2.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Four 'models' that disagree: each its own class centroids and its own per-image noise, so two
    models' nearest neighbours of an image are nearly independent beyond the class."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    out = []
    for d in LOW_DIMS:
        centres = rng.normal(size=(classes, d))
        out.append((centres[labels] + rng.normal(scale=noise, size=(len(labels), d))).astype(np.float32))
    return out, labels


GENERATORS = {"agree": synthetic_models, "disagree": disagreeing_models}


def float64_metrics(embeddings, labels, weights_list, k: int, device: str) -> list[dict]:
    """Metrics of each weighted concatenation ranked in float64 by (-score, index), in query chunks:
    the truth every float32 side is compared with."""
    xs = []
    for e in embeddings:
        x = torch.as_tensor(e, dtype=torch.float64, device=device)
        xs.append(x / x.norm(dim=1, keepdim=True))
    n = len(labels)
    n_relevant = relevant_counts(labels)
    depth = min(max(k, int(n_relevant.max())), n - 1)
    lab = torch.as_tensor(np.unique(labels, return_inverse=True)[1].reshape(-1), device=device)
    valid = torch.as_tensor(n_relevant > 0, device=device)
    rows = max(1, 2**24 // n)
    out = []
    for weights in weights_list:
        sums = dict.fromkeys(METRIC_KEYS, 0.0)
        for s in range(0, n, rows):
            q = torch.arange(s, min(n, s + rows), device=device)
            fused = sum(float(w) ** 2 * (x[q] @ x.T) for w, x in zip(weights, xs) if w)
            fused[q - s, q] = -torch.inf
            order = torch.sort(fused, dim=1, descending=True, stable=True).indices[:, :depth]
            scores = scores_from_relevance(lab[order] == lab[q, None], n_relevant[s:s + len(q)], k)
            for key, attr in PER_QUERY.items():
                sums[key] += float(scores[attr][valid[q]].sum())
        out.append({key: total / int(valid.sum()) for key, total in sums.items()})
    return out


def max_diff(got: list[dict], want: list[dict]) -> float:
    return max(abs(g[key] - w[key]) for g, w in zip(got, want) for key in METRIC_KEYS)


def run_case(kind: str, n: int, args, device: str) -> dict:
    embeddings, labels = GENERATORS[kind](n, max(1, n // args.per_class))
    values = [float(v) for v in args.weights.split(",")]
    vectors = [v for v in itertools.product(values, repeat=len(embeddings)) if any(v)]
    first_of_class: dict[tuple, tuple] = {}  # both scorers score each ratio class once
    for v in vectors:
        first_of_class.setdefault(ratio_class(v), v)
    classes = list(first_of_class.values())
    rng = np.random.default_rng(1)
    if args.max_vectors and args.max_vectors < len(classes):
        classes = [classes[i] for i in sorted(rng.choice(len(classes), args.max_vectors, replace=False))]
    weights = np.array(classes)

    adaptive = WeightedConcatScorer(embeddings, labels, args.k, device=device)
    _, build_s = timed(adaptive.prepare)
    adaptive_rows, score_s = timed(lambda: adaptive.score(weights))
    dense = WeightedConcatScorer(embeddings, labels, args.k, device=device, path="dense")
    dense_rows, dense_s = timed(lambda: dense.score(weights))

    timed_ids = rng.choice(len(classes), size=min(args.naive_sample, len(classes)), replace=False)
    backend = default_backend(device)
    naive_rows, naive_sample_s = timed(lambda: [evaluate(weighted_concat(embeddings, classes[i]), labels, args.k,
                                                         backend=backend) for i in timed_ids])
    naive_per_vector = naive_sample_s / len(timed_ids)
    naive_s = naive_per_vector * len(classes)
    adaptive_s = build_s + score_s

    check_ids = timed_ids[:args.check_sample]
    truth = float64_metrics(embeddings, labels, [classes[i] for i in check_ids], args.k, device)
    return {
        "models": kind, "n_items": n, "n_classes": int(len(np.unique(labels))),
        "dims": [e.shape[1] for e in embeddings],
        "single_model_map@k": [round(evaluate(e, labels, args.k, backend=backend)["map@k"], 4) for e in embeddings],
        "weight_vectors": len(vectors), "vectors_scored": len(classes),
        "vectors_scored_are": "every ratio class" if len(classes) == len(first_of_class)
        else f"a fixed random {len(classes)} of the {len(first_of_class)} ratio classes (--max-vectors)",
        "naive_s_per_vector": round(naive_per_vector, 4),
        "naive_vectors_timed": len(timed_ids),
        "naive_total_s": round(naive_s, 2),
        "naive_total_is": f"naive_s_per_vector x {len(classes)}, timed on {len(timed_ids)} random ones of them",
        "dense_s": round(dense_s, 2),
        "dense_is": "score() of a path=\"dense\" scorer, which builds no candidate lists",
        "adaptive_s": round(adaptive_s, 2),
        "adaptive_is": f"prepare(), building the candidate lists ({build_s:.2f} s), + score()",
        "speedup_dense_vs_naive": round(naive_s / dense_s, 2),
        "speedup_adaptive_vs_naive": round(naive_s / adaptive_s, 2),
        "level0_uncertified_fraction": round(adaptive.n_uncertified / (len(classes) * n), 4),
        "candidate_list_depths": adaptive.list_depths,
        "candidates_per_query_by_level": [round(w, 1) for w in adaptive.costs.widths],
        "adaptive_blocks": {**adaptive.blocks, "candidates_by_level": adaptive.level_blocks},
        "vectors_checked_against_float64": len(check_ids),
        "max_abs_metric_diff_from_float64": {
            "adaptive": max_diff([adaptive_rows[i] for i in check_ids], truth),
            "dense": max_diff([dense_rows[i] for i in check_ids], truth),
            "naive": max_diff(naive_rows[:len(check_ids)], truth),
        },
        "max_abs_metric_diff_adaptive_vs_dense_all_vectors": max_diff(adaptive_rows, dense_rows),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,5000", help="item counts, comma-separated")
    p.add_argument("--models", default="agree,disagree", help="which synthetic models: agree, disagree or both")
    p.add_argument("--per-class", type=int, default=50, help="items per class (R = this - 1, as ImageNet val)")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--weights", default="1,2,3,4,5")
    p.add_argument("--naive-sample", type=int, default=8, help="ratio classes timed on the naive side")
    p.add_argument("--check-sample", type=int, default=3, help="of those, vectors checked against float64")
    p.add_argument("--max-vectors", type=int, default=0,
                   help="score a fixed random subset of the ratio classes (0 = all): for quick checks")
    p.add_argument("--device", default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    result = {
        "benchmark": "sweep",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "faiss": faiss.__version__ if faiss else None,
        "threads": {"torch": torch.get_num_threads(), "faiss": faiss.omp_get_max_threads() if faiss else None},
        "k": args.k, "weights": args.weights,
        "targets": {"disagree": "adaptive >= 1x naive (aim >= 3x)", "agree": "adaptive >= 20x naive"},
        "cases": [],
    }
    for kind in args.models.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            result["cases"].append(run_case(kind, n, args, device))
            print(json.dumps(result["cases"][-1]), flush=True)
    if args.json_out:
        write_result(result, args.json_out, summary="")
    return result


if __name__ == "__main__":
    main()
