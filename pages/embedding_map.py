"""Embedding map: a 2-D projection of any embedding set or fused embedding, coloured by class; click opens a query."""
from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from core.projection import methods as projections
from pages import context

st.title("Embedding map")

with context.guarded():
    imageset = context.require_imageset()
    rows = context.eval_rows(imageset)
    options = context.method_options(imageset)
    if not options:
        st.info("No cached embeddings for this dataset yet: extract some on the Data & models page.")
        st.page_link(context.PAGES["data"], label="Go to Data & models", icon=":material/folder_open:")
        st.stop()
    cols = st.columns([3, 1, 1])
    name = cols[0].selectbox("Embedding", list(options), key="map:method")
    how = cols[1].selectbox("Projection", projections(), key="map:projection",
                            help="UMAP appears when umap-learn is installed")
    max_points = cols[2].number_input("Points (sampled per class)", 100, 50_000, 5_000, step=500, key="map:points")
    method = options[name][0]
    positions, coords = context.projection(imageset, method, how, int(max_points))
    labels = imageset.labels[rows][positions]
    ids = rows[positions]

    figure = go.Figure()
    for c, class_name in enumerate(imageset.class_names):
        mask = labels == c
        if not mask.any():
            continue
        figure.add_trace(go.Scattergl(
            x=coords[mask, 0], y=coords[mask, 1], mode="markers", name=class_name, marker={"size": 6, "opacity": 0.8},
            customdata=ids[mask], hovertemplate=f"#%{{customdata}} · {class_name}<extra></extra>"))
    figure.update_layout(height=600, title=f"{how.upper()} of {name} ({len(ids):,} eval images)",
                         legend={"itemsizing": "constant"}, dragmode="select", margin={"l": 10, "r": 10, "t": 40, "b": 10})
    event = st.plotly_chart(figure, key="map:chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
    points = event.selection.points if event else []
    if points:
        picked = [int(p["customdata"]) for p in points if "customdata" in p][:12]
        st.caption(f"{len(points)} point(s) selected; the first {len(picked)} are shown. Open one in the query explorer:")
        cells = st.columns(6)
        for i, row in enumerate(picked):
            with cells[i % 6]:
                path = context.thumb(imageset, row, 96)
                if path:
                    st.image(path, width=80)
                st.page_link(context.PAGES["explorer"], label=f"Open #{row}", icon=":material/image_search:",
                             query_params={"query": str(row), "dataset": context.current_source()})
    else:
        st.caption("Hover a point for its id and class; click or lasso points to see their images and open one "
                   "in the query explorer.")
