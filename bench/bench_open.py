"""Benchmark: opening a 60,000-image dataset, without and with the probes kept in the workspace.

On the synthetic study's images (bench/synthetic_study.py: 50,000 eval and 10,000 train small JPEGs,
written first if the workspace lacks them): the first open hashes and verifies every file, as every open
did before the workspace kept its probes; the next ones read only the files' stat. The files are in the
page cache for both (written or read just before), so this is the CPU's cost, not the disk's.

    python bench/bench_open.py --workspace /tmp/syn50k --json-out bench/results/open_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import time
from pathlib import Path

from bench.machine import cpu_name, write_result
from bench.synthetic_study import build
from core.datasets import open_dataset
from core.workspace import Workspace


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    source = build(args.workspace)
    workspace = Workspace.open(args.workspace)
    seconds = []
    for repeat in range(args.repeats):
        shutil.rmtree(workspace.probes)  # the first open of each pair probes every file
        for _ in range(2):
            t0 = time.perf_counter()
            imageset = open_dataset(source, workspace)
            seconds.append(time.perf_counter() - t0)
    probing, cached = sorted(seconds[0::2]), sorted(seconds[1::2])
    result = {
        "benchmark": "open",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "cpu": cpu_name(),
        "images": len(imageset), "repeats": args.repeats,
        "probing_every_file_s": [round(s, 2) for s in probing],
        "with_kept_probes_s": [round(s, 2) for s in cached],
        "median_speedup": round(probing[len(probing) // 2] / cached[len(cached) // 2], 1),
    }
    if args.json_out:
        write_result(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
