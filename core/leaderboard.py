"""The leaderboard: every method measured on a dataset's eval split, read from the runs DB and ranked.

A method is a single model, a weighted concatenation (from a sweep or promoted), or a trained fusion
head. Sweep rows enter the board as the best concatenation of each model subset (labelled oracle:
tuned on eval); any sweep row can be *promoted*, which records it in a run of kind "promote" that the
board always shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from sqlalchemy import Engine

from core import db
from core.metrics import METRIC_KEYS

PROMOTE_KIND = "promote"
# Leaderboard columns in the order the dashboard shows them.
# The key columns (what won, by how much) first; the details that identify it after.
COLUMNS = ("method", "type", *METRIC_KEYS, "gain", "gain_%", "models", "n_models", "weights", "oracle",
           "promoted", "run_id", "result_id")


@dataclass(frozen=True)
class Entry:
    """One stored result, in the user's words."""

    result_id: int
    run_id: int
    run_kind: str
    method: str
    kind: str  # "single" | "concat" | "head" | "fusion"
    models: tuple[str, ...]
    weights: tuple[float, ...] | None
    metrics: dict = field(hash=False)
    is_oracle: bool = False
    promoted: bool = False
    head_path: str | None = None
    stored_weights: tuple[float, ...] | None = None  # as recorded (a sweep's (0, 2, 0) stays that, not "model b")

    @property
    def k(self) -> int | None:
        k = self.metrics.get("k")
        return int(k) if k is not None else None

    @property
    def used_models(self) -> tuple[str, ...]:
        """Models that contribute (non-zero weight)."""
        if self.weights is None:
            return self.models
        return tuple(m for m, w in zip(self.models, self.weights) if w)

    @property
    def ratio(self) -> tuple[float, ...] | None:
        if self.weights is None:
            return None
        top = max(self.weights)
        return tuple(round(w / top, 9) for w in self.weights) if top else None

    def score(self, metric: str = "map@k") -> float:
        value = self.metrics.get(metric)
        return float("nan") if value is None else float(value)


def entry_from_result(result: db.Result) -> Entry:
    run = result.run
    extra = dict(result.extra or {})
    kind_of_run = extra.get("source_run_kind", run.kind)
    weights = stored = tuple(float(w) for w in result.weights) if result.weights is not None else None
    models = tuple(extra.get("models") or ())
    head_path = extra.get("head_path")
    if kind_of_run == "train_head" or head_path:
        kind = "head"
    elif kind_of_run == "sweep" or (weights is not None and len(models) > 1 and kind_of_run != "fusion"):
        kind = "concat"
    elif kind_of_run == "fusion":
        kind = "fusion"
    else:
        kind = "single"
        models = models or (result.method,)
    if kind == "concat" and weights is not None and sum(1 for w in weights if w) == 1:
        # A sweep's one-model vector is that model alone.
        kind, models, weights = "single", (models[[i for i, w in enumerate(weights) if w][0]],), None
    method = result.method if kind != "single" else models[0]
    oracle = bool(result.is_oracle) and kind != "single"  # a model alone has no tuned weights
    return Entry(result.id, run.id, run.kind, method, kind, models, weights, dict(result.metrics or {}),
                 oracle, run.kind == PROMOTE_KIND, head_path, stored)


def entries_for_dataset(engine: Engine, fingerprint: str) -> list[Entry]:
    """Every eval-split result of a finished run on this dataset, newest run first."""
    with db.read_session(engine) as session:
        results = db.results_for_dataset(session, fingerprint)
        return [entry_from_result(r) for r in results if r.split == "eval"]


def available_ks(entries: Sequence[Entry]) -> list[int]:
    return sorted({e.k for e in entries if e.k is not None})


def _best(entries: Sequence[Entry], metric: str) -> Entry:
    # Newest first in input; max keeps the first of equals, i.e. the newest.
    return max(entries, key=lambda e: (_finite(e.score(metric)), -entries.index(e)))


