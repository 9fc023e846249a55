"""Benchmark: how long a first look at the offline demo takes, from an empty workspace to a full leaderboard.

    python bench/bench_demo.py [--dataset demo|demo-small] [--workspace EMPTY_DIR] [--timeout 3600]
                               [--extraction-json bench/results/extraction_cpu.json] [--json-out FILE]

Queues whatever `core.configs.demo_jobs(dataset)` returns into a new workspace, starts a real worker
(`python -m core worker --workspace W`) and waits until every queued job has ended, polling the runs DB.
Every time is measured from the worker's start (its imports and model loading included) to the moment the
runs DB recorded it:
  - first leaderboard row: the first finished evaluate run with a result on the eval split;
  - four singles + ensemble: every demo model scored alone, and an ensemble (the first one chosen without
    the eval split when the demo makes one, else the first oracle);
  - whole demo: the last queued job done.
Each model's pipeline/ceiling ratio comes from bench_extraction's JSON when it exists. Results go to
bench/results/<dataset>_cpu.json (demo_cpu.json for the full demo), with a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from sqlalchemy import select

from core import db
from core.configs import DEFAULT_K, DEMO_MODELS, demo_jobs
from core.jobs import CANCELLED, DONE, FAILED
from core.leaderboard import entries_for_dataset, headline
from core.workspace import Workspace
from bench.machine import cpu_name, write_result

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ENDED = (DONE, FAILED, CANCELLED)


def empty_workspace(path: str | None) -> tuple[Workspace, bool]:
    """(workspace, whether this script made it and removes it). A given folder must be empty or absent."""
    if path is None:
        return Workspace.open(tempfile.mkdtemp(prefix="ensemble-demo-bench-")), True
    folder = Path(path)
    if folder.exists() and any(folder.iterdir()):
        raise SystemExit(f"{folder} is not empty; the demo benchmark starts from an empty workspace. "
                         "Give a new or empty folder, or leave --workspace out for a temporary one.")
    return Workspace.open(folder), False


def ratios(extraction_json: Path) -> dict[str, float]:
    """Each model's pipeline/ceiling ratio from bench_extraction's JSON; {} when it is absent or older."""
    try:
        models = json.loads(extraction_json.read_text()).get("models", {})
        return {name: row["ratio_pipeline_over_ceiling"] for name, row in models.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def wait_for_jobs(engine, job_ids: list[int], worker: subprocess.Popen, timeout: float, poll: float,
                  started: float) -> dict[int, str]:
    """Poll the jobs table until every job has ended, the worker died or `timeout` passed; their statuses."""
    while True:
        with db.read_session(engine) as session:
            statuses = dict(session.execute(select(db.Job.id, db.Job.status).where(db.Job.id.in_(job_ids))).all())
        if all(status in ENDED for status in statuses.values()):
            return statuses
        if worker.poll() is not None:
            print(f"the worker exited with code {worker.returncode} before the demo finished", file=sys.stderr)
            return statuses
        if time.monotonic() - started > timeout:
            print(f"stopped waiting after {timeout:.0f} s", file=sys.stderr)
            return statuses
        time.sleep(poll)


def stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)  # the worker finishes or hands back its job, then exits
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def since(moment: dt.datetime | None, start: dt.datetime) -> float | None:
    return None if moment is None else round((moment - start).total_seconds(), 1)


def milestones(engine, start: dt.datetime) -> dict:
    """Seconds from the worker's start to each milestone, from the runs' recorded finish times."""
    with db.read_session(engine) as session:
        runs = session.scalars(select(db.Run).where(db.Run.status == "done")).all()
        # (finished, run kind, result kind, models, chosen on) of every result on the eval split
        scored = [(run.finished, run.kind, result.kind, tuple(result.models or ()), result.selected_on)
                  for run in runs for result in run.results if result.split == "eval"]
    first_row = min((finished for finished, run_kind, *_ in scored if run_kind == "evaluate"), default=None)
    single_done: dict[str, dt.datetime] = {}
    for finished, _, kind, models, _ in scored:
        if kind == "single" and len(models) == 1:
            single_done[models[0]] = min(finished, single_done.get(models[0], finished))
    ensembles = [(finished, chosen_on) for finished, _, kind, _, chosen_on in scored if kind != "single"]
    honest = min((finished for finished, chosen_on in ensembles if chosen_on != "eval"), default=None)
    oracle = min((finished for finished, chosen_on in ensembles if chosen_on == "eval"), default=None)
    ensemble, ensemble_kind = (honest, "chosen without eval") if honest else (oracle, "oracle (tuned on eval)")
    all_singles = max(single_done.values()) if set(DEMO_MODELS) <= set(single_done) else None
    both = max(all_singles, ensemble) if all_singles and ensemble else None
    return {
        "first_leaderboard_row_s": since(first_row, start),
        "all_single_models_s": since(all_singles, start),
        "single_model_s": {model: since(single_done.get(model), start) for model in DEMO_MODELS},
        "first_ensemble_chosen_without_eval_s": since(honest, start),
        "first_oracle_ensemble_s": since(oracle, start),
        "singles_and_ensemble_s": since(both, start),
        "ensemble_counted": ensemble_kind if ensemble else None,
    }


def job_timeline(engine, job_ids: list[int], start: dt.datetime) -> list[dict]:
    with db.read_session(engine) as session:
        jobs = session.scalars(select(db.Job).where(db.Job.id.in_(job_ids)).order_by(db.Job.id)).all()
        return [{"id": job.id, "kind": job.kind, "models": list(job.params.get("models", [])),
                 "status": job.status, "started_s": since(job.started, start),
                 "finished_s": since(job.finished, start),
                 "seconds": since(job.finished, job.started) if job.started else None,
                 "error": job.error} for job in jobs]


def leaderboard(engine, dataset: str) -> dict:
    """The demo's headline at k=DEFAULT_K (map@k), to compare with earlier runs of the demo."""
    with db.read_session(engine) as session:
        found = session.scalars(select(db.Dataset).where(db.Dataset.source == dataset)).first()
        fingerprint = found.fingerprint if found else None
    if fingerprint is None:
        return {}
    entries = entries_for_dataset(engine, fingerprint)
    head = headline(entries, DEFAULT_K)
    singles = {e.label: round(e.score(), 4) for e in entries if e.kind == "single" and e.k == DEFAULT_K}
    best = {role: {"method": e.label, "map@k": round(e.score(), 4)} if e else None
            for role, e in (("best_single", head.best_single), ("best_ensemble", head.best_ensemble),
                            ("best_oracle", head.best_oracle))}
    return {"k": DEFAULT_K, "single_map@k": singles, **best}


def minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.0f} s ({int(seconds // 60)}:{int(seconds % 60):02d})"


def markdown(result: dict) -> str:
    m = result["milestones"]
    lines = [f"Demo ({result['dataset']}) on {result['device_name']}, {result['cpu_count']} CPUs, "
             f"from the worker's start:", "", "| milestone | time |", "|---|---|",
             f"| first leaderboard row | {minutes(m['first_leaderboard_row_s'])} |",
             f"| all four single models | {minutes(m['all_single_models_s'])} |",
             f"| four singles + an ensemble ({m['ensemble_counted'] or 'none yet'}) | "
             f"{minutes(m['singles_and_ensemble_s'])} |",
             f"| whole demo ({len(result['jobs'])} jobs) | {minutes(result['whole_demo_s'])} |", "",
             "| model | scored alone at | map@k | pipeline/ceiling |", "|---|---|---|---|"]
    singles = result["leaderboard"].get("single_map@k", {})
    for model in DEMO_MODELS:
        ratio = result["pipeline_over_ceiling"].get(model)
        lines.append(f"| {model} | {minutes(m['single_model_s'][model])} | {singles.get(model, '—')} | "
                     f"{'—' if ratio is None else f'{ratio:.0%}'} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="demo", choices=["demo", "demo-small"])
    parser.add_argument("--workspace", default=None, help="an empty or new folder (default: a temporary one, removed)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the whole demo")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between looks at the jobs table")
    parser.add_argument("--extraction-json", default=str(RESULTS / "extraction_cpu.json"))
    parser.add_argument("--json-out", default=None, help="default bench/results/<dataset>_cpu.json")
    args = parser.parse_args(argv)

    # The workspace's own SQLite file for this process and the worker, whatever the environment points at.
    os.environ.pop("ENSEMBLE_DB_URL", None)
    workspace, temporary = empty_workspace(args.workspace)
    engine = db.make_engine(workspace.db_url)
    db.init_db(engine)
    job_ids = [config.submit(engine).id for config in demo_jobs(args.dataset)]
    log_path = workspace.root / "worker.log"
    try:
        with open(log_path, "wb") as log:
            start = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)  # naive UTC, as the runs DB stores
            started = time.monotonic()
            worker = subprocess.Popen([sys.executable, "-m", "core", "worker", "--workspace", str(workspace.root)],
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                statuses = wait_for_jobs(engine, job_ids, worker, args.timeout, args.poll, started)
            finally:
                stop(worker)
        timeline = job_timeline(engine, job_ids, start)
        finished = [job["finished_s"] for job in timeline]
        result = {
            "benchmark": "demo", "dataset": args.dataset, "device_name": cpu_name(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads_default": torch.get_num_threads(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "all_jobs_done": all(statuses.get(i) == DONE for i in job_ids),
            "whole_demo_s": max(finished) if all(statuses.get(i) == DONE for i in job_ids) else None,
            "milestones": milestones(engine, start),
            "jobs": timeline,
            "leaderboard": leaderboard(engine, args.dataset),
            "pipeline_over_ceiling": ratios(Path(args.extraction_json)),
        }
        if not result["all_jobs_done"]:
            print(f"not every job finished; the worker's log:\n{log_path.read_text()[-4000:]}", file=sys.stderr)
    finally:
        engine.dispose()
        if temporary:
            shutil.rmtree(workspace.root, ignore_errors=True)
    write_result(result, args.json_out or RESULTS / f"{args.dataset}_cpu.json", markdown(result))
    return result


if __name__ == "__main__":
    main()
