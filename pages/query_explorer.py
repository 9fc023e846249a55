"""Query explorer: one query, its top-k under two to four methods side by side, hits and misses marked.

Any stored method can be shown: those with one embedding per image search with it; rank fusions and query
expansion show their own ranking (no similarity). The query lists read the per-query scores stored with
each result, so choosing a list never searches the eval set again."""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import streamlit as st

from core import explorer, views
from core.explorer import per_class_difference
from pages import cached, state, widgets

st.title("Query explorer")
GRID = 24
WAYS = ["thumbnail", "id", "ensemble fixed", "ensemble broke", "hardest", "per class"]


def set_query(row: int) -> None:
    st.query_params["query"] = str(int(row))


def choose_methods(options: dict) -> tuple[list[str], int]:
    """The methods to compare and k, from the URL first (?methods=<result ids>, ?k=), kept in it."""
    wanted = state.url_value("methods", partial(views.parse_ids, name="methods"), ())
    cols = st.columns([4, 1])
    chosen = cols[0].multiselect("Methods (two to four)", list(options), default=views.default_methods(options, wanted),
                                 max_selections=4, key="explorer:methods")
    k = int(cols[1].number_input("k", 1, views.MAX_SHOWN_K, state.url_value(
        "k", partial(views.parse_k, most=views.MAX_SHOWN_K), 10), key="explorer:k"))
    state.remember("k", k)
    ids = [str(options[name].result_id) for name in chosen if options[name].result_id is not None]
    if chosen and len(ids) == len(chosen):  # methods with a stored result survive a reload through the URL
        state.remember("methods", ",".join(ids))
    return chosen, k


def thumbnails(imageset, rows: np.ndarray, labels: np.ndarray) -> None:
    cls = st.selectbox("Class", [None, *range(len(imageset.class_names))], key="explorer:class",
                       format_func=lambda c: "all" if c is None else imageset.class_names[c])
    pool = np.arange(len(rows)) if cls is None else np.flatnonzero(labels == cls)
    pages = views.page_count(len(pool), GRID)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="explorer:grid_page") if pages > 1 else 1
    cells = st.columns(8)
    for i, position in enumerate(views.page_of(pool, page, GRID)):
        with cells[i % 8]:
            path = cached.thumb(imageset, int(rows[position]), 96)
            if path:
                st.image(path, width=72)
            st.button(f"#{rows[position]}", key=f"explorer:pick:{rows[position]}", on_click=set_query,
                      args=(int(rows[position]),))


def query_list(how: str, imageset, rows, labels, picked: list, chosen: list[str], k: int, query: int | None) -> None:
    """Queries the first ensemble fixed or broke against the first single model, the hardest ones, or AP per
    class (core.views over the per-query scores stored with each result: cached.list_scores)."""
    single, fused = views.single_and_fused([o.method for o in picked])
    shown = [fused if fused is not None else 0] if how == "hardest" else [fused, single]
    if None in shown:
        st.info("Choose one single model and one ensemble (or head) to see where the ensemble fixed or broke queries.")
        return
    scores, at, origin = cached.list_scores(imageset, [picked[i] for i in shown], k)
    st.caption(" · ".join(f"{views.md(chosen[i])}: AP@{at} {where}" for i, where in zip(shown, origin)))
    names = imageset.class_names
    if how == "per class":
        table = per_class_difference(scores[1], scores[0], labels, names)
        st.caption(f"A: {views.md(chosen[single])} · B: {views.md(chosen[fused])} · biggest gain first")
        st.dataframe(pd.DataFrame(table), hide_index=True, key="explorer:per_class")
        return
    if how == "hardest":
        table = views.hardest_rows(scores[0], rows, labels, names, at, chosen[shown[0]])
    else:
        table = views.changed_rows(scores[0], scores[1], rows, labels, names, at, improved=how == "ensemble fixed")
    if not table:
        st.info("No query to list.")
        return
    selected = st.dataframe(pd.DataFrame(table), hide_index=True, key=f"explorer:list:{how}", on_select="rerun",
                            selection_mode="single-row")
    if selected and selected.selection.rows and table[selected.selection.rows[0]]["id"] != query:
        set_query(table[selected.selection.rows[0]]["id"])
        st.rerun()


