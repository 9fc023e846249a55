"""Benchmark: extraction and evaluation through Ray (a local cluster of CPU nodes) against the local executor's
code on the same images, so the engine's overhead is known.

    python -m bench.bench_ray [--images 2000] [--models a,b] [--nodes 2] [--cpus-per-node 2] [--k 10]
                            [--shard-size 512] [--workspace DIR] [--json-out bench/results/ray_cpu.json]

The images are the first `--images` of the offline demo's eval split. Local: `extract_embeddings` in this
process, then `per_query_scores`. Ray: a `ray.cluster_utils.Cluster` of `--nodes` nodes on this machine,
`extract_on_ray` into an empty cache (timed from the call to the last shard committed and assembled, so actor
start and model loading are in it; the time to the first committed shard is reported apart), then
`scores_on_ray` on the local embeddings. Both sides run on the same cores: on one machine Ray can only add
overhead, and the ratio says how much; the gain comes from nodes with cores (or GPUs) of their own, which
this benchmark cannot show. Embeddings are compared (max |difference|) and metrics must be identical.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_extraction import demo_subset
from bench.machine import cpu_name, timed, write_result
from core.cache import EmbeddingCache
from core.extract import DEFAULT_SHARD_SIZE, extract_embeddings
from core.metrics import per_query_scores
from core.models import DEMO_MODELS
from core.progress import Reporter
from core.ray_executor import connect, extract_on_ray, ray_module, scores_on_ray
from core.workspace import Workspace

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="demo eval images (default 2000)")
    parser.add_argument("--models", default=",".join(DEMO_MODELS))
    parser.add_argument("--nodes", type=int, default=2, help="local Ray nodes (default 2)")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs each node offers (default 2)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    parser.add_argument("--workspace", default=None, help="where the demo images live (default: a temp folder)")
    parser.add_argument("--json-out", default=str(RESULTS / "ray_cpu.json"))
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    workspace = Workspace.open(args.workspace or os.path.join(tempfile.gettempdir(), "ensemble-bench-workspace"))
    imageset = demo_subset(workspace, args.images)
    ray = ray_module()
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": args.cpus_per_node, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(num_cpus=args.cpus_per_node)
    connect(cluster.address)
    try:
        with tempfile.TemporaryDirectory() as folder:
            local_cache, ray_cache = EmbeddingCache(Path(folder) / "local"), EmbeddingCache(Path(folder) / "ray")
            local, local_s = timed(lambda: extract_embeddings(imageset, models, local_cache, device="cpu",
                                                              shard_size=args.shard_size))
            first_shard: list[float] = []
            started = time.perf_counter()
            reporter = Reporter(on_progress=lambda f, m: first_shard.append(time.perf_counter() - started)
                                if "on Ray" in m and not first_shard else None)
            on_ray, ray_s = timed(lambda: extract_on_ray(imageset, models, ray_cache, device="cpu", reporter=reporter,
                                                         shard_size=args.shard_size))
            evaluation = {}
            for name in models:
                embeddings = np.array(local[name].load())
                mine, local_eval_s = timed(lambda: per_query_scores(embeddings, imageset.labels, args.k))
                (theirs,), ray_eval_s = timed(lambda: scores_on_ray([embeddings], imageset.labels, args.k))
                evaluation[name] = {
                    "local_s": round(local_eval_s, 3), "ray_s": round(ray_eval_s, 3),
                    "ray_over_local": round(ray_eval_s / local_eval_s, 2),
                    "metrics_identical": mine.summary() == theirs.summary(),
                    "max_abs_embedding_difference": float(np.abs(np.asarray(on_ray[name].load()) - embeddings).max()),
                }
    finally:
        ray.shutdown()
        cluster.shutdown()
    import faiss
    result = {
        "benchmark": "ray", "device": "cpu", "device_name": cpu_name(), "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "versions": {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "faiss": faiss.__version__},
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.bench_ray", *(sys.argv[1:] if argv is None else argv)]),
        "cluster": {"nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "machines": 1},
        "images": len(imageset), "models": models, "shard_size": args.shard_size, "k": args.k,
        "extraction": {"local_s": round(local_s, 2), "ray_s": round(ray_s, 2),
                       "ray_over_local": round(ray_s / local_s, 2),
                       "ray_first_shard_s": round(first_shard[0], 2) if first_shard else None,
                       "local_images_per_s": round(len(imageset) / local_s, 1),
                       "ray_images_per_s": round(len(imageset) / ray_s, 1)},
        "evaluation": evaluation,
    }
    write_result(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
