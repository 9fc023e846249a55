"""2-D maps (core.projection): PCA against a float64 SVD, UMAP's neighbourhoods, progress and cancel, and
the maps kept in the workspace (read without unpickling)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from core import projection
from core.cache import files_state
from core.progress import JobCancelled, Reporter
from core.vectors import l2_normalize
from core.workspace import Workspace


def clusters(n_per_class: int = 60, classes: int = 5, dim: int = 96, seed: int = 0):
    """Unit rows in `classes` separated clusters: a map that keeps neighbourhoods keeps the classes apart."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = rng.normal(size=(classes, dim)) * 3
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    return l2_normalize(x.astype(np.float32)), labels


def same_class_neighbours(coords: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Brute force in float64: the share of each point's k nearest 2-D neighbours in its own class."""
    c = coords.astype(np.float64)
    d = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :k]
    return float((labels[nearest] == labels[:, None]).mean())


def test_sampling_keeps_every_class_and_everything_when_it_fits():
    labels = np.repeat(np.arange(4), 10)
    positions = projection.sample_positions(labels, 12)
    assert len(positions) <= 12 and set(labels[positions]) == {0, 1, 2, 3}
    assert list(positions) == sorted(positions)
    assert np.array_equal(projection.sample_positions(labels, 100), np.arange(40))


def test_pca_equals_the_top_two_principal_components_of_a_float64_svd():
    x, _ = clusters()
    coords = projection.project(x, "pca")
    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    reference = u[:, :2] * s[:2]
    for axis in range(2):  # an axis' sign is arbitrary: compare up to it
        sign = np.sign(coords[:, axis] @ reference[:, axis])
        np.testing.assert_allclose(coords[:, axis] * sign, reference[:, axis], atol=1e-3)
    np.testing.assert_array_equal(coords, projection.project(x, "pca"))  # the same data, the same picture
    with pytest.raises(ValueError, match="unknown projection"):
        projection.project(x, "tsne")


@pytest.mark.skipif("umap" not in projection.methods(), reason="umap-learn is not installed")
def test_umap_keeps_classes_apart_reports_its_epochs_and_stops_on_cancel():
    x, labels = clusters()
    seen = []
    coords = projection.project(x, "umap", reporter=Reporter(on_progress=lambda f, m: seen.append((f, m))))
    assert coords.shape == (len(x), 2) and np.isfinite(coords).all()
    assert same_class_neighbours(coords, labels) > 0.95
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] > 0.95
    assert any("epoch" in message for _, message in seen)
    np.testing.assert_array_equal(coords, projection.project(x, "umap"))  # seeded: the same picture again

    epochs = []

    def cancelled() -> bool:
        return len(epochs) > 0

    with pytest.raises(JobCancelled):
        projection.project(x, "umap", reporter=Reporter(
            on_progress=lambda f, m: epochs.append(m) if "epoch" in m else None, is_cancelled=cancelled))


def test_a_stored_map_round_trips_and_garbage_reads_as_no_map(tmp_path):
    ws = Workspace.open(tmp_path / "ws")
    positions, coords = np.array([0, 3, 7]), np.array([[0.5, 1.0], [2.0, -1.0], [3.25, 4.0]], dtype=np.float32)
    projection.save_map(ws, "k1", positions, coords)
    got_positions, got_coords = projection.load_map(ws, "k1")
    np.testing.assert_array_equal(got_positions, positions)
    np.testing.assert_array_equal(got_coords, coords)
    assert projection.load_map(ws, "missing") is None
    with open(projection.map_path(ws, "bad"), "wb") as handle:  # a pickle where a map belongs is never loaded
        pickle.dump({"boom": 1}, handle)
    assert projection.load_map(ws, "bad") is None
    np.save(projection.map_path(ws, "nan"), np.array([[0.0, np.nan, 1.0]]), allow_pickle=False)
    assert projection.load_map(ws, "nan") is None


def test_the_map_key_changes_with_each_thing_the_map_depends_on(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.ones((4, 2), dtype=np.float32))
    files = files_state({"m": np.load(path, mmap_mode="r")})
    method = {"kind": "single", "models": ["m"]}
    key = projection.map_key("fp", method, files, "umap", 100)
    assert key == projection.map_key("fp", dict(method), files_state({"m": np.load(path, mmap_mode="r")}), "umap", 100)
    others = [projection.map_key("fp2", method, files, "umap", 100),
              projection.map_key("fp", {**method, "models": ["n"]}, files, "umap", 100),
              projection.map_key("fp", method, files, "pca", 100),
              projection.map_key("fp", method, files, "umap", 101),
              projection.map_key("fp", method, files, "umap", 100, seed=1)]
    os.utime(path, ns=(1, 1))  # re-extracted embeddings: a new map
    others.append(projection.map_key("fp", method, files_state({"m": np.load(path, mmap_mode="r")}), "umap", 100))
    assert len({key, *others}) == len(others) + 1
