"""Fusion: train small networks over frozen embeddings (train split), and run every other fusion method as a
job: rank fusion and re-ranking (nothing tuned), concat weights chosen on train (grid or greedy) and learned
concat ratios. Curves, selection paths and finished results below."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core import configs, jobs, views
from core import leaderboard as lb
from core.heads import HEAD_KINDS, LOSSES, HeadConfig
from core.metrics import METRIC_KEYS
from pages import cached, charts, state, widgets

st.title("Fusion heads and methods")
st.caption("A head is fitted on the **train** split (early stopping on a part of train) and reported on the "
           "**eval** split — unlike sweep weights, these numbers are not tuned on eval.")
NUMBERS = {m: st.column_config.NumberColumn(format="%.4f") for m in METRIC_KEYS}
FUSE_TEXT = {"rrf": "rrf: reciprocal rank fusion of the models' lists", "max": "max: each item's best similarity",
             "combsum": "combsum: summed z-scored similarities (weighted)",
             "qe": "qe: alpha query expansion of the concatenation", "dba": "dba: database-side augmentation"}


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


def fuse_form(source: str, models: list[str]) -> None:
    """core.configs.FuseConfig: a rank fusion or re-ranking with fixed parameters (chosen on: none)."""
    defaults = configs.FuseConfig()
    with st.form("fusion:fuse"):
        st.markdown("**Rank fusion and re-ranking** — fixed parameters, nothing tuned")
        method = st.selectbox("Method", configs.FUSE_METHODS, format_func=FUSE_TEXT.get, key="fusion:fuse_method")
        chosen = st.multiselect("Models", models, default=models[:4], key="fusion:fuse_models")
        cols = st.columns(4)
        k = cols[0].number_input("k", 1, configs.MAX_K, configs.DEFAULT_K, key="fusion:fuse_k")
        n = cols[1].number_input("n (qe, dba)", 0, 100, defaults.n, key="fusion:fuse_n",
                                 help="neighbours averaged in")
        alpha = cols[2].number_input("alpha (qe, dba)", 0.0, 100.0, defaults.alpha, key="fusion:fuse_alpha",
                                     help="similarity exponent of the neighbours' weights")
        rrf_k = cols[3].number_input("rrf_k (rrf)", 0.0, 10_000.0, defaults.rrf_k, key="fusion:fuse_rrf_k",
                                     help="the constant in 1 / (rrf_k + rank)")
        weights = st.text_input("Weights, one per model (combsum, qe, dba; empty: all 1)", key="fusion:fuse_weights")
        if st.form_submit_button("Run fusion", icon=":material/merge:"):
            with widgets.guarded():
                config = configs.FuseConfig(dataset=source, models=tuple(chosen), method=method, k=int(k),
                                            weights=weights.strip() or None, n=int(n), alpha=float(alpha),
                                            rrf_k=float(rrf_k))
                widgets.submitted(config.submit(state.engine()), f"Fusion by {method}")


def select_form(source: str, models: list[str], n_train: int) -> None:
    """core.configs.SelectWeightsConfig (weights chosen on train: grid or greedy) and a learned_ratio head
    (TrainHeadConfig): honest ensembles, scored once on eval."""
    defaults = configs.SelectWeightsConfig()
    with st.form("fusion:select"):
        st.markdown("**Concat weights chosen on train** — scored once on eval (an honest ensemble)")
        chosen = st.multiselect("Models", models, default=models, max_selections=configs.MAX_MODELS,
                                key="fusion:select_models")
        search = st.radio("Search", ("greedy", "grid"), horizontal=True, key="fusion:select_search",
                          help="greedy: add one unit of weight at a time to the best model, then refine (for many "
                               "models); grid: every vector of the grid values below")
        cols = st.columns(3)
        k = cols[0].number_input("k", 1, configs.MAX_K, configs.DEFAULT_K, key="fusion:select_k")
        steps = cols[1].number_input("Max steps (greedy)", 1, 1000, defaults.max_steps, key="fusion:select_steps")
        patience = cols[2].number_input("Patience (greedy)", 1, 1000, defaults.patience, key="fusion:select_patience")
        grid = st.text_input("Grid values (grid)", ", ".join(map(str, configs.DEFAULT_GRID)), key="fusion:select_grid")
        cols = st.columns(2)
        select = cols[0].form_submit_button("Choose weights on train", icon=":material/verified:", disabled=n_train == 0)
        learn = cols[1].form_submit_button("Learn concat ratios", icon=":material/model_training:",
                                           disabled=n_train == 0, help="a learned_ratio head: concat weights "
                                                                       "learned by gradient descent on train")
        if select or learn:
            with widgets.guarded():
                common = {"dataset": source, "models": tuple(chosen), "k": int(k)}
                if learn:
                    config = configs.TrainHeadConfig(**common, head={"kind": "learned_ratio"})
                elif search == "greedy":
                    config = configs.SelectWeightsConfig(**common, search="greedy", max_steps=int(steps),
                                                         patience=int(patience))
                else:
                    config = configs.SelectWeightsConfig(**common, search="grid", weights=grid)
                widgets.submitted(config.submit(state.engine()), "Learning concat ratios" if learn else
                                  f"Weight selection on train ({search})")


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


def finished(engine, fingerprint: str, kinds: tuple[str, ...]) -> tuple[list[dict], dict[int, lb.Entry]]:
    """views.result_rows of this dataset's finished runs of `kinds`, and their entries by result id."""
    runs = [lb.run_results(engine, run.id) for kind in kinds for run in views.done_runs(engine, fingerprint, kind)]
    return views.result_rows(runs), {e.result_id: e for _, entries in runs for e in entries}


