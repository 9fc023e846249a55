"""Where a page stands: the workspace and its DB engine (one per process), the current dataset, and the
values a page reads from its URL. Also the one workaround for Streamlit's multipage routing.

Not a page itself (app.py lists the pages explicitly).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import streamlit as st

from core import catalog, views
from core.cache import EmbeddingCache
from core.configs import ConfigError
from core.db import init_db, make_engine
from core.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent

PAGES = {
    "start": "pages/start.py",
    "data": "pages/data.py",
    "leaderboard": "pages/leaderboard.py",
    "complementarity": "pages/complementarity.py",
    "sweep": "pages/sweep.py",
    "fusion": "pages/fusion.py",
    "explorer": "pages/query_explorer.py",
    "map": "pages/embedding_map.py",
    "runs": "pages/runs.py",
}
ROWS_PER_PAGE = 50


# --- routing --------------------------------------------------------------------------------------------

def leave_pages_directory_mode() -> None:
    """Checked against streamlit==1.67.0; tests/test_pages.py (test_routing_*) fails when an upgrade makes
    this unnecessary or breaks it. Streamlit treats a folder named pages/ beside app.py as the old (v1)
    multipage layout until some script in this process has called st.navigation (a private class flag,
    PagesManager.uses_pages_directory): a fresh server's first visitor on a deep link
    (/leaderboard?dataset=...) would get the bare page file, without app.py's navigation and sidebar. Leave
    that mode and rerun: the rerun goes through app.py, whose st.navigation finds the same page."""
    from streamlit.runtime.pages_manager import PagesManager
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


leave_pages_directory_mode()  # once per process: the first import, by whichever script runs first


# --- resources (one per process) ------------------------------------------------------------------------

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
    upgraded = init_db(engine)  # an older runs DB is upgraded in place, after a backup copy
    if upgraded:
        st.toast(upgraded, icon=":material/database:")
    return engine


def reopen_database() -> None:
    """Drop this process's engine, so the next call opens the file now at the runs DB's path."""
    _engine.clear()


def embedding_cache() -> EmbeddingCache:
    return EmbeddingCache(workspace().embeddings)


@st.cache_resource(show_spinner=False)
def device() -> str:
    from core.devices import resolve_device
    return resolve_device()


def start_worker() -> int:
    """A detached `python -m core.worker` on this workspace; its log goes to workspace/worker.log."""
    ws = workspace()
    with open(ws.root / "worker.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "core.worker", "--workspace", str(ws.root)], cwd=ROOT,
                                   stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    return process.pid


# --- the current dataset: URL first, then this session, then the DB's most recently used ----------------

def data_roots() -> tuple[Path, ...]:
    return views.data_roots(os.environ.get("ENSEMBLE_DATA_ROOTS"), workspace().root)


def allowed_source(source: Any) -> str:
    """`source` if the dashboard may open it (core.views.check_allowed_source), else ConfigError."""
    return views.check_allowed_source(source, data_roots(), catalog.known_sources(engine()))


def dataset_choice() -> tuple[str | None, str | None]:
    """(the current dataset's source or None, why the link's ?dataset= was refused or None)."""
    wanted = st.query_params.get("dataset")
    if wanted:
        checked = st.session_state.setdefault("dataset:allowed", set())
        if wanted not in checked:
            try:
                allowed_source(wanted)
            except ConfigError as error:
                return None, str(error)
            checked.add(wanted)
        source = wanted
    else:  # what this session or, after a restart, the DB last used: checked when it was chosen
        source = st.session_state.get("dataset") or catalog.last_used_source(engine())
    if source:
        _keep(source)
    return source, None


def current_source() -> str | None:
    return dataset_choice()[0]


def set_source(source: str) -> str:
    """Make `source` the current dataset (ConfigError if the dashboard may not open it)."""
    source = allowed_source(source)
    st.session_state.setdefault("dataset:allowed", set()).add(source)
    _keep(source)
    return source


def _keep(source: str) -> None:
    st.session_state["dataset"] = source
    remember("dataset", source)


# --- URL values -----------------------------------------------------------------------------------------

def url_value(name: str, parse: Callable[[str], Any], default: Any = None) -> Any:
    """?name= read through `parse` (a check from core.views or core.configs). A value it refuses is named
    in one clear message on the page, and `default` is used instead."""
    raw = st.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return parse(raw)
    except ConfigError as error:
        st.error(f"Ignored ?{name}= from the link: {views.md(error)}", icon=":material/link_off:")
        return default


def remember(name: str, value: Any) -> None:
    """Keep a choice in the URL, so a reload or a shared link shows the same."""
    if st.query_params.get(name) != str(value):
        st.query_params[name] = str(value)
