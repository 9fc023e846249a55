"""Start: what this app answers, and the offline demo in one click."""
from __future__ import annotations

import streamlit as st

from core import catalog, db, jobs
from core import leaderboard as lb
from core.datasets import DatasetError
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



def headline(source: str) -> None:
    """The answer so far on the current dataset: best single model vs best ensemble at map@k, and the gain."""
    try:
        imageset = context.open_imageset(source)
    except DatasetError:
        return  # the Data page says what is wrong with it; the start page stays a start page
    entries = context.entries(imageset)
    if not entries:
        return
    ks = lb.available_ks(entries)
    k = catalog.DEMO_K if catalog.DEMO_K in ks else ks[-1]
    board = lb.board(entries, k, "map@k")
    best = lb.best_single(board, "map@k")
    ensembles = [e for e in board if e.kind != "single"]
    st.subheader(f"So far on {imageset.name} (map@k, k={k})")
    cols = st.columns(3)
    if best is not None:
        cols[0].metric("Best single model", f"{best.score('map@k'):.4f}", help=best.method)
    if ensembles:
        top = max(ensembles, key=lambda e: e.score("map@k"))
        gain = top.score("map@k") - best.score("map@k") if best is not None else None
        cols[1].metric("Best ensemble", f"{top.score('map@k'):.4f}",
                       f"{gain:+.4f}" if gain is not None else None, help=top.method)
        if gain is not None and best.score("map@k"):
            cols[2].metric("Gain over the best single", f"{100 * gain / best.score('map@k'):+.1f}%")
    elif best is not None:
        cols[1].caption("No ensemble evaluated yet: run a weight sweep or train a fusion head.")
    st.page_link(context.PAGES["leaderboard"], label="See the full leaderboard", icon=":material/leaderboard:",
                 query_params={"dataset": source})


with context.guarded():
    engine = context.engine()
    with db.read_session(engine) as session:
        n_runs = db.count_runs(session)
        n_datasets = len(db.list_datasets(session))

    source = context.current_source()
    if source and n_runs:
        headline(source)

    other = bool(source) and source != catalog.DEMO_SOURCE
    # The demo's sizes belong to the demo only: with another dataset current, its description is folded away.
    demo = st.expander("Try the offline demo (Fashion-MNIST, a dataset of its own)") if other else st.container()
    with demo:
        if not other:
            st.subheader("Try it offline")
        st.write(
            "The offline demo is Fashion-MNIST: 1,000 eval images (100 per class) and 3,000 train images shipped "
            f"with this machine, and four packaged models ({', '.join(catalog.DEMO_MODELS)}). One click queues the "
            "extraction, the evaluation and a small weight sweep, makes the demo the current dataset, and starts a "
            "worker if none is running. Extraction (4,000 images x 4 models) takes a minute or two on a GPU and can "
            "take an hour on a small CPU; progress shows below, and every page works as soon as it is done."
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
