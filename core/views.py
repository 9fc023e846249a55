"""What the dashboard's pages show, computed: the tables, option lists, rankings and chart grids a page
lays out, and the checks of what a browser may send (URL values, dataset sources, uploaded images, user
strings that end up in Markdown).

Pages (pages/) draw what these functions return and compute nothing themselves, so any number on a page
is one hop from here or from the core module named beside it. No Streamlit here (core/ never imports it).
"""
from __future__ import annotations

import io
import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image
from sqlalchemy import Engine, func, select

from core import db
from core import leaderboard as lb
from core.configs import DEFAULT_K, ConfigError, ExtractConfig, JobConfig, check_k, check_source, parse_names
from core.datasets import DEMO_SIZES, to_rgb
from core.explorer import ap_values, changed_queries, hardest_queries, query_view
from core.leaderboard import Entry
from core.methods import EMBEDDING_KINDS, EXPORTABLE, KINDS, ORACLE_LABEL, Method
from core.metrics import METRIC_KEYS, QueryScores, scores_from_relevance
from core.models import model_info

DEMO_NAMES = tuple(DEMO_SIZES)  # "demo", "demo-small": built in, opened from packaged files only
# Ids travel through number widgets as JavaScript numbers: above 2**53 they are no longer exact, and no
# workspace comes near it, so a larger "id" in a URL is refused instead of being rounded to another one.
MAX_ID = 2**53 - 1
MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000  # checked from the header, before decoding: a 40 MP RGB image is 120 MB
UPLOAD_FORMATS = ("PNG", "JPEG")
SHOWN_CHARS = 80  # how much of a user's value an error message repeats
MAX_SHOWN_K = 100  # results per method the query explorer shows at most

_DIGITS = re.compile(r"[0-9]+")
# Every ASCII punctuation character Markdown (CommonMark + GFM + Streamlit's directives) may act on.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:&])")


# --- user strings in Markdown and Plotly --------------------------------------------------------------

def md(text: Any) -> str:
    """`text` (a class name, folder, model name, error message ...) as Markdown that shows it literally:
    every Markdown character escaped and each line's spacing collapsed (line breaks kept as hard breaks),
    so a folder named `[x](http://evil)` stays text and cannot become a link, a heading, a code block or
    a colour directive."""
    lines = (" ".join(line.split()) for line in str(text).splitlines())
    return "  \n".join(_MARKDOWN_SPECIAL.sub(r"\\\1", line) for line in lines if line)


def plot_text(text: Any) -> str:
    """`text` for a Plotly label, legend or title: Plotly renders a subset of HTML (<a href>, <b>, <br>)."""
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def shorten(text: Any, most: int = SHOWN_CHARS) -> str:
    """The start of a (possibly hostile, 20,000-character) value, for repeating it in a message."""
    value = str(text)
    return value if len(value) <= most else value[:most] + f"… ({len(value):,} characters)"


def first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0].strip() if lines else ""


# --- dataset sources the dashboard may open ----------------------------------------------------------

def data_roots(setting: str | None, workspace_root: str | os.PathLike) -> tuple[Path, ...]:
    """The folders the dashboard opens datasets under: ENSEMBLE_DATA_ROOTS (os.pathsep-separated), or,
    when that is unset or blank, the workspace folder."""
    parts = [p.strip() for p in (setting or "").split(os.pathsep) if p.strip()]
    return tuple(_resolved(p) for p in (parts or [workspace_root]))


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_allowed_source(source: Any, roots: Sequence[Path], registered: Iterable[str]) -> str:
    """`source` if the dashboard may open it: a built-in demo name, a source already registered in the
    runs DB (the CLI registers what it ran on), or a folder / manifest under one of `roots` (after
    resolving symlinks and '..'). Otherwise ConfigError: a link must never make the server scan an
    arbitrary path."""
    value = check_source(source)
    if value.lower() in DEMO_NAMES or value in set(registered):
        return value
    try:
        path = _resolved(value)
    except (OSError, RuntimeError, ValueError):  # unknown ~user, a symlink loop, a name the OS refuses
        path = None
    if path is not None and any(path == root or root in path.parents for root in roots):
        return value
    listed = ", ".join(str(r) for r in roots)
    raise ConfigError(
        f"The dashboard does not open {shorten(value)!r}: it opens only 'demo', 'demo-small', datasets already "
        f"in this workspace's runs database, and folders or CSV manifests under {listed}. Move the data under "
        "one of those folders, add its folder to ENSEMBLE_DATA_ROOTS (separated by "
        f"{os.pathsep!r}) and restart the dashboard, or run a job on it once with the CLI "
        "(python -m core extract --dataset ...).")


