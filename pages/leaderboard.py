"""Leaderboard: every single model and ensemble on the current dataset's eval split, and the gain over the best one."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core import catalog
from core import leaderboard as lb
from core.explorer import Method, per_class_difference
from core.metrics import METRIC_KEYS
from pages import context

st.title("Leaderboard")

NUMBER = st.column_config.NumberColumn(format="%.4f")
GAIN = st.column_config.NumberColumn(format="%+.4f")


def evaluate_form(imageset, source: str, key: str, default_k: int = 50) -> None:
    cached = [s.model_name for s in catalog.cached_sets(context.embedding_cache(), imageset.fingerprint)]
    with st.form(key):
        cols = st.columns([3, 1])
        models = cols[0].multiselect("Models", cached, default=cached, key=f"{key}:models")
        k = cols[1].number_input("k", min_value=1, max_value=1000, value=default_k, key=f"{key}:k")
        if st.form_submit_button("Evaluate", icon=":material/play_arrow:"):
            if not models:
                st.warning("No cached embeddings to evaluate: extract some on the Data & models page.")
            else:
                st.success(f"Evaluation queued as job {context.submit('evaluate', {'dataset': source, 'models': models, 'k': int(k)})}.")


with context.guarded():
    imageset = context.require_imageset()
    source = context.current_source()
    entries = context.entries(imageset)
    st.caption(f"Dataset **{imageset.name}** · eval split: {len(imageset.split('eval')):,} queries; "
               "each query searches every other eval image (cosine; ties by index).")

    if not entries:
        st.info("No results on this dataset yet. Evaluate the cached models (queued as a job), or prepare the "
                "offline demo on the Start page.")
        evaluate_form(imageset, source, "lb:evaluate_empty")
        context.show_jobs(kinds=("evaluate", "extract", "sweep"), key="lb:jobs")
        st.stop()

    ks = lb.available_ks(entries)
    top = st.columns([1, 2, 3])
    k = top[0].selectbox("k", ks, index=context.url_index("k", ks, len(ks) - 1 if 50 not in ks else ks.index(50)),
                         key="lb:k")
    metric = top[1].selectbox("Rank by", METRIC_KEYS, index=context.url_index("metric", list(METRIC_KEYS)),
                              key="lb:metric")
    context.remember("k", k)
    context.remember("metric", metric)
    top[2].caption(context.metric_header(k, metric) + ". Queries without any relevant item are excluded.")

    board = lb.board(entries, k, metric)
    table = lb.rows(board, metric)
    best = lb.best_single(board, metric)
    if best is None:
        st.warning("No single model evaluated at this k, so gains cannot be computed: evaluate the models below.")
    else:
        ens = [e for e in board if e.kind != "single"]
        m = st.columns(3)
        m[0].metric(f"Best single model ({metric})", f"{best.score(metric):.4f}", help=best.method)
        if ens:
            top_ens = max(ens, key=lambda e: e.score(metric))
            gain = top_ens.score(metric) - best.score(metric)
            m[1].metric("Best ensemble", f"{top_ens.score(metric):.4f}", f"{gain:+.4f}", help=top_ens.method)
            m[2].metric("Relative gain", f"{100 * gain / best.score(metric):+.1f}%")

    st.subheader(f"All methods at k={k}")
    st.caption("'oracle' = weights tuned on the eval split itself (as the reference study did); heads are fitted on train.")
    frame = pd.DataFrame(table)
    selection = st.dataframe(
        frame, hide_index=True, key="lb:table", on_select="rerun", selection_mode="single-row",
        column_config={**{c: NUMBER for c in METRIC_KEYS}, "gain": GAIN,
                       "gain_%": st.column_config.NumberColumn("gain %", format="%+.2f")},
    )
    chosen = selection.selection.rows if selection else []
    if chosen:
        row = table[chosen[0]]
        ids = [row["result_id"]] + ([best.result_id] if best and best.result_id != row["result_id"] else [])
        st.page_link(context.PAGES["explorer"], label=f"Explore queries: {row['method']} vs best single",
                     icon=":material/image_search:", query_params={"methods": ",".join(map(str, ids)), "dataset": source})
    context.download_buttons(table, f"leaderboard-{imageset.name}-k{k}", "lb:export")

    figure = go.Figure(go.Bar(
        x=[r[metric] for r in table[:20]], y=[f"{i}. {r['method']}" for i, r in enumerate(table[:20], start=1)],
        orientation="h",
        marker_color=["#9e9e9e" if r["type"] == "single" else "#1f77b4" for r in table[:20]],
        text=[f"{r[metric]:.4f}" for r in table[:20]], textposition="auto"))
    if best is not None:
        # The label sits above the plot area (paper y > 1), clear of the bars and their value labels.
        figure.add_vline(x=best.score(metric), line_dash="dash", line_color="#616161")
        figure.add_annotation(x=best.score(metric), xref="x", y=1, yref="paper", yanchor="bottom",
                              text=f"best single {best.score(metric):.4f}", showarrow=False,
                              font={"size": 11, "color": "#616161"})
    figure.update_layout(title=f"{metric} (k={k}): single models (grey) vs ensembles (blue)", height=140 + 28 * min(20, len(table)),
                         yaxis={"autorange": "reversed"}, margin={"l": 10, "r": 10, "t": 64, "b": 10})
    st.plotly_chart(figure, key="lb:bar")

    st.subheader("Best ensemble of each size (the reference study's layout)")
    by_size = lb.best_by_model_count(entries, k, metric)
    if len(by_size) > 1:
        st.dataframe(pd.DataFrame(by_size), hide_index=True, key="lb:by_size",
                     column_config={metric: NUMBER, "gain": GAIN})
    else:
        st.info("No concatenations yet: run a weight sweep to fill this table.")
        st.page_link(context.PAGES["sweep"], label="Open the weight sweep", icon=":material/tune:")

    st.subheader("Per-class AP: compare two entries")
    labels = [f"{e.method} [{e.kind}]" for e in board]
    cols = st.columns(2)
    default_b = next((i for i, e in enumerate(board) if e.kind != "single"), min(1, len(board) - 1))
    default_a = board.index(best) if best in board else 0
    a_index = cols[0].selectbox("A", range(len(board)), index=default_a, format_func=labels.__getitem__, key="lb:a")
    b_index = cols[1].selectbox("B", range(len(board)), index=default_b, format_func=labels.__getitem__, key="lb:b")
    if st.toggle("Compute per-class AP (searches every query with both methods)", key="lb:per_class"):
        with context.guarded():
            method_a, method_b = Method.from_entry(board[a_index]), Method.from_entry(board[b_index])
            scores_a = context.method_scores(imageset, method_a, k)
            scores_b = context.method_scores(imageset, method_b, k)
            eval_labels = imageset.labels[imageset.split("eval")]
            diff = per_class_difference(scores_a, scores_b, eval_labels, imageset.class_names, metric if metric in
                                        ("map@k", "map@k_hits", "map@r", "p@1") else "map@k")
            st.dataframe(pd.DataFrame(diff), hide_index=True, key="lb:per_class_table",
                         column_config={"A": NUMBER, "B": NUMBER, "B - A": GAIN})
            st.plotly_chart(go.Figure(go.Bar(x=[r["class"] for r in diff], y=[r["B - A"] for r in diff],
                                             marker_color=["#2e7d32" if r["B - A"] >= 0 else "#c62828" for r in diff]))
                            .update_layout(title=f"{metric}: B − A per class", height=320), key="lb:per_class_bar")

    with st.expander("Evaluate models at another k"):
        evaluate_form(imageset, source, "lb:evaluate", default_k=k)
    context.show_jobs(kinds=("evaluate", "extract", "sweep"), key="lb:jobs")
