"""Shared vector arithmetic of every retrieval method: L2 normalisation and weight ratio classes."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit length, as float32; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def ratio_class(weights: Sequence[float]) -> tuple[float, ...]:
    """Weights scaled so the largest is 1 (rounded): vectors that are multiples of each other rank
    identically (DESIGN.md, the sweep identity) and share one class."""
    top = max((float(w) for w in weights), default=0.0)
    if top <= 0:
        return tuple(0.0 for _ in weights)
    return tuple(round(float(w) / top, 9) for w in weights)


def plain_weights(weights: Sequence[float]) -> tuple[float | int, ...]:
    """Plain Python numbers, integral ones as ints: what a user reads and a job stores as JSON."""
    return tuple(int(w) if float(w).is_integer() else float(w) for w in weights)