def _finite(x: float) -> float:
    return -math.inf if x != x else x


def board(entries: Sequence[Entry], k: int, metric: str = "map@k") -> list[Entry]:
    """The leaderboard at cut-off k: the newest result of each single model, the best concatenation of
    each model subset, every head and rank-fusion result, every promoted result; best `metric` first."""
    at_k = [e for e in entries if e.k == k]
    chosen: dict[tuple, Entry] = {}
    subsets: dict[frozenset, list[Entry]] = {}
    for e in at_k:
        if e.kind == "single":
            chosen.setdefault(("single", e.models[0]), e)
        elif e.kind == "concat" and not e.promoted:
            subsets.setdefault(frozenset(e.used_models), []).append(e)
        elif e.promoted:
            chosen.setdefault(("promoted", e.kind, e.used_models, e.ratio, e.head_path, e.method), e)
        else:
            chosen.setdefault((e.kind, e.method, e.models, e.run_id), e)
    for group in subsets.values():
        best = _best(group, metric)
        chosen.setdefault(("concat", frozenset(best.used_models), best.ratio), best)
    # A promoted row replaces the identical sweep row or head instead of appearing twice.
    promoted_keys = {(e.used_models, e.ratio) for e in chosen.values() if e.promoted and e.kind == "concat"}
    promoted_heads = {e.head_path for e in chosen.values() if e.promoted and e.head_path}
    rows = [e for key, e in chosen.items()
            if not (key[0] == "concat" and (e.used_models, e.ratio) in promoted_keys)
            and not (not e.promoted and e.head_path and e.head_path in promoted_heads)]
    return sorted(rows, key=lambda e: -_finite(e.score(metric)))


def best_single(entries: Sequence[Entry], metric: str = "map@k") -> Entry | None:
    singles = [e for e in entries if e.kind == "single"]
    return _best(singles, metric) if singles else None


def _weights_text(e: Entry) -> str:
    if e.weights is None:
        return ""
    return ", ".join(f"{w:g}" for w in e.weights)


def rows(entries: Sequence[Entry], metric: str = "map@k") -> list[dict]:
    """Plain rows for a table (COLUMNS), with the gain over the best single model in `entries`."""
    reference = best_single(entries, metric)
    ref = reference.score(metric) if reference is not None else float("nan")
    out = []
    for e in entries:
        value = e.score(metric)
        gain = value - ref if reference is not None else float("nan")
        out.append({
            "method": e.method, "type": e.kind, **{key: e.score(key) for key in METRIC_KEYS},
            "gain": gain, "gain_%": 100.0 * gain / ref if ref and ref == ref else float("nan"),
            "models": " + ".join(e.used_models), "n_models": len(e.used_models), "weights": _weights_text(e),
            "oracle": e.is_oracle, "promoted": e.promoted, "run_id": e.run_id, "result_id": e.result_id,
        })
    return out


def best_by_model_count(entries: Sequence[Entry], k: int, metric: str = "map@k", max_models: int = 4) -> list[dict]:
    """The reference study's table: the best single model, then the best 2-, 3-, 4-model concatenation."""
    at_k = [e for e in entries if e.k == k and e.kind in ("single", "concat")]
    reference = best_single(at_k, metric)
    out = []
    for n in range(1, max_models + 1):
        group = [e for e in at_k if len(e.used_models) == n]
        if not group:
            continue
        best = _best(group, metric)
        ref = reference.score(metric) if reference else float("nan")
        out.append({"models in ensemble": n, "method": best.method, "weights": _weights_text(best),
                    metric: best.score(metric),
                    "gain": best.score(metric) - ref, "oracle": best.is_oracle, "result_id": best.result_id})
    return out


