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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image
from sqlalchemy import Engine, func, select

from core import db
from core import leaderboard as lb
from core.configs import DEFAULT_K, ConfigError, ExtractConfig, check_k, check_source, parse_names
from core.datasets import DEMO_SIZES, to_rgb
from core.explorer import ap_values, changed_queries, hardest_queries
from core.leaderboard import Entry
from core.methods import Method
from core.metrics import METRIC_KEYS, QueryScores
from core.models import model_info

DEMO_NAMES = tuple(DEMO_SIZES)  # "demo", "demo-small": built in, opened from packaged files only
# Ids travel through number widgets as JavaScript numbers: above 2**53 they are no longer exact, and no
# workspace comes near it, so a larger "id" in a URL is refused instead of being rounded to another one.
MAX_ID = 2**53 - 1
MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000  # checked from the header, before decoding: a 40 MP RGB image is 120 MB
UPLOAD_FORMATS = ("PNG", "JPEG")
SHOWN_CHARS = 80  # how much of a user's value an error message repeats

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


def method_options(entries: Sequence[Entry], cached_models: Sequence[str]) -> dict[str, MethodOption]:
    """Every method a page can show, by label: single models best first (map@k at the board's usual k),
    then cached models not evaluated yet, then ensembles and heads best first; each label once."""
    ks = lb.available_ks(entries)
    ordered: list[Entry] = []
    if ks:
        ordered = lb.board(entries, default_k(ks)) + [e for k in ks for e in lb.board(entries, k)]
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
    best: dict[tuple[float, float], float] = {}
    for r in table:
        key, value = (float(r[row_key]), float(r[column_key])), float(r[metric])
        if value == value and not best.get(key, -math.inf) >= value:
            best[key] = value
    return Heatmap(rows, columns, [[best.get((a, b), float("nan")) for b in columns] for a in rows])


def head_rows(runs: Sequence[tuple[Any, Sequence[Entry]]]) -> list[dict]:
    """One row per trained head: (run, its entries) pairs from core.leaderboard.run_results."""
    return [{"run_id": run.id, "method": e.label, "models": " + ".join(e.method.models),
             **{m: e.score(m) for m in METRIC_KEYS}, "k": e.k, "chosen on": e.selected_on,
             "duration_s": run.duration_s, "result_id": e.result_id}
            for run, entries in runs for e in entries]


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
