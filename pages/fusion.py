"""Fusion heads: train small networks over frozen embeddings (train split), watch their curves, compare, promote."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import catalog, db, jobs
from core import leaderboard as lb
from core.heads import HEAD_KINDS, LOSSES, HeadConfig
from core.metrics import METRIC_KEYS
from pages import context

st.title("Fusion heads")
st.caption("A head is fitted on the **train** split (early stopping on a part of train) and reported on the "
           "**eval** split — unlike sweep weights, these numbers are not tuned on eval.")


def curve_figure(run_id: int, k: int) -> go.Figure | None:
    with db.read_session(context.engine()) as session:
        points = [p.values for p in db.curve(session, run_id)]
    if not points:
        return None
    frame = pd.DataFrame(points)
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=frame["epoch"], y=frame["loss"], name="train loss", yaxis="y2", line={"dash": "dot"}))
    for column, name in (("val_map", f"val map@{k} (train part)"), ("eval_map", f"eval map@{k}")):
        if column in frame:
            figure.add_trace(go.Scatter(x=frame["epoch"], y=frame[column], name=name, mode="lines+markers"))
    figure.update_layout(height=340, xaxis_title="epoch", yaxis_title="map@k",
                         yaxis2={"title": "loss", "overlaying": "y", "side": "right"},
                         margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h"})
    return figure


with context.guarded():
    imageset = context.require_imageset()
    source = context.current_source()
    engine = context.engine()
    cached = [s.model_name for s in catalog.cached_sets(context.embedding_cache(), imageset.fingerprint)]
    n_train = len(imageset.split("train"))
    if n_train == 0:
        st.warning("This dataset has no train split, so no head can be trained here: give the manifest a split "
                   "column (train/eval) or use train/ and eval/ folders.")

    with st.form("fusion:form"):
        models = st.multiselect("Models", cached, default=cached[:4], key="fusion:models")
        cols = st.columns(3)
        defaults = HeadConfig()  # core's tuned defaults
        kind = cols[0].selectbox("Head", HEAD_KINDS, index=HEAD_KINDS.index(defaults.kind), key="fusion:kind",
                                 help="mlp: concat → MLP; project_concat: per-model projections; learned_ratio: learn concat weights")
        loss = cols[1].selectbox("Loss", LOSSES, index=LOSSES.index(defaults.loss), key="fusion:loss")
        out_dim = cols[2].number_input("Output dim", 8, 8192, defaults.out_dim, step=64, key="fusion:out_dim")
        cols = st.columns(3)
        epochs = cols[0].number_input("Epochs", 1, 500, defaults.epochs, key="fusion:epochs")
        lr = cols[1].number_input("Learning rate", 1e-6, 1.0, defaults.lr, format="%.5f", key="fusion:lr")
        k = cols[2].number_input("k (map@k)", 1, 1000, 50, key="fusion:k")
        if st.form_submit_button("Train head", type="primary", icon=":material/model_training:", disabled=n_train == 0):
            if not models:
                st.warning("Choose at least one model with cached embeddings.")
            else:
                head = {"kind": kind, "loss": loss, "out_dim": int(out_dim), "epochs": int(epochs), "lr": float(lr),
                        "k": int(k)}
                job = context.submit("train_head", {"dataset": source, "models": models, "head": head, "k": int(k)})
                st.success(f"Training queued as job {job}.")
    context.show_jobs(kinds=("train_head",), key="fusion:jobs")

    @st.fragment(run_every=context.POLL_SECONDS)
    def live_curves():
        for job in jobs.list_jobs(engine, status=jobs.RUNNING, kind="train_head", limit=4):
            if job.run_id is None:
                continue
            st.markdown(f"**Live: job {job.id}** — {job.message}")
            figure = curve_figure(job.run_id, int(job.params.get("k", 50)))
            if figure is not None:
                st.plotly_chart(figure, key=f"fusion:live:{job.id}")
            st.button("Stop training", key=f"fusion:stop:{job.id}", icon=":material/stop:",
                      disabled=bool(job.cancel_requested), on_click=jobs.request_cancel, args=(engine, job.id))
    live_curves()

    st.subheader("Finished heads")
    runs = [r for r in lb.runs_for_dataset(engine, imageset.fingerprint, "train_head") if r.status == "done"]
    if not runs:
        st.info("No trained heads on this dataset yet.")
        st.stop()
    table = []
    for run in runs:
        _, entries = lb.run_results(engine, run.id)
        for e in entries:
            table.append({"run_id": run.id, "method": e.method, "models": " + ".join(e.models),
                          **{m: e.score(m) for m in METRIC_KEYS}, "k": e.k, "result_id": e.result_id,
                          "duration_s": run.duration_s})
    picked = st.dataframe(pd.DataFrame(table), hide_index=True, key="fusion:table", on_select="rerun",
                          selection_mode="single-row",
                          column_config={m: st.column_config.NumberColumn(format="%.4f") for m in METRIC_KEYS})
    rows = picked.selection.rows if picked else []
    chosen = table[rows[0]] if rows else table[0]
    st.markdown(f"**Run {chosen['run_id']}: {chosen['method']}** over {chosen['models']}")
    figure = curve_figure(chosen["run_id"], chosen["k"] or 50)
    if figure is not None:
        st.plotly_chart(figure, key="fusion:curve")
    if st.button("Promote to leaderboard", key="fusion:promote", icon=":material/upgrade:"):
        st.success(f"Promoted (run {lb.promote(engine, chosen['result_id'])}).")
