"""Start: what this app answers, the answer so far on the current dataset, and the offline demo in one click.

Start draws in about a second whatever the worker is doing: it reads the runs DB only and never opens (scans)
a dataset."""
from __future__ import annotations

import streamlit as st

from core import configs, db, jobs, views
from core import leaderboard as lb
from core.methods import ORACLE_LABEL
from pages import cached, state, widgets

st.title("Ensemble Explorer")
st.markdown(
    "**Would an ensemble of our image-embedding models retrieve better than our best single model — "
    "by how much, and where?**\n\n"
    "1. **Data & models** — pick a labelled image set and models; extract embeddings once (cached).\n"
    "2. **Leaderboard** — every single model and ensemble on the eval split: mAP@k under several "
    "conventions, P@1, mAP@R and the gain over the best single model.\n"
    f"3. **Weight sweep** — search concat weights on the eval split (labelled *{ORACLE_LABEL}*), or choose them "
    "on the train split (an honest ensemble).\n"
    "4. **Fusion heads** — train small fusion networks on the train split in the background.\n"
    "5. **Query explorer** and **Embedding map** — see where the ensemble fixed or broke a query.\n"
    "6. **Runs** — every job ever run, reloadable and exportable."
)
DEMO_TEXT = (
    "The offline demo is Fashion-MNIST: 1,000 eval images (100 per class) and 3,000 train images shipped with this "
    f"machine, and four packaged models ({', '.join(configs.DEMO_MODELS)}). One click queues the extraction, the "
    "evaluation, the reference study's weight sweep (tuned on eval: the oracle), weights chosen on the train split "
    "and a fusion head (the honest ensembles), makes the demo the current dataset, and starts a worker if none is "
    "running. Extraction (4,000 images x 4 models) takes a minute or two on a GPU and can take an hour on a small "
    "CPU; progress shows below, and every page works as soon as it is done.")
INSTANT_INTERVALS_UP_TO = 2_000  # eval queries: the headline's two paired bootstraps take well under a second


def answer_so_far(source: str) -> None:
    """The headline (core.leaderboard.headline) on the current dataset at its usual k, from the runs DB alone:
    the dataset is never opened here (a worker may be reading the same files), so Start draws at once. Paired
    intervals come with it while they are quick to compute, else on request (then kept for the process)."""
    facts = views.dataset_facts(state.engine(), source)
    if facts is None:
        return
    entries = cached.entries(facts.fingerprint)
    k = views.default_k(lb.available_ks(entries))
    known = f"{views.md(facts.name)}: {facts.n_images:,} images, {facts.n_classes:,} classes"
    if k is None:
        st.caption(f"{known}. No results yet: they appear here as soon as the first evaluation finishes.")
        return
    st.subheader(f"So far on {views.md(facts.name)} (map@k, k={k})")
    n = views.queries_scored(entries)
    intervals = n <= INSTANT_INTERVALS_UP_TO or st.toggle(
        f"Paired 95 % intervals of the gains (a bootstrap over {n:,} queries: seconds, once)", key="start:intervals")
    widgets.headline(cached.headline(entries, k, intervals=intervals), intervals=intervals)
    st.caption(f"{known} · {n:,} eval queries")
    st.page_link(state.PAGES["leaderboard"], label="See the full leaderboard", icon=":material/leaderboard:",
                 query_params={"dataset": source})


def offer_demo(engine) -> None:
    """One click queues the demo's jobs, unless they are queued or running already (then: where they are)."""
    preparing = views.active_demo_jobs(jobs.list_jobs(engine, status=jobs.ACTIVE, limit=200), configs.demo_jobs())
    if preparing:
        ids = ", ".join(str(j.id) for j in reversed(preparing))
        st.info(f"The demo is being prepared: job(s) {ids} queued or running. Progress shows below; each page fills "
                "in as its results arrive.", icon=":material/hourglass_top:")
        return
    if st.button("Prepare the offline demo", key="start:demo", type="primary", icon=":material/rocket_launch:"):
        if not jobs.worker_alive(engine):
            state.start_worker()
        queued = [config.submit(engine) for config in configs.demo_jobs()]
        state.set_source(configs.DEMO_SOURCE)
        st.success(f"Demo queued (jobs {', '.join(str(j.id) for j in queued)}). Progress shows below; "
                   "you can leave this page.")


with widgets.guarded():
    engine = state.engine()
    with db.read_session(engine) as session:
        n_runs, n_datasets = db.count_runs(session), len(db.list_datasets(session))
    source, problem = state.dataset_choice()
    if problem:
        st.error(views.md(problem), icon=":material/block:")
    if source and n_runs:
        with widgets.guarded():  # whatever fails in the answer so far, Start stays a start page
            answer_so_far(source)

    other = bool(source) and source != configs.DEMO_SOURCE
    # The demo's sizes belong to the demo only: with another dataset current, its description is folded away.
    with st.expander("Try the offline demo (Fashion-MNIST, a dataset of its own)") if other else st.container():
        if not other:
            st.subheader("Try it offline")
        st.write(DEMO_TEXT)
        offer_demo(engine)
    widgets.show_jobs(key="start:jobs")

    if n_runs:
        st.caption(f"This workspace holds {n_datasets} dataset(s) and {n_runs} run(s).")
        cols = st.columns(3)
        cols[0].page_link(state.PAGES["leaderboard"], label="Open the leaderboard", icon=":material/leaderboard:")
        cols[1].page_link(state.PAGES["explorer"], label="Explore queries", icon=":material/image_search:")
        cols[2].page_link(state.PAGES["runs"], label="See all runs", icon=":material/history:")
    else:
        st.caption("Nothing has run in this workspace yet.")
