"""Command line: python -m core {models,extract,evaluate,sweep,train-head,fuse,report,export,embed,demo,worker,db} --help.

extract / evaluate / sweep / train-head / fuse run the same job handlers as the background worker, in this
process, so a CLI run lands in the runs database exactly as a dashboard run does.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from core import db
from core.configs import (DEFAULT_GRID, DEFAULT_K, DEMO_MODELS, DEMO_SOURCE, FUSE_METHODS, EvaluateConfig,
                          ExtractConfig, FuseConfig, SelectWeightsConfig, SweepConfig, TrainHeadConfig, check_k, demo_jobs,
                          parse_names, parse_numbers)
from core.datasets import PROTOCOL_SPLIT, PROTOCOLS, open_dataset
from core.errors import user_message
from core.export import embed_command, export_result
from core.extract import EXPORTS_FOLDER
from core.heads import HEAD_KINDS, LOSSES
from core.leaderboard import board, entries_for_dataset, headline, headline_text, rows, to_markdown
from core.methods import ORACLE_LABEL
from core.metrics import METRIC_KEYS
from core.models import list_models
from core.progress import Reporter
from core.tasks import run_job
from core.workspace import Workspace


def _open_workspace(args):
    workspace = Workspace.open(args.workspace)
    engine = db.make_engine(args.db_url or workspace.db_url)
    db.init_db(engine)
    return workspace, engine


def _tqdm_reporter():
    bars: list = []  # opened on the first progress report, so an early error prints no empty bar

    def on_progress(fraction: float, message: str) -> None:
        if not bars:
            bars.append(tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {desc}"))
        bars[0].n = int(fraction * 1000)
        bars[0].set_description_str(message[:60], refresh=False)
        bars[0].refresh()

    return Reporter(on_progress=on_progress), bars


def _run(config, args) -> int:
    """Run a job's handler here, as the worker would; its run lands in the same runs DB."""
    workspace, engine = _open_workspace(args)
    reporter, bars = _tqdm_reporter()
    try:
        return run_job(config.kind, config.to_dict(), reporter, workspace, engine)
    finally:
        for bar in bars:
            bar.close()


def _results(run_id: int, args) -> list[dict]:
    _, engine = _open_workspace(args)
    with db.read_session(engine) as session:
        run = db.get_run(session, run_id)
        return [{"method": r.method, "weights": r.weights, "chosen on": r.selected_on, **(r.metrics or {})}
                for r in run.results]


def _print_rows(rows: list[dict], as_json: bool, top: int | None = None) -> None:
    rows = rows[:top] if top else rows
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    print(to_markdown([{key: v for key, v in r.items() if key != "weights" or v} for r in rows]))


def cmd_models(args) -> int:
    models = list_models()
    if args.json:
        print(json.dumps([m.__dict__ for m in models], indent=2))
        return 0
    width = max(len(m.name) for m in models)
    for m in models:
        dim = str(m.dim) if m.dim else "?"
        note = "" if m.availability == "offline" else f"  ({m.how_to_get})"
        print(f"{m.name:<{width}}  {m.availability:<14} {dim:>5}-d  {m.family}{note}")
    return 0


def _common(args) -> dict:
    return {"dataset": args.dataset, "models": parse_names(args.models), "limit_per_class": args.limit_per_class,
            "device": args.device or "auto", "protocol": args.protocol}


def cmd_extract(args) -> int:
    run_id = _run(ExtractConfig(**_common(args), force=args.force), args)
    print(f"extracted; run {run_id}")
    return 0


def cmd_evaluate(args) -> int:
    run_id = _run(EvaluateConfig(**_common(args), k=args.k), args)
    _print_rows(_results(run_id, args), args.json)
    return 0


def cmd_sweep(args) -> int:
    search = {"search": "random", "n_samples": args.random} if args.random else {}
    run_id = _run(SweepConfig(**_common(args), k=args.k, weights=parse_numbers(args.weights), **search), args)
    _print_rows(_results(run_id, args), args.json, args.top)
    return 0


def cmd_train_head(args) -> int:
    head = {key: getattr(args, key) for key in ("kind", "out_dim", "loss", "epochs", "lr")
            if getattr(args, key) is not None}  # unset ones take HeadConfig's measured defaults
    run_id = _run(TrainHeadConfig(**_common(args), k=args.k, head=head), args)
    _print_rows(_results(run_id, args), args.json)
    return 0


def cmd_fuse(args) -> int:
    """Every fusion method from one command: rank fusion and re-ranking (fuse jobs), weights chosen on
    train (select_weights) and learned ratios (a learned_ratio head)."""
    common = {**_common(args), "k": args.k}
    if args.method == "select-weights":
        config = SelectWeightsConfig(**common, **({"weights": parse_numbers(args.weights)} if args.weights else {}))
    elif args.method == "learned-ratio":
        config = TrainHeadConfig(**common, head={"kind": "learned_ratio"})
    else:
        config = FuseConfig(**common, method=args.method, weights=parse_numbers(args.weights) if args.weights else None,
                            n=args.n, alpha=args.alpha)
    _print_rows(_results(_run(config, args), args), args.json)
    return 0


