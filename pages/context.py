"""What every page shares: the workspace, the one DB engine, the current dataset, job progress and error display.

Not a page itself (app.py lists the pages explicitly). Holds no computation: everything it caches comes
from core.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import sys
import traceback
from pathlib import Path

import streamlit as st

from core import catalog, jobs
from core.cache import EmbeddingCache
from core.datasets import DatasetError, ImageSet, open_dataset
from core.db import init_db, make_engine, utcnow
from core.explorer import ExplorerError
from core.metrics import MetricsError
from core.models import ModelError
from core.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent

PAGES = {
    "start": "pages/start.py",
    "data": "pages/data.py",
    "leaderboard": "pages/leaderboard.py",
    "sweep": "pages/sweep.py",
    "fusion": "pages/fusion.py",
    "explorer": "pages/query_explorer.py",
    "map": "pages/embedding_map.py",
    "runs": "pages/runs.py",
}
USER_ERRORS = (DatasetError, ModelError, MetricsError, ExplorerError)
POLL_SECONDS = 2.0
# With no job queued or running, look for new ones (another tab, the CLI) this rarely: each poll reruns
# the panel, and a rerun can close a dropdown the user is opening.
IDLE_POLL_SECONDS = 10.0
ROWS_PER_PAGE = 50
FAILURES_SHOWN_FOR_H = 6  # a failed job is announced on the pages for this long, then only on Runs


# --- routing -----------------------------------------------------------------------------------------

def _leave_pages_directory_mode() -> None:
    """Streamlit treats a folder named pages/ beside app.py as the old (v1) multipage layout until app.py
    has called st.navigation once in this process: a fresh server's first visitor on a deep link
    (/leaderboard?dataset=...) would get the bare page without app.py's navigation and sidebar. Leave that
    mode and rerun, so the rerun goes through app.py to the same page. (Private flag; a no-op if it moves.)"""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:
        return
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        st.rerun()


_leave_pages_directory_mode()  # runs once per process, on the first import by any page or app.py


# --- resources (one per process) ---------------------------------------------------------------------

def workspace() -> Workspace:
    return _workspace(os.environ.get("ENSEMBLE_WORKSPACE") or "workspace")


@st.cache_resource(show_spinner=False)
def _workspace(root: str) -> Workspace:
    return Workspace.open(root)


def engine():
    return _engine(workspace().db_url)


@st.cache_resource(show_spinner=False)
def _engine(url: str):
    engine = make_engine(url)
    init_db(engine)
    return engine


def embedding_cache() -> EmbeddingCache:
    return EmbeddingCache(workspace().embeddings)


@st.cache_resource(show_spinner=False)
def device() -> str:
    from core.devices import resolve_device
    return resolve_device()


@st.cache_resource(show_spinner="Opening the dataset ...", max_entries=8)
def _open(source: str, root: str) -> ImageSet:
    return open_dataset(source, Workspace.open(root))


def open_imageset(source: str) -> ImageSet:
    return _open(source, str(workspace().root))


def forget_imageset(source: str) -> None:
    """After files changed on disk: the next open re-scans them."""
    _open.clear(source, str(workspace().root))


# --- the current dataset: URL first, then this session, then the DB's most recently used ------------

def current_source() -> str | None:
    source = st.query_params.get("dataset") or st.session_state.get("dataset")
    if not source:
        source = catalog.last_used_source(engine())
    if source:
        set_source(source)
    return source


def set_source(source: str) -> None:
    st.session_state["dataset"] = source
    if st.query_params.get("dataset") != source:
        st.query_params["dataset"] = source


def require_imageset() -> ImageSet:
    """The current dataset, opened; or a note pointing at the Data page, and the page stops."""
    source = current_source()
    if not source:
        st.info("No dataset chosen yet. Pick one (or the offline demo) on the **Data & models** page.")
        st.page_link(PAGES["data"], label="Go to Data & models", icon=":material/folder_open:")
        st.stop()
    imageset = open_imageset(source)
    if not st.session_state.get(f"registered:{source}"):  # once per session: the leaderboard finds it by fingerprint
        catalog.register_dataset(engine(), imageset, source)
        st.session_state[f"registered:{source}"] = True
    return imageset


# --- errors -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def guarded():
    """Core's user errors become a message that says what to do; anything else a short message with the
    details folded away. Streamlit's own stop/rerun signals are BaseExceptions and pass through."""
    try:
        yield
    except USER_ERRORS as error:
        st.error(str(error), icon=":material/error:")
    except Exception as error:  # noqa: BLE001 - the page must never show a raw traceback
        st.error(f"Something went wrong: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
                 "Try again; if it keeps happening, report it with the details below.", icon=":material/error:")
        with st.expander("Details"):
            st.code("".join(traceback.format_exception(error)))


