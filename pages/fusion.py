"""Fusion heads: train small networks over frozen embeddings (train split), watch their curves, compare, promote."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core import configs, jobs, views
from core import leaderboard as lb
from core.heads import HEAD_KINDS, LOSSES, HeadConfig
from core.metrics import METRIC_KEYS
from pages import cached, charts, state, widgets

st.title("Fusion heads")
st.caption("A head is fitted on the **train** split (early stopping on a part of train) and reported on the "
           "**eval** split — unlike sweep weights, these numbers are not tuned on eval.")


def train_form(source: str, models: list[str], n_train: int) -> None:
    defaults = HeadConfig()  # core's tuned defaults
    with st.form("fusion:form"):
        chosen = st.multiselect("Models", models, default=models[:4], key="fusion:models")
        cols = st.columns(3)
        kind = cols[0].selectbox("Head", HEAD_KINDS, index=HEAD_KINDS.index(defaults.kind), key="fusion:kind",
                                 help="mlp: concat → MLP; project_concat: per-model projections; learned_ratio: learn concat weights")
        loss = cols[1].selectbox("Loss", LOSSES, index=LOSSES.index(defaults.loss), key="fusion:loss")
        out_dim = cols[2].number_input("Output dim", 8, 8192, defaults.out_dim, step=64, key="fusion:out_dim")
        cols = st.columns(3)
        epochs = cols[0].number_input("Epochs", 1, 500, defaults.epochs, key="fusion:epochs")
        lr = cols[1].number_input("Learning rate", 1e-6, 1.0, defaults.lr, format="%.5f", key="fusion:lr")
        k = cols[2].number_input("k (map@k)", 1, configs.MAX_K, configs.DEFAULT_K, key="fusion:k")
        if st.form_submit_button("Train head", type="primary", icon=":material/model_training:", disabled=n_train == 0):
            with widgets.guarded():
                head = {"kind": kind, "loss": loss, "out_dim": int(out_dim), "epochs": int(epochs), "lr": float(lr)}
                config = configs.TrainHeadConfig(dataset=source, models=tuple(chosen), head=head, k=int(k))
                widgets.submitted(config.submit(state.engine()), "Training")


def curve(run_id: int, k: int, key: str) -> None:
    figure = charts.training_curve(views.curve_points(state.engine(), run_id), k)
    if figure is not None:
        st.plotly_chart(figure, key=key)


@st.fragment(run_every=widgets.POLL_SECONDS)
def live_curves() -> None:
    engine = state.engine()
    for job in jobs.list_jobs(engine, status=jobs.RUNNING, kind="train_head", limit=4):
        if job.run_id is not None:
            st.markdown(f"**Live: job {job.id}** — {views.md(job.message or '')}")
            curve(job.run_id, int(job.params.get("k") or configs.DEFAULT_K), f"fusion:live:{job.id}")
            st.button("Stop training", key=f"fusion:stop:{job.id}", icon=":material/stop:",
                      disabled=bool(job.cancel_requested), on_click=jobs.request_cancel, args=(engine, job.id))


with widgets.guarded():
    imageset, source = widgets.require_imageset()
    engine = state.engine()
    n_train = len(imageset.split("train"))
    if n_train == 0:
        st.warning("This dataset has no train split, so no head can be trained here: give the manifest a split "
                   "column (train/eval) or use train/ and eval/ folders.")
    train_form(source, cached.cached_models(imageset), n_train)
    widgets.show_jobs(kinds=("train_head",), key="fusion:jobs")
    if jobs.list_jobs(engine, status=jobs.RUNNING, kind="train_head", limit=1):  # poll only while one trains
        live_curves()

    st.subheader("Finished heads")
    table = views.head_rows([lb.run_results(engine, run.id) for run in views.done_runs(engine, imageset.fingerprint,
                                                                                          "train_head")])
    if not table:
        st.info("No trained heads on this dataset yet.")
        st.stop()
    picked = st.dataframe(pd.DataFrame(table), hide_index=True, key="fusion:table", on_select="rerun",
                          selection_mode="single-row",
                          column_config={m: st.column_config.NumberColumn(format="%.4f") for m in METRIC_KEYS})
    chosen = table[picked.selection.rows[0]] if picked and picked.selection.rows else table[0]
    st.markdown(f"**Run {chosen['run_id']}: {views.md(chosen['method'])}** over {views.md(chosen['models'])}")
    curve(chosen["run_id"], chosen["k"] or configs.DEFAULT_K, "fusion:curve")
    if st.button("Promote to leaderboard", key="fusion:promote", icon=":material/upgrade:"):
        st.success(f"Promoted (run {lb.promote(engine, chosen['result_id'])}).")
