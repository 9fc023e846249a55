"""Data & models: choose or register a dataset, see what is in it, pick models and extract embeddings."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from core import catalog, configs, views
from pages import cached, state, widgets

st.title("Data & models")


def dataset_form(current: str | None) -> None:
    """Pick a known dataset or type a new one; opening it makes it the current dataset."""
    options = list(dict.fromkeys(([current] if current else []) + catalog.known_sources(state.engine())
                                 + [configs.DEMO_SOURCE]))
    with st.form("data:open"):
        cols = st.columns([2, 3])
        picked = cols[0].selectbox("Known datasets", options, key="data:known", help="'demo' is the offline Fashion-MNIST set")
        typed = cols[1].text_input("…or a new one: ImageFolder path, CSV manifest (path,label[,split]) or 'demo'",
                                   key="data:source", placeholder="/data/images or /data/manifest.csv")
        if st.form_submit_button("Open dataset", type="primary", icon=":material/folder_open:"):
            with widgets.guarded():
                cached.forget_imageset(state.set_source((typed or picked).strip()))  # a re-open scans the files again
                st.rerun()


def summary(imageset, source: str) -> None:
    """core.catalog.summarise: sizes, classes per split, sample images, skipped files and dropped duplicates."""
    facts = catalog.summarise(imageset)
    st.markdown(f"**{views.md(facts.name)}** · {views.md(source)} · fingerprint `{facts.fingerprint[:12]}`")
    for column, (label, value) in zip(st.columns(5), [("Images", facts.n_images), ("Eval split", facts.n_eval),
                                                      ("Train split", facts.n_train), ("Skipped files", facts.n_skipped),
                                                      ("Duplicates dropped", len(imageset.duplicates))]):
        column.metric(label, f"{value:,}")
    if facts.n_eval == 0:
        st.warning("This dataset has no eval split: the leaderboard evaluates on eval rows. "
                   "Give the manifest a split column, or use eval/ (or val/, test/) folders.")
    left, right = st.columns([2, 3])
    left.dataframe(pd.DataFrame(facts.class_rows), hide_index=True, key="data:classes", height=300)
    with right:
        samples(imageset)
    for what, rows in (("skipped files", [{"path": s.path, "reason": s.reason} for s in imageset.skipped]),
                       ("duplicates dropped", [{"kept": d.kept, "dropped": d.dropped, "reason": d.reason}
                                               for d in imageset.duplicates])):
        if rows:
            with st.expander(f"{len(rows)} {what}"):
                st.dataframe(pd.DataFrame(rows), hide_index=True)


def samples(imageset) -> None:
    st.caption("Sample images (first eval images of each class)")
    grid = st.columns(8)
    for i, row in enumerate(catalog.sample_rows(imageset, per_class=1)[:24]):
        path = cached.thumb(imageset, row, 96)
        if path is not None:
            grid[i % 8].image(path, caption=views.md(imageset.class_names[imageset.labels[row]]), width=80)


def extract_form(source: str, statuses) -> None:
    usable = [s.info.name for s in statuses if s.info.availability != "missing"]
    not_cached = [s.info.name for s in statuses if s.cached is None and s.info.availability == "offline"]
    with st.form("data:extract"):
        chosen = st.multiselect("Models to extract", usable, default=not_cached[:4], key="data:models_to_extract")
        typed = st.text_input("Other model names (comma-separated: timm:<arch>.<tag>, checkpoint:<arch>@<file>, "
                              "random:<arch>)", key="data:custom_models")
        force = st.checkbox("Extract again even if cached (replaces damaged or outdated embeddings)", key="data:force")
        if st.form_submit_button("Extract embeddings", type="primary", icon=":material/memory:"):
            with widgets.guarded():
                widgets.submitted(views.extraction_config(source, chosen, typed, force).submit(state.engine()), "Extraction")


with widgets.guarded():
    source, problem = state.dataset_choice()
    st.subheader("Dataset")
    dataset_form(source)
    if problem:
        st.error(views.md(problem), icon=":material/block:")
    if not source:
        st.info("Choose a dataset above, or prepare the offline demo on the Start page.")
        st.stop()

    imageset, source = widgets.require_imageset()
    summary(imageset, source)
    st.subheader("Models")
    sets = catalog.cached_sets(state.embedding_cache(), imageset.fingerprint)
    statuses = catalog.model_statuses(state.embedding_cache(), imageset.fingerprint, [s.model_name for s in sets])
    st.dataframe(pd.DataFrame(views.model_rows(statuses)), hide_index=True, key="data:models")
    extract_form(source, statuses)
    widgets.show_jobs(kinds=("extract",), key="data:jobs")

    st.subheader("Cached embedding sets")
    if sets:
        st.dataframe(pd.DataFrame(views.cached_rows(sets)), hide_index=True, key="data:cached")
    else:
        st.info("No embeddings cached for this dataset yet: choose models above and extract them.")