# --- worker and jobs ----------------------------------------------------------------------------------

def start_worker() -> int:
    """A detached `python -m core.worker` on this workspace; its log goes to workspace/worker.log."""
    ws = workspace()
    log = open(ws.root / "worker.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "core.worker", "--workspace", str(ws.root)],
                               cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


def submit(kind: str, params: dict) -> int:
    """Queue a job (an identical queued or running one is shared instead); its id."""
    job = jobs.submit(engine(), kind, params)
    return job.id


def job_label(job) -> str:
    what = ", ".join(job.params.get("models", [])) if isinstance(job.params, dict) else ""
    return f"Job {job.id} · {job.kind}" + (f" · {what}" if what else "")


def show_jobs(kinds: tuple[str, ...] | None = None, key: str = "jobs") -> None:
    """Live progress of queued and running jobs (of `kinds`) with Cancel buttons, and the last failure."""

    def active_jobs():
        return [j for j in jobs.list_jobs(engine(), status=jobs.ACTIVE, limit=20) if kinds is None or j.kind in kinds]

    busy = bool(active_jobs())

    @st.fragment(run_every=POLL_SECONDS if busy else IDLE_POLL_SECONDS)
    def panel():
        eng = engine()
        active = active_jobs()
        seen = set(st.session_state.get(f"{key}:active", []))
        now = {j.id for j in active}
        st.session_state[f"{key}:active"] = sorted(now)
        if seen - now:  # something finished while we watched: refresh the whole page to show its results
            st.rerun(scope="app")
        if active and not busy:  # a job appeared (another tab, the CLI): rerun to poll at the fast rate
            st.rerun(scope="app")
        if active and not jobs.worker_alive(eng):
            st.warning("No worker is running, so queued jobs wait. Start one from the sidebar.", icon=":material/warning:")
        for job in active:
            cols = st.columns([5, 1])
            text = f"{job_label(job)} — {job.status}: {job.message or ''}"
            cols[0].progress(min(max(float(job.progress or 0.0), 0.0), 1.0), text=text)
            # A callback, so the click is recorded before the (fragment or full) rerun draws the panel again.
            cols[1].button("Cancel", key=f"{key}:cancel:{job.id}", disabled=bool(job.cancel_requested),
                           on_click=jobs.request_cancel, args=(eng, job.id))
        recent = utcnow() - dt.timedelta(hours=FAILURES_SHOWN_FOR_H)
        failed = [j for j in jobs.list_jobs(eng, status=jobs.FAILED, limit=5)
                  if (kinds is None or j.kind in kinds) and j.finished and j.finished > recent]
        if failed:
            last = failed[0]
            first_line = (last.error or "no reason recorded").strip().splitlines()[0]
            st.error(f"{job_label(last)} failed: {first_line} (details on the Runs page)", icon=":material/error:")

    panel()


def metric_header(k: int, metric: str = "map@k") -> str:
    names = {
        "map@k": f"map@{k}: sum P@i·rel_i over the top {k} / min({k}, R)",
        "map@k_hits": f"map@{k}_hits: divided by relevant items found in the top {k} (reference authors' later code)",
        "map@r": "map@R: k = R, divided by R",
        "p@1": "P@1: the first result has the query's label",
    }
    return names[metric]


# --- cached views of methods (large arrays live in cache_resource: a data cache would copy them per hit) ---

def eval_rows(imageset: ImageSet):
    return imageset.split("eval")


@st.cache_resource(show_spinner=False, max_entries=32)
def _memmap(path: str, mtime_ns: int):
    import numpy as np
    return np.load(path, mmap_mode="r")


def model_arrays(imageset: ImageSet, models) -> dict:
    """Each model's cached embeddings of the dataset, memory-mapped once per process."""
    from core.explorer import cached_arrays
    found = cached_arrays(embedding_cache(), imageset, list(models))  # raises the "extract first" message
    out = {}
    for name, array in found.items():
        path = str(array.filename)
        out[name] = _memmap(path, os.stat(path).st_mtime_ns)
    return out


@st.cache_resource(show_spinner="Building the method's embeddings ...", max_entries=4)  # 50k x 5k floats = 1 GB each
def _method_embeddings(key: str, _imageset: ImageSet, _method):
    from core.explorer import method_embeddings as build
    return build(_method, model_arrays(_imageset, _method.models), eval_rows(_imageset))


def method_embeddings(imageset: ImageSet, method):
    return _method_embeddings(f"{imageset.fingerprint}|{method!r}", imageset, method)


@st.cache_resource(show_spinner="Scoring every query ...", max_entries=24)
def _method_scores(key: str, k: int, _imageset: ImageSet, _method):
    from core.explorer import query_scores
    return query_scores(method_embeddings(_imageset, _method), _imageset.labels[eval_rows(_imageset)], k)


def method_scores(imageset: ImageSet, method, k: int):
    return _method_scores(f"{imageset.fingerprint}|{method!r}", int(k), imageset, method)


def entries(imageset: ImageSet):
    from core.leaderboard import entries_for_dataset
    return entries_for_dataset(engine(), imageset.fingerprint)


def download_buttons(table: list[dict], name: str, key: str) -> None:
    """CSV and Markdown exports of a table."""
    import pandas as pd
    from core.leaderboard import to_markdown
    cols = st.columns(2)
    cols[0].download_button("Download CSV", pd.DataFrame(table).to_csv(index=False), f"{name}.csv", "text/csv",
                            key=f"{key}:csv", icon=":material/download:")
    cols[1].download_button("Download Markdown", to_markdown(table), f"{name}.md", "text/markdown",
                            key=f"{key}:md", icon=":material/download:")


@st.cache_resource(show_spinner="Loading the model for uploads ...", max_entries=8)
def loaded_model(name: str):
    """A model on the CPU for embedding uploaded query images (one per process)."""
    from core.models import load_model
    return load_model(name, "cpu")


def thumb(imageset: ImageSet, row: int, size: int = 128) -> str | None:
    from core.thumbnails import thumbnail_path
    path = thumbnail_path(workspace().thumbnails, imageset.paths[row], size)
    return str(path) if path is not None else None


def method_options(imageset: ImageSet) -> dict:
    """Every method the explorer can show, keyed by a label; values are (core.explorer.Method, result_id or None).
    Order: single models best first (by map@k at the board's usual k), other cached models, then ensembles
    and heads best first. So the first entry is the best single model and the first "[...]" one the best ensemble."""
    from core import leaderboard as lb
    from core.explorer import ExplorerError, Method
    all_entries = entries(imageset)
    ks = lb.available_ks(all_entries)
    ordered = []
    if ks:
        ordered = lb.board(all_entries, 50 if 50 in ks else ks[-1])
        ordered += [e for k in ks for e in lb.board(all_entries, k)]
    singles, fused = {}, {}
    for e in ordered:
        if e.kind == "single":
            singles.setdefault(e.models[0], (Method.single(e.models[0]), e.result_id))
            continue
        try:
            method = Method.from_entry(e)
        except ExplorerError:
            continue
        fused.setdefault(f"{e.method} [{e.kind}{', oracle' if e.is_oracle else ''}]", (method, e.result_id))
    for s in catalog.cached_sets(embedding_cache(), imageset.fingerprint):
        singles.setdefault(s.model_name, (Method.single(s.model_name), None))
    return {**singles, **fused}


@st.cache_resource(show_spinner="Projecting to 2-D ...", max_entries=8)
def _projection(key: str, how: str, max_points: int, _imageset: ImageSet, _method):
    from core.projection import project, sample_positions
    positions = sample_positions(_imageset.labels[eval_rows(_imageset)], max_points)
    return positions, project(method_embeddings(_imageset, _method)[positions], how)


def projection(imageset: ImageSet, method, how: str, max_points: int):
    """(eval positions shown, their 2-D coordinates)."""
    return _projection(f"{imageset.fingerprint}|{method!r}", how, int(max_points), imageset, method)


def url_index(name: str, options: list, default: int = 0) -> int:
    """The index of the option named in the URL (?name=value), so a reload keeps the choice."""
    wanted = st.query_params.get(name)
    texts = [str(o) for o in options]
    return texts.index(wanted) if wanted in texts else default


def remember(name: str, value) -> None:
    if st.query_params.get(name) != str(value):
        st.query_params[name] = str(value)