def cmd_report(args) -> int:
    workspace, engine = _open_workspace(args)
    check_k(args.k)
    imageset = open_dataset(args.dataset, workspace, limit_per_class=args.limit_per_class)
    split = PROTOCOL_SPLIT[args.protocol]
    entries = [e for e in entries_for_dataset(engine, imageset.fingerprint, split) if e.k == args.k]
    if not entries:
        print(f"No results at k={args.k} for {imageset.name} ({split}) yet: run `python -m core evaluate` and "
              f"`python -m core sweep` (or `python -m core demo`) first.", file=sys.stderr)
        return 1
    table = rows(board(entries, args.k), workspace=workspace)
    n_queries = entries[0].metrics.get("n_queries", "?")
    print(f"# Ensemble report: {imageset.name}, {split} split ({n_queries} queries), k={args.k}\n")
    print("map@k divides by min(k, R); map@k_hits by the hits in the top k (the reference study's later code); "
          f"map@r uses k = R. Weights marked {ORACLE_LABEL} were swept on the very split they are scored on; "
          "'chosen on' says what every other method was fitted or selected on. Gains are over the best single "
          "model, with a paired 95 % bootstrap interval and a sign-flip p-value over the same queries.\n")
    print(headline_text(headline(entries, args.k, workspace=workspace)) + "\n")
    sections = [("Single models", lambda r: r["type"] == "single")]
    sections += [(f"Best {n}-model concatenations", lambda r, n=n: r["type"] == "concat" and r["n_models"] == n)
                 for n in (2, 3, 4)]
    sections.append(("Trained fusion heads", lambda r: r["type"] == "head"))
    sections.append(("Rank fusion and re-ranking", lambda r: r["type"] in ("rank", "qe", "dba")))
    for title, keep in sections:
        chosen = [r for r in table if keep(r)][:args.top]
        if not chosen:
            continue
        print(f"## {title}\n")
        print(to_markdown([{"method": r["method"], **{key: r[key] for key in METRIC_KEYS},
                            "gain (map@k)": r["gain"], "gain 95% CI": r["gain 95% CI"], "p": r["p"],
                            "chosen on": ORACLE_LABEL if r["oracle"] else r["chosen on"]}
                           for r in chosen]))
        print()
    return 0


def cmd_export(args) -> int:
    _, engine = _open_workspace(args)
    print(f"wrote {export_result(engine, args.result, args.out)}")
    return 0


def cmd_embed(args) -> int:
    workspace = Workspace.open(args.workspace)
    embed_command(args.artifact, args.images, args.out, export_dir=workspace.embeddings / EXPORTS_FOLDER)
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    """Prepare the offline demo (extract, evaluate, sweep): here and now with its report, or queued for the worker."""
    configs = [type(c).from_dict({**c.to_dict(), "device": args.device or "auto"}) for c in demo_jobs()]
    if args.queue:
        _, engine = _open_workspace(args)
        ids = [config.submit(engine).id for config in configs]
        print(f"queued demo jobs {ids}; a worker (python -m core worker) runs them")
        return 0
    for config in configs:
        _run(config, args)
    return cmd_report(argparse.Namespace(**{**vars(args), "dataset": DEMO_SOURCE, "limit_per_class": None,
                                            "k": DEFAULT_K, "top": 5, "protocol": "image"}))


def cmd_db(args) -> int:
    """Upgrade the runs database to this release's schema (the dashboard and workers also do it on opening it)."""
    workspace = Workspace.open(args.workspace)
    engine = db.make_engine(args.db_url or workspace.db_url)
    try:
        upgraded = db.init_db(engine)  # its message, naming the backup, is logged to stderr
        print(f"The runs database {engine.url.render_as_string(hide_password=True)} is at schema "
              f"{db.schema_revision(engine)}{'' if upgraded else ', the newest: nothing to do'}.")
    finally:
        engine.dispose()
    return 0


