"""Benchmark: extract_embeddings throughput vs a plain per-image loop (and vs the model-only ceiling on CUDA).

    python bench/bench_extraction.py [--device cpu|cuda] [--n-images 256] [--model tf_efficientnet_lite0]
                                     [--batch-size 64] [--num-workers 0] [--json-out result.json]

Both sides run in this process on the same images and model, so the ratio holds on a noisy machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


import torch

from core.cache import EmbeddingCache
from core.datasets import open_demo
from core.devices import resolve_device
from core.extract import extract_embeddings
from core.models import load_model
from core.workspace import Workspace


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def plain_loop(imageset, model_name: str, device: str) -> float:
    """What a first script does: load the model, then open, preprocess, forward one image at a time (fp32).
    Model loading is timed on both sides, since extract_embeddings loads its models itself. Returns images/s."""
    start = time.perf_counter()
    model = load_model(model_name, device)
    with torch.inference_mode():
        for row in range(len(imageset)):
            x = model.preprocess(imageset.load_image(row))[None].to(device)
            model.embed(x).cpu()
    _sync(device)
    return len(imageset) / (time.perf_counter() - start)


def pipeline(imageset, model_name: str, device: str, batch_size: int, num_workers: int) -> float:
    with tempfile.TemporaryDirectory() as folder:  # empty cache: measure extraction, not a cache hit
        start = time.perf_counter()
        extract_embeddings(imageset, [model_name], EmbeddingCache(folder), device=device,
                           batch_size=batch_size, num_workers=num_workers)
        _sync(device)
        return len(imageset) / (time.perf_counter() - start)


def model_ceiling(model, device: str, batch_size: int, n_batches: int = 20) -> float:
    """Pre-made random batches already on the GPU, bf16 autocast, channels_last: the model alone."""
    size = model.preprocess(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (64, 64))).shape
    batch = torch.randn(batch_size, *size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model.embed(batch)
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            model.embed(batch)
        _sync(device)
    return batch_size * n_batches / (time.perf_counter() - start)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--n-images", type=int, default=None,
                        help="default 1024 on CUDA, 128 on CPU (keeps a 2-core run near 3 minutes)")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--workspace", default=None, help="where the demo images live (default: a temp folder)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    args.n_images = args.n_images or (1024 if device.startswith("cuda") else 128)
    workspace = Workspace.open(args.workspace or os.path.join(tempfile.gettempdir(), "ensemble-bench-workspace"))
    per_class = max(1, -(-args.n_images // 10))
    imageset = open_demo(workspace, eval_per_class=per_class, train_per_class=0)
    rows = list(range(min(args.n_images, len(imageset))))
    from core.datasets import ImageSet
    imageset = ImageSet(imageset.name, tuple(imageset.paths[r] for r in rows), imageset.labels[rows],
                        imageset.class_names, imageset.splits[rows], f"{imageset.fingerprint}-{len(rows)}")

    model = load_model(args.model, device)
    # Warm-up both paths (file cache, allocator, cudnn autotune for both batch shapes, thread pools).
    warm = ImageSet(imageset.name, imageset.paths[:args.batch_size], imageset.labels[:args.batch_size],
                    imageset.class_names, imageset.splits[:args.batch_size], imageset.fingerprint + "-warm")
    plain_loop(ImageSet(warm.name, warm.paths[:4], warm.labels[:4], warm.class_names, warm.splits[:4], "w4"),
               args.model, device)
    pipeline(warm, args.model, device, args.batch_size, args.num_workers)
    loop_ips = plain_loop(imageset, args.model, device)
    pipe_ips = pipeline(imageset, args.model, device, args.batch_size, args.num_workers)
    result = {
        "benchmark": "extraction", "model": args.model, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "n_images": len(imageset), "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "plain_loop_images_per_s": round(loop_ips, 2),
        "pipeline_images_per_s": round(pipe_ips, 2),
        "ratio_pipeline_over_loop": round(pipe_ips / loop_ips, 3),
    }
    if device.startswith("cuda") and model.is_torch_module:
        ceiling = model_ceiling(model, device, args.batch_size)
        result["model_only_ceiling_images_per_s"] = round(ceiling, 2)
        result["ratio_pipeline_over_ceiling"] = round(pipe_ips / ceiling, 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
