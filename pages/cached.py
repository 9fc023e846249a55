"""What the pages keep between reruns, one copy per process: opened datasets, method embeddings, per-query
scores, paired comparisons, 2-D projections and models for uploads.

All st.cache_resource, never a data cache: the values are large arrays that a data cache would copy
(pickle) on every hit. Each key names what the value depends on, so a changed input is a new entry,
not a stale one. The computations themselves are core's (named in each function).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import streamlit as st

from core import db, views
from core import leaderboard as lb
from core.cache import files_state
from core.datasets import PROTOCOL_SPLIT, ImageSet, open_dataset
from core.explorer import query_scores
from core.extract import query_arrays
from core.methods import Method
from core.metrics import QueryScores, depth_needed, query_scores_from_ranking, relevant_counts
from core.projection import draw, load_map, map_key
from core.scores import load_query_scores
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


def eval_rows(imageset: ImageSet, protocol: str = "image") -> np.ndarray:
    """The rows queries come from under `protocol` (core.datasets.ImageSet.protocol_rows)."""
    return imageset.protocol_rows(protocol)[1]


@st.cache_resource(max_entries=16)
def _entries(database: str, fingerprint: str, split: str, version: tuple[int, ...]) -> list[lb.Entry]:
    return lb.entries_for_dataset(state.engine(), fingerprint, split)


def entries(imageset: ImageSet | str, protocol: str = "image") -> list[lb.Entry]:
    """core.leaderboard.entries_for_dataset: every stored result on this dataset (an opened one, or its
    fingerprint: no scan) under `protocol`; read again only when the stored results changed
    (core.db.results_version). Shared by every session: never modify the list."""
    fingerprint = imageset if isinstance(imageset, str) else imageset.fingerprint
    engine = state.engine()
    return _entries(str(engine.url), fingerprint, PROTOCOL_SPLIT[protocol], _results_version(engine))


@st.cache_resource(max_entries=16)
def _sweep_table(database: str, run_id: int, metric: str, version: tuple[int, ...]) -> tuple[db.Run | None, list[dict]]:
    run, results = lb.run_results(state.engine(), run_id)
    return run, lb.sweep_rows(results, list(run.config.get("models", [])) if run else [], metric)


def sweep_table(run_id: int, metric: str) -> tuple[db.Run | None, list[dict]]:
    """A sweep run and its rows ranked by `metric` (core.leaderboard.run_results and sweep_rows), read again
    only when the stored results changed. Shared by every session: never modify them."""
    engine = state.engine()
    return _sweep_table(str(engine.url), int(run_id), metric, _results_version(engine))


def _results_version(engine) -> tuple[int, ...]:
    with db.read_session(engine) as session:
        return db.results_version(session)


def cached_models(imageset: ImageSet) -> list[str]:
    """Models with cached embeddings of this dataset or of its eval split alone (core.catalog.cached_sets)."""
    fingerprints = {imageset.fingerprint, imageset.only("eval").fingerprint}
    return sorted({s.model_name for s in state.embedding_cache().list() if s.dataset_fingerprint in fingerprints})


def thumb(imageset: ImageSet, row: int, size: int = 128) -> str | None:
    path = thumbnail_path(state.workspace().thumbnails, imageset.paths[row], size)
    return str(path) if path is not None else None


# --- methods ----------------------------------------------------------------------------------------------

def _arrays(imageset: ImageSet, method: Method, protocol: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """core.extract.query_arrays of the method's models."""
    return query_arrays(state.embedding_cache(), imageset, list(method.used_models), protocol)


def _key(imageset: ImageSet, method: Method, protocol: str) -> str:
    """The dataset, the method, the protocol and the state of each embedding file the method reads (a
    re-extraction, or the whole set replacing the eval split's own, is a new key)."""
    arrays, _ = _arrays(imageset, method, protocol)
    return f"{imageset.fingerprint}|{protocol}|{method.to_dict()}|{files_state(arrays)}"


@st.cache_resource(show_spinner="Building the method's embeddings ...", max_entries=4)  # 50k x 5k floats = 1 GB
def _method_embeddings(key: str, _imageset: ImageSet, _method: Method, protocol: str) -> np.ndarray:
    return _method.embeddings(*_arrays(_imageset, _method, protocol))


def method_embeddings(imageset: ImageSet, method: Method, protocol: str = "image") -> np.ndarray:
    """core.methods.Method.embeddings of the query rows."""
    return _method_embeddings(_key(imageset, method, protocol), imageset, method, protocol)


@st.cache_resource(show_spinner="Ranking every query ...", max_entries=4)  # 50k x 100 positions = 40 MB
def _method_ranking(key: str, depth: int, _imageset: ImageSet, _method: Method, protocol: str) -> np.ndarray:
    arrays, rows = _arrays(_imageset, _method, protocol)
    return _method.ranking(arrays, rows, depth)


def method_ranking(imageset: ImageSet, method: Method, depth: int, protocol: str = "image") -> np.ndarray:
    """core.methods.Method.ranking of every eval query, `depth` deep: how a method without one embedding
    per image (rank fusion, query expansion) answers."""
    return _method_ranking(_key(imageset, method, protocol), int(depth), imageset, method, protocol)


def query_top(imageset: ImageSet, method: Method, position: int, k: int) -> views.QueryTop:
    """core.views.query_top from the method's cached embeddings, or for a method without them from its
    cached ranking (views.MAX_SHOWN_K deep, so every k the explorer offers reads the same one)."""
    if method.yields_embedding:
        return views.query_top(method, _eval_labels(imageset), position, k,
                               embeddings=method_embeddings(imageset, method))
    ranking = method_ranking(imageset, method, min(views.MAX_SHOWN_K, len(eval_rows(imageset)) - 1))
    return views.query_top(method, _eval_labels(imageset), position, k, ranking=ranking)