def promote(engine: Engine, result_id: int, note: str = "") -> int:
    """Put a result (e.g. one sweep row) on the leaderboard: a run of kind "promote" holding a copy of it
    (oracle flag kept). Promoting the same result again returns the existing run."""
    with db.begin_immediate(engine) as session:
        source = session.get(db.Result, result_id)
        if source is None:
            raise ValueError(f"result {result_id} does not exist (was its run deleted?)")
        existing = [r for r in db.list_runs(session, PROMOTE_KIND, limit=10_000)
                    if (r.config or {}).get("result_id") == result_id]
        if existing:
            return existing[0].id
        run_kind = source.run.kind
        run = db.start_run(session, kind=PROMOTE_KIND, title=f"promoted {source.method} from run {source.run_id}",
                           config={"result_id": result_id, "run_id": source.run_id, "note": note},
                           dataset_id=source.run.dataset_id)
        extra = dict(source.extra or {})
        extra.update(promoted_from_result=result_id, promoted_from_run=source.run_id, source_run_kind=run_kind)
        db.finish_run(session, run.id, [{"method": source.method, "weights": source.weights,
                                         "metrics": dict(source.metrics or {}), "split": source.split,
                                         "is_oracle": source.is_oracle, "extra": extra}])
        return run.id


def to_markdown(table: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table (for pasting into reports)."""
    if not table:
        return ""
    columns = list(columns or table[0].keys())

    def cell(value) -> str:
        if isinstance(value, float):
            return "" if value != value else f"{value:.{digits}f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in table]
    return "\n".join(lines) + "\n"


def run_results(engine: Engine, run_id: int) -> tuple[db.Run | None, list[Entry]]:
    """A run and its results as entries (for reloading a sweep, a head or any past run)."""
    with db.read_session(engine) as session:
        run = db.get_run(session, run_id)
        if run is None:
            return None, []
        _ = run.dataset  # loaded now: pages read run.dataset.source after the session is gone
        return run, [entry_from_result(r) for r in run.results]


def runs_for_dataset(engine: Engine, fingerprint: str, kind: str | None = None, limit: int = 200) -> list[db.Run]:
    """Runs on this dataset (of `kind`), newest first."""
    from sqlalchemy import select
    query = (select(db.Run).join(db.Dataset, db.Run.dataset_id == db.Dataset.id)
             .where(db.Dataset.fingerprint == fingerprint).order_by(db.Run.started.desc(), db.Run.id.desc()).limit(limit))
    if kind is not None:
        query = query.where(db.Run.kind == kind)
    with db.read_session(engine) as session:
        return list(session.scalars(query))


def sweep_rows(entries: Sequence[Entry], models: Sequence[str], metric: str = "map@k") -> list[dict]:
    """A sweep's rows ranked by `metric`, one weight column per model, and each row's ratio class:
    weight vectors that are multiples of each other rank identically, so they share a class and
    `same as` names the first (smallest) vector of the class."""
    if not entries:
        return []
    models = tuple(models)

    def weights_of(e: Entry) -> tuple[float, ...]:
        if e.stored_weights is not None:
            return e.stored_weights
        return tuple(1.0 if m in e.used_models else 0.0 for m in models)

    def ratio_of(w: tuple[float, ...]) -> tuple[float, ...]:
        top = max(w)
        return tuple(round(x / top, 9) for x in w)

    first_of: dict[tuple, tuple] = {}
    for w in sorted((weights_of(e) for e in entries), key=lambda w: (sum(w), w)):
        first_of.setdefault(ratio_of(w), w)
    classes = {ratio: i for i, ratio in enumerate(first_of)}
    out = []
    for rank, e in enumerate(sorted(entries, key=lambda e: -_finite(e.score(metric))), start=1):
        w = weights_of(e)
        same = first_of[ratio_of(w)]
        out.append({"rank": rank, "method": e.method,
                    **{f"w:{m}": x for m, x in zip(models, w)},
                    **{k: e.score(k) for k in METRIC_KEYS},
                    "ratio class": classes[ratio_of(w)],
                    "same as": "" if same == w else ", ".join(f"{x:g}" for x in same),
                    "oracle": True, "result_id": e.result_id})
    return out
