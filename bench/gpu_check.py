"""One script for a lent GPU machine: the CUDA tests, then the GPU benchmarks, then a short table.

    python bench/gpu_check.py --out DIR      (DIR gets gpu_check.json, extraction_gpu.json and the pytest log)

Benchmarks: exact search and the three-sided [1..5]^4 sweep at --n items, and extraction of --extract-images
ImageNet-like JPEGs (bench/imagenet_like.py, 500 x 375) by a ResNet-50 and a ViT-L (random weights: the
speed is the architecture's), model-only ceiling against the pipeline with the PIL decoder and with JPEGs
decoded on the GPU (core.decode). Runs where faiss, SQLAlchemy, Streamlit, plotly and ONNX Runtime are absent
(checked on CPU with them blocked); carry the pytorch-metric-learning wheel for the head-training test.
Tested on CPU with --n 2000 --extract-images 64 --extract-models random:test_efficientnet --skip-tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the device machine runs from a plain copy of the tree, not an installed package


# The test files with `device`-parametrised tests (tests/conftest.py); `-m gpu` picks their CUDA cases.
GPU_TESTS = ("tests/test_metrics.py", "tests/test_sweep.py", "tests/test_extract.py", "tests/test_heads.py",
             "tests/test_decode.py")


def run_tests(out: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS],
                          cwd=ROOT, capture_output=True, text=True)
    (out / "gpu_tests.log").write_text(proc.stdout + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"returncode": proc.returncode, "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}


def time_search(n: int, device: str) -> dict:
    import numpy as np
    import torch

    from bench.bench_sweep import synthetic_models
    from core.fusion import weighted_concat
    from core.search import TorchSearch, top_k

    embeddings, _ = synthetic_models(n, max(1, n // 50))
    x = weighted_concat(embeddings, [1, 1, 1, 1])
    backend = TorchSearch(device)
    top_k(x[:1000], x[:1000], 51, exclude_self=True, backend=backend)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, ids = top_k(x, x, 51, exclude_self=True, backend=backend)
    seconds = time.perf_counter() - t0
    assert not (ids == np.arange(n)[:, None]).any()
    return {"n": n, "dims": int(x.shape[1]), "k": 51, "exact_search_s": round(seconds, 3)}


def time_extraction(n: int, models: str, device: str, out: Path) -> dict:
    from bench.bench_extraction import main as extraction_main
    from bench.imagenet_like import write_imagenet_like

    folder = Path(tempfile.mkdtemp()) / "imagenet-like"
    per_class = max(1, min(50, n // 2))  # at least two classes: retrieval needs them
    write_imagenet_like(folder, classes=-(-n // per_class), per_class=per_class, workers=os.cpu_count() or 1)
    workers = str(min(8, max(1, (os.cpu_count() or 2) - 2)))
    return extraction_main(["--folder", str(folder), "--images", str(n), "--models", models, "--device", device,
                            "--decoders", "pil,tensor", "--num-workers", workers, "--batch-size", "128",
                            "--json-out", str(out / "extraction_gpu.json")])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--naive-sample", type=int, default=3)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--extract-images", type=int, default=4096, help="JPEGs for the extraction check (0: skip it)")
    p.add_argument("--extract-models", default="random:resnet50,random:vit_large_patch16_224")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from bench.bench_sweep import main as sweep_main

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    "torch": torch.__version__}
    steps = [("tests", lambda: run_tests(out))] if not args.skip_tests else []
    steps += [("search", lambda: time_search(args.n, device)),
              ("sweep", lambda: sweep_main(["--sizes", str(args.n), "--naive-sample", str(args.naive_sample),
                                            "--device", device]))]
    if args.extract_images:
        steps.append(("extraction", lambda: time_extraction(args.extract_images, args.extract_models, device, out)))
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            report[name] = step()
        except Exception as exc:  # one failed step must not hide the others' numbers
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{name}] done in {time.perf_counter() - t0:.1f}s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    print("\n| check | result |\n|---|---|")
    print(f"| device | {report['device']} (torch {report['torch']}) |")
    if "tests" in report:
        print(f"| CUDA tests | {report['tests'].get('summary', report['tests'])} |")
    s = report.get("search", {})
    print(f"| exact top-51 search {s.get('n')} x {s.get('dims')}-d fp32 | {s.get('exact_search_s', s)} s |")
    for case in report.get("sweep", {}).get("cases", []):
        print(f"| sweep [1..5]^4, {case.get('models')} models, {case.get('n_items')} items | {case.get('adaptive_s')} s "
              f"vs naive {case.get('naive_total_s')} s ({case.get('speedup_adaptive_vs_naive')}x), max diff "
              f"{case.get('max_abs_metric_diff_from_float64')} |")
    for name, row in report.get("extraction", {}).get("models", {}).items():
        pipelines = ", ".join(f"{label}: {p['images_per_s']} ({p['ratio_to_ceiling']:.0%})"
                              for label, p in row.get("pipeline", {}).items())
        print(f"| extraction {name}, ceiling {row.get('ceiling_images_per_s')} img/s | {pipelines} |")
    failed = [name for name in report if isinstance(report[name], dict) and "error" in report[name]]
    if "tests" in report and report["tests"].get("returncode"):
        failed.append("tests")
    print(f"\nfailed: {', '.join(failed)}" if failed else "\nall passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
