"""Benchmark: greedy selection + refinement (core.ensemble_search) for many models, and against the grid.

1. Many models: select_weights on synthetic --models models x --n items, timed from the raw
   embeddings (scorer build included). Target: 10 models x 5,000 items in <= 60 s on the 2-core CPU.
2. Four models: the full grid 0..5 (grid_sweep) against greedy + refinement on the same data, both
   scored by WeightedConcatScorer. Target: the selected map@k within 0.002 of the grid's best.
   With --workspace, the same comparison also runs on the train split of the offline demo (--dataset)
   under --demo-models (default: four packaged models; extracted first if the workspace has not cached them).

    python bench/bench_selection.py --json-out bench/results/selection_cpu.json
    python bench/bench_selection.py --workspace workspace --json-out bench/results/selection_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

import numpy as np
import torch

from bench.machine import write_result
from core.ensemble_search import select_weights
from core.models import DEMO_MODELS
from core.sweep import grid_sweep

DIMS = (2048, 2560, 1536, 1024, 768, 1280, 512, 1024, 2048, 384, 1536, 640)


def synthetic_models(n: int, classes: int, models: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """`models` views of the same images: a shared class + per-image latent seen
    through each model's own random projection, with model-specific error growing with its index, so
    models differ in quality and in what they get wrong."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    shared = rng.normal(size=(classes, 64))
    image = rng.normal(size=(len(labels), 64))
    out = []
    for i in range(models):
        d = DIMS[i % len(DIMS)]
        proj = rng.normal(size=(64, d)) / 8
        own = rng.normal(scale=0.6 + 0.1 * i, size=(len(labels), 64))
        noise = rng.normal(scale=0.3, size=(len(labels), d))
        out.append(((shared[labels] + image + own) @ proj + noise).astype(np.float32))
    return out, labels


def _selection(embeddings, labels, args) -> dict:
    t0 = time.perf_counter()
    greedy, refined = select_weights(embeddings, labels, args.k, max_steps=args.max_steps, patience=args.patience,
                                     rounds=args.rounds, device=args.device)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "greedy": {"weights": greedy.weights, "map@k": greedy.map_at_k, "steps": len(greedy.path),
                   "vectors_scored": greedy.n_scored},
        "refined": {"weights": refined.weights, "map@k": refined.map_at_k, "rounds": len(refined.path) - 1,
                    "vectors_scored": refined.n_scored},
        "greedy_path": greedy.path,
        "refine_path": refined.path,
    }


def _against_grid(embeddings, labels, args) -> dict:
    selected = _selection(embeddings, labels, args)
    t0 = time.perf_counter()
    rows = grid_sweep(embeddings, labels, weights=range(6), k=args.k, device=args.device)
    grid_s = time.perf_counter() - t0
    singles = [r for r in rows if sum(1 for w in r["weights"] if w) == 1]
    return {
        "n_items": len(labels), "models": len(embeddings), "dims": [e.shape[1] for e in embeddings],
        "best_single_map@k": max(r["map@k"] for r in singles),
        "grid": {"seconds": round(grid_s, 2), "vectors": len(rows), "weights": rows[0]["weights"],
                 "map@k": rows[0]["map@k"]},
        "selection": selected,
        "grid_minus_selected": rows[0]["map@k"] - selected["refined"]["map@k"],
        "grid_seconds_over_selection_seconds": round(grid_s / selected["seconds"], 1),
        "target_gap": 0.002,
    }


def _demo_train_split(root: str, dataset: str, models: list[str]) -> tuple[list[np.ndarray], np.ndarray, str]:
    """The demo's train rows under each model (where selection runs: weights are chosen on train)."""
    from core.cache import EmbeddingCache
    from core.datasets import open_dataset
    from core.extract import extract_embeddings
    from core.workspace import Workspace

    workspace = Workspace.open(root)
    imageset = open_dataset(dataset, workspace)
    sets = extract_embeddings(imageset, models, EmbeddingCache(workspace.embeddings))
    rows = imageset.split("train")
    embeddings = [np.asarray(sets[m].load(), dtype=np.float32)[rows] for m in models]
    return embeddings, np.asarray(imageset.labels)[rows], f"{dataset} {imageset.fingerprint[:12]}, train split"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="items of the synthetic sets")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--models", type=int, default=10, help="models of the many-model run")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--workspace", default=None, help="also compare on a demo's train split in this workspace")
    p.add_argument("--dataset", default="demo", help="the demo to open there: demo or demo-small")
    p.add_argument("--demo-models", nargs="+", default=list(DEMO_MODELS), help="models for --workspace")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)

    embeddings, labels = synthetic_models(args.n, args.classes, args.models)
    result = {
        "benchmark": "selection",
        "command": " ".join(["python", "bench/bench_selection.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
        "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
        "k": args.k, "max_steps": args.max_steps, "patience": args.patience, "rounds": args.rounds,
        "many_models": {"n_items": len(labels), "models": args.models, "dims": [e.shape[1] for e in embeddings],
                        **_selection(embeddings, labels, args), "target_seconds": 60},
        "four_models_synthetic": _against_grid(embeddings[:4], labels, args),
    }
    if args.workspace:
        embeddings, labels, source = _demo_train_split(args.workspace, args.dataset, args.demo_models)
        result["demo_train_split"] = {"source": source, "model_names": args.demo_models,
                                      **_against_grid(embeddings, labels, args)}
    # Short lists (weights, dims) on one line each, so a path reads as one row per step.
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]",
                  json.dumps(result, indent=2))
    if args.json_out:
        write_result(result, args.json_out, text=text)
    else:
        print(text)
    return result


if __name__ == "__main__":
    main()
