"""Shared pytest fixtures: temporary workspaces, small real image sets on disk, the devices to run on."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.workspace import Workspace
from tests.images import write_image


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def device(request) -> str:
    """Each device a test's computation runs on: the CPU, and CUDA where there is a GPU (`-m gpu` selects
    those; bench/gpu_check.py runs them on a lent GPU machine)."""
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: one thread avoids OpenMP spin-waiting (several times faster).
    A module uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    try:
        import faiss
    except ImportError:  # the lent GPU machines have no faiss: search runs on torch there
        faiss = None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(before)
    if faiss is not None:
        faiss.omp_set_num_threads(before)


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


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL database for the whole session: $ENSEMBLE_TEST_POSTGRES_URL if set, else a throwaway
    server started on first use. Where none can be started, CI fails (the PostgreSQL variants must never
    be skipped silently there) and elsewhere those tests are skipped with the reason."""
    import os

    from tests import postgres

    if os.environ.get("ENSEMBLE_TEST_POSTGRES_URL"):
        yield os.environ["ENSEMBLE_TEST_POSTGRES_URL"]
        return
    reason = postgres.missing()
    if reason and os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI must run the PostgreSQL tests, but {reason}", pytrace=False)
    if reason:
        pytest.skip(reason)
    with postgres.throwaway_database() as url:
        yield url
