"""Small deterministic image files for tests (imported by name: a conftest module cannot be imported
reliably, since tests/ and tests/e2e/ each have one)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, size: int = 32, fmt: str | None = None) -> Path:
    """A small deterministic RGB image (noise + a per-seed colour), real PNG/JPEG bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 64, (size, size, 3)) + rng.integers(0, 192, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path
