"""Weight sweep: search concat weights over models and subsets, see the ranked vectors and the map over weights."""
from __future__ import annotations

import itertools

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import catalog
from core import leaderboard as lb
from core.metrics import METRIC_KEYS
from pages import context

st.title("Weight sweep")
st.caption("Every weight vector is scored on the eval split it is reported on: these are **oracle (tuned on eval)** "
           "numbers, as in the reference study. A weight of 0 leaves a model out, so one sweep covers every subset.")

with context.guarded():
    imageset = context.require_imageset()
    source = context.current_source()
    engine = context.engine()
    cached = [s.model_name for s in catalog.cached_sets(context.embedding_cache(), imageset.fingerprint)]

    with st.expander("Launch a sweep", expanded=not lb.runs_for_dataset(engine, imageset.fingerprint, "sweep")):
        if len(cached) < 2:
            st.info("A sweep needs at least two models with cached embeddings: extract them on Data & models.")
        with st.form("sweep:form"):
            models = st.multiselect("Models (2 to 4)", cached, default=cached[:4], max_selections=4, key="sweep:models")
            cols = st.columns(2)
            weights_text = cols[0].text_input("Weight values", "0, 1, 2, 3, 4, 5", key="sweep:weights",
                                              help="Each model takes each value; 0 = left out")
            k = cols[1].number_input("k", min_value=1, max_value=1000, value=50, key="sweep:k")
            if st.form_submit_button("Start sweep", type="primary", icon=":material/tune:"):
                try:
                    values = sorted({float(v) for v in weights_text.replace(";", ",").split(",") if v.strip()})
                except ValueError:
                    values = []
                if len(models) < 2:
                    st.warning("Choose at least two models.")
                elif not values or any(v < 0 for v in values) or not any(values):
                    st.warning("Weight values must be non-negative numbers, at least one above zero, e.g. 0, 1, 2, 3.")
                else:
                    n = len(values) ** len(models) - (1 if 0 in values else 0)
                    job = context.submit("sweep", {"dataset": source, "models": models,
                                                   "weights": [int(v) if v.is_integer() else v for v in values],
                                                   "k": int(k)})
                    st.success(f"Sweep of {n} weight vectors queued as job {job}.")
    context.show_jobs(kinds=("sweep",), key="sweep:jobs")

    runs = [r for r in lb.runs_for_dataset(engine, imageset.fingerprint, "sweep") if r.status == "done"]
    if not runs:
        st.info("No finished sweep on this dataset yet.")
        st.stop()
    wanted = st.query_params.get("sweep")
    ids = [r.id for r in runs]
    index = ids.index(int(wanted)) if wanted and wanted.isdigit() and int(wanted) in ids else 0
    run_id = st.selectbox("Sweep", ids, index=index, key="sweep:run",
                          format_func=lambda i: next(f"run {r.id} · {r.title} · {r.started:%Y-%m-%d %H:%M}" for r in runs if r.id == i))
    st.query_params["sweep"] = str(run_id)
    metric = st.selectbox("Metric", METRIC_KEYS, key="sweep:metric")
    run, entries = lb.run_results(engine, run_id)
    models = list(run.config.get("models", []))
    table = lb.sweep_rows(entries, models, metric)
    st.caption(f"{len(table)} weight vectors over {', '.join(models)}, k={run.config.get('k', 50)}; "
               "vectors in the same ratio class rank identically ('same as').")

    distinct = st.toggle("One row per ratio class (multiples of a weight vector rank identically)", value=True,
                         key="sweep:distinct")
    # One row per class: rank = the rank among the distinct ratio classes (1, 2, 3 ... without gaps).
    listed = [{**r, "rank": i} for i, r in enumerate((r for r in table if not r["same as"]), start=1)] \
        if distinct else table
    page_size = context.ROWS_PER_PAGE
    pages = max(1, -(-len(listed) // page_size))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="sweep:page") if pages > 1 else 1
    shown = listed[(page - 1) * page_size: page * page_size]
    # Rank, weights and their ratio class first (narrow columns that stay in view), then the metrics; the
    # long method name and the ids last.
    weight_cols = [f"w:{m}" for m in models]
    order = ["rank", *weight_cols, "ratio class", "same as", *METRIC_KEYS, "method", "oracle", "result_id"]
    picked = st.dataframe(pd.DataFrame(shown), hide_index=True, key="sweep:table", on_select="rerun",
                          selection_mode="single-row", column_order=order,
                          column_config={"rank": st.column_config.NumberColumn(width="small"),
                                         "ratio class": st.column_config.NumberColumn(help="vectors that are multiples of each other share a class"),
                                         "same as": st.column_config.TextColumn(width="small"),
                                         **{m: st.column_config.NumberColumn(format="%.4f") for m in METRIC_KEYS}})
    rows = picked.selection.rows if picked else []
    choice = shown[rows[0]] if rows else (shown[0] if shown else None)
    if choice is not None:
        cols = st.columns([3, 1])
        cols[0].markdown(f"Selected: **{choice['method']}** ({metric} {choice[metric]:.4f}, oracle)")
        if cols[1].button("Promote to leaderboard", key="sweep:promote", icon=":material/upgrade:"):
            promoted = lb.promote(engine, choice["result_id"])
            st.success(f"Promoted (run {promoted}); it now shows on the leaderboard.")
    context.download_buttons(table, f"sweep-run{run_id}", "sweep:export")

    frame = pd.DataFrame(table)
    if len(models) == 2:
        grid = frame.pivot_table(index=weight_cols[0], columns=weight_cols[1], values=metric, aggfunc="max")
        # The all-zero vector is never scored: its cell stays blank (no "NaN" label).
        labels = [[f"{v:.4f}" if pd.notna(v) else "" for v in row] for row in grid.values]
        figure = go.Figure(go.Heatmap(z=grid.values, x=[f"{c:g}" for c in grid.columns], y=[f"{i:g}" for i in grid.index],
                                      colorscale="Viridis", text=labels, texttemplate="%{text}",
                                      colorbar={"title": metric}))
        # Categorical axes: one equal cell per weight value, ticks labelled by the values (0, 1, 3 not a
        # numeric axis with uneven cells and ticks at -0.5, 0, 0.5 ...).
        figure.update_layout(title=f"{metric} over weights (oracle)", xaxis_title=models[1], yaxis_title=models[0],
                             xaxis={"type": "category"}, yaxis={"type": "category"}, height=480)
        st.plotly_chart(figure, key="sweep:heatmap")
    elif len(models) > 2:
        dims = [{"label": m.split(":")[-1][-14:], "values": frame[c]} for m, c in zip(models, weight_cols)]
        dims.append({"label": metric, "values": frame[metric]})
        figure = go.Figure(go.Parcoords(line={"color": frame[metric], "colorscale": "Viridis", "showscale": True},
                                        dimensions=dims))
        figure.update_layout(title=f"{metric} over weights (oracle): one line per weight vector", height=460)
        st.plotly_chart(figure, key="sweep:parcoords")
        # Small multiples: the best value over the other weights for each pair of models.
        pairs = list(itertools.combinations(range(len(models)), 2))
        cells = st.columns(min(3, len(pairs)))
        for i, (a, b) in enumerate(pairs):
            grid = frame.pivot_table(index=weight_cols[a], columns=weight_cols[b], values=metric, aggfunc="max")
            small = go.Figure(go.Heatmap(z=grid.values, x=[f"{c:g}" for c in grid.columns],
                                         y=[f"{v:g}" for v in grid.index], colorscale="Viridis", showscale=False))
            small.update_layout(height=260, margin={"l": 10, "r": 10, "t": 30, "b": 10},
                                xaxis={"type": "category"}, yaxis={"type": "category"},
                                title=f"best {metric}", xaxis_title=models[b][-14:], yaxis_title=models[a][-14:])
            cells[i % len(cells)].plotly_chart(small, key=f"sweep:small:{a}:{b}")