def source_stamp(source: str) -> int:
    """Changes when a folder's or manifest's listing changes (its mtime): the key under which an opened
    dataset is kept, so an edited manifest is read again. The demos never change (0); a missing path -1."""
    if source.lower() in DEMO_NAMES:
        return 0
    try:
        return os.stat(Path(source).expanduser()).st_mtime_ns
    except (OSError, RuntimeError, ValueError):
        return -1


# --- URL values ----------------------------------------------------------------------------------------

def parse_id(value: Any, name: str, lowest: int = 0) -> int:
    """A database id or dataset row from a URL (?run=, ?query=, ...)."""
    text = str(value).strip()
    if not _DIGITS.fullmatch(text):
        raise ConfigError(f"{name} must be a whole number, got {shorten(text)!r}")
    if len(text) > 16 or not lowest <= int(text) <= MAX_ID:
        raise ConfigError(f"{name} must be between {lowest} and {MAX_ID:,}, got {shorten(text)}")
    return int(text)


def parse_ids(value: Any, name: str) -> tuple[int, ...]:
    """'3,7' -> (3, 7): result ids from a URL."""
    return tuple(parse_id(part, name, lowest=1) for part in str(value).split(",") if part.strip())


def parse_k(value: Any, most: int) -> int:
    """k from a URL or form, at most `most` (what the page's own input allows)."""
    text = str(value).strip()
    if len(text) > 16:
        raise ConfigError(f"k must be a whole number from 1 to {most:,}, got {shorten(text)}")
    k = check_k(text)
    if k > most:
        raise ConfigError(f"k must be at most {most:,} here, got {k:,}")
    return k


def pick(value: Any, options: Sequence, name: str):
    """`value` if it names one of `options` (compared as text), else ConfigError listing them."""
    texts = [str(o) for o in options]
    if str(value) in texts:
        return options[texts.index(str(value))]
    raise ConfigError(f"{name} must be one of {', '.join(texts[:12])}, got {shorten(value)!r}")


def default_k(ks: Sequence[int], preferred: int = DEFAULT_K) -> int | None:
    """The k a board opens at: the project's usual k if results exist at it, else the largest."""
    if not ks:
        return None
    return preferred if preferred in ks else max(ks)


# --- uploads ------------------------------------------------------------------------------------------

def open_upload(data: bytes, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """An uploaded PNG/JPEG as 8-bit RGB (core.datasets.to_rgb, like every embedded image). The size is
    read from the header first (PIL opens lazily), so an image of too many pixels is refused before a
    single pixel is decoded."""
    if len(data) > max_bytes:
        raise ConfigError(f"That file is {len(data) / 2**20:.1f} MB; upload an image of at most "
                          f"{max_bytes / 2**20:.0f} MB.")
    unreadable = ConfigError("That file is not an image this app can read; upload a PNG or JPEG.")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Image.DecompressionBombError:
        raise ConfigError(f"That image has far too many pixels; upload one of at most "
                          f"{max_pixels / 1e6:.0f} megapixels.") from None
    except (OSError, SyntaxError, ValueError):
        raise unreadable from None
    if image.format not in UPLOAD_FORMATS:
        raise unreadable
    if width * height > max_pixels:
        raise ConfigError(f"That image is {width:,} x {height:,} pixels ({width * height / 1e6:.0f} megapixels); "
                          f"upload one of at most {max_pixels / 1e6:.0f} megapixels.")
    try:
        image.load()
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError):
        raise unreadable from None


# --- data & models ----------------------------------------------------------------------------------

