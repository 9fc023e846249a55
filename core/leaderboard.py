"""The leaderboard: every method measured on a dataset's eval split, read from the runs DB and ranked.

Each stored result carries its method (core.methods.Method) and how it was chosen (`selected_on`).
A sweep enters the board as the best concatenation of each model subset (labelled oracle: tuned on
eval); any result can be *promoted*, which records a copy in a run of kind "promote" that the board
always shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from sqlalchemy import Engine, select

from core import db
from core.methods import ORACLE_LABEL, Method
from core.metrics import METRIC_KEYS, PER_QUERY
from core.scores import load_query_scores
from core.stats import paired_difference
from core.vectors import ratio_class
from core.workspace import Workspace

PROMOTE_KIND = "promote"
# Leaderboard columns in the order the dashboard shows them.
# The key columns (what won, by how much) first; the details that identify it after.
COLUMNS = ("method", "type", *METRIC_KEYS, "gain", "gain_%", "gain 95% CI", "p", "models", "n_models", "weights", "chosen on",
           "oracle", "promoted", "run_id", "result_id")


@dataclass(frozen=True)
class Entry:
    """One stored result: a method, its metrics on a split, and how its parameters were chosen."""

    result_id: int
    run_id: int
    run_kind: str
    method: Method
    metrics: dict = field(hash=False)
    selected_on: str = "none"
    promoted: bool = False
    extra: dict = field(default_factory=dict, hash=False)  # what the run kept beside (a sweep's raw weight vector)

    @property
    def label(self) -> str:
        return self.method.label

    @property
    def kind(self) -> str:
        return self.method.kind

    @property
    def is_oracle(self) -> bool:
        return self.selected_on == "eval"

    @property
    def k(self) -> int | None:
        k = self.metrics.get("k")
        return int(k) if k is not None else None

    def score(self, metric: str = "map@k") -> float:
        value = self.metrics.get(metric)
        return float("nan") if value is None else float(value)


def entry_from_result(result: db.Result) -> Entry:
    return Entry(result.id, result.run.id, result.run.kind, Method.from_result(result), dict(result.metrics or {}),
                 result.selected_on, result.run.kind == PROMOTE_KIND, dict(result.extra or {}))


def entries_for_dataset(engine: Engine, fingerprint: str, split: str = "eval") -> list[Entry]:
    """Every result of a finished run on this dataset scored on `split` ("eval": split by image;
    "eval-new-classes": the class-disjoint protocol), newest run first."""
    with db.read_session(engine) as session:
        results = db.results_for_dataset(session, fingerprint)
        return [entry_from_result(r) for r in results if r.split == split]


def available_ks(entries: Sequence[Entry]) -> list[int]:
    return sorted({e.k for e in entries if e.k is not None})


def _best(entries: Sequence[Entry], metric: str) -> Entry:
    # Newest first in input; of equal scores the first, i.e. the newest.
    return max(enumerate(entries), key=lambda pair: (_finite(pair[1].score(metric)), -pair[0]))[1]


def _finite(x: float) -> float:
    return -math.inf if x != x else x


def board(entries: Sequence[Entry], k: int, metric: str = "map@k") -> list[Entry]:
    """The leaderboard at cut-off k: per method (weights that are multiples of each other are one
    method), the newest result of each way of choosing it (a promoted copy first), and of a sweep's
    many concatenations of the same models only the best; best `metric` first."""
    at_k = [e for e in entries if e.k == k]
    chosen: dict[tuple, Entry] = {}
    best_of_sweep: dict[tuple, list[Entry]] = {}
    for e in sorted(at_k, key=lambda e: not e.promoted):  # stable: newest first within each group
        if e.run_kind == "sweep":
            best_of_sweep.setdefault((frozenset(e.method.used_models), e.selected_on), []).append(e)
        else:
            chosen.setdefault((e.method.identity, e.selected_on), e)
    for group in best_of_sweep.values():
        best = _best(group, metric)
        chosen.setdefault((best.method.identity, best.selected_on), best)
    return sorted(chosen.values(), key=lambda e: -_finite(e.score(metric)))


@dataclass(frozen=True)
class Cost:
    """What a method costs per image: the sum over its models of the measured extraction time (on the
    device it ran on) and of the embedding dimensions."""

    seconds_per_image: float | None  # None when a model's time was never measured
    dims: int


def model_costs(engine: Engine, fingerprint: str) -> dict[str, tuple[float | None, int]]:
    """(seconds per image, dims) of every model extracted on this dataset."""
    with db.read_session(engine) as session:
        return {row.model_name: (row.seconds_per_image, row.dim)
                for row in db.embedding_sets_for_dataset(session, fingerprint)}


def method_cost(entry: Entry, costs: dict[str, tuple[float | None, int]]) -> Cost | None:
    """None when a model of the method has no measured dims (its embeddings are not in this workspace)."""
    parts = [costs.get(m) for m in entry.method.used_models]
    if any(p is None for p in parts):
        return None
    seconds = None if any(p[0] is None for p in parts) else float(sum(p[0] for p in parts))
    return Cost(seconds, int(sum(p[1] for p in parts)))


def pareto_front(entries: Sequence[Entry], costs: dict[str, tuple[float | None, int]], metric: str = "map@k",
                 by: str = "seconds_per_image") -> list[Entry]:
    """The entries no other entry beats on both `metric` (higher) and cost `by` (lower), cheapest first."""
    priced = [(getattr(method_cost(e, costs), by, None), e) for e in entries]
    priced = [(c, e) for c, e in priced if c is not None and e.score(metric) == e.score(metric)]
    front, best = [], -math.inf
    for cost, e in sorted(priced, key=lambda ce: (ce[0], -ce[1].score(metric))):
        if e.score(metric) > best:
            front.append(e)
            best = e.score(metric)
    return front


def best_under_budget(entries: Sequence[Entry], costs: dict[str, tuple[float | None, int]], budget: float,
                      metric: str = "map@k", by: str = "seconds_per_image") -> Entry | None:
    """The best entry whose cost `by` is within `budget` (seconds per image, or total dims)."""
    within = [e for e in entries if (c := getattr(method_cost(e, costs), by, None)) is not None and c <= budget]
    return _best(within, metric) if within else None


def best_single(entries: Sequence[Entry], metric: str = "map@k") -> Entry | None:
    singles = [e for e in entries if e.kind == "single"]
    return _best(singles, metric) if singles else None


@dataclass(frozen=True)
class Headline:
    """The answer to "is an ensemble better, and by how much?" at one k: the best single model, the best
    ensemble chosen without the eval split (the honest one), and the best tuned on eval (the oracle)."""

    k: int
    metric: str
    best_single: Entry | None
    best_ensemble: Entry | None  # chosen on train or validation, or with nothing tuned
    best_oracle: Entry | None  # tuned on the eval split it is scored on: always labelled oracle
    ensemble_vs_single: dict | None = None  # core.stats.paired_difference over the queries, when both kept them
    oracle_vs_single: dict | None = None

    def gain(self, entry: Entry | None) -> float:
        if entry is None or self.best_single is None:
            return float("nan")
        return entry.score(self.metric) - self.best_single.score(self.metric)


def headline(entries: Sequence[Entry], k: int, metric: str = "map@k", workspace: Workspace | None = None) -> Headline:
    """With `workspace`, each gain comes with its paired 95 % interval and p-value over the eval queries."""
    at_k = board(entries, k, metric)
    singles = [e for e in at_k if e.kind == "single"]
    honest = [e for e in at_k if e.kind != "single" and not e.is_oracle]
    oracle = [e for e in at_k if e.kind != "single" and e.is_oracle]
    single, ensemble, tuned = (_best(group, metric) if group else None for group in (singles, honest, oracle))
    stats = {}
    if workspace is not None and single is not None:
        stats = {"ensemble_vs_single": compare(workspace, ensemble, single, metric),
                 "oracle_vs_single": compare(workspace, tuned, single, metric)}
    return Headline(k, metric, single, ensemble, tuned, **stats)


def headline_text(head: Headline) -> str:
    """The answer in words, for the CLI report and the dashboard: the honest ensemble's gain with its
    interval, and the oracle beside it, labelled."""
    if head.best_single is None:
        return f"No single model has been scored at k={head.k} yet."
    m = head.metric.replace("@k", f"@{head.k}")
    lines = [f"Best single model: {head.best_single.label}, {m} {head.best_single.score(head.metric):.4f}."]
    if head.best_ensemble is None:
        lines.append("No ensemble chosen without the eval split yet: choose weights on train or train a head.")
    else:
        lines.append(f"Best ensemble: {head.best_ensemble.label} (chosen on {head.best_ensemble.selected_on}), "
                     + _gain_text(head, head.best_ensemble, head.ensemble_vs_single))
    if head.best_oracle is not None:
        lines.append(f"Oracle: {head.best_oracle.label} ({ORACLE_LABEL}), "
                     + _gain_text(head, head.best_oracle, head.oracle_vs_single))
    return "\n".join(lines)


def _gain_text(head: Headline, entry: Entry, stats: dict | None) -> str:
    text = f"{head.metric.replace('@k', f'@{head.k}')} {entry.score(head.metric):.4f}, gain {100 * head.gain(entry):+.2f} points"
    if stats:
        text += (f" (95 % CI {100 * stats['ci_low']:+.2f} to {100 * stats['ci_high']:+.2f}, p = {stats['p_value']:.2g}; "
                 f"{stats['wins']} queries better, {stats['losses']} worse: {stats['verdict']})")
    return text + "."


def compare(workspace: Workspace, a: Entry | None, b: Entry | None, metric: str = "map@k",
            n_resamples: int = 10_000) -> dict | None:
    """How much `a` beats `b` on the same eval queries (core.stats.paired_difference of per-query
    `metric`, a - b), or None when either result kept no per-query scores or they differ in k or queries."""
    if a is None or b is None:
        return None
    sa, sb = load_query_scores(workspace, a.result_id), load_query_scores(workspace, b.result_id)
    if sa is None or sb is None or sa.k != sb.k or len(sa.n_relevant) != len(sb.n_relevant):
        return None
    attr = PER_QUERY[metric]
    return paired_difference(getattr(sa, attr), getattr(sb, attr), n_resamples=n_resamples)


def _weights_text(e: Entry) -> str:
    if e.method.weights is None:
        return ""
    return ", ".join(f"{w:g}" for w in e.method.weights)


def rows(entries: Sequence[Entry], metric: str = "map@k", workspace: Workspace | None = None) -> list[dict]:
    """Plain rows for a table (COLUMNS), with the gain over the best single model in `entries` and, with
    `workspace`, its paired 95 % interval and p-value (2,000 resamples per row, to keep a table quick)."""
    reference = best_single(entries, metric)
    ref = reference.score(metric) if reference is not None else float("nan")
    out = []
    for e in entries:
        value = e.score(metric)
        gain = value - ref if reference is not None else float("nan")
        stats = compare(workspace, e, reference, metric, n_resamples=2_000) \
            if workspace is not None and e is not reference else None
        out.append({
            "method": e.label, "type": e.kind, **{key: e.score(key) for key in METRIC_KEYS},
            "gain": gain, "gain_%": 100.0 * gain / ref if ref and ref == ref else float("nan"),
            "gain 95% CI": f"[{stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]" if stats else "",
            "p": stats["p_value"] if stats else float("nan"),
            "models": " + ".join(e.method.used_models), "n_models": len(e.method.used_models),
            "weights": _weights_text(e), "chosen on": e.selected_on, "oracle": e.is_oracle,
            "promoted": e.promoted, "run_id": e.run_id, "result_id": e.result_id,
        })
    return out


def best_by_model_count(entries: Sequence[Entry], k: int, metric: str = "map@k", max_models: int = 4) -> list[dict]:
    """The reference study's table: the best single model, then the best 2-, 3-, 4-model concatenation."""
    at_k = [e for e in entries if e.k == k and e.kind in ("single", "concat")]
    reference = best_single(at_k, metric)
    out = []
    for n in range(1, max_models + 1):
        group = [e for e in at_k if len(e.method.used_models) == n]
        if not group:
            continue
        best = _best(group, metric)
        ref = reference.score(metric) if reference else float("nan")
        out.append({"models in ensemble": n, "method": best.label, "weights": _weights_text(best),
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
        entry = entry_from_result(source)
        run = db.start_run(session, kind=PROMOTE_KIND, title=f"promoted {source.method} from run {source.run_id}",
                           config={"result_id": result_id, "run_id": source.run_id, "note": note},
                           dataset_id=source.run.dataset_id)
        extra = dict(source.extra or {})
        extra.update(promoted_from_result=result_id, promoted_from_run=source.run_id)
        db.finish_run(session, run.id, [{"method": entry.method, "metrics": entry.metrics, "split": source.split,
                                         "selected_on": entry.selected_on, "extra": extra}])
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
    vector = {e.result_id: tuple(float(w) for w in e.extra.get("vector", ())) for e in entries}
    first_of: dict[tuple, tuple] = {}
    for w in sorted(vector.values(), key=lambda w: (sum(w), w)):
        first_of.setdefault(ratio_class(w), w)
    classes = {ratio: i for i, ratio in enumerate(first_of)}
    out = []
    for rank, e in enumerate(sorted(entries, key=lambda e: -_finite(e.score(metric))), start=1):
        w = vector[e.result_id]
        same = first_of[ratio_class(w)]
        out.append({"rank": rank, "method": e.label,
                    **{f"w:{m}": x for m, x in zip(models, w)},
                    **{k: e.score(k) for k in METRIC_KEYS},
                    "ratio class": classes[ratio_class(w)],
                    "same as": "" if same == w else ", ".join(f"{x:g}" for x in same),
                    "oracle": e.is_oracle, "result_id": e.result_id})
    return out
