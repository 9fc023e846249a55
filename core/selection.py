"""Choosing ensemble weights without looking at the eval split: fit on train, report on eval, the oracle beside it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from core.fusion import weighted_concat
from core.metrics import evaluate as evaluate_embeddings
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


@dataclass(frozen=True)
class WeightSelection:
    """Concat weights picked on the train split next to the best weights found by sweeping eval itself."""

    selected_weights: tuple[float, ...]
    selected_train: dict  # the sweep row on train that chose them
    selected_eval: dict  # evaluated on eval with those weights: the honest number
    oracle_weights: tuple[float, ...]
    oracle_eval: dict  # evaluated on eval with eval's best weights: "oracle (tuned on eval)"


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


def select_concat_weights(
    embeddings: Sequence[np.ndarray],
    labels: np.ndarray,
    train_rows: np.ndarray,
    eval_rows: np.ndarray,
    weights: Sequence[float] = (0, 1, 2, 3, 4, 5),
    k: int = 50,
    *,
    sweep: Callable[..., list[dict]] = grid_sweep,
    evaluate: Callable[..., dict] = evaluate_embeddings,
    reporter=None,
) -> WeightSelection:
    """Grid-sweep concat weights on the train rows, keep the best, and score it on the eval rows beside
    the oracle best of a sweep on the eval rows."""
    on_train = weights_chosen_on_train(embeddings, labels, train_rows, eval_rows, weights, k, sweep=sweep,
                                       reporter=reporter)
    eval_rows, labels = np.asarray(eval_rows), np.asarray(labels)
    on_eval = sweep([e[eval_rows] for e in embeddings], labels[eval_rows], weights, k, reporter=reporter)
    chosen = tuple(float(w) for w in on_train["weights"])
    oracle = tuple(float(w) for w in on_eval[0]["weights"])
    eval_embeddings = [e[eval_rows] for e in embeddings]
    return WeightSelection(
        selected_weights=chosen,
        selected_train=on_train,
        selected_eval=evaluate(weighted_concat(eval_embeddings, chosen), labels[eval_rows], k),
        oracle_weights=oracle,
        oracle_eval=evaluate(weighted_concat(eval_embeddings, oracle), labels[eval_rows], k),
    )
