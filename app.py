"""Ensemble Explorer: would an ensemble of our image-embedding models retrieve better than the best one alone?

Run with `streamlit run app.py`. The pages are listed here explicitly; the sidebar shows the workspace,
the device and whether a background worker is alive.
"""
from __future__ import annotations

import streamlit as st

from core import db, jobs
from core.views import md
from pages import state, widgets

st.set_page_config(page_title="Ensemble Explorer", page_icon=":material/hub:", layout="wide")

P = state.PAGES
# url_path = the file's stem: Streamlit's old pages/-folder routing, which answers a fresh server's first
# request, then finds the same page (see pages/state.py, leave_pages_directory_mode). The default page
# has none: Streamlit serves it only at /, so a url_path there would advertise a /start that 404s.
navigation = st.navigation({
    "Start": [st.Page(P["start"], title="Start", icon=":material/home:", default=True)],
    "Evaluate": [
        st.Page(P["data"], title="Data & models", icon=":material/folder_open:", url_path="data"),
        st.Page(P["leaderboard"], title="Leaderboard", icon=":material/leaderboard:", url_path="leaderboard"),
        st.Page(P["complementarity"], title="Complementarity", icon=":material/join_inner:",
                url_path="complementarity"),
        st.Page(P["sweep"], title="Weight sweep", icon=":material/tune:", url_path="sweep"),
        st.Page(P["fusion"], title="Fusion heads", icon=":material/model_training:", url_path="fusion"),
    ],
    "Inspect": [
        st.Page(P["explorer"], title="Query explorer", icon=":material/image_search:", url_path="query_explorer"),
        st.Page(P["map"], title="Embedding map", icon=":material/scatter_plot:", url_path="embedding_map"),
        st.Page(P["runs"], title="Runs", icon=":material/history:", url_path="runs"),
    ],
})

with st.sidebar, widgets.guarded():
    engine = state.engine()
    source = state.current_source()
    st.caption(f"Workspace: {md(state.workspace().root)}")
    st.caption(f"Dataset: {md(source)}" if source else "Dataset: none chosen yet")
    st.caption(f"Device: **{md(state.device())}**")
    problem = jobs.queue_problem(engine, state.workspace())
    if problem:
        st.error(md(problem), icon=":material/error:")
        if db.check_same_file(engine):
            st.button("Reopen the runs database", key="sidebar:reopen_db", on_click=state.reopen_database)
    if jobs.worker_alive(engine):
        st.success("Worker running", icon=":material/play_circle:")
    else:
        st.warning("No worker running: jobs wait in the queue.", icon=":material/pause_circle:")
        if st.button("Start a worker", key="sidebar:start_worker", icon=":material/play_arrow:"):
            st.toast(f"Worker started (pid {state.start_worker()}); it appears here within a few seconds.")

navigation.run()