def extraction_config(source: str, chosen: Sequence[str], typed: str, force: bool = False) -> ExtractConfig:
    """The extraction a form asks for: the ticked models and the typed names (comma-separated), each known
    to the model registry (a typo fails here with the registry's message, not later in the worker)."""
    names = list(dict.fromkeys([*chosen, *parse_names(typed)]))
    config = ExtractConfig(dataset=source, models=tuple(names), force=force)
    for name in config.models:
        model_info(name)
    return config


def model_rows(statuses) -> list[dict]:
    """The Data page's model table: every registry model (core.catalog.model_statuses) and its cache."""
    return [{"model": s.info.name, "family": s.info.family, "source": s.info.source,
             "availability": s.info.availability,
             "embedding size": s.info.dim or (s.cached.dim if s.cached else None),
             "cached": s.cached is not None, "cache MB": round(s.size_mb, 1), "how to get": s.info.how_to_get}
            for s in statuses]


def cached_rows(sets) -> list[dict]:
    """One row per cached embedding set (core.catalog.cached_sets) with its file size."""
    rows = []
    for s in sets:
        try:
            size = os.path.getsize(s.path) / 2**20
        except OSError:
            size = float("nan")
        rows.append({"model": s.model_name, "images": s.n, "dim": s.dim, "dtype": s.dtype,
                     "MB": round(size, 1), "file": s.path})
    return rows


# --- methods the explorer and the map offer -----------------------------------------------------------

class MethodOption(NamedTuple):
    method: Method
    result_id: int | None  # the stored result it came from (None: a cached model not evaluated yet)


def method_options(entries: Sequence[Entry], cached_models: Sequence[str],
                   embedding_only: bool = False) -> dict[str, MethodOption]:
    """Every method a page can show, by label: single models best first (map@k at the board's usual k),
    then cached models not evaluated yet, then ensembles, heads, rank fusions and re-rankings best first;
    each label once. `embedding_only`: only methods with one embedding per image (what a map can draw)."""
    ks = lb.available_ks(entries)
    ordered: list[Entry] = []
    if ks:
        ordered = lb.board(entries, default_k(ks)) + [e for k in ks for e in lb.board(entries, k)]
    if embedding_only:
        ordered = [e for e in ordered if e.method.yields_embedding]
    singles: dict[str, MethodOption] = {}
    fused: dict[str, MethodOption] = {}
    for e in ordered:
        if e.kind == "single":
            singles.setdefault(e.method.models[0], MethodOption(e.method, e.result_id))
        else:
            label = f"{e.label} [{e.kind}{', oracle' if e.is_oracle else ''}]"
            fused.setdefault(label, MethodOption(e.method, e.result_id))
    for model in cached_models:
        singles.setdefault(model, MethodOption(Method.single(model), None))
    return {**singles, **fused}


def default_methods(options: Mapping[str, MethodOption], wanted_ids: Sequence[int] = (), most: int = 4) -> list[str]:
    """The labels a page opens with: the results named in the URL, else the best single model and the
    best ensemble (else the first two)."""
    by_id = {o.result_id: label for label, o in options.items() if o.result_id is not None}
    wanted = list(dict.fromkeys(by_id[i] for i in wanted_ids if i in by_id))
    if wanted:
        return wanted[:most]
    singles = [label for label, o in options.items() if o.method.kind == "single"]
    fused = [label for label, o in options.items() if o.method.kind != "single"]
    return [singles[0], fused[0]] if singles and fused else list(options)[:2]


def single_and_fused(methods: Sequence[Method]) -> tuple[int | None, int | None]:
    """Indexes of the first single model and the first ensemble/head among `methods` (None if absent)."""
    single = next((i for i, m in enumerate(methods) if m.kind == "single"), None)
    fused = next((i for i, m in enumerate(methods) if m.kind != "single"), None)
    return single, fused


