"""Leaderboard: every single model and ensemble on the current dataset's eval split, and the gain over the best one."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pandas as pd
import streamlit as st

from core import configs, views
from core import leaderboard as lb
from core.explorer import per_class_difference
from core.export import export_result
from core.datasets import PROTOCOLS
from core.methods import ORACLE_LABEL
from core.metrics import METRIC_KEYS, METRICS
from pages import cached, charts, state, widgets

st.title("Leaderboard")
NUMBER = st.column_config.NumberColumn(format="%.4f")
GAIN = st.column_config.NumberColumn(format="%+.4f")
PROTOCOL_NAMES = {"image": "split by image (classes shared)", "class": "split by class (eval classes never trained on)"}
COLUMNS = {**{c: NUMBER for c in METRIC_KEYS}, "gain": GAIN, "gain_%": st.column_config.NumberColumn("gain %", format="%+.2f"),
           "p": st.column_config.NumberColumn(format="%.3g")}


def evaluate_form(imageset, source: str, key: str, default_k: int = configs.DEFAULT_K) -> None:
    models = cached.cached_models(imageset)
    with st.form(key):
        cols = st.columns([3, 1])
        chosen = cols[0].multiselect("Models", models, default=models, key=f"{key}:models")
        k = cols[1].number_input("k", min_value=1, max_value=configs.MAX_K, value=default_k, key=f"{key}:k")
        if st.form_submit_button("Evaluate", icon=":material/play_arrow:"):
            with widgets.guarded():
                config = configs.EvaluateConfig(dataset=source, models=tuple(chosen), k=int(k))
                widgets.submitted(config.submit(state.engine()), "Evaluation")


def choose_view(imageset) -> tuple[str, int, str, list[lb.Entry]]:
    """(protocol, k, metric, the protocol's entries) from the widgets, which start from and are kept in the
    URL; the protocol choice shows only once results of the class-disjoint protocol exist."""
    protocols = [p for p in PROTOCOLS if p == "image" or cached.entries(imageset, p)]
    protocol = "image"
    if len(protocols) > 1:
        wanted = state.url_value("protocol", partial(views.pick, options=protocols, name="protocol"), "image")
        protocol = st.segmented_control("Protocol", protocols, default=wanted, format_func=PROTOCOL_NAMES.get,
                                        key="lb:protocol") or "image"
        state.remember("protocol", protocol)
    entries = cached.entries(imageset, protocol)
    ks = lb.available_ks(entries)
    if not ks:
        return protocol, configs.DEFAULT_K, "map@k", entries
    top = st.columns([1, 2, 3])
    k = top[0].selectbox("k", ks, index=ks.index(state.url_value("k", partial(views.pick, options=ks, name="k"),
                                                                 views.default_k(ks))), key="lb:k")
    metric = top[1].selectbox("Rank by", METRIC_KEYS, key="lb:metric", index=METRIC_KEYS.index(
        state.url_value("metric", partial(views.pick, options=METRIC_KEYS, name="metric"), "map@k")))
    state.remember("k", k)
    state.remember("metric", metric)
    top[2].caption(METRICS[METRIC_KEYS.index(metric)].header(k) + ". Queries without any relevant item are excluded.")
    return protocol, k, metric, entries


def methods_table(imageset, source: str, board: list[lb.Entry], best: lb.Entry | None, k: int, metric: str) -> None:
    """core.leaderboard.rows of the board (with paired intervals on request), a link from a selected row to
    the query explorer, the exports and the top 20 as bars."""
    st.subheader(f"All methods at k={k}")
    intervals = st.toggle("Paired 95 % interval and p-value of each gain (bootstrap over the queries; computed "
                          "once, slow on large eval sets)", key="lb:intervals")
    table = views.labelled_board(cached.board_rows(board, metric, intervals))
    st.caption(f"'chosen on' says how each method's parameters were picked: '{ORACLE_LABEL}' as the reference "
               "study did; 'train': chosen on the train split; 'validation': a head fitted on train and stopped on a "
               "validation part of it; 'none': nothing tuned (a single model, rank fusion rrf/max/combsum, query "
               "expansion qe, database augmentation dba). Select a row to explore its queries or export it.")
    columns = [c for c in lb.COLUMNS if intervals or c not in ("gain 95% CI", "p")]
    picked = st.dataframe(pd.DataFrame(table, columns=columns), hide_index=True, key="lb:table", on_select="rerun",
                          selection_mode="single-row", column_config=COLUMNS)
    if picked and picked.selection.rows:
        row, chosen = table[picked.selection.rows[0]], board[picked.selection.rows[0]]
        ids = [row["result_id"]] + ([best.result_id] if best and best.result_id != row["result_id"] else [])
        st.page_link(state.PAGES["explorer"], label=f"Explore queries: {views.md(row['method'])} vs best single",
                     icon=":material/image_search:", query_params={"methods": ",".join(map(str, ids)), "dataset": source})
        export(chosen)
    widgets.download_buttons(table, f"leaderboard-{imageset.name}-k{k}", "lb:export")
    st.plotly_chart(charts.board_bars(table[:20], metric, k, best.score(metric) if best else None), key="lb:bar")


def export(entry: lb.Entry) -> None:
    """The selected method as an artifact folder that embeds new images (core.export), offered as a zip;
    a method that ranks against this gallery gets a sentence why it cannot be exported instead."""
    reason = views.why_not_exportable(entry.method)
    if reason:
        st.caption(views.md(reason))
        return
    kept = f"lb:exported:{entry.result_id}"
    if st.button("Export as an artifact", key="lb:export_artifact", icon=":material/ios_share:",
                 help="A folder (manifest + weights) that `python -m core embed` uses to embed new images"):
        folder = state.workspace().folder("exports") / f"result-{entry.result_id}"
        st.session_state[kept] = str(export_result(state.engine(), entry.result_id, folder))
    if kept in st.session_state:
        folder = Path(st.session_state[kept])
        st.success(f"Exported to {views.md(folder)}. Embed new images with it: `python -m core embed <folder> "
                   "<image> ... --out vectors.npy`")
        st.download_button("Download the artifact (zip)", views.zip_folder(folder), f"{folder.name}.zip",
                           "application/zip", key="lb:export_zip", icon=":material/download:")


def costs(imageset, board: list[lb.Entry], k: int, metric: str) -> None:
    """map@k against cost (core.leaderboard.pareto_front) and the best method within a budget
    (core.leaderboard.best_under_budget); a model whose time was never measured is 'not measured'."""
    st.subheader("Cost: the best method for what it costs")
    prices = lb.model_costs(state.engine(), imageset.fingerprint)
    by = st.segmented_control("Cost", list(views.COST_UNITS), default="seconds_per_image", key="lb:cost_by",
                              format_func=lambda b: views.COST_UNITS[b][0]) or "seconds_per_image"
    unit, scale = views.COST_UNITS[by]
    table = views.cost_rows(board, prices, by, lb.pareto_front(board, prices, metric, by), metric)
    unpriced = [r["method"] for r in table if r["cost"] is None]
    if len(unpriced) == len(table):
        st.info(f"No method has a measured cost in {unit} yet ({views.NOT_MEASURED}: the extraction recorded no "
                "time, or the embeddings are not in this workspace). Compare by dims, or extract the models again.")
        return
    st.plotly_chart(charts.pareto(table, metric, k, by), key="lb:pareto")
    if unpriced:
        st.caption(views.md(f"Not on the plot ({views.NOT_MEASURED}: extraction time never recorded, or the "
                            f"embeddings are not in this workspace): {', '.join(unpriced)}"))
    start = views.default_budget(board, prices, by, metric)
    budget = st.number_input(f"Budget ({unit})", min_value=0.0, value=start if start is not None else 0.0,
                             format="%.4g", key=f"lb:budget:{by}",
                             help="Starts at what the best single model costs (when that was measured)")
    found = lb.best_under_budget(board, prices, budget / scale, metric, by)
    if found is None:
        st.info(f"No method with a measured cost within {budget:.4g} {unit}.")
    else:
        cost = next(r for r in table if r["result_id"] == found.result_id)
        st.success(f"Best within {budget:.4g} {unit}: **{views.md(found.label)}**, {metric} {found.score(metric):.4f} "
                   f"at {cost['cost']:.4g} {unit} (chosen on {views.md(views.chosen_on_text(found.selected_on))})")
    with st.expander("Cost of every method"):
        st.dataframe(pd.DataFrame(table).drop(columns=["cost"]), hide_index=True, key="lb:cost_table",
                     column_config={metric: NUMBER})


def by_size(entries: list[lb.Entry], k: int, metric: str) -> None:
    st.subheader("Best ensemble of each size (the reference study's layout)")
    table = lb.best_by_model_count(entries, k, metric)
    if len(table) > 1:
        st.dataframe(pd.DataFrame(table), hide_index=True, key="lb:by_size", column_config={metric: NUMBER, "gain": GAIN})
    else:
        st.info("No concatenations yet: run a weight sweep to fill this table.")
        st.page_link(state.PAGES["sweep"], label="Open the weight sweep", icon=":material/tune:")


def per_class(imageset, board: list[lb.Entry], best: lb.Entry | None, k: int, metric: str, protocol: str) -> None:
    """Per-class AP of two entries (core.explorer.per_class_difference over their per-query scores: stored
    with the result, or computed once)."""
    labels = [f"{e.label} [{e.kind}]" for e in board]
    cols = st.columns(2)
    default_b = next((i for i, e in enumerate(board) if e.kind != "single"), min(1, len(board) - 1))
    a = cols[0].selectbox("A", range(len(board)), index=board.index(best) if best in board else 0,
                          format_func=labels.__getitem__, key="lb:a")
    b = cols[1].selectbox("B", range(len(board)), index=default_b, format_func=labels.__getitem__, key="lb:b")
    if st.toggle("Compare per class", key="lb:per_class"):
        scores = [cached.method_scores(imageset, board[i].method, k, board[i].result_id, protocol) for i in (a, b)]
        labels = imageset.labels[cached.eval_rows(imageset, protocol)]
        diff = per_class_difference(*scores, labels, imageset.class_names, metric)
        st.dataframe(pd.DataFrame(diff), hide_index=True, key="lb:per_class_table",
                     column_config={"A": NUMBER, "B": NUMBER, "B - A": GAIN})
        st.plotly_chart(charts.class_difference(diff, metric), key="lb:per_class_bar")


with widgets.guarded():
    imageset, source = widgets.require_imageset()
    protocol, k, metric, entries = choose_view(imageset)
    st.caption(f"Dataset **{views.md(imageset.name)}** · eval split: {len(cached.eval_rows(imageset, protocol)):,} "
               f"queries ({PROTOCOL_NAMES[protocol]}); each query searches every other eval image (cosine; ties by index).")
    if not entries:
        st.info("No results on this dataset yet. Evaluate the cached models (queued as a job), or prepare the "
                "offline demo on the Start page.")
        evaluate_form(imageset, source, "lb:evaluate_empty")
        widgets.show_jobs(kinds=widgets.RESULT_KINDS, key="lb:jobs")
        st.stop()

    board = lb.board(entries, k, metric)
    best = lb.best_single(board, metric)
    widgets.headline(cached.headline(entries, k, metric))
    methods_table(imageset, source, board, best, k, metric)
    costs(imageset, board, k, metric)
    by_size(entries, k, metric)
    st.subheader("Per-class AP: compare two entries")
    with widgets.guarded():
        per_class(imageset, board, best, k, metric, protocol)
    with st.expander("Evaluate models at another k"):
        evaluate_form(imageset, source, "lb:evaluate", default_k=k)
    widgets.show_jobs(kinds=widgets.RESULT_KINDS, key="lb:jobs")
