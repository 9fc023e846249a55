"""Image thumbnails for the dashboard: made lazily, cached on disk under the workspace, keyed by path + mtime."""
from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path

from PIL import Image

DEFAULT_SIZE = 128


def _key(image_path: str, size: int) -> str:
    try:
        stat = os.stat(image_path)
        stamp = f"{stat.st_mtime_ns}:{stat.st_size}"
    except OSError:
        stamp = "missing"
    return hashlib.sha1(f"{os.path.abspath(image_path)}\0{stamp}\0{size}".encode()).hexdigest()


def thumbnail_path(folder: str | os.PathLike, image_path: str, size: int = DEFAULT_SIZE) -> Path | None:
    """A PNG no larger than size x size for `image_path`, made on first request and reused until the
    source file changes (its mtime or size). None when the image cannot be decoded."""
    key = _key(image_path, size)
    target = Path(folder) / key[:2] / f"{key}.png"
    if target.is_file():
        return target
    try:
        with Image.open(image_path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            if max(image.size) < size // 2:  # tiny images (28x28 demo) are upscaled so they can be seen
                scale = size // max(image.size)
                image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".thumb.", suffix=".png", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format="PNG")
            os.replace(temp, target)
    except (OSError, SyntaxError, ValueError):
        return None
    return target


def thumbnail_data_uri(folder: str | os.PathLike, image_path: str, size: int = DEFAULT_SIZE) -> str | None:
    """The thumbnail as a data: URI, for table image columns (only ever a page of rows at a time)."""
    path = thumbnail_path(folder, image_path, size)
    if path is None:
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