def changed_rows(ensemble: QueryScores, single: QueryScores, rows: np.ndarray, labels: np.ndarray,
                 class_names: Sequence[str], k: int, improved: bool, metric: str = "map@k") -> list[dict]:
    """The queries an ensemble fixed (improved=True) or broke against a single model, most changed first."""
    ap_single, ap_ensemble = ap_values(single, metric), ap_values(ensemble, metric)
    return [{"id": int(rows[p]), "class": class_names[int(labels[p])], f"AP@{k} single": float(ap_single[p]),
             f"AP@{k} ensemble": float(ap_ensemble[p]), "change": change}
            for p, change in changed_queries(ensemble, single, metric, improved=improved)]


def hardest_rows(scores: QueryScores, rows: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 k: int, method_label: str, metric: str = "map@k") -> list[dict]:
    """The lowest-scoring queries of one method."""
    return [{"id": int(rows[p]), "class": class_names[int(labels[p])], f"AP@{k} ({method_label})": value}
            for p, value in hardest_queries(scores, metric)]


def list_k(stored_ks: Sequence[int | None], default: int) -> int:
    """The k the query lists compare at: the k the chosen results' per-query scores were stored at (so
    nothing is searched again), else `default` (the page's k) when none of them kept scores. ConfigError
    when they were stored at different k: their APs are not comparable query by query."""
    ks = sorted({int(k) for k in stored_ks if k is not None})
    if len(ks) > 1:
        raise ConfigError(f"these results were scored at different k ({', '.join(map(str, ks))}), so their "
                          "per-query AP does not compare; choose results measured at the same k")
    return ks[0] if ks else int(default)


class QueryTop(NamedTuple):
    """One query's top-k under a method: eval positions best first, their cosine similarities (None for a
    method that ranks without one similarity per result: rank fusion, query expansion) and the query's
    AP@k (map@k convention; NaN when no other eval image shares its label)."""
    positions: np.ndarray
    similarities: np.ndarray | None
    ap: float


def query_top(method: Method, labels: np.ndarray, position: int, k: int, *, embeddings: np.ndarray | None = None,
              ranking: np.ndarray | None = None) -> QueryTop:
    """A query's top-k under any method: from the method's eval `embeddings` (one exact search) when it
    has them, else from its `ranking` of every eval query (core.methods.Method.ranking: positions, best
    first, at least k deep)."""
    labels = np.asarray(labels)
    if method.yields_embedding:
        if embeddings is None:
            raise ValueError(f"{method.label}: pass its embeddings")
        sims, ids, ap = query_view(embeddings, labels, position, k)
        return QueryTop(ids, sims, ap["map@k"])
    if ranking is None:
        raise ValueError(f"{method.label} ranks without embeddings: pass its ranking")
    ids = np.asarray(ranking[position][:k])
    n_relevant = np.array([int((labels == labels[position]).sum()) - 1])
    values = scores_from_relevance((labels[ids] == labels[position])[None, :], n_relevant, k)
    return QueryTop(ids, None, float(values["ap_at_k"][0]))


def points_by_class(labels: np.ndarray, n_classes: int) -> list[tuple[int, np.ndarray]]:
    """(class, positions) for every class with at least one point: one map trace each."""
    labels = np.asarray(labels)
    return [(c, np.flatnonzero(labels == c)) for c in range(n_classes) if (labels == c).any()]


# --- tables: leaderboard, sweeps, heads, runs ----------------------------------------------------------

def _descending(value: float) -> float:
    return -value if value == value else math.inf  # NaN last


def ranked(table: Sequence[Mapping], metric: str, most: int | None = None) -> list[Mapping]:
    """Rows best `metric` first (NaN last; ties keep their order), at most `most` of them."""
    out = sorted(table, key=lambda r: _descending(float(r[metric])))
    return out if most is None else out[:most]


def interval_text(stats: Mapping | None) -> str:
    """A paired comparison (core.stats.paired_difference) in one line: the interval, p and the queries won."""
    if not stats:
        return "no per-query scores kept: no interval"
    return (f"95 % CI {stats['ci_low']:+.4f} to {stats['ci_high']:+.4f}, p = {stats['p_value']:.2g}; "
            f"{stats['wins']} queries better, {stats['losses']} worse: {stats['verdict']}")


def relative_gain(gain: float, base: float) -> float:
    """gain as a percentage of base (NaN when base is 0 or missing)."""
    return 100.0 * gain / base if base and base == base else float("nan")


