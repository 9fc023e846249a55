"""Benchmark: each demo model's model-only throughput per backend (the ceiling) against extraction end to end.

    python bench/bench_extraction.py [--images 512] [--batch-size 64] [--threads 2] [--models a,b]
                                     [--backends eager,channels_last,onnxruntime] [--compile]
                                     [--num-workers 0,1] [--device cpu] [--workspace DIR] [--json-out FILE]

For every model: `embed_batch` on one real preprocessed batch, warm, once per backend (the same number of
images as the pipeline run); the registry's choice (`cpu_backend_for`) is the ceiling. Then
`extract_embeddings` on the same images from an empty embedding set, timed from the moment the model is loaded
to the last shard committed (decode, preprocessing, the model's first cold batch and the rest, cache writes),
once per `--num-workers` value.
Preprocessing alone is timed too: the batched transform against timm's PIL transform image by image.
Everything runs in this process on the same images, so the ratios hold on a noisy machine; the absolute
numbers need a quiet one. `--compile` adds torch.compile of the channels_last module (it compiles for
minutes on 2 cores). On CUDA the only backend is the torch module with bf16 autocast.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core.cache import EmbeddingCache
from core.datasets import ImageSet, open_demo, open_image_folder
from core.devices import resolve_device
from core.extract import EXPORTS_FOLDER, embed_batch, extract_embeddings
from core.models import (CPU_BACKENDS, DEMO_MODELS, PACKAGED, OnnxCfg, TimmBatchTransform, cpu_backend_for,
                         load_model, rgb_array)
from core.progress import Reporter
from core.workspace import Workspace
from bench.machine import cpu_name, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def first_rows(imageset: ImageSet, n_images: int) -> ImageSet:
    """The first `n_images` rows of `imageset`, as their own set."""
    rows = np.arange(min(n_images, len(imageset)))
    return ImageSet(imageset.name, tuple(imageset.paths[r] for r in rows), imageset.labels[rows],
                    imageset.class_names, imageset.splits[rows], f"{imageset.fingerprint}-first{len(rows)}")


def demo_subset(workspace: Workspace, n_images: int) -> ImageSet:
    """The first `n_images` rows of the demo's eval split (all classes), as their own set."""
    return first_rows(open_demo(workspace, eval_per_class=max(1, math.ceil(n_images / 10)), train_per_class=0),
                      n_images)


def model_only(model, batch: torch.Tensor, device: str, n_batches: int) -> float:
    """Images/s of `embed_batch` alone on one ready batch (already on the device), after one warm-up call."""
    batch = batch.to(device)
    with torch.inference_mode():
        embed_batch(model, batch, device)
        _sync(device)
        started = time.perf_counter()
        for _ in range(n_batches):
            embed_batch(model, batch, device)
        _sync(device)
    return len(batch) * n_batches / (time.perf_counter() - started)


def compiled_only(name: str, batch: torch.Tensor, n_batches: int) -> dict:
    model = load_model(name, "cpu", cpu_backend="channels_last")
    embed = torch.compile(model.embed)
    with torch.inference_mode():
        started = time.perf_counter()
        embed(batch)
        compile_s = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(n_batches):
            embed(batch)
    return {"images_per_s": round(len(batch) * n_batches / (time.perf_counter() - started), 2),
            "compile_s": round(compile_s, 1)}


def preprocessing(model, images: list[np.ndarray]) -> dict:
    """ms per image of the model's batched transform, and of timm's PIL transform image by image."""
    from PIL import Image
    result = {}
    started = time.perf_counter()
    model.batch_transform(images)
    result["batched_ms_per_image"] = round(1e3 * (time.perf_counter() - started) / len(images), 3)
    if isinstance(model.batch_transform, TimmBatchTransform):
        pil_transform = model.batch_transform.pil_transform
        started = time.perf_counter()
        torch.stack([pil_transform(Image.fromarray(image)) for image in images])
        result["pil_per_image_ms_per_image"] = round(1e3 * (time.perf_counter() - started) / len(images), 3)
    return result


def pipeline(imageset: ImageSet, name: str, cache: EmbeddingCache, device: str, batch_size: int,
             num_workers: int, decoder: str = "pil") -> dict:
    """extract_embeddings from an empty set (force): images/s after the model is loaded, and with loading."""
    loaded_at: list[float] = []
    reporter = Reporter(on_progress=lambda f, m: loaded_at.append(time.perf_counter()) if m.startswith("loaded ")
                        else None)
    started = time.perf_counter()
    extract_embeddings(imageset, [name], cache, device=device, batch_size=batch_size, num_workers=num_workers,
                       reporter=reporter, force=True, decoder=decoder)
    _sync(device)
    ended = time.perf_counter()
    return {"images_per_s": round(len(imageset) / (ended - loaded_at[-1]), 2),
            "with_load_images_per_s": round(len(imageset) / (ended - started), 2),
            "load_s": round(loaded_at[-1] - started, 2)}


def backends_for(name: str, device: str, wanted: list[str]) -> list[str]:
    """The backends to time: those asked for that apply, always with the registry's choice (the ceiling)."""
    if device.startswith("cuda"):
        return ["cuda"]
    if isinstance(PACKAGED.get(name), OnnxCfg):
        return ["onnxruntime"]  # a graph, not a torch module: nothing else to try
    return [b for b in CPU_BACKENDS if b in wanted or b == cpu_backend_for(name)]