def cmd_worker(args, rest: list[str]) -> int:
    from core.worker import main  # the worker's own module; imported here only to keep its parser separate

    for flag, value in (("--workspace", args.workspace), ("--db-url", args.db_url)):
        if value and flag not in rest:
            rest = [flag, value, *rest]
    return main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="Ensemble Explorer: does an ensemble of "
                                "image-embedding models retrieve better than the best single model?")
    p.add_argument("--workspace", default=None, help="workspace folder (default $ENSEMBLE_WORKSPACE or ./workspace)")
    p.add_argument("--db-url", default=None, help="SQLAlchemy URL of the runs database (default: SQLite in the workspace)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list the models and whether their weights are available offline")
    m.add_argument("--json", action="store_true")

    def data_args(q, models=True):
        q.add_argument("--dataset", default=DEMO_SOURCE, help='"demo", an ImageFolder path or a CSV manifest')
        if models:
            q.add_argument("--models", default=",".join(DEMO_MODELS),
                           help="comma-separated model names (default: the offline four)")
        q.add_argument("--limit-per-class", type=int, default=None)
        q.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        if models:
            q.add_argument("--protocol", choices=PROTOCOLS, default="image",
                           help="image: the dataset's own train/eval splits; class: train and eval classes disjoint")

    for name, helptext in (("extract", "extract and cache embeddings"),
                           ("evaluate", "score each model alone on the eval split"),
                           ("sweep", "grid-sweep concat weights over every subset"),
                           ("train-head", "train a fusion head on the train split, score on eval"),
                           ("fuse", "run one fusion method (rank fusion, re-ranking, weights chosen on train, learned ratios)")):
        q = sub.add_parser(name, help=helptext)
        data_args(q)
        if name == "extract":
            q.add_argument("--force", action="store_true", help="drop these models' cached embeddings and extract again")
        else:
            q.add_argument("--k", type=int, default=DEFAULT_K)
            q.add_argument("--json", action="store_true")
    sub.choices["sweep"].add_argument("--weights", default=",".join(map(str, DEFAULT_GRID)), help="grid values per model")
    sub.choices["sweep"].add_argument("--top", type=int, default=20, help="rows to print")
    sub.choices["sweep"].add_argument("--random", type=int, default=0, metavar="N",
                                      help="continuous weights instead of the grid: N random points, then refinement")
    fu = sub.choices["fuse"]
    fu.add_argument("--method", required=True, choices=(*FUSE_METHODS, "select-weights", "learned-ratio"),
                    help="rrf / max / combsum: merge the models' result lists; qe / dba: re-rank their concatenation; "
                         "select-weights: concat weights chosen on the train split; learned-ratio: ratios learned on train")
    fu.add_argument("--weights", default=None, help="combsum / qe / dba: one weight per model; select-weights: the grid")
    fu.add_argument("--n", type=int, default=2, help="qe / dba: neighbours averaged in")
    fu.add_argument("--alpha", type=float, default=3.0, help="qe / dba: similarity exponent")
    th = sub.choices["train-head"]
    th.add_argument("--kind", choices=HEAD_KINDS)
    th.add_argument("--out-dim", type=int)
    th.add_argument("--loss", choices=LOSSES)
    th.add_argument("--epochs", type=int)
    th.add_argument("--lr", type=float)

    r = sub.add_parser("report", help="the reference study's tables for a dataset, as Markdown")
    data_args(r, models=False)
    r.add_argument("--k", type=int, default=DEFAULT_K)
    r.add_argument("--top", type=int, default=3, help="rows per table")
    r.add_argument("--protocol", choices=PROTOCOLS, default="image",
                   help="image: the dataset's splits (classes shared); class: results on classes never trained on")

    x = sub.add_parser("export", help="save a stored result (model, concatenation or head) as an ensemble artifact")
    x.add_argument("result", type=int, help="result id (report, Runs page)")
    x.add_argument("--out", required=True, help="artifact folder to write")

    e = sub.add_parser("embed", help="embed images with an exported ensemble artifact")
    e.add_argument("artifact")
    e.add_argument("images", nargs="+")
    e.add_argument("--out", required=True, help=".npy file to write")

    d = sub.add_parser("demo", help="prepare the offline demo (extract, evaluate, sweep) and print its report")
    d.add_argument("--device", default=None)
    d.add_argument("--queue", action="store_true", help="submit the jobs to the worker instead of running them here")

    sub.add_parser("worker", help="run a background worker (python -m core worker --help)", add_help=False)
    b = sub.add_parser("db", help="the runs database: `db upgrade` brings it to this release's schema, "
                                  "keeping every row (a SQLite file is copied beside itself first)")
    b.add_argument("action", choices=["upgrade"])
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "worker" in argv:  # everything after "worker" belongs to the worker's own parser
        at = argv.index("worker")
        args = build_parser().parse_args(argv[:at + 1])
        return cmd_worker(args, argv[at + 1:])
    args = build_parser().parse_args(argv)
    command = {"models": cmd_models, "extract": cmd_extract, "evaluate": cmd_evaluate, "sweep": cmd_sweep,
               "train-head": cmd_train_head, "fuse": cmd_fuse, "report": cmd_report, "export": cmd_export, "embed": cmd_embed,
               "demo": cmd_demo, "db": cmd_db}
    try:
        return command[args.command](args)
    except KeyboardInterrupt:
        print("stopped; nothing half-written was kept", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one clear line, never a traceback (ENSEMBLE_DEBUG=1 shows it)
        if os.environ.get("ENSEMBLE_DEBUG"):
            raise
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