def grid_size(weights: Sequence[float], n_models: int) -> int:
    """Weight vectors a grid sweep scores: every combination, less the all-zero one."""
    return len(weights) ** n_models - (1 if 0 in weights else 0)


def distinct_rows(table: Sequence[Mapping]) -> list[dict]:
    """A sweep table (core.leaderboard.sweep_rows) with one row per ratio class (the class's first vector),
    ranked 1, 2, 3 ... among the classes."""
    return [{**r, "rank": i} for i, r in enumerate((r for r in table if not r["same as"]), start=1)]


def page_count(n: int, size: int) -> int:
    return max(1, -(-n // size))


def page_of(rows: Sequence, page: int, size: int) -> list:
    return list(rows[(page - 1) * size: page * size])


@dataclass(frozen=True)
class Heatmap:
    """A metric over two weight columns: z[i][j] is the best value with rows[i] and columns[j] (NaN where
    no vector has them, e.g. the all-zero one)."""
    rows: list[float]
    columns: list[float]
    z: list[list[float]]

    def labels(self, digits: int = 4) -> list[list[str]]:
        return [[f"{v:.{digits}f}" if v == v else "" for v in row] for row in self.z]


def heatmap(table: Sequence[Mapping], row_key: str, column_key: str, metric: str) -> Heatmap:
    """The best `metric` per pair of values of `row_key` and `column_key` (other weights maximised over)."""
    rows = sorted({float(r[row_key]) for r in table})
    columns = sorted({float(r[column_key]) for r in table})
    best = _best_by(table, lambda r: (float(r[row_key]), float(r[column_key])), metric)
    return Heatmap(rows, columns, [[best.get((a, b), float("nan")) for b in columns] for a in rows])


def best_by_weight(table: Sequence[Mapping], models: Sequence[str], metric: str) -> dict[str, list[tuple[float, float]]]:
    """Per model, (weight value, the best `metric` of the vectors giving it that weight), by weight: how much
    each model's weight matters when the others are at their best."""
    return {model: sorted(_best_by(table, lambda r: float(r[f"w:{model}"]), metric).items()) for model in models}


def _best_by(table: Sequence[Mapping], key: Callable[[Mapping], Any], metric: str) -> dict:
    """The best `metric` (NaN left out) of the rows sharing each value of `key(row)`."""
    best: dict = {}
    for r in table:
        group, value = key(r), float(r[metric])
        if value == value and not best.get(group, -math.inf) >= value:
            best[group] = value
    return best


def done_runs(engine: Engine, fingerprint: str, kind: str) -> list[db.Run]:
    """This dataset's finished runs of `kind`, newest first."""
    return [r for r in lb.runs_for_dataset(engine, fingerprint, kind) if r.status == "done"]


def run_comparison(run_a: int, table_a: Sequence[Mapping], run_b: int, table_b: Sequence[Mapping],
                   metric: str = "map@k") -> list[dict]:
    """Two runs' result tables side by side by method label, and the difference b - a where both have it."""
    a = {}
    for r in table_a:
        a.setdefault(r["method"], r[metric])
    b = {}
    for r in table_b:
        b.setdefault(r["method"], r[metric])
    out = []
    for method in dict.fromkeys([*a, *b]):
        x, y = a.get(method), b.get(method)
        out.append({"method": method, f"run {run_a} {metric}": x, f"run {run_b} {metric}": y,
                    "difference": y - x if x is not None and y is not None else None})
    return out


def run_listing(engine: Engine, kind: str | None, limit: int, offset: int) -> list[dict]:
    """A page of the runs table, newest first, with each run's number of results (counted in SQL: a
    sweep holds thousands)."""
    counts = (select(db.Result.run_id, func.count(db.Result.id).label("n"))
              .group_by(db.Result.run_id).subquery())
    query = (select(db.Run, db.Dataset.name, counts.c.n)
             .join(db.Dataset, db.Run.dataset_id == db.Dataset.id, isouter=True)
             .join(counts, counts.c.run_id == db.Run.id, isouter=True)
             .order_by(db.Run.started.desc(), db.Run.id.desc()).limit(limit).offset(offset))
    if kind is not None:
        query = query.where(db.Run.kind == kind)
    with db.read_session(engine) as session:
        return [{"id": run.id, "kind": run.kind, "title": run.title, "status": run.status, "dataset": name or "",
                 "started (UTC)": run.started, "duration_s": run.duration_s, "results": int(n or 0),
                 "error": first_line(run.error)}
                for run, name, n in session.execute(query)]


def job_rows(jobs: Sequence) -> list[dict]:
    return [{"job": j.id, "kind": j.kind, "status": j.status, "progress": j.progress, "message": j.message,
             "run": j.run_id, "error": first_line(j.error)} for j in jobs]


def curve_points(engine: Engine, run_id: int) -> list[dict]:
    """A training run's curve (one dict per epoch: epoch, loss, val_map, eval_map), in order."""
    with db.read_session(engine) as session:
        return [dict(p.values) for p in db.curve(session, run_id)]


def chosen_on_text(selected_on: str) -> str:
    """How a result's parameters were chosen, as the leaderboard says it: tuned on eval is the oracle."""
    return ORACLE_LABEL if selected_on == "eval" else selected_on


def labelled_board(table: Sequence[Mapping]) -> list[dict]:
    """core.leaderboard.rows with "chosen on" in words: none, train, validation, or the oracle label."""
    return [{**r, "chosen on": chosen_on_text(r["chosen on"])} for r in table]


# --- fusion methods: which yield an embedding, which export, how a selection went ----------------------

KIND_TEXT = {
    "single": "one model's embeddings",
    "concat": "the models' normalised embeddings, weighted and concatenated",
    "head": "a small network fitted on the train split over the models' embeddings (learned_ratio: learned "
            "concat weights)",
    "rank": "merges each model's ranked result list (rrf: reciprocal rank, max: best similarity, combsum: "
            "summed z-scored similarities)",
    "qe": "alpha query expansion: each query is averaged with its top-n results, then searches again",
    "dba": "database-side augmentation: every image averaged with its top-n neighbours, then searched",
}
WHY_NOT_EXPORTABLE = {
    "rank": "it merges result lists ranked against this gallery: there is no vector of a new image to export",
    "qe": "it expands each query with its neighbours in this gallery and searches again: it ranks, it has "
          "no vector of a new image on its own",
    "dba": "its vector of an image is averaged with that image's neighbours in this gallery, so it depends on "
           "the gallery and cannot embed a new image on its own",
}


def method_kind_rows() -> list[dict]:
    """One row per method kind (core.methods.KINDS): what it does, whether it gives one embedding per
    image, whether it exports as an artifact that embeds new images, and if not, why."""
    return [{"kind": kind, "what it does": KIND_TEXT[kind], "one embedding per image": kind in EMBEDDING_KINDS,
             "exportable": kind in EXPORTABLE, "why not exportable": WHY_NOT_EXPORTABLE.get(kind, "")}
            for kind in KINDS]


def why_not_exportable(method: Method) -> str | None:
    """None for a method that exports (core.methods.Method.exportable), else the reason in one sentence."""
    if method.exportable:
        return None
    return f"{method.label} does not export: {WHY_NOT_EXPORTABLE[method.kind]}."


def selection_path(path: Mapping[str, Sequence[Mapping]] | None) -> list[dict]:
    """A greedy selection's path (result.extra["path"]: {"greedy": [{step, weights, map@k}, ...],
    "refined": [...]}) as plot rows: the greedy steps (1, 2, ...), then the refinement rounds counted on
    from the last greedy step (refinement round 0 is the greedy result it starts from). map@k on train."""
    path = path or {}
    out = [{"phase": "greedy", "step": int(p["step"]), "map@k": float(p["map@k"]), "weights": weights_text(p["weights"])}
           for p in path.get("greedy") or ()]
    last = out[-1]["step"] if out else 0
    out += [{"phase": "refined", "step": last + int(p["step"]), "map@k": float(p["map@k"]),
             "weights": weights_text(p["weights"])} for p in path.get("refined") or ()]
    return out


def weights_text(values: Sequence[float]) -> str:
    """(1, 0.5, 0) -> "1, 0.5, 0"."""
    return ", ".join(f"{float(w):g}" for w in values)


def result_rows(runs: Sequence[tuple[Any, Sequence[Entry]]]) -> list[dict]:
    """One row per result of finished runs (heads, fusions, selections: (run, entries) pairs from
    core.leaderboard.run_results): the method, its kind, how it was chosen, whether it gives one embedding
    per image and whether it kept a greedy selection path."""
    return [{"run_id": run.id, "method": e.label, "type": e.kind, "models": " + ".join(e.method.used_models),
             "weights": weights_text(e.method.weights) if e.method.weights is not None else "",
             **{m: e.score(m) for m in METRIC_KEYS}, "k": e.k, "chosen on": chosen_on_text(e.selected_on),
             "one embedding per image": e.method.yields_embedding, "greedy path": bool(e.extra.get("path")),
             "duration_s": run.duration_s, "result_id": e.result_id}
            for run, entries in runs for e in entries]


# --- model complementarity (core.complementarity, stored as a run's summary) ---------------------------

PAIR_MATRICES = (
    ("overlap@k", "Neighbour overlap: share of the top-k both models retrieve", 0.0, 1.0),
    ("jaccard@k", "Jaccard of the two top-k lists", 0.0, 1.0),
    ("cka", "Linear CKA: how alike the representations are", 0.0, 1.0),
    ("ap_pearson", "Correlation of per-query AP@k (Pearson)", -1.0, 1.0),
    ("ap_spearman", "Correlation of per-query AP@k (Spearman)", -1.0, 1.0),
    ("oracle_pair", "Per-query oracle of the pair: mean of the better AP@k per query", None, None),
)


@dataclass(frozen=True)
class PairMatrix:
    """A models x models matrix of a complementarity summary, NaN where undefined."""
    key: str
    title: str
    models: list[str]
    z: list[list[float]]
    zmin: float | None
    zmax: float | None


def pair_matrices(summary: Mapping[str, Any]) -> list[PairMatrix]:
    """The summary's matrices (PAIR_MATRICES order) that it holds, None cells (undefined) as NaN."""
    models = [str(m) for m in summary["models"]]
    return [PairMatrix(key, title, models, [[float("nan") if v is None else float(v) for v in row]
                                            for row in summary[key]], low, high)
            for key, title, low, high in PAIR_MATRICES if key in summary]


def complementarity_rows(summary: Mapping[str, Any]) -> list[dict]:
    """Each model's map@k and its best partner: the pair with the highest per-query oracle."""
    models, oracle = summary["models"], summary["oracle_pair"]
    rows = []
    for i, (model, value) in enumerate(zip(models, summary["map@k"])):
        partners = [(oracle[i][j], j) for j in range(len(models)) if j != i and oracle[i][j] is not None]
        best = max(partners, key=lambda p: (p[0], -p[1]), default=None)
        rows.append({"model": model, "map@k": value, "best partner": models[best[1]] if best else "",
                     "pair oracle": best[0] if best else None})
    return rows


def oracle_text(summary: Mapping[str, Any]) -> str:
    """The per-query oracle in words: what choosing the right model for every query reaches, against the
    best single model; the ceiling a fusion of these models is read against."""
    k, best, oracle = summary.get("k"), float(summary["best_single"]), float(summary["oracle_all"])
    gain = oracle - best
    return (f"Upper bound: picking, for every query, the model that retrieves it best reaches map@{k} {oracle:.4f}, "
            f"against {best:.4f} for the best single model ({gain:+.4f}, {relative_gain(gain, best):+.1f}%) over "
            f"{summary.get('n_queries', '?')} queries. No choice of one model per query can do better. Read any "
            "fusion of these models against this ceiling: a fusion mixes their lists and may pass it on some "
            "queries, but one far below it leaves room, and a ceiling barely above the best single model means "
            "these models have little to give an ensemble.")


# --- cost-aware choice (core.leaderboard.model_costs / method_cost / pareto_front) ---------------------

# Each cost core.leaderboard prices (`by`): its unit on a page and the factor from core's value to it.
COST_UNITS = {"seconds_per_image": ("ms per image", 1000.0), "dims": ("dims", 1.0)}
NOT_MEASURED = "not measured"


def cost_rows(entries: Sequence[Entry], costs: Mapping[str, tuple[float | None, int]], by: str,
              front: Sequence[Entry], metric: str = "map@k") -> list[dict]:
    """Each entry with its cost (core.leaderboard.method_cost): its extraction time per image (summed over
    its models; "not measured" when a model's time never was, never 0), its total dims, "cost" in the
    unit of `by` (COST_UNITS; None when unpriced) and whether it lies on the Pareto `front`."""
    unit, scale = COST_UNITS[by]
    on_front = {e.result_id for e in front}
    out = []
    for e in entries:
        cost = lb.method_cost(e, dict(costs))
        seconds = cost.seconds_per_image if cost is not None else None
        value = getattr(cost, by) if cost is not None else None
        out.append({"method": e.label, "type": e.kind, metric: e.score(metric),
                    "ms per image": NOT_MEASURED if seconds is None else f"{1000 * seconds:.2f}",
                    "dims": cost.dims if cost is not None else None,
                    "cost": None if value is None else float(value) * scale,
                    "pareto": e.result_id in on_front, "chosen on": chosen_on_text(e.selected_on),
                    "result_id": e.result_id})
    return out


def default_budget(entries: Sequence[Entry], costs: Mapping[str, tuple[float | None, int]], by: str,
                   metric: str = "map@k") -> float | None:
    """Where a budget starts, in the unit of `by`: what the best single model costs, so the first answer
    reads "the best method that costs no more than our best model"; when that is not measured, the dearest
    measured method (every priced method within). None when nothing is priced."""
    def cost(e: Entry | None) -> float | None:
        priced = lb.method_cost(e, dict(costs)) if e is not None else None
        value = getattr(priced, by) if priced is not None else None
        return float(value) * COST_UNITS[by][1] if value is not None else None

    best = cost(lb.best_single(entries, metric))
    return best if best is not None else max((c for e in entries if (c := cost(e)) is not None), default=None)


# --- the Start page: what the runs DB already knows, without opening a dataset -------------------------

@dataclass(frozen=True)
class DatasetFacts:
    name: str
    fingerprint: str
    n_images: int
    n_classes: int


def dataset_facts(engine: Engine, source: str) -> DatasetFacts | None:
    """The runs DB's row of `source` (the newest, when its files changed and it was registered again):
    no scan of the dataset, so a page can show it while a worker reads the same files. None when the
    dataset was never registered."""
    with db.read_session(engine) as session:
        row = session.scalars(select(db.Dataset).where(db.Dataset.source == source)
                              .order_by(db.Dataset.created.desc(), db.Dataset.id.desc()).limit(1)).first()
        return DatasetFacts(row.name, row.fingerprint, row.n_images, row.n_classes) if row is not None else None


def queries_scored(entries: Sequence[Entry]) -> int:
    """Eval queries behind the entries' numbers (the largest count stored with any of them; 0 if none)."""
    return max((int(e.metrics.get("n_queries") or 0) + int(e.metrics.get("n_excluded") or 0) for e in entries),
               default=0)


def active_demo_jobs(active: Sequence, demo: Sequence[JobConfig]) -> list:
    """The queued or running jobs (core.jobs.list_jobs(status=ACTIVE)) that prepare the demo: a kind of
    `demo` (core.configs.demo_jobs()) on its dataset."""
    kinds, datasets = {c.kind for c in demo}, {c.dataset for c in demo}
    return [j for j in active if j.kind in kinds and isinstance(j.params, dict) and j.params.get("dataset") in datasets]


# --- export -------------------------------------------------------------------------------------------

def zip_folder(folder: str | os.PathLike) -> bytes:
    """An exported artifact folder (core.export) as one zip for a download, paths relative to its parent
    so it unpacks to the folder itself."""
    folder = Path(folder)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder.parent).as_posix())
    return out.getvalue()
