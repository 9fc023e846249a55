"""What several pages draw the same way: errors, the dataset gate, the live job panel, download buttons and
the headline (best single model, honest ensemble, oracle).

Not a page itself (app.py lists the pages explicitly). Every user string shown as Markdown here goes
through core.views.md.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
from functools import partial

import pandas as pd
import streamlit as st

from core import catalog, jobs, views
from core.datasets import ImageSet
from core.db import utcnow
from core.errors import user_message
from core.leaderboard import Headline, to_markdown
from core.methods import ORACLE_LABEL
from pages import cached, state

log = logging.getLogger("ensemble_explorer.pages")

POLL_SECONDS = 2.0
# With no job queued or running, look for new ones (another tab, the CLI) this rarely: each poll reruns
# the panel, and a rerun can close a dropdown the user is opening.
IDLE_POLL_SECONDS = 10.0
FAILURES_SHOWN_FOR_H = 6  # a failed job is announced on the pages for this long, then only on Runs
FUSION_KINDS = ("fuse", "select_weights", "train_head")  # the jobs the Fusion page submits
RESULT_KINDS = ("extract", "evaluate", "sweep", *FUSION_KINDS)  # the jobs that add rows to the leaderboard


# --- errors -------------------------------------------------------------------------------------------

def show_error(error: BaseException) -> None:
    """One clear line on the page (core.errors.user_message); the traceback goes to the server log only."""
    log.error("page error: %s", user_message(error), exc_info=error)
    st.error(views.md(user_message(error)), icon=":material/error:")


@contextlib.contextmanager
def guarded():
    """Any error in the block becomes one clear message instead of a traceback. Streamlit's own stop and
    rerun signals are not Exceptions and pass through."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - the page must never show a raw traceback
        show_error(error)


# --- the current dataset --------------------------------------------------------------------------------

def require_imageset() -> tuple[ImageSet, str]:
    """The current dataset, opened, and its source; or a message that says what to do, and the page stops."""
    source, problem = state.dataset_choice()
    if problem or not source:
        if problem:
            st.error(views.md(problem), icon=":material/block:")
        else:
            st.info("No dataset chosen yet. Pick one (or the offline demo) on the **Data & models** page.")
        st.page_link(state.PAGES["data"], label="Go to Data & models", icon=":material/folder_open:")
        st.stop()
    imageset = cached.imageset(source)
    if not st.session_state.get(f"registered:{source}"):  # once per session: the leaderboard finds it by fingerprint
        catalog.register_dataset(state.engine(), imageset, source)
        st.session_state[f"registered:{source}"] = True
    return imageset, source


def require_models(models: list[str], at_least: int = 1) -> None:
    """Stop with a pointer to the Data page when fewer than `at_least` models have cached embeddings."""
    if len(models) < at_least:
        st.info("No cached embeddings for this dataset yet: extract some on the Data & models page.")
        st.page_link(state.PAGES["data"], label="Go to Data & models", icon=":material/folder_open:")
        st.stop()


# --- jobs ---------------------------------------------------------------------------------------------

def job_label(job) -> str:
    models = job.params.get("models", []) if isinstance(job.params, dict) else []
    what = ", ".join(str(m) for m in models) if isinstance(models, list) else ""
    return views.md(f"Job {job.id} · {job.kind}" + (f" · {what}" if what else ""))


def submitted(job, what: str) -> None:
    st.success(f"{what} queued as job {job.id}. Progress shows below; you can leave this page.")