def picked_row(table: list[dict], key: str, default: dict | None = None) -> dict:
    """The row selected in the table (until one is: `default`, else the first)."""
    picked = st.dataframe(pd.DataFrame(table), hide_index=True, key=key, on_select="rerun",
                          selection_mode="single-row", column_config=NUMBERS)
    return table[picked.selection.rows[0]] if picked and picked.selection.rows else (default or table[0])


def finished_heads(engine, fingerprint: str) -> None:
    st.subheader("Finished heads")
    table, entries = finished(engine, fingerprint, ("train_head",))
    if not table:
        st.info("No trained heads on this dataset yet.")
        return
    chosen = picked_row(table, "fusion:table")
    st.markdown(f"**Run {chosen['run_id']}: {views.md(chosen['method'])}** over {views.md(chosen['models'])}")
    learned = entries[chosen["result_id"]].extra.get("learned_weights")
    if learned:
        st.caption(f"Learned concat weights: {views.md(views.weights_text(learned))}")
    curve(chosen["run_id"], chosen["k"] or configs.DEFAULT_K, "fusion:curve")
    if st.button("Promote to leaderboard", key="fusion:promote", icon=":material/upgrade:"):
        st.success(f"Promoted (run {lb.promote(engine, chosen['result_id'])}).")


def finished_methods(engine, fingerprint: str) -> None:
    """Rank fusions, re-rankings and weight selections; a greedy selection's path on train as a plot."""
    st.subheader("Finished fusion methods and weight selections")
    table, entries = finished(engine, fingerprint, ("fuse", "select_weights"))
    if not table:
        st.info("No fusion method or weight selection finished on this dataset yet.")
        return
    chosen = picked_row(table, "fusion:methods_table", next((r for r in table if r["greedy path"]), None))
    path = entries[chosen["result_id"]].extra.get("path")
    if path:
        st.plotly_chart(charts.selection_path(views.selection_path(path)), key="fusion:path")
    else:
        st.caption(f"{views.md(chosen['method'])}: no selection path (only greedy selections keep one).")


with widgets.guarded():
    imageset, source = widgets.require_imageset()
    engine = state.engine()
    models = cached.cached_models(imageset)
    n_train = len(imageset.split("train"))
    if n_train == 0:
        st.warning("This dataset has no train split, so no head can be trained and no weights chosen here: give the "
                   "manifest a split column (train/eval) or use train/ and eval/ folders.")
    train_form(source, models, n_train)
    st.subheader("Methods")
    st.caption("Which methods give one embedding per image, and which export as an artifact that embeds new images:")
    st.table(pd.DataFrame(views.method_kind_rows()).set_index("kind"))  # a static table: the long texts wrap
    cols = st.columns(2)
    with cols[0]:
        fuse_form(source, models)
    with cols[1]:
        select_form(source, models, n_train)
    widgets.show_jobs(kinds=widgets.FUSION_KINDS, key="fusion:jobs")
    if jobs.list_jobs(engine, status=jobs.RUNNING, kind="train_head", limit=1):  # poll only while one trains
        live_curves()
    finished_heads(engine, imageset.fingerprint)
    finished_methods(engine, imageset.fingerprint)
