"""Choosing ensemble weights without looking at the eval split: the best weights of a sweep over the train rows."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from core.sweep import grid_sweep


def check_disjoint(train_rows: np.ndarray, eval_rows: np.ndarray) -> None:
    """Raise if any eval-split row would be used for fitting: the one row guard every learned method calls
    (the dataset's content guard, `ImageSet.check_disjoint`, catches the same image under two paths)."""
    overlap = np.intersect1d(np.asarray(train_rows), np.asarray(eval_rows))
    if len(overlap):
        raise ValueError(
            f"{len(overlap)} eval-split rows (e.g. {overlap[:5].tolist()}) are also in the training rows; "
            "fit on the train split only and report on the eval split"
        )


def weights_chosen_on_train(
    embeddings: Sequence[np.ndarray],
    labels: np.ndarray,
    train_rows: np.ndarray,
    eval_rows: np.ndarray,
    weights: Sequence[float] = (0, 1, 2, 3, 4, 5),
    k: int = 50,
    *,
    sweep: Callable[..., list[dict]] = grid_sweep,
    reporter=None,
) -> dict:
    """The best row of a weight sweep over the train rows only (its "weights" and train metrics), after
    checking that no eval row takes part."""
    train_rows = np.asarray(train_rows)
    check_disjoint(train_rows, np.asarray(eval_rows))
    labels = np.asarray(labels)
    return sweep([e[train_rows] for e in embeddings], labels[train_rows], weights, k, reporter=reporter)[0]
