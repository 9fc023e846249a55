"""Runs: every extraction, evaluation, sweep and training ever run; open one, compare two, export tables."""
from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import db, jobs
from core import leaderboard as lb
from core.metrics import METRIC_KEYS
from pages import context

st.title("Runs")

KINDS = ["all", "extract", "evaluate", "sweep", "train_head", "promote"]


def result_table(entries) -> list[dict]:
    return [{"method": e.method, "type": e.kind, "models": " + ".join(e.used_models),
             "weights": ", ".join(f"{w:g}" for w in e.stored_weights) if e.stored_weights else "",
             **{m: e.score(m) for m in METRIC_KEYS}, "k": e.k, "oracle": e.is_oracle, "result_id": e.result_id}
            for e in entries]


with context.guarded():
    engine = context.engine()
    kind = st.segmented_control("Kind", KINDS, default="all", key="runs:kind") or "all"
    with db.read_session(engine) as session:
        total = db.count_runs(session, None if kind == "all" else kind)
    if total == 0:
        st.info("No runs yet. Prepare the offline demo on the Start page, or extract and evaluate on Data & models.")
    else:
        pages = max(1, -(-total // context.ROWS_PER_PAGE))
        page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="runs:page") if pages > 1 else 1
        with db.read_session(engine) as session:
            runs = db.list_runs(session, None if kind == "all" else kind, limit=context.ROWS_PER_PAGE,
                                offset=(page - 1) * context.ROWS_PER_PAGE)
            listing = [{"id": r.id, "kind": r.kind, "title": r.title, "status": r.status,
                        "dataset": r.dataset.name if r.dataset else "", "started (UTC)": r.started,
                        "duration_s": r.duration_s, "results": len(r.results),
                        "error": (r.error or "").splitlines()[0] if r.error else ""} for r in runs]
        picked = st.dataframe(pd.DataFrame(listing), hide_index=True, key="runs:table", on_select="rerun",
                              selection_mode="multi-row",
                              column_config={"duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f")})
        selected = [listing[i]["id"] for i in (picked.selection.rows if picked else [])]
        if selected:
            st.query_params["run"] = str(selected[0])
            if len(selected) > 1:
                st.query_params["compare"] = str(selected[1])

    with st.expander("Recent jobs (queued, running, failed)"):
        recent = jobs.list_jobs(engine, limit=20)
        if recent:
            st.dataframe(pd.DataFrame([{"job": j.id, "kind": j.kind, "status": j.status, "progress": j.progress,
                                        "message": j.message, "run": j.run_id,
                                        "error": (j.error or "").strip().splitlines()[0] if j.error else ""}
                                       for j in recent]), hide_index=True, key="runs:jobs")
        else:
            st.caption("No jobs yet.")
    context.show_jobs(key="runs:live")

    run_param = st.query_params.get("run")
    if run_param and run_param.isdigit():
        run, entries = lb.run_results(engine, int(run_param))
        if run is None:
            st.error(f"Run {run_param} does not exist in this workspace; pick one from the table.")
            st.stop()
        st.subheader(f"Run {run.id}: {run.title or run.kind}")
        status = {"done": st.success, "failed": st.error, "cancelled": st.warning}.get(run.status, st.info)
        status(f"{run.status}" + (f" after {run.duration_s:.1f} s" if run.duration_s else "")
               + (f": {run.error.splitlines()[0]}" if run.error else ""))
        with st.expander("Config"):
            st.code(json.dumps(run.config, indent=2, sort_keys=True), language="json")
        table = result_table(entries)
        if table:
            st.dataframe(pd.DataFrame(table), hide_index=True, key="runs:results",
                         column_config={m: st.column_config.NumberColumn(format="%.4f") for m in METRIC_KEYS})
            context.download_buttons(table, f"run-{run.id}", "runs:export")
            top = sorted(table, key=lambda r: -(r["map@k"] if r["map@k"] == r["map@k"] else -1))[:20]
            # Numbered labels: a sweep holds the same method under several weight vectors (bars must not stack).
            st.plotly_chart(go.Figure(go.Bar(x=[r["map@k"] for r in top],
                                             y=[f"{i}. {r['method']}" for i, r in enumerate(top, start=1)],
                                             orientation="h"))
                            .update_layout(title="map@k", yaxis={"autorange": "reversed"}, height=120 + 26 * len(top)),
                            key="runs:bar")
        if run.kind == "sweep":
            st.page_link(context.PAGES["sweep"], label="Open this sweep's heatmap", icon=":material/tune:",
                         query_params={"sweep": str(run.id), **({"dataset": run.dataset.source} if run.dataset else {})})
        if run.kind == "train_head":
            with db.read_session(engine) as session:
                points = [p.values for p in db.curve(session, run.id)]
            if points:
                frame = pd.DataFrame(points)
                st.line_chart(frame.set_index("epoch")[[c for c in ("loss", "val_map", "eval_map") if c in frame]])

        compare = st.query_params.get("compare")
        other = st.number_input("Compare with run id", 0, 10**9, int(compare) if compare and compare.isdigit() else 0,
                                key="runs:compare", help="0 = no comparison")
        if other:
            run_b, entries_b = lb.run_results(engine, int(other))
            if run_b is None:
                st.error(f"Run {other} does not exist.")
            else:
                a = {r["method"]: r for r in table}
                b = {r["method"]: r for r in result_table(entries_b)}
                merged = [{"method": m, f"run {run.id} map@k": a.get(m, {}).get("map@k"),
                           f"run {run_b.id} map@k": b.get(m, {}).get("map@k")} for m in dict.fromkeys([*a, *b])]
                for row in merged:
                    x, y = row[f"run {run.id} map@k"], row[f"run {run_b.id} map@k"]
                    row["difference"] = (y - x) if x is not None and y is not None else None
                st.markdown(f"**Run {run.id} vs run {run_b.id}**")
                st.dataframe(pd.DataFrame(merged), hide_index=True, key="runs:compare_table")
                context.download_buttons(merged, f"run-{run.id}-vs-{run_b.id}", "runs:compare_export")
    elif total:
        st.info("Select a run in the table to see its results, config and curves.", icon=":material/touch_app:")
