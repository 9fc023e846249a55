"""Per-query scores of stored results, kept beside the runs DB so every comparison can be paired.

One float32 file per result under the workspace's `scores/` folder: one row per eval query (in eval
split order), one column per metric (core.metrics.PER_QUERY order), NaN for a query with no relevant
item, and a last column with the query's number of relevant items. Written atomically after the
result's row exists; a result without its file simply has no interval shown.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.files import atomic_write
from core.metrics import PER_QUERY, QueryScores
from core.workspace import Workspace


def scores_path(workspace: Workspace, result_id: int) -> Path:
    return workspace.folder("scores") / f"result-{int(result_id)}.npy"


def save_query_scores(workspace: Workspace, result_id: int, scores: QueryScores) -> Path:
    table = np.column_stack([*(getattr(scores, attr) for attr in PER_QUERY.values()), scores.n_relevant])
    meta = np.full((1, table.shape[1]), float(scores.k))  # first row: k, so a file can't be read at another k
    data = np.vstack([meta, table]).astype(np.float32)
    return atomic_write(scores_path(workspace, result_id), lambda h: np.save(h, data, allow_pickle=False))


def load_query_scores(workspace: Workspace, result_id: int) -> QueryScores | None:
    """The stored per-query scores of a result, or None when it has none (or they are unreadable)."""
    path = scores_path(workspace, result_id)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if data.ndim != 2 or data.shape[1] != len(PER_QUERY) + 1 or len(data) < 2:
        return None
    columns = data[1:].T.astype(np.float64)
    return QueryScores(int(data[0, 0]), **dict(zip(PER_QUERY.values(), columns[:-1])),
                       n_relevant=columns[-1].astype(np.int64))
