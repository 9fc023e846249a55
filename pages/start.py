"""Start: what this app answers, and the offline demo in one click."""
from __future__ import annotations

import streamlit as st

from core import catalog, db, jobs
from pages import context

st.title("Ensemble Explorer")
st.markdown(
    "**Would an ensemble of our image-embedding models retrieve better than our best single model — "
    "by how much, and where?**\n\n"
    "1. **Data & models** — pick a labelled image set and models; extract embeddings once (cached).\n"
    "2. **Leaderboard** — every single model and ensemble on the eval split: mAP@k under several "
    "conventions, P@1, mAP@R and the gain over the best single model.\n"
    "3. **Weight sweep** — search concat weights (labelled *oracle: tuned on eval*).\n"
    "4. **Fusion heads** — train small fusion networks on the train split in the background.\n"
    "5. **Query explorer** and **Embedding map** — see where the ensemble fixed or broke a query.\n"
    "6. **Runs** — every job ever run, reloadable and exportable."
)

with context.guarded():
    engine = context.engine()
    with db.read_session(engine) as session:
        n_runs = db.count_runs(session)
        n_datasets = len(db.list_datasets(session))

    st.subheader("Try it offline")
    st.write(
        "The demo uses 1,000 Fashion-MNIST eval images (100 per class) and 3,000 train images shipped with this "
        f"machine, and four packaged models ({', '.join(catalog.DEMO_MODELS)}). One click queues the extraction, "
        "the evaluation and a small weight sweep, and starts a worker if none is running. Extraction (4,000 images "
        "x 4 models) takes a minute or two on a GPU and can take an hour on a small CPU; progress shows below, "
        "and every page works as soon as it is done."
    )
    if st.button("Prepare the offline demo", key="start:demo", type="primary", icon=":material/rocket_launch:"):
        if not jobs.worker_alive(engine):
            context.start_worker()
        ids = [context.submit(kind, params) for kind, params in catalog.demo_jobs()]
        context.set_source(catalog.DEMO_SOURCE)
        st.success(f"Demo queued (jobs {', '.join(map(str, ids))}). Progress shows below; you can leave this page.")

    context.show_jobs(key="start:jobs")

    if n_runs:
        st.caption(f"This workspace holds {n_datasets} dataset(s) and {n_runs} run(s).")
        cols = st.columns(3)
        cols[0].page_link(context.PAGES["leaderboard"], label="Open the leaderboard", icon=":material/leaderboard:")
        cols[1].page_link(context.PAGES["explorer"], label="Explore queries", icon=":material/image_search:")
        cols[2].page_link(context.PAGES["runs"], label="See all runs", icon=":material/history:")
    else:
        st.caption("Nothing has run in this workspace yet.")
