"""Complementarity: which models retrieve differently, at a glance, and how far any ensemble of them could go."""
from __future__ import annotations


import pandas as pd
import streamlit as st

from core import configs, views
from core import leaderboard as lb
from pages import cached, charts, state, widgets

st.title("Complementarity")
st.caption("Per pair of models on the eval split: how much their top-k lists and representations agree, how "
           "their per-query AP correlates, and the per-query oracle. Models that agree everywhere leave an "
           "ensemble little to gain; a pair that disagrees with a high pair oracle is where fusion can help.")


def launch_form(source: str, models: list[str]) -> None:
    with st.form("comp:form"):
        cols = st.columns([3, 1])
        chosen = cols[0].multiselect("Models (at least two)", models, default=models, key="comp:models")
        k = cols[1].number_input("k", 1, configs.MAX_K, configs.DEFAULT_K, key="comp:k")
        if st.form_submit_button("Compare the models", type="primary", icon=":material/compare_arrows:"):
            with widgets.guarded():
                config = configs.ComplementarityConfig(dataset=source, models=tuple(chosen), k=int(k))
                widgets.submitted(config.submit(state.engine()), "Complementarity")


def summary_view(summary: dict) -> None:
    """The stored summary (core.complementarity) drawn: the ceiling in words, each model's map@k and best
    partner, and one heatmap per pairwise measure."""
    st.info(views.md(views.oracle_text(summary)), icon=":material/vertical_align_top:")
    st.dataframe(pd.DataFrame(views.complementarity_rows(summary)), hide_index=True, key="comp:models_table",
                 column_config={c: st.column_config.NumberColumn(format="%.4f") for c in ("map@k", "pair oracle")})
    matrices = views.pair_matrices(summary)
    for i in range(0, len(matrices), 2):  # two per row, in PAIR_MATRICES order
        for cell, matrix in zip(st.columns(2), matrices[i:i + 2]):
            cell.plotly_chart(charts.pair_matrix(matrix), key=f"comp:{matrix.key}")
    st.caption(f"CKA on {summary.get('cka_rows', '?')} sampled rows; {summary.get('n_excluded', 0)} queries without "
               "a relevant item left out.")


with widgets.guarded():
    imageset, source = widgets.require_imageset()
    engine = state.engine()
    runs = {run.id: run for run in views.done_runs(engine, imageset.fingerprint, "complementarity")}
    with st.expander("Compare models", expanded=not runs):
        launch_form(source, cached.cached_models(imageset))
    widgets.show_jobs(kinds=("complementarity",), key="comp:jobs")
    if not runs:
        st.info("No comparison of models on this dataset yet: compare two or more models with cached embeddings.")
        st.stop()
    run_id = widgets.pick_run(runs, "comparison", "Comparison", key="comp:run")
    run, _ = lb.run_results(engine, run_id)
    if not run or not run.summary:
        st.warning(f"Run {run_id} kept no summary: compare the models again.")
        st.stop()
    summary_view(run.summary)
