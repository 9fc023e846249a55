"""Data & models: choose or register a dataset, see what is in it, pick models and extract embeddings."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core import catalog, thumbnails
from pages import context

st.title("Data & models")

with context.guarded():
    engine = context.engine()
    ws = context.workspace()
    known = catalog.known_sources(engine)
    current = context.current_source()

    st.subheader("Dataset")
    with st.form("data:open"):
        cols = st.columns([2, 3])
        options = list(dict.fromkeys(([current] if current else []) + known + [catalog.DEMO_SOURCE]))
        picked = cols[0].selectbox("Known datasets", options, index=0, key="data:known",
                                   help="'demo' is the offline Fashion-MNIST set")
        typed = cols[1].text_input("…or a new one: ImageFolder path, CSV manifest (path,label[,split]) or 'demo'",
                                   key="data:source", placeholder="/data/images or /data/manifest.csv")
        if st.form_submit_button("Open dataset", type="primary", icon=":material/folder_open:"):
            context.set_source((typed or picked).strip())
            current = context.current_source()
            context.forget_imageset(current)  # a re-open re-scans the files

    if not current:
        st.info("Choose a dataset above, or prepare the offline demo on the Start page.")
        st.stop()

    imageset = context.require_imageset()
    summary = catalog.summarise(imageset)
    st.markdown(f"**{summary.name}** · `{current}` · fingerprint `{summary.fingerprint[:12]}`")
    m = st.columns(4)
    m[0].metric("Images", f"{summary.n_images:,}")
    m[1].metric("Eval split", f"{summary.n_eval:,}")
    m[2].metric("Train split", f"{summary.n_train:,}")
    m[3].metric("Skipped files", f"{summary.n_skipped:,}")
    if summary.n_eval == 0:
        st.warning("This dataset has no eval split: the leaderboard evaluates on eval rows. "
                   "Give the manifest a split column, or use eval/ (or val/, test/) folders.")

    left, right = st.columns([2, 3])
    left.dataframe(pd.DataFrame(summary.class_rows), hide_index=True, key="data:classes", height=300)
    with right:
        st.caption("Sample images (first eval images of each class)")
        rows = catalog.sample_rows(imageset, per_class=1)[:24]
        grid = st.columns(8)
        for i, row in enumerate(rows):
            path = thumbnails.thumbnail_path(ws.thumbnails, imageset.paths[row], 96)
            if path is not None:
                grid[i % 8].image(str(path), caption=imageset.class_names[imageset.labels[row]], width=80)
    if imageset.skipped:
        with st.expander(f"{len(imageset.skipped)} skipped files"):
            st.dataframe(pd.DataFrame([{"path": s.path, "reason": s.reason} for s in imageset.skipped]),
                         hide_index=True, key="data:skipped")

    st.subheader("Models")
    cache = context.embedding_cache()
    extra = [s.model_name for s in catalog.cached_sets(cache, imageset.fingerprint)]
    statuses = catalog.model_statuses(cache, imageset.fingerprint, extra)
    table = pd.DataFrame([{
        "model": s.info.name, "family": s.info.family, "source": s.info.source, "availability": s.info.availability,
        "embedding size": s.info.dim if s.info.dim else (s.cached.dim if s.cached else None),
        "cached": s.cached is not None, "cache MB": round(s.size_mb, 1), "how to get": s.info.how_to_get,
    } for s in statuses])
    st.dataframe(table, hide_index=True, key="data:models")

    usable = [s.info.name for s in statuses if s.info.availability != "missing"]
    not_cached = [s.info.name for s in statuses if s.cached is None and s.info.availability == "offline"]
    with st.form("data:extract"):
        chosen = st.multiselect("Models to extract", usable, default=not_cached[:4], key="data:models_to_extract")
        custom = st.text_input("Other model names (comma-separated: timm:<arch>.<tag>, checkpoint:<arch>@<file>, "
                               "random:<arch>)", key="data:custom_models")
        if st.form_submit_button("Extract embeddings", type="primary", icon=":material/memory:"):
            names = list(dict.fromkeys(chosen + [n.strip() for n in custom.split(",") if n.strip()]))
            if not names:
                st.warning("Choose at least one model.")
            else:
                from core.models import model_info
                for name in names:
                    model_info(name)  # a typo fails here with the registry's message, not in the worker
                job_id = context.submit("extract", {"dataset": current, "models": names})
                st.success(f"Extraction queued as job {job_id}.")
    context.show_jobs(kinds=("extract",), key="data:jobs")

    st.subheader("Cached embedding sets")
    sets = catalog.cached_sets(cache, imageset.fingerprint)
    if sets:
        import os
        st.dataframe(pd.DataFrame([{"model": s.model_name, "images": s.n, "dim": s.dim, "dtype": s.dtype,
                                    "MB": round(os.path.getsize(s.path) / 2**20, 1), "file": s.path} for s in sets]),
                     hide_index=True, key="data:cached")
    else:
        st.info("No embeddings cached for this dataset yet: choose models above and extract them.")