def _eval_labels(imageset: ImageSet, protocol: str = "image") -> np.ndarray:
    return imageset.labels[eval_rows(imageset, protocol)]


@st.cache_resource(show_spinner="Scoring every query ...", max_entries=24)
def _method_scores(key: str, k: int, _imageset: ImageSet, _method: Method, protocol: str) -> QueryScores:
    labels = _eval_labels(_imageset, protocol)
    if _method.yields_embedding:
        return query_scores(method_embeddings(_imageset, _method, protocol), labels, k)
    depth = depth_needed(relevant_counts(labels), k, len(labels) - 1)
    return query_scores_from_ranking(method_ranking(_imageset, _method, depth, protocol), labels, k)


def stored_scores(imageset: ImageSet, result_id: int | None, protocol: str = "image") -> QueryScores | None:
    """The per-query scores kept with a result (core.scores), when they cover this eval split."""
    if result_id is None:
        return None
    stored = load_query_scores(state.workspace(), result_id)
    return stored if stored is not None and len(stored.n_relevant) == len(eval_rows(imageset, protocol)) else None


def method_scores(imageset: ImageSet, method: Method, k: int, result_id: int | None = None,
                  protocol: str = "image") -> QueryScores:
    """Per-query AP of every query: the scores stored with `result_id` when they are at this k
    (core.scores), else one full evaluation here (once per process)."""
    stored = stored_scores(imageset, result_id, protocol)
    if stored is not None and stored.k == k:
        return stored
    return _method_scores(_key(imageset, method, protocol), int(k), imageset, method, protocol)


def list_scores(imageset: ImageSet, picked: Sequence[views.MethodOption], k: int
                ) -> tuple[list[QueryScores], int, list[str]]:
    """Per-query scores of the picked methods for the explorer's lists: the stored ones, at the k they were
    stored at (core.views.list_k: nothing is searched for a stored result), and only methods without
    stored scores (a cached model not evaluated yet) scored here at that k. Also, per method, where its
    scores came from."""
    stored = [stored_scores(imageset, o.result_id) for o in picked]
    at = views.list_k([s.k if s is not None else None for s in stored], k)
    out, origin = [], []
    for option, kept in zip(picked, stored):
        if kept is not None and kept.k == at:
            out.append(kept)
            origin.append(f"stored with result {option.result_id}")
        else:
            out.append(_method_scores(_key(imageset, option.method, "image"), at, imageset, option.method, "image"))
            origin.append("computed here")
    return out, at, origin


@st.cache_resource(show_spinner="Projecting to 2-D ...", max_entries=8)
def _pca_map(key: str, max_points: int, _imageset: ImageSet, _method: Method):
    return draw(method_embeddings(_imageset, _method), _imageset.labels[eval_rows(_imageset)], "pca", max_points)


def pca_map(imageset: ImageSet, method: Method, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """core.projection PCA, computed here (under a second at 50,000 points): (eval positions, 2-D coordinates)."""
    return _pca_map(_key(imageset, method, "image"), int(max_points), imageset, method)


def stored_map(imageset: ImageSet, method: Method, how: str, max_points: int
               ) -> tuple[np.ndarray, np.ndarray] | None:
    """A map computed by an embedding_map job (core.projection.load_map), or None when there is none yet."""
    arrays, _ = _arrays(imageset, method, "image")
    key = map_key(imageset.fingerprint, method.to_dict(), files_state(arrays), how, int(max_points))
    return load_map(state.workspace(), key)


@st.cache_resource(show_spinner="Loading the model for uploads ...", max_entries=8)
def loaded_model(name: str):
    """A model on the CPU for embedding an uploaded image; loaded on the first upload, not before (it
    imports the model stack), reusing the worker's CPU export of it."""
    from core.extract import EXPORTS_FOLDER
    from core.models import load_model
    return load_model(name, "cpu", export_dir=state.workspace().embeddings / EXPORTS_FOLDER)


# --- paired comparisons (bootstraps over the queries: seconds on a large eval set, so computed once) ------

def _ids(entries: Sequence[lb.Entry | None]) -> tuple:
    return tuple(e.result_id if e is not None else None for e in entries)


@st.cache_resource(show_spinner="Comparing the methods query by query ...", max_entries=64)
def _headline(key: tuple, _entries: Sequence[lb.Entry], k: int, metric: str, root: str) -> lb.Headline:
    return lb.headline(_entries, k, metric, Workspace.open(root))


def headline(entries: Sequence[lb.Entry], k: int, metric: str = "map@k", intervals: bool = True) -> lb.Headline:
    """core.leaderboard.headline with each gain's paired interval (unless `intervals` is False: instant);
    recomputed only when the best single model, ensemble or oracle changes (stored per-query scores never
    change for a result)."""
    quick = lb.headline(entries, k, metric)
    if not intervals:
        return quick
    chosen = _ids([quick.best_single, quick.best_ensemble, quick.best_oracle])
    return _headline((chosen, k, metric), entries, k, metric, str(state.workspace().root))


@st.cache_resource(show_spinner="Paired intervals for every row ...", max_entries=16)
def _rows_with_intervals(key: tuple, _board: Sequence[lb.Entry], metric: str, root: str) -> list[dict]:
    return lb.rows(_board, metric, Workspace.open(root))


def board_rows(board: Sequence[lb.Entry], metric: str, intervals: bool) -> list[dict]:
    """core.leaderboard.rows; with `intervals`, each gain's paired 95 % interval and p-value too."""
    if not intervals:
        return lb.rows(board, metric)
    return _rows_with_intervals((_ids(board), metric), board, metric, str(state.workspace().root))
