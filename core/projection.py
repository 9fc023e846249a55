"""2-D maps of an embedding set for the dashboard: PCA always, UMAP where the package is installed."""
from __future__ import annotations

import importlib.util

import numpy as np
import torch


def methods() -> list[str]:
    return ["pca"] + (["umap"] if importlib.util.find_spec("umap") is not None else [])


def sample_positions(labels: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """At most `max_points` positions, stratified by label so every class shows; sorted."""
    labels = np.asarray(labels)
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        take = max(1, int(round(max_points * len(members) / n)))
        picked.append(rng.choice(members, size=min(take, len(members)), replace=False))
    positions = np.concatenate(picked)
    if len(positions) > max_points:  # rounding small classes up to one point can overshoot: drop some at random
        positions = rng.choice(positions, size=max_points, replace=False)
    return np.sort(positions)


def project(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """n x 2 coordinates of L2-normalised rows: PCA (randomised, exact enough for a picture) or UMAP (cosine)."""
    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) < 3:
        return np.zeros((len(x), 2), dtype=np.float32)
    if method == "umap":
        if importlib.util.find_spec("umap") is None:
            raise ValueError("UMAP is not installed here (pip install umap-learn); use PCA")
        import umap
        return umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(x).astype(np.float32)
    if method != "pca":
        raise ValueError(f"unknown projection {method!r}; choose one of {methods()}")
    t = torch.as_tensor(x)
    centred = t - t.mean(dim=0, keepdim=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, s, _ = torch.pca_lowrank(centred, q=min(6, min(centred.shape)), center=False)
    finally:
        torch.random.set_rng_state(generator_state)
    coords = (u[:, :2] * s[:2]).numpy()
    # Fix the sign so the same data always gives the same picture.
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), [0, 1]])
    return (coords * np.where(signs == 0, 1, signs)).astype(np.float32)
