"""One script for a lent GPU machine: the CUDA tests, then the GPU benchmarks, then a short table.

    python bench/gpu_check.py --out DIR      (DIR gets gpu_check.json and the pytest log)

Runs where faiss, SQLAlchemy and Streamlit are absent (the GPU path never imports them); carry the
pytorch-metric-learning wheel for the head-training test. Tested on CPU with --n 2000 --skip-tests.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the device machine runs from a plain copy of the tree, not an installed package


# The test files with `device`-parametrised tests (tests/conftest.py); `-m gpu` picks their CUDA cases.
GPU_TESTS = ("tests/test_metrics.py", "tests/test_sweep.py", "tests/test_extract.py", "tests/test_heads.py")


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--naive-sample", type=int, default=3)
    p.add_argument("--skip-tests", action="store_true")
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
    failed = [name for name in report if isinstance(report[name], dict) and "error" in report[name]]
    if "tests" in report and report["tests"].get("returncode"):
        failed.append("tests")
    print(f"\nfailed: {', '.join(failed)}" if failed else "\nall passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
