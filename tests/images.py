"""Small deterministic image files for tests, and polling another process (imported by name: a conftest
module cannot be imported reliably, since tests/ and tests/e2e/ each have one)."""
from __future__ import annotations

import struct
import time
import zlib
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


def header_only_png(width: int, height: int, data: bytes = b"", colour_type: int = 2) -> bytes:
    """A PNG that declares width x height pixels (colour type 2: RGB, 0: grey) but holds only `data` (zlib'd
    if given): a reader that decodes before checking the size would allocate width*height pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))
    pixels = chunk(b"IDAT", zlib.compress(data)) if data else b""
    return b"\x89PNG\r\n\x1a\n" + header + pixels + chunk(b"IEND", b"")


def wait_for(predicate, timeout: float = 60.0, every: float = 0.02):
    """Poll `predicate` (another process's progress: there is no event to wait on) until it returns a true
    value, which is returned; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