def results_row(imageset, rows, labels, label: str, k: int, top: views.QueryTop, query_label: int | None) -> None:
    st.markdown(f"**{views.md(label)}**" + (f" — AP@{k} {top.ap:.3f}" if top.ap == top.ap else ""))
    sims = top.similarities if top.similarities is not None else [None] * len(top.positions)
    for rank, (cell, sim, position) in enumerate(zip(st.columns(len(top.positions) or 1), sims, top.positions), 1):
        hit = query_label is not None and labels[position] == query_label
        mark = "" if query_label is None else (":green[**✓**] " if hit else ":red[**✗**] ")
        with cell:
            path = cached.thumb(imageset, int(rows[position]), 96)
            if path:
                st.image(path, width="stretch")
            # Two short lines ("✓ 0.831", "#5 T-shirt/top"): ten results share the width.
            score = f"{sim:.3f}" if sim is not None else f"rank {rank}"
            st.caption(f"{mark}{score}  \n#{rows[position]} {views.md(imageset.class_names[labels[position]])}")


def search_with_upload(imageset, rows, labels, data: bytes, chosen, methods, k: int) -> None:
    st.subheader("Your image")
    image = views.open_upload(data)  # refused before decoding when too large; never written to disk
    st.image(image, width=128)
    for label, method in zip(chosen, methods):
        if not method.exportable:  # it ranks against this gallery: nothing embeds a new image on its own
            st.markdown(f"**{views.md(label)}**")
            st.caption(views.md(views.why_not_exportable(method)))
            continue
        vector = explorer.embed_image(image, method, {name: cached.loaded_model(name) for name in method.models})
        sims, found = explorer.search(cached.method_embeddings(imageset, method), vector, k)
        results_row(imageset, rows, labels, label, k, views.QueryTop(found, sims, float("nan")), None)


def show_query(imageset, rows, labels, query: int, position: int, chosen, methods, k: int) -> None:
    """The query image and, per method, its top-k (core.views.query_top: one search, or the method's own
    ranking) with its AP@k."""
    st.subheader(f"Query #{query}: {views.md(imageset.class_names[labels[position]])}")
    cols = st.columns([1, 5])
    path = cached.thumb(imageset, query, 128)
    if path:
        cols[0].image(path, width=112)
    cols[1].caption(f"{views.md(imageset.paths[query])}\n\n:green[**✓**] hit (same label) · :red[**✗**] miss (other "
                    "label) · number = cosine similarity (a rank fusion or query expansion shows the rank: it merges "
                    "lists, no one similarity) · #id = image id, then its class")
    for label, method in zip(chosen, methods):
        results_row(imageset, rows, labels, label, k, cached.query_top(imageset, method, position, k), labels[position])


def eval_position(rows: np.ndarray, query: int) -> int | None:
    position = int(np.searchsorted(rows, query))
    return position if position < len(rows) and rows[position] == query else None


with widgets.guarded():
    imageset, source = widgets.require_imageset()
    rows = cached.eval_rows(imageset)
    if len(rows) < 2:
        st.warning("The eval split has fewer than two images; there is nothing to retrieve.")
        st.stop()
    labels = imageset.labels[rows]
    options = views.method_options(cached.entries(imageset), cached.cached_models(imageset))
    widgets.require_models(list(options))
    chosen, k = choose_methods(options)
    if not chosen:
        st.info("Choose at least one method.")
        st.stop()
    methods = [options[name].method for name in chosen]
    query = state.url_value("query", partial(views.parse_id, name="query"), int(rows[0]))
    position = eval_position(rows, query)

    with st.expander("Pick a query", expanded="query" not in st.query_params, icon=":material/search:"):
        how = st.radio("By", WAYS, horizontal=True, key="explorer:how")
        if how == "thumbnail":
            thumbnails(imageset, rows, labels)
        elif how == "id":
            shown = query if position is not None else int(rows[0])
            picked = st.number_input("Image id (dataset row, eval split)", 0, len(imageset) - 1, shown, key="explorer:id")
            if picked != shown:
                set_query(picked)
                st.rerun()
        else:
            with widgets.guarded():  # e.g. results stored at different k: say so, and still show the query
                query_list(how, imageset, rows, labels, [options[name] for name in chosen], chosen, k, query)
        upload = st.file_uploader(f"…or search with your own image (PNG/JPEG, up to {views.MAX_UPLOAD_BYTES // 2**20} MB, "
                                  f"{views.MAX_UPLOAD_PIXELS // 10**6} megapixels)", type=["png", "jpg", "jpeg"],
                                  key="explorer:upload")

    if upload is not None:
        search_with_upload(imageset, rows, labels, upload.getvalue(), chosen, methods, k)
    elif position is None:
        st.error(f"Image {query} is not in the eval split; pick a query from the grid or give an eval image id.")
    else:
        show_query(imageset, rows, labels, query, position, chosen, methods, k)
