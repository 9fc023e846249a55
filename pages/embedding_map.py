"""Embedding map: a 2-D projection of any embedding set or fused embedding, coloured by class; click opens a query."""
from __future__ import annotations

import streamlit as st

from core import configs, views
from core.projection import methods as projections
from pages import cached, charts, state, widgets

st.title("Embedding map")


def picked_points(imageset, points: list[dict], source: str) -> None:
    """Thumbnails of the selected points, each with a link that opens it in the query explorer."""
    picked = [int(p["customdata"]) for p in points if "customdata" in p][:12]
    st.caption(f"{len(points)} point(s) selected; the first {len(picked)} are shown. Open one in the query explorer:")
    cells = st.columns(6)
    for i, row in enumerate(picked):
        with cells[i % 6]:
            path = cached.thumb(imageset, row, 96)
            if path:
                st.image(path, width=80)
            st.page_link(state.PAGES["explorer"], label=f"Open #{row}", icon=":material/image_search:",
                         query_params={"query": str(row), "dataset": source})


def umap_job(imageset, source: str, name: str, method, max_points: int) -> None:
    """No stored UMAP of this embedding yet: say what it costs and queue it as a background job."""
    n = min(max_points, len(cached.eval_rows(imageset)))
    st.info(f"UMAP of {n:,} points runs as a background job: 40 s for 50,000 points on two CPU cores, plus about "
            "a minute the first time a worker compiles it (cuML runs it on a GPU where installed). The map appears "
            "here when it is done, and stays for the next visit.", icon=":material/schedule:")
    if st.button(f"Compute the UMAP map of {name}", type="primary", icon=":material/scatter_plot:", key="map:umap"):
        with widgets.guarded():
            config = configs.MapConfig(dataset=source, method=method, projection="umap", max_points=max_points)
            widgets.submitted(config.submit(state.engine()), "The UMAP map")
    widgets.show_jobs(kinds=("embedding_map",), key="map:jobs")


with widgets.guarded():
    imageset, source = widgets.require_imageset()
    rows = cached.eval_rows(imageset)
    # Rank fusions and query expansion rank without one embedding per image: nothing to project.
    options = views.method_options(cached.entries(imageset), cached.cached_models(imageset), embedding_only=True)
    widgets.require_models(list(options))
    cols = st.columns([3, 1, 1])
    name = cols[0].selectbox("Embedding", list(options), key="map:method")
    how = cols[1].selectbox("Projection", projections(), key="map:projection",
                            help="PCA is computed at once; UMAP (umap-learn, or cuML on a GPU) runs as a background job")
    max_points = int(cols[2].number_input("Points (sampled per class)", 100, 50_000, 5_000, step=500, key="map:points"))
    method = options[name].method
    shown = cached.pca_map(imageset, method, max_points) if how == "pca" else \
        cached.stored_map(imageset, method, how, max_points)
    if shown is None:
        umap_job(imageset, source, name, method, max_points)
    else:
        positions, coords = shown
        title = f"{how.upper()} of {name} ({len(positions):,} eval images)"
        figure = charts.embedding_map(imageset.labels[rows][positions], coords, rows[positions], imageset.class_names, title)
        event = st.plotly_chart(figure,
                                key="map:chart", on_select="rerun", selection_mode=("points", "box", "lasso"))
        if event and event.selection.points:
            picked_points(imageset, event.selection.points, source)
        else:
            st.caption("Hover a point for its id and class; click or lasso points to see their images and open one "
                       "in the query explorer.")
