"""Benchmark: grid_sweep against the naive sweep (concatenate, build a faiss IndexFlatIP, search, score).

Same process, same data, same numbers required. The naive sweep is timed on a random sample of the
weight vectors (it needs hours for all of them on 2 cores) and its per-vector time is multiplied by
the number of vectors; --naive-sample 0 times it on every vector. Prints JSON.

    python bench/bench_sweep.py --n 5000 --json-out bench/results/sweep_cpu.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


from core.fusion import weighted_concat
from core.metrics import evaluate
from core.search import default_backend
from core.sweep import grid_sweep

DIMS = (2048, 2560, 1536, 1024)  # the reference study's four models (resnet101, b7, swin-L, vit-L)


def synthetic_models(n: int, classes: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Four 'models' of the same images: a shared class + per-image latent (what is in the picture),
    seen through a different random projection with its own noise by each model. Real backbones
    agree on most neighbours like this; with independent per-model noise they would not, and the
    pruning bound would certify far fewer queries (see RESULTS.md)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    shared = rng.normal(size=(classes, 64))
    image = rng.normal(size=(n, 64))
    out = []
    for i, d in enumerate(DIMS):
        proj = rng.normal(size=(64, d)) / 8
        own = rng.normal(scale=0.6 + 0.1 * i, size=(n, 64))  # what this model gets wrong
        out.append(((shared[labels] + image + own) @ proj + rng.normal(scale=0.3, size=(n, d))).astype(np.float32))
    return out, labels


def float64_map(embeddings, labels, weights, k: int) -> float:
    """map@k of the weighted concatenation ranked in float64 (the tie-breaking truth)."""
    import torch

    from core.metrics import relevant_counts, scores_from_relevance

    xs = [torch.as_tensor(e, dtype=torch.float64) for e in embeddings]
    fused = sum(w * w * (x / x.norm(dim=1, keepdim=True)) @ (x / x.norm(dim=1, keepdim=True)).T
                for w, x in zip(weights, xs) if w)
    fused.fill_diagonal_(-torch.inf)
    order = torch.sort(fused, dim=1, descending=True, stable=True).indices
    depth = max(k, int(relevant_counts(labels).max()))
    lab = torch.as_tensor(labels)
    rel = lab[order[:, :depth]] == lab[:, None]
    return float(torch.nanmean(scores_from_relevance(rel, relevant_counts(labels), k)["ap_at_k"]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--weights", default="1,2,3,4,5")
    p.add_argument("--naive-sample", type=int, default=8, help="vectors timed naively (0 = all)")
    p.add_argument("--device", default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    embeddings, labels = synthetic_models(args.n, args.classes)
    values = [float(v) for v in args.weights.split(",")]
    vectors = [v for v in itertools.product(values, repeat=len(embeddings)) if any(v)]

    t0 = time.perf_counter()
    rows = grid_sweep(embeddings, labels, weights=values, k=args.k, device=args.device)
    fast_s = time.perf_counter() - t0
    by_weights = {tuple(float(x) for x in r["weights"]): r for r in rows}

    rng = np.random.default_rng(1)
    sample = vectors if args.naive_sample == 0 else [vectors[i] for i in rng.choice(
        len(vectors), size=min(args.naive_sample, len(vectors)), replace=False)]
    # The naive method as the reference study ran it: concat + exact search per vector
    # (faiss IndexFlatIP on the CPU, torch matmul + topk on CUDA).
    backend = default_backend(args.device)
    keys = ("map@k", "map@k_hits", "map@r", "p@1")
    max_diff = 0.0
    naive_rows = []
    t0 = time.perf_counter()
    for v in sample:
        naive = evaluate(weighted_concat(embeddings, v), labels, args.k, backend=backend)
        naive_rows.append(naive)
        max_diff = max(max_diff, *(abs(naive[key] - by_weights[tuple(v)][key]) for key in keys))
    naive_per_vector = (time.perf_counter() - t0) / len(sample)
    # Both sides rank in float32, so a near-tie can flip on either; a float64 ranking says which is right.
    truth_gap = {"grid_sweep": 0.0, "naive": 0.0}
    for v, naive in zip(sample, naive_rows):
        truth = float64_map(embeddings, labels, v, args.k)
        truth_gap["grid_sweep"] = max(truth_gap["grid_sweep"], abs(by_weights[tuple(v)]["map@k"] - truth))
        truth_gap["naive"] = max(truth_gap["naive"], abs(naive["map@k"] - truth))
    naive_total = naive_per_vector * len(vectors)

    result = {
        "benchmark": "sweep",
        "machine": f"{platform.machine()} {os.cpu_count()} cores" + (f", {args.device}" if args.device else ""),
        "n_items": args.n, "n_classes": args.classes, "k": args.k, "dims": list(DIMS),
        "weight_vectors": len(vectors), "ratio_classes": len({r["ratio"] for r in rows}),
        "grid_sweep_s": round(fast_s, 2),
        "naive_s_per_vector": round(naive_per_vector, 3),
        "naive_vectors_timed": len(sample),
        "naive_total_s": round(naive_total, 1),
        "speedup": round(naive_total / fast_s, 1),
        "max_abs_metric_diff": max_diff,
        "max_abs_map_diff_from_float64_truth": truth_gap,
        "best": {"weights": rows[0]["weights"], "map@k": rows[0]["map@k"]},
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
