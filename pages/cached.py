"""What the pages keep between reruns, one copy per process: opened datasets, method embeddings, per-query
scores, 2-D projections and models for uploads.

All st.cache_resource, never st.cache_data: the values are large arrays that a data cache would copy
(pickle) on every hit. Each key names what the value depends on, so a changed input is a new entry,
not a stale one. The computations themselves are core's (named in each function).
"""
from __future__ import annotations

import os

import numpy as np
import streamlit as st

from core import catalog, views
from core import leaderboard as lb
from core.datasets import ImageSet, open_dataset
from core.explorer import cached_arrays, query_scores
from core.methods import Method
from core.metrics import QueryScores
from core.projection import project, sample_positions
from core.thumbnails import thumbnail_path
from core.workspace import Workspace
from pages import state


# --- datasets -------------------------------------------------------------------------------------------

@st.cache_resource(show_spinner="Opening the dataset ...", max_entries=8)
def _imageset(source: str, root: str, stamp: int) -> ImageSet:
    return open_dataset(source, Workspace.open(root))


def imageset(source: str) -> ImageSet:
    """core.datasets.open_dataset, scanned once per process and again only when the folder's or manifest's
    mtime changes (opening reads and hashes every file)."""
    return _imageset(source, str(state.workspace().root), views.source_stamp(source))


def forget_imageset(source: str) -> None:
    """After files changed on disk without touching the folder's mtime: the next open scans them again."""
    _imageset.clear(source, str(state.workspace().root), views.source_stamp(source))


def eval_rows(imageset: ImageSet) -> np.ndarray:
    return imageset.split("eval")


def entries(imageset: ImageSet) -> list[lb.Entry]:
    """core.leaderboard.entries_for_dataset: every stored eval result on this dataset."""
    return lb.entries_for_dataset(state.engine(), imageset.fingerprint)


def cached_models(imageset: ImageSet) -> list[str]:
    """Models with cached embeddings of this dataset (core.catalog.cached_sets)."""
    return [s.model_name for s in catalog.cached_sets(state.embedding_cache(), imageset.fingerprint)]


def thumb(imageset: ImageSet, row: int, size: int = 128) -> str | None:
    path = thumbnail_path(state.workspace().thumbnails, imageset.paths[row], size)
    return str(path) if path is not None else None


# --- methods ----------------------------------------------------------------------------------------------

def _key(imageset: ImageSet, method: Method) -> str:
    """The dataset, the method and the state of each embedding file it reads (a re-extraction is a new key)."""
    arrays = cached_arrays(state.embedding_cache(), imageset, list(method.used_models))
    files = sorted((name, os.stat(a.filename).st_mtime_ns) for name, a in arrays.items())
    return f"{imageset.fingerprint}|{method.to_dict()}|{files}"


@st.cache_resource(show_spinner="Building the method's embeddings ...", max_entries=4)  # 50k x 5k floats = 1 GB
def _method_embeddings(key: str, _imageset: ImageSet, _method: Method) -> np.ndarray:
    arrays = cached_arrays(state.embedding_cache(), _imageset, list(_method.used_models))
    return _method.embeddings(arrays, eval_rows(_imageset))


def method_embeddings(imageset: ImageSet, method: Method) -> np.ndarray:
    """core.methods.Method.embeddings of the eval split."""
    return _method_embeddings(_key(imageset, method), imageset, method)


@st.cache_resource(show_spinner="Scoring every query ...", max_entries=24)
def _method_scores(key: str, k: int, _imageset: ImageSet, _method: Method) -> QueryScores:
    return query_scores(method_embeddings(_imageset, _method), _imageset.labels[eval_rows(_imageset)], k)


def method_scores(imageset: ImageSet, method: Method, k: int) -> QueryScores:
    """core.explorer.query_scores: per-query AP of every eval query (one full evaluation, once per process)."""
    return _method_scores(_key(imageset, method), int(k), imageset, method)


@st.cache_resource(show_spinner="Projecting to 2-D ...", max_entries=8)
def _projection(key: str, how: str, max_points: int, _imageset: ImageSet, _method: Method):
    positions = sample_positions(_imageset.labels[eval_rows(_imageset)], max_points)
    return positions, project(method_embeddings(_imageset, _method)[positions], how)


def projection(imageset: ImageSet, method: Method, how: str, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """core.projection: (eval positions shown, their 2-D coordinates)."""
    return _projection(_key(imageset, method), how, int(max_points), imageset, method)


@st.cache_resource(show_spinner="Loading the model for uploads ...", max_entries=8)
def loaded_model(name: str):
    """A model on the CPU for embedding an uploaded image; loaded on the first upload, not before."""
    from core.models import load_model
    return load_model(name, "cpu")
