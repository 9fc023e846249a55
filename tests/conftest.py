"""Shared pytest fixtures: temporary workspaces and small real image sets on disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.workspace import Workspace


def write_image(path: Path, seed: int, size: int = 32, fmt: str | None = None) -> Path:
    """A small deterministic RGB image (noise + a per-seed colour), real PNG/JPEG bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 64, (size, size, 3)) + rng.integers(0, 192, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    return Workspace.open(tmp_path / "workspace")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """ImageFolder layout: 3 classes x 4 PNGs, everything in the eval split."""
    root = tmp_path / "folder"
    for c, name in enumerate(["cat", "dog", "fox"]):
        for i in range(4):
            write_image(root / name / f"{i:02d}.png", seed=10 * c + i)
    return root


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    """The real Fashion-MNIST demo, materialised small (4 eval + 2 train per class) once per session."""
    from core.datasets import open_demo
    workspace = Workspace.open(tmp_path_factory.mktemp("demo-workspace"))
    return open_demo(workspace, eval_per_class=4, train_per_class=2)