def measure_model(name: str, imageset: ImageSet, images: list[np.ndarray], args, device: str,
                  cache: EmbeddingCache) -> dict:
    export_dir = Path(cache.root) / EXPORTS_FOLDER  # the folder extraction uses: the pipeline reuses the export
    n_batches = math.ceil(len(imageset) / args.batch_size)
    row: dict = {"backends": {}}
    chosen = "cuda" if device.startswith("cuda") else cpu_backend_for(name)
    sample = images[:args.batch_size]
    for backend in backends_for(name, device, args.backends):
        started = time.perf_counter()
        model = load_model(name, device, cpu_backend=None if backend == "cuda" else backend, export_dir=export_dir)
        load_s = time.perf_counter() - started
        batch = model.batch_transform(sample)
        row["backends"][backend] = {"images_per_s": round(model_only(model, batch, device, n_batches), 2),
                                    "load_s": round(load_s, 2)}
        print(f"{name}: {backend} {row['backends'][backend]['images_per_s']} img/s", flush=True)
    if args.compile and not device.startswith("cuda") and not isinstance(PACKAGED.get(name), OnnxCfg):
        row["backends"]["torch.compile"] = compiled_only(name, batch, n_batches)
    row["preprocessing"] = preprocessing(model, sample)
    row["chosen"] = chosen
    row["fastest"] = max(row["backends"], key=lambda b: row["backends"][b]["images_per_s"])
    ceiling = row["backends"][chosen]["images_per_s"]
    row["ceiling_images_per_s"] = ceiling
    row["pipeline"] = {}
    for decoder in args.decoders:
        for workers in args.num_workers:
            result = pipeline(imageset, name, cache, device, args.batch_size, workers, decoder)
            result["ratio_to_ceiling"] = round(result["images_per_s"] / ceiling, 3)
            label = f"num_workers={workers}" if args.decoders == ["pil"] else f"{decoder} decoder, num_workers={workers}"
            row["pipeline"][label] = result
            print(f"{name}: pipeline {label} {result['images_per_s']} img/s "
                  f"({result['ratio_to_ceiling']:.0%} of {ceiling})", flush=True)
    first = next(iter(row["pipeline"].values()))
    row["pipeline_images_per_s"] = first["images_per_s"]
    row["ratio_pipeline_over_ceiling"] = first["ratio_to_ceiling"]
    return row


def markdown(result: dict) -> str:
    backends = sorted({b for row in result["models"].values() for b in row["backends"]}, key=str)
    workers = [w for w in next(iter(result["models"].values()))["pipeline"]]
    head = ["model", *backends, "chosen", *[f"pipeline {w}" for w in workers]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in result["models"].items():
        cells = [name, *[str(row["backends"].get(b, {}).get("images_per_s", "")) for b in backends], row["chosen"]]
        cells += [f"{row['pipeline'][w]['images_per_s']} ({row['pipeline'][w]['ratio_to_ceiling']:.0%})"
                  for w in workers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="demo eval images per measurement (default 512)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch (and ONNX Runtime) threads (default: torch's)")
    parser.add_argument("--models", default=",".join(DEMO_MODELS))
    parser.add_argument("--backends", default=",".join(CPU_BACKENDS), help="CPU backends to try")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling)")
    parser.add_argument("--num-workers", default="0,1", help="DataLoader workers for the pipeline runs; the "
                        "first is the ratio reported (extraction jobs run with 0)")
    parser.add_argument("--decoders", default="pil", help="pipeline decoders to time (core.decode): pil, tensor "
                        "(JPEGs decoded on the device) or both, comma-separated")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--folder", default=None, help="an ImageFolder to read (e.g. bench/imagenet_like.py's "
                        "JPEGs) instead of the demo's images; its first --images files")
    parser.add_argument("--workspace", default=None, help="where the demo images live (default: a temp folder)")
    parser.add_argument("--json-out", default=None, help="default bench/results/extraction_<device>.json")
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    args.num_workers = [int(w) for w in args.num_workers.split(",")]
    args.decoders = [d for d in args.decoders.split(",") if d]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    workspace = Workspace.open(args.workspace or os.path.join(tempfile.gettempdir(), "ensemble-bench-workspace"))
    imageset = (first_rows(open_image_folder(args.folder), args.images) if args.folder
                else demo_subset(workspace, args.images))
    images = [rgb_array(imageset.load_image(row)) for row in range(min(len(imageset), args.batch_size))]
    try:
        import onnxruntime
    except ImportError:  # the lent GPU machines have none; on CUDA every model runs in torch
        onnxruntime = None
    result = {
        "benchmark": "extraction", "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu_name(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__ if onnxruntime else None, "images_from": args.folder or "demo",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "images": len(imageset), "batch_size": args.batch_size, "models": {},
    }
    with tempfile.TemporaryDirectory() as folder:
        cache = EmbeddingCache(folder)
        for name in [m for m in args.models.split(",") if m]:
            result["models"][name] = measure_model(name, imageset, images, args, device, cache)
    write_result(result, args.json_out or RESULTS / f"extraction_{'cuda' if device.startswith('cuda') else 'cpu'}.json",
                 markdown(result))
    return result


if __name__ == "__main__":
    main()
