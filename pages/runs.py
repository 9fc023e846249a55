"""Runs: every extraction, evaluation, sweep and training ever run; open one, compare two, export tables."""
from __future__ import annotations

import json
from functools import partial

import pandas as pd
import streamlit as st

from core import db, jobs, views
from core import leaderboard as lb
from core.metrics import METRIC_KEYS
from pages import charts, state, widgets

st.title("Runs")
KINDS = ["all", "extract", "evaluate", "sweep", "select_weights", "train_head", "promote"]
NUMBERS = {m: st.column_config.NumberColumn(format="%.4f") for m in METRIC_KEYS}
STATUS = {"done": st.success, "failed": st.error, "cancelled": st.warning}


def listing(engine, kind: str | None) -> None:
    """A page of runs (newest first); selecting rows puts the first in ?run= and the second in ?compare=."""
    with db.read_session(engine) as session:
        total = db.count_runs(session, kind)
    if total == 0:
        st.info("No runs yet. Prepare the offline demo on the Start page, or extract and evaluate on Data & models.")
        return
    pages = views.page_count(total, state.ROWS_PER_PAGE)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="runs:page") if pages > 1 else 1
    table = views.run_listing(engine, kind, state.ROWS_PER_PAGE, (page - 1) * state.ROWS_PER_PAGE)
    picked = st.dataframe(pd.DataFrame(table), hide_index=True, key="runs:table", on_select="rerun",
                          selection_mode="multi-row",
                          column_config={"duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f")})
    for name, i in zip(("run", "compare"), picked.selection.rows if picked else []):
        st.query_params[name] = str(table[i]["id"])
    if "run" not in st.query_params:
        st.info("Select a run in the table to see its results, config and curves.", icon=":material/touch_app:")


def one_run(engine, run: db.Run, table: list[dict]) -> None:
    st.subheader(f"Run {run.id}: {views.md(run.title or run.kind)}")
    STATUS.get(run.status, st.info)(views.md(f"{run.status}" + (f" after {run.duration_s:.1f} s" if run.duration_s else "")
                                             + (f": {views.first_line(run.error)}" if run.error else "")))
    with st.expander("Config"):
        st.code(json.dumps(run.config, indent=2, sort_keys=True), language="json")
    if table:
        st.dataframe(pd.DataFrame(table), hide_index=True, key="runs:results", column_config=NUMBERS)
        widgets.download_buttons(table, f"run-{run.id}", "runs:export")
        st.plotly_chart(charts.run_bars(views.ranked(table, "map@k", 20)), key="runs:bar")
    if run.kind == "sweep":
        st.page_link(state.PAGES["sweep"], label="Open this sweep's heatmap", icon=":material/tune:",
                     query_params={"sweep": str(run.id), **({"dataset": run.dataset.source} if run.dataset else {})})
    points = views.curve_points(engine, run.id) if run.kind == "train_head" else []
    if points:
        st.plotly_chart(charts.training_curve(points, int(run.config.get("k") or 0)), key="runs:curve")


def comparison(engine, run: db.Run, table: list[dict]) -> None:
    other = st.number_input("Compare with run id", 0, views.MAX_ID, key="runs:compare", help="0 = no comparison",
                            value=state.url_value("compare", partial(views.parse_id, name="compare"), 0))
    if not other:
        return
    run_b, entries_b = lb.run_results(engine, int(other))
    if run_b is None:
        st.error(f"Run {other} does not exist.")
        return
    merged = views.run_comparison(run.id, table, run_b.id, lb.rows(entries_b))
    st.markdown(f"**Run {run.id} vs run {run_b.id}**")
    st.dataframe(pd.DataFrame(merged), hide_index=True, key="runs:compare_table")
    widgets.download_buttons(merged, f"run-{run.id}-vs-{run_b.id}", "runs:compare_export")


with widgets.guarded():
    engine = state.engine()
    kind = st.segmented_control("Kind", KINDS, default="all", key="runs:kind") or "all"
    listing(engine, None if kind == "all" else kind)
    with st.expander("Recent jobs (queued, running, failed)"):
        recent = jobs.list_jobs(engine, limit=20)
        if recent:
            st.dataframe(pd.DataFrame(views.job_rows(recent)), hide_index=True, key="runs:jobs")
        else:
            st.caption("No jobs yet.")
    widgets.show_jobs(key="runs:live")

    run_id = state.url_value("run", partial(views.parse_id, name="run", lowest=1))
    if run_id is not None:
        run, entries = lb.run_results(engine, run_id)
        if run is None:
            st.error(f"Run {run_id} does not exist in this workspace; pick one from the table.")
            st.stop()
        table = lb.rows(entries)
        one_run(engine, run, table)
        comparison(engine, run, table)
