"""Weight sweep: search concat weights over models and subsets, see the ranked vectors and the map over weights."""
from __future__ import annotations

import itertools

import pandas as pd
import streamlit as st

from core import configs, views
from core import leaderboard as lb
from core.methods import ORACLE_LABEL
from core.metrics import METRIC_KEYS
from pages import cached, charts, state, widgets

st.title("Weight sweep")
st.caption(f"Every weight vector is scored on the eval split it is reported on: these are **{ORACLE_LABEL}** "
           "numbers, as in the reference study. A weight of 0 leaves a model out, so one sweep covers every subset.")
# Rank, weights and their ratio class first (narrow columns that stay in view), then the metrics; the long
# method name and the ids last.
COLUMNS = {"rank": st.column_config.NumberColumn(width="small"),
           "ratio class": st.column_config.NumberColumn(help="vectors that are multiples of each other share a class"),
           "same as": st.column_config.TextColumn(width="small"),
           **{m: st.column_config.NumberColumn(format="%.4f") for m in METRIC_KEYS}}


def launch_form(source: str, models: list[str]) -> None:
    if len(models) < 2:
        st.info("A sweep needs at least two models with cached embeddings: extract them on Data & models.")
    with st.form("sweep:form"):
        chosen = st.multiselect("Models (2 to 4)", models, default=models[:4], max_selections=4, key="sweep:models")
        cols = st.columns(2)
        weights = cols[0].text_input("Weight values", ", ".join(map(str, configs.DEFAULT_GRID)), key="sweep:weights",
                                     help="Each model takes each value; 0 = left out")
        k = cols[1].number_input("k", min_value=1, max_value=configs.MAX_K, value=configs.DEFAULT_K, key="sweep:k")
        cols = st.columns(2)
        oracle = cols[0].form_submit_button("Start sweep", type="primary", icon=":material/tune:",
                                            help=f"Scores every vector on eval: {ORACLE_LABEL}")
        honest = cols[1].form_submit_button("Choose weights on train", icon=":material/verified:",
                                            help="The same search on the train split; only the chosen vector is "
                                                 "scored on eval (an honest ensemble for the headline)")
        if oracle or honest:
            with widgets.guarded():
                if len(chosen) < 2:
                    raise configs.ConfigError("choose at least two models to sweep their weights")
                settings = configs.SweepConfig if oracle else configs.SelectWeightsConfig
                config = settings(dataset=source, models=tuple(chosen), weights=weights, k=int(k))
                n = views.grid_size(config.weights, len(chosen))
                widgets.submitted(config.submit(state.engine()), f"Sweep of {n:,} weight vectors" if oracle
                                  else f"Choosing weights on train among {n:,} vectors")


def pictures(table: list[dict], models: list[str], metric: str) -> None:
    """The metric over the weights: a heatmap of two models' weights; with more models, each model's best
    value per weight first, and the heatmap of a chosen pair (at the best over the other weights). Plain
    charts: parallel coordinates draw with WebGL, seconds per render where the browser has no GPU."""
    pair = tuple(models)
    if len(models) > 2:
        st.plotly_chart(charts.weight_profiles(views.best_by_weight(table, models, metric), metric),
                        key="sweep:profiles")
        pairs = list(itertools.combinations(models, 2))
        pair = st.selectbox("Heatmap of two models' weights (best over the others' weights)", pairs,
                            format_func=" × ".join, key="sweep:pair")
    grid = views.heatmap(table, f"w:{pair[0]}", f"w:{pair[1]}", metric)
    st.plotly_chart(charts.weight_heatmap(grid, metric, pair[1], pair[0]), key="sweep:heatmap")


with widgets.guarded():
    imageset, source = widgets.require_imageset()
    engine = state.engine()
    runs = {run.id: run for run in views.done_runs(engine, imageset.fingerprint, "sweep")}
    with st.expander("Launch a sweep", expanded=not runs):
        launch_form(source, cached.cached_models(imageset))
    widgets.show_jobs(kinds=("sweep",), key="sweep:jobs")
    if not runs:
        st.info("No finished sweep on this dataset yet.")
        st.stop()

    run_id = widgets.pick_run(runs, "sweep", "Sweep", key="sweep:run")
    metric = st.selectbox("Metric", METRIC_KEYS, key="sweep:metric")
    run, table = cached.sweep_table(run_id, metric)
    models = list(run.config.get("models", []))
    st.caption(f"{len(table)} weight vectors over {views.md(', '.join(models))}, k={run.config.get('k')}; "
               "vectors in the same ratio class rank identically ('same as').")

    distinct = st.toggle("One row per ratio class (multiples of a weight vector rank identically)", value=True,
                         key="sweep:distinct")
    listed = views.distinct_rows(table) if distinct else table
    pages = views.page_count(len(listed), state.ROWS_PER_PAGE)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="sweep:page") if pages > 1 else 1
    shown = views.page_of(listed, page, state.ROWS_PER_PAGE)
    order = ["rank", *[f"w:{m}" for m in models], "ratio class", "same as", *METRIC_KEYS, "method", "oracle", "result_id"]
    picked = st.dataframe(pd.DataFrame(shown), hide_index=True, key="sweep:table", on_select="rerun",
                          selection_mode="single-row", column_order=order, column_config=COLUMNS)
    choice = shown[picked.selection.rows[0]] if picked and picked.selection.rows else (shown[0] if shown else None)
    if choice is not None:
        cols = st.columns([3, 1])
        cols[0].markdown(f"Selected: **{views.md(choice['method'])}** ({metric} {choice[metric]:.4f}, {ORACLE_LABEL})")
        if cols[1].button("Promote to leaderboard", key="sweep:promote", icon=":material/upgrade:"):
            st.success(f"Promoted (run {lb.promote(engine, choice['result_id'])}); it now shows on the leaderboard.")
    widgets.download_buttons(table, f"sweep-run{run_id}", "sweep:export")
    pictures(table, models, metric)
