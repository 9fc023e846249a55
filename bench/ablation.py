"""Ablation on the offline demo: does any fusion beat the weighted concat, honestly?

Every method is fitted or tuned on the demo's TRAIN split (heads early-stop on a stratified
validation part of it; QE/DBA depth and alpha are picked on that validation part) and every number
in the table is measured on the EVAL split (query = each eval image, gallery = the other eval
images, cosine, k=50). The only exception is labelled: the "oracle" concat whose weights were swept
on eval itself, as the reference study did.

    python bench/ablation.py                  # ~10-15 min on 2 CPU cores once embeddings are cached
    python bench/ablation.py --full-grid      # every head kind x out_dim x loss (much longer)
    python bench/ablation.py --synthetic      # the same pipeline on generated arrays, for a dry run

Prints JSON (all rows) and writes a Markdown table (default workspace/bench/ablation.md).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


from core.fusion import (
    AlphaQueryExpansion,
    DatabaseAugmentation,
    MaxSimilarity,
    ReciprocalRank,
    combsum_zscore,
    rank_fusion,
    weighted_concat,
)
from core.selection import check_disjoint, select_concat_weights
from core.heads import HeadConfig, TrainedHead, head_label, stratified_split, train_fusion_head
from core.metrics import depth_needed, evaluate, metrics_from_ranking, relevant_counts

DEMO_MODELS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "open_nsfw_resnet50_thin"]
METRICS = ("map@k", "map@k_hits", "map@r", "p@1")
LOSSES = ("normalized_softmax", "proxy_anchor", "arcface", "multi_similarity")
OUT_DIMS = (512, 1024, 2048)
QE_GRID = [(1, 1.0), (2, 3.0), (3, 3.0), (5, 3.0), (10, 3.0), (20, 3.0)]
# The grid's starting point, pinned here (not HeadConfig's defaults, which this ablation chose).
BASE_HEAD = HeadConfig(kind="mlp", out_dim=512, hidden_dim=1024, dropout=0.1, loss="normalized_softmax",
                       epochs=20, lr=2e-3, batch_size=512, weight_decay=1e-4, patience=5, k=50, seed=0)


def short(name: str) -> str:
    return name.replace("tf_efficientnet_", "").replace("open_nsfw_resnet50_thin", "nsfw-r50thin")


class Table:
    """Rows of the ablation; rewritten to `md_path` after every row, so a stopped run leaves what it measured."""

    def __init__(self, k: int, md_path: Path | None = None, header: str = ""):
        self.k = k
        self.rows: list[dict] = []
        self.md_path, self.header = md_path, header

    def add(self, family: str, method: str, metrics: dict, **extra) -> dict:
        row = {"family": family, "method": method, **{m: float(metrics[m]) for m in METRICS}, **extra}
        self.rows.append(row)
        print(f"  {family:<22} {method:<58} map@k {row['map@k']:.4f}"
              + (f"  (val {extra['val_map@k']:.4f})" if "val_map@k" in extra else ""), flush=True)
        if self.md_path is not None:
            self.md_path.write_text(self.markdown(self.header + "\n\n(partial: run still going)"))
        return row

    def markdown(self, header: str) -> str:
        lines = [header, "", "| family | method | val map@k | map@k | map@k_hits | map@r | p@1 | note |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            val = f"{r['val_map@k']:.4f}" if r.get("val_map@k") is not None else ""
            lines.append(f"| {r['family']} | {r['method']} | {val} | {r['map@k']:.4f} | {r['map@k_hits']:.4f} | "
                         f"{r['map@r']:.4f} | {r['p@1']:.4f} | {r.get('note', '')} |")
        return "\n".join(lines) + "\n"


def tune_reranking(val_x: np.ndarray, val_y: np.ndarray, k: int) -> tuple[tuple[int, float], tuple[int, float]]:
    """(n, alpha) for alpha-QE and for DBA, each picked by map@k on the validation rows only."""
    depth = depth_needed(relevant_counts(val_y), k, len(val_y) - 1)
    qe = max(QE_GRID, key=lambda p: metrics_from_ranking(AlphaQueryExpansion(*p)(val_x, depth), val_y, k)["map@k"])
    dba = max(QE_GRID, key=lambda p: evaluate(DatabaseAugmentation(*p)(val_x), val_y, k)["map@k"])
    return qe, dba


def run_ablation(arrays: list[np.ndarray], names: list[str], labels: np.ndarray, train_rows: np.ndarray,
                 eval_rows: np.ndarray, *, k: int = 50, full_grid: bool = False, epochs: int | None = None,
                 quick: bool = False, table: Table | None = None) -> tuple[Table, dict]:
    check_disjoint(train_rows, eval_rows)
    table = table or Table(k)
    notes: dict = {}
    y_tr, y_ev = labels[train_rows], labels[eval_rows]
    tr = [a[train_rows] for a in arrays]
    ev = [a[eval_rows] for a in arrays]
    depth = depth_needed(relevant_counts(y_ev), k, len(y_ev) - 1)
    # the validation part of train, exactly as train_fusion_head splits it (same labels, fraction, seed)
    _, y_codes = np.unique(y_tr, return_inverse=True)
    _, val_pos = stratified_split(y_codes, BASE_HEAD.val_fraction, BASE_HEAD.seed)
    val_y = y_tr[val_pos]

    print("single models (eval)", flush=True)
    singles = {}
    for name, e in zip(names, ev):
        singles[name] = table.add("single model", short(name), evaluate(e, y_ev, k))
    best_single = max(singles.values(), key=lambda r: r["map@k"])

    print("weighted concat", flush=True)
    t = time.perf_counter()
    table.add("weighted concat", "equal weights, all models", evaluate(weighted_concat(ev, [1] * len(ev)), y_ev, k))
    sel = select_concat_weights(arrays, labels, train_rows, eval_rows, weights=(0, 1, 2, 3, 4, 5), k=k)
    label = lambda w: " + ".join(f"{short(n)}({w_:g})" for n, w_ in zip(names, w) if w_)  # noqa: E731
    concat_sel = table.add("weighted concat", f"grid 0..5 selected on train: {label(sel.selected_weights)}",
                           sel.selected_eval, weights=list(sel.selected_weights), note="weights chosen on train split")
    table.add("weighted concat", f"grid 0..5 ORACLE on eval: {label(sel.oracle_weights)}", sel.oracle_eval,
              weights=list(sel.oracle_weights), note="oracle (tuned on eval)")
    notes["sweep_seconds"] = round(time.perf_counter() - t, 1)

    print("rank / score fusion over all models (eval, nothing fitted)", flush=True)
    table.add("rank fusion", f"result merge (max cosine, top-{2 * depth} per model)",
              metrics_from_ranking(rank_fusion(ev, depth, MaxSimilarity(), depth=2 * depth), y_ev, k))
    table.add("rank fusion", f"reciprocal rank fusion k=60 (top-{2 * depth} per model)",
              metrics_from_ranking(rank_fusion(ev, depth, ReciprocalRank(60), depth=2 * depth), y_ev, k))
    table.add("rank fusion", "CombSUM of z-scored cosines (full gallery)", metrics_from_ranking(combsum_zscore(ev, depth), y_ev, k))

    def train(config: HeadConfig) -> tuple[TrainedHead, dict, float]:
        t0 = time.perf_counter()
        head = train_fusion_head(tr, y_tr, config, eval_embeddings=ev, eval_labels=y_ev,
                                 train_rows=train_rows, eval_rows=eval_rows, model_names=names)
        return head, evaluate(head.embed(ev), y_ev, k), time.perf_counter() - t0

    base = replace(BASE_HEAD, k=k, epochs=epochs or BASE_HEAD.epochs)
    heads: list[tuple[HeadConfig, TrainedHead, dict]] = []

    def add_head(config: HeadConfig, family: str = "fusion head") -> None:
        head, metrics, seconds = train(config)
        heads.append((config, head, metrics))
        table.add(family, head_label(config), metrics, **{"val_map@k": head.best_val},
                  best_epoch=head.best_epoch, epochs_run=len(head.history), seconds=round(seconds, 1),
                  config=config.to_dict(),
                  **({"weights": [round(w, 3) for w in head.module().weights]} if config.kind == "learned_ratio" else {}))

    print("learned concat ratio (train)", flush=True)
    for loss in (LOSSES[:1] if quick else LOSSES):
        add_head(replace(base, kind="learned_ratio", loss=loss, lr=0.05, proxy_lr_multiplier=1.0), "learned ratio")

    print("fusion heads (train; early-stopped on validation; eval reported)", flush=True)
    if full_grid:
        grid = [replace(base, kind=kd, out_dim=d, loss=loss) for kd in ("mlp", "project_concat") for d in OUT_DIMS for loss in LOSSES]
    else:
        # losses compared at mlp-512; then kinds x out_dims with the loss validation liked best
        for loss in (LOSSES[:2] if quick else LOSSES):
            add_head(replace(base, loss=loss))
        fusion_heads = [h for h in heads if h[0].kind != "learned_ratio"]
        best_loss = max(fusion_heads, key=lambda h: h[1].best_val)[0].loss
        notes["loss_chosen_on_validation"] = best_loss
        grid = [replace(base, kind=kd, out_dim=d, loss=best_loss) for kd in ("mlp", "project_concat") for d in OUT_DIMS
                if not (kd == "mlp" and d == 512)]
        if quick:
            grid = grid[:2]
    for config in grid:
        add_head(config)

    fusion_heads = [h for h in heads if h[0].kind != "learned_ratio"]
    chosen_cfg, chosen_head, chosen_metrics = max(fusion_heads, key=lambda h: h[1].best_val)
    notes["default_head_chosen_on_validation"] = chosen_cfg.to_dict()
    notes.setdefault("loss_chosen_on_validation", chosen_cfg.loss)
    table.add("fusion head", f"SELECTED on validation: {head_label(chosen_cfg)}", chosen_metrics,
              **{"val_map@k": chosen_head.best_val}, note="best validation map@k among the heads above")

    print("re-ranking on top of the selected head and the selected concat (params tuned on validation)", flush=True)
    for what, embed_fn in (("selected head", chosen_head.embed),
                           ("selected concat", lambda xs: weighted_concat(xs, sel.selected_weights))):
        val_x = embed_fn([x[val_pos] for x in tr])
        (qn, qa), (dn, da) = tune_reranking(val_x, val_y, k)
        x_ev = embed_fn(ev)
        table.add("re-ranking", f"{what} + alpha-QE (n={qn}, alpha={qa:g})",
                  metrics_from_ranking(AlphaQueryExpansion(qn, qa)(x_ev, depth), y_ev, k))
        table.add("re-ranking", f"{what} + DBA (n={dn}, alpha={da:g})", evaluate(DatabaseAugmentation(dn, da)(x_ev), y_ev, k))
        table.add("re-ranking", f"{what} + DBA + alpha-QE",
                  metrics_from_ranking(AlphaQueryExpansion(qn, qa)(DatabaseAugmentation(dn, da)(x_ev), depth), y_ev, k))

    notes["ordering"] = {
        "best_single": best_single["map@k"], "concat_selected_on_train": concat_sel["map@k"],
        "head_selected_on_validation": chosen_metrics["map@k"],
        "head > concat > single": bool(chosen_metrics["map@k"] > concat_sel["map@k"] > best_single["map@k"]),
    }
    return table, notes


def synthetic(n_per_class: int = 120, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    shared = rng.normal(size=(classes, 32))
    arrays = []
    for d in (96, 64, 48):
        proj = rng.normal(size=(32, d)) / 4
        arrays.append(((shared[labels] + 1.5 * rng.normal(size=(len(labels), 32))) @ proj
                       + rng.normal(size=(len(labels), d))).astype(np.float32))
    splits = rng.permutation(len(labels))
    return arrays, ["syn_a", "syn_b", "syn_c"], labels, np.sort(splits[: len(labels) * 3 // 4]), np.sort(splits[len(labels) * 3 // 4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default="workspace")
    parser.add_argument("--models", nargs="+", default=DEMO_MODELS)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=None, help=f"head epochs (default {BASE_HEAD.epochs}, early-stopped)")
    parser.add_argument("--full-grid", action="store_true", help="every kind x out_dim x loss")
    parser.add_argument("--quick", action="store_true", help="a few heads only (smoke run)")
    parser.add_argument("--synthetic", action="store_true", help="generated arrays instead of the demo")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a busy 2-core box: small steps, no spin-waiting)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--md-out", default=None)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.synthetic:
        arrays, names, labels, train_rows, eval_rows = synthetic()
        source = "synthetic"
    else:
        from core.cache import EmbeddingCache
        from core.datasets import open_dataset
        from core.extract import extract_embeddings
        from core.progress import Reporter
        from core.workspace import Workspace

        workspace = Workspace.open(args.workspace)
        imageset = open_dataset("demo", workspace)
        sets = extract_embeddings(imageset, args.models, EmbeddingCache(workspace.embeddings),
                                  reporter=Reporter(on_progress=lambda f, m: print(f"  {f:.0%} {m}", file=sys.stderr)))
        arrays = [np.asarray(sets[m].load(), dtype=np.float32) for m in args.models]
        names, labels = list(args.models), np.asarray(imageset.labels)
        train_rows, eval_rows = imageset.split("train"), imageset.split("eval")
        source = f"demo {imageset.fingerprint[:12]}"
    print(f"{source}: {len(train_rows)} train rows, {len(eval_rows)} eval rows, models {names}", flush=True)
    md_path = Path(args.md_out or Path(args.workspace) / "bench" / ("ablation-synthetic.md" if args.synthetic else "ablation.md"))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"## Fusion ablation on {source} (eval split, {len(eval_rows)} queries, k={args.k}; "
              "learned things fitted on train, selected on its validation part)")
    table, notes = run_ablation(arrays, names, labels, train_rows, eval_rows, k=args.k, full_grid=args.full_grid,
                                epochs=args.epochs, quick=args.quick, table=Table(args.k, md_path, header))
    notes["seconds"] = round(time.perf_counter() - t0, 1)
    notes["machine"] = f"{platform.processor() or platform.machine()}, torch CPU threads {torch.get_num_threads()}"
    report = {"source": source, "k": args.k, "n_train": int(len(train_rows)), "n_eval": int(len(eval_rows)),
              "models": names, "notes": notes, "rows": table.rows}
    print(json.dumps(report, indent=1, default=str))
    header += (f"\n\nLoss chosen on validation: {notes.get('loss_chosen_on_validation', 'n/a')}. "
               f"Ordering head > concat > single: {notes['ordering']['head > concat > single']}. Took {notes['seconds']} s.")
    md_path.write_text(table.markdown(header))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {md_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
