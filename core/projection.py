"""2-D maps of an embedding set for the dashboard: PCA (instant, computed where it is shown) and UMAP
(a background job with progress, stored in the workspace's `maps/` folder; cuML's on a GPU where it is
installed, umap-learn's otherwise)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from core.devices import resolve_device
from core.files import atomic_write
from core.progress import SILENT, Reporter
from core.workspace import Workspace

# UMAP's neighbour search runs on the first PCA components: at thousands of dims it would cost ~100x
# more, and 50 components keep the neighbourhoods UMAP draws (the usual practice, e.g. scanpy's).
UMAP_INPUT_DIMS = 50


def methods() -> list[str]:
    return ["pca"] + (["umap"] if _umap_installed() else [])


def _umap_installed() -> bool:
    return importlib.util.find_spec("umap") is not None or _cuml_usable()


def _cuml_usable() -> bool:
    return importlib.util.find_spec("cuml") is not None and resolve_device(None) == "cuda"


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


def draw(embeddings: np.ndarray, labels: np.ndarray, method: str, max_points: int, seed: int = 0,
         reporter: Reporter = SILENT) -> tuple[np.ndarray, np.ndarray]:
    """A map of at most `max_points` rows of `embeddings`, sampled per label (sample_positions): (positions,
    their 2-D coordinates). The page's PCA and the job's UMAP both draw through here, so a stored map's
    positions are the ones the page would sample."""
    positions = sample_positions(labels, max_points, seed)
    return positions, project(np.asarray(embeddings)[positions], method, seed, reporter)


def project(embeddings: np.ndarray, method: str = "pca", seed: int = 0, reporter: Reporter = SILENT) -> np.ndarray:
    """n x 2 coordinates of L2-normalised rows: PCA (randomised, exact enough for a picture) or UMAP."""
    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) < 3:
        return np.zeros((len(x), 2), dtype=np.float32)
    if method == "umap":
        return _umap(x, seed, reporter)
    if method != "pca":
        raise ValueError(f"unknown projection {method!r}; choose one of {methods()}")
    return _pca(x, 2, seed)


def _pca(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """The first `dims` principal components (scores), signs fixed so the same data always gives the same picture."""
    t = torch.as_tensor(x)
    centred = t - t.mean(dim=0, keepdim=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, s, _ = torch.pca_lowrank(centred, q=min(dims + 4, min(centred.shape)), center=False)
    finally:
        torch.random.set_rng_state(generator_state)
    dims = min(dims, u.shape[1])
    coords = (u[:, :dims] * s[:dims]).numpy()
    signs = np.sign(coords[np.abs(coords).argmax(axis=0), np.arange(dims)])
    return (coords * np.where(signs == 0, 1, signs)).astype(np.float32)


class _EpochProgress:
    """A file for umap-learn's tqdm bar (bar_format "{n} {total}"): each line it writes is an epoch count,
    passed on as progress from `start` to `end`; a cancel request stops the layout between epochs."""

    def __init__(self, reporter: Reporter, start: float, end: float) -> None:
        self.reporter, self.start, self.end = reporter, start, end

    def write(self, text: str) -> None:
        self.reporter.check_cancel()
        found = re.findall(r"(\d+) (\d+)", text)
        if found:
            done, total = (int(v) for v in found[-1])
            self.reporter.progress(self.start + (self.end - self.start) * done / max(total, 1),
                                   f"UMAP layout: epoch {done} of {total}")

    def flush(self) -> None:
        pass


def _umap(x: np.ndarray, seed: int, reporter: Reporter) -> np.ndarray:
    if not _umap_installed():
        raise ValueError("UMAP is not installed here (pip install umap-learn); use PCA")
    reporter.progress(0.02, f"UMAP: reducing {x.shape[1]} dims to {min(UMAP_INPUT_DIMS, x.shape[1])} with PCA")
    if x.shape[1] > UMAP_INPUT_DIMS:
        # Euclidean distance between PCA scores approximates it between the unit rows, which orders pairs
        # as cosine similarity does: so the reduced rows are mapped with the euclidean metric.
        x = _pca(x, UMAP_INPUT_DIMS, seed)
    n_neighbors = min(15, len(x) - 1)
    reporter.check_cancel()
    if _cuml_usable():
        from cuml.manifold import UMAP as CumlUMAP
        reporter.progress(0.1, f"UMAP on the GPU (cuML), {len(x):,} points")
        coords = CumlUMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed).fit_transform(x)
        return np.asarray(coords, dtype=np.float32)
    reporter.progress(0.03, "UMAP: loading umap-learn (a worker's first map also compiles it: about a minute)")
    import umap
    reporter.progress(0.05, f"UMAP: finding the {n_neighbors} nearest neighbours of {len(x):,} points")
    layout = _EpochProgress(reporter, 0.3, 0.99)
    # A seed makes umap-learn single-threaded anyway; saying n_jobs=1 keeps its warning out of the job log.
    model = umap.UMAP(n_components=2, n_neighbors=n_neighbors, metric="euclidean", random_state=seed, n_jobs=1,
                      tqdm_kwds={"disable": False, "file": layout, "bar_format": "{n} {total}\n", "mininterval": 0.5})
    return model.fit_transform(x).astype(np.float32)


# --- maps kept in the workspace -------------------------------------------------------------------------

def map_key(dataset_fingerprint: str, method: Mapping[str, Any], files: Sequence[tuple[str, str, int]],
            projection: str, max_points: int, seed: int = 0) -> str:
    """Names a map by everything it depends on: the dataset, the method, the state of each embedding file
    it reads (core.cache.files_state: a re-extraction is a new map), the projection, the number of points
    and the seed."""
    text = json.dumps([dataset_fingerprint, dict(method), [list(f) for f in files], projection, int(max_points),
                       int(seed)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def map_path(workspace: Workspace, key: str) -> Path:
    return workspace.folder("maps") / f"map-{key}.npy"


def save_map(workspace: Workspace, key: str, positions: np.ndarray, coords: np.ndarray) -> Path:
    """Rows of (eval position, x, y), written atomically (a killed job leaves no half map)."""
    table = np.column_stack([np.asarray(positions, dtype=np.float64), np.asarray(coords, dtype=np.float64)])
    return atomic_write(map_path(workspace, key), lambda h: np.save(h, table, allow_pickle=False))


def load_map(workspace: Workspace, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(eval positions, n x 2 coordinates) of a stored map, or None when there is none (or it is unreadable)."""
    try:
        table = np.load(map_path(workspace, key), allow_pickle=False)
    except (OSError, ValueError):
        return None
    if table.ndim != 2 or table.shape[1] != 3 or not np.isfinite(table).all():
        return None
    return table[:, 0].astype(np.int64), table[:, 1:].astype(np.float32)
