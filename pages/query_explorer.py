"""Query explorer: one query, its top-k under two to four methods side by side, hits and misses marked."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

from core import explorer
from pages import context

st.title("Query explorer")
GRID = 24


def set_query(row: int) -> None:
    st.query_params["query"] = str(int(row))


with context.guarded():
    imageset = context.require_imageset()
    rows = context.eval_rows(imageset)
    if len(rows) < 2:
        st.warning("The eval split has fewer than two images; there is nothing to retrieve.")
        st.stop()
    labels = imageset.labels[rows]
    options = context.method_options(imageset)
    if not options:
        st.info("No cached embeddings for this dataset yet: extract some on the Data & models page.")
        st.page_link(context.PAGES["data"], label="Go to Data & models", icon=":material/folder_open:")
        st.stop()

    labels_by_result = {rid: label for label, (_, rid) in options.items() if rid is not None}
    wanted = [labels_by_result[int(x)] for x in st.query_params.get("methods", "").split(",")
              if x.isdigit() and int(x) in labels_by_result]
    names = list(options)
    ensembles = [n for n in names if n.endswith("]")]
    default = wanted or ([names[0], ensembles[0]] if ensembles else names[:2])  # best single vs best ensemble
    cols = st.columns([4, 1])
    chosen = cols[0].multiselect("Methods (two to four)", names, default=default[:4], max_selections=4,
                                 key="explorer:methods")
    k = cols[1].number_input("k", 1, 100, int(st.query_params.get("k", 10)) if st.query_params.get("k", "").isdigit()
                             else 10, key="explorer:k")
    context.remember("k", k)
    picked_ids = [str(options[name][1]) for name in chosen if options[name][1] is not None]
    if len(picked_ids) == len(chosen):  # methods with a stored result survive a reload through the URL
        context.remember("methods", ",".join(picked_ids))
    if not chosen:
        st.info("Choose at least one method.")
        st.stop()
    methods = [options[name][0] for name in chosen]

    def all_scores():
        """Per-query AP of every eval query under each method: one full evaluation each (cached), only
        needed to list queries; showing one query needs only its own search."""
        return [context.method_scores(imageset, m, int(k)) for m in methods]

    with st.expander("Pick a query", expanded="query" not in st.query_params, icon=":material/search:"):
        how = st.radio("By", ["thumbnail", "id", "ensemble fixed", "ensemble broke", "hardest"], horizontal=True,
                       key="explorer:how")
        # "Fixed / broke" compares the first chosen ensemble with the first chosen single model (by default the best one).
        singles = [i for i, m in enumerate(methods) if len(m.models) == 1 and not m.head_path]
        fused = [i for i, m in enumerate(methods) if i not in singles]

        if how == "thumbnail":
            cls = st.selectbox("Class", ["all", *imageset.class_names], key="explorer:class")
            pool = np.arange(len(rows)) if cls == "all" else np.flatnonzero(labels == imageset.class_names.index(cls))
            pages = max(1, -(-len(pool) // GRID))
            page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="explorer:grid_page") if pages > 1 else 1
            cells = st.columns(8)
            for i, position in enumerate(pool[(page - 1) * GRID: page * GRID]):
                row = int(rows[position])
                with cells[i % 8]:
                    path = context.thumb(imageset, row, 96)
                    if path:
                        st.image(path, width=72)
                    st.button(f"#{row}", key=f"explorer:pick:{row}", on_click=set_query, args=(row,))
        elif how == "id":
            current = int(st.query_params.get("query", rows[0]))
            picked = st.number_input("Image id (dataset row, eval split)", 0, len(imageset) - 1, current, key="explorer:id")
            if picked != current:
                set_query(picked)
        else:
            scores = all_scores()
            if how == "hardest":
                base = fused[0] if fused else 0
                listed = explorer.hardest_queries(scores[base], "map@k", limit=50)
                frame = pd.DataFrame([{"id": int(rows[p]), "class": imageset.class_names[labels[p]],
                                       f"AP@{k} ({chosen[base]})": v} for p, v in listed])
            elif not singles or not fused:
                st.info("Choose one single model and one ensemble (or head) to see where the ensemble fixed or broke queries.")
                frame = pd.DataFrame()
            else:
                single, ens = singles[0], fused[0]
                listed = explorer.changed_queries(scores[ens], scores[single], "map@k", improved=how == "ensemble fixed")
                ap_s, ap_e = explorer.ap_values(scores[single]), explorer.ap_values(scores[ens])
                frame = pd.DataFrame([{"id": int(rows[p]), "class": imageset.class_names[labels[p]],
                                       f"AP@{k} single": ap_s[p], f"AP@{k} ensemble": ap_e[p], "change": d}
                                      for p, d in listed])
                st.caption(f"Single: {chosen[single]} · ensemble: {chosen[ens]} · {len(listed)} queries shown (most changed first)")
            if not frame.empty:
                picked = st.dataframe(frame, hide_index=True, key=f"explorer:list:{how}", on_select="rerun",
                                      selection_mode="single-row")
                if picked and picked.selection.rows:
                    set_query(frame.iloc[picked.selection.rows[0]]["id"])
            elif how != "hardest":
                pass
            else:
                st.info("No query to list.")

        upload = st.file_uploader("…or search with your own image (PNG/JPEG, up to 10 MB)", type=["png", "jpg", "jpeg"],
                                  key="explorer:upload")

    def results_row(method_index: int, sims, positions, ap: float | None, query_label: int | None) -> None:
        head = f"**{chosen[method_index]}**" + (f" — AP@{k} {ap:.3f}" if ap is not None and ap == ap else "")
        st.markdown(head)
        cells = st.columns(len(positions) or 1)
        for cell, sim, position in zip(cells, sims, positions):
            row = int(rows[position])
            hit = query_label is not None and labels[position] == query_label
            mark = "" if query_label is None else (":green[**✓**] " if hit else ":red[**✗**] ")
            with cell:
                path = context.thumb(imageset, row, 96)
                if path:
                    st.image(path, width="stretch")
                # Two short lines ("✓ 0.831", "#5 T-shirt/top"): ten results share the width.
                st.caption(f"{mark}{sim:.3f}  \n#{row} {imageset.class_names[labels[position]]}")

    if upload is not None:
        st.subheader("Your image")
        if upload.size > 10 * 2**20:
            st.error("That file is over 10 MB; choose a smaller image.")
            st.stop()
        try:
            image = Image.open(io.BytesIO(upload.getvalue())).convert("RGB")  # never written to disk
        except OSError:
            st.error("That file is not an image this app can read; upload a PNG or JPEG.")
            st.stop()
        st.image(image, width=128)
        for i, method in enumerate(methods):
            loaded = {name: context.loaded_model(name) for name in method.models}
            vector = explorer.embed_image(image, method, loaded)
            sims, positions = explorer.search(context.method_embeddings(imageset, method), vector, int(k))
            results_row(i, sims, positions, None, None)
        st.stop()

    query = int(st.query_params.get("query", rows[0]))
    position = int(np.searchsorted(rows, query))
    if position >= len(rows) or rows[position] != query:
        st.error(f"Image {query} is not in the eval split; pick a query from the grid or give an eval image id.")
        st.stop()
    st.subheader(f"Query #{query}: {imageset.class_names[labels[position]]}")
    qcols = st.columns([1, 5])
    path = context.thumb(imageset, query, 128)
    if path:
        qcols[0].image(path, width=112)
    qcols[1].caption(f"{imageset.paths[query]}\n\n:green[**✓**] hit (same label) · :red[**✗**] miss (other label) · "
                     "number = cosine similarity · #id = image id, then its class")
    for i, method in enumerate(methods):
        sims, positions, ap = explorer.query_view(context.method_embeddings(imageset, method), labels, position, int(k))
        ap = ap["map@k"]
        results_row(i, sims, positions, ap, labels[position])