def show_jobs(kinds: tuple[str, ...] | None = None, key: str = "jobs") -> None:
    """Live progress of queued and running jobs (of `kinds`) with Cancel buttons, and the last failure."""
    engine = state.engine()

    def active_jobs():
        return [j for j in jobs.list_jobs(engine, status=jobs.ACTIVE, limit=20) if kinds is None or j.kind in kinds]

    busy = bool(active_jobs())

    @st.fragment(run_every=POLL_SECONDS if busy else IDLE_POLL_SECONDS)
    def panel():
        active = active_jobs()
        seen = set(st.session_state.get(f"{key}:active", []))
        now = {j.id for j in active}
        st.session_state[f"{key}:active"] = sorted(now)
        if seen - now:  # something finished while we watched: refresh the whole page to show its results
            st.rerun(scope="app")
        if active and not busy:  # a job appeared (another tab, the CLI): rerun to poll at the fast rate
            st.rerun(scope="app")
        if active and not jobs.worker_alive(engine):
            st.warning("No worker is running, so queued jobs wait. Start one from the sidebar.", icon=":material/warning:")
        for job in active:
            cols = st.columns([5, 1])
            text = f"{job_label(job)} — {job.status}: {views.md(job.message or '')}"
            cols[0].progress(min(max(float(job.progress or 0.0), 0.0), 1.0), text=text)
            # A callback, so the click is recorded before the (fragment or full) rerun draws the panel again.
            cols[1].button("Cancel", key=f"{key}:cancel:{job.id}", disabled=bool(job.cancel_requested),
                           on_click=jobs.request_cancel, args=(engine, job.id))
        recent = utcnow() - dt.timedelta(hours=FAILURES_SHOWN_FOR_H)
        failed = [j for j in jobs.list_jobs(engine, status=jobs.FAILED, limit=5)
                  if (kinds is None or j.kind in kinds) and j.finished and j.finished > recent]
        if failed:
            reason = views.first_line(failed[0].error) or "no reason recorded"
            st.error(f"{job_label(failed[0])} failed: {views.md(reason)} (details on the Runs page)",
                     icon=":material/error:")

    panel()


# --- tables and the headline ---------------------------------------------------------------------------

def download_buttons(table: list[dict], name: str, key: str) -> None:
    """CSV and Markdown exports of a table."""
    cols = st.columns(2)
    cols[0].download_button("Download CSV", pd.DataFrame(table).to_csv(index=False), f"{name}.csv", "text/csv",
                            key=f"{key}:csv", icon=":material/download:")
    cols[1].download_button("Download Markdown", to_markdown(table), f"{name}.md", "text/markdown",
                            key=f"{key}:md", icon=":material/download:")


def headline(h: Headline, intervals: bool = True) -> None:
    """core.leaderboard.headline drawn: the best single model, the best ensemble chosen without the eval
    split with its gain and paired interval (unless `intervals` is False: not computed), and beside it the
    best one tuned on eval, always labelled as the oracle."""
    cols = st.columns(3)
    if h.best_single is None:
        st.warning(f"No single model evaluated at k={h.k}, so no gain can be computed: evaluate the models.")
        return
    base = h.best_single.score(h.metric)
    cols[0].metric(f"Best single model ({h.metric})", f"{base:.4f}", help=views.md(h.best_single.label))
    cols[0].caption(views.md(h.best_single.label))
    if h.best_ensemble is not None:
        gain = h.gain(h.best_ensemble)
        cols[1].metric("Best ensemble (chosen without eval)", f"{h.best_ensemble.score(h.metric):.4f}",
                       f"{gain:+.4f} ({views.relative_gain(gain, base):+.1f}%)",
                       help=f"{views.md(h.best_ensemble.label)}, chosen on {h.best_ensemble.selected_on}")
        cols[1].caption(views.md(h.best_ensemble.label + (f" · {views.interval_text(h.ensemble_vs_single)}"
                                                          if intervals else "")))
    else:
        cols[1].info("No ensemble chosen without the eval split yet: choose weights on train (Weight sweep page) "
                     "or train a fusion head. Sweep weights are tuned on eval: they count only as the oracle.")
    if h.best_oracle is not None:
        gain = h.gain(h.best_oracle)
        cols[2].metric(f"Best ensemble, {ORACLE_LABEL}", f"{h.best_oracle.score(h.metric):.4f}",
                       f"{gain:+.4f} ({views.relative_gain(gain, base):+.1f}%)",
                       help="weights tuned on the eval split it is scored on, so this overstates what the "
                            "ensemble does on new data")
        cols[2].caption(views.md(h.best_oracle.label + (f" · {views.interval_text(h.oracle_vs_single)}"
                                                        if intervals else "")))


def pick_run(runs: dict, name: str, label: str, key: str) -> int:
    """A selectbox over finished runs (newest first), its choice kept in the URL as ?name=<run id>."""
    ids = list(runs)
    wanted = state.url_value(name, partial(views.pick, options=ids, name=name), ids[0])
    run_id = st.selectbox(label, ids, index=ids.index(wanted), key=key,
                          format_func=lambda i: f"run {i} · {runs[i].title} · {runs[i].started:%Y-%m-%d %H:%M}")
    state.remember(name, run_id)
    return run_id
