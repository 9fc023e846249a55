"""Shared pytest fixtures: temporary workspaces and small real image sets on disk."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.workspace import Workspace
from tests.images import write_image


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
