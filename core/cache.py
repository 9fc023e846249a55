"""Embedding files on disk: one float32 .npy per (dataset fingerprint, model cache key), memory-mapped on read.

Stored as float32, not float16: metrics here are exact (ties ranked by index, certified pruned sweeps),
and float16 rounding (~1e-3 relative) reorders near-ties, so a cached run would not reproduce a fresh one.
Space is not the constraint (50k x 2048 x 4 B = 400 MB per model).

Commit protocol: the .npy is written to a temp name, fsynced and `os.replace`d; then the JSON sidecar the
same way. The sidecar is the commit marker: `get` returns nothing unless the sidecar exists and agrees with
the .npy header, so a killed writer never leaves a file that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

STORE_DTYPE = np.float32


@dataclass(frozen=True)
class EmbeddingSet:
    model_name: str
    dataset_fingerprint: str
    cache_key: str
    path: str
    n: int
    dim: int
    dtype: str

    def load(self) -> np.ndarray:
        """Memory-mapped and read-only: pages load on demand and no caller can corrupt the cache."""
        return np.load(self.path, mmap_mode="r")


def _entry_id(dataset_fingerprint: str, model_cache_key: str) -> str:
    return hashlib.sha256(f"{dataset_fingerprint}\0{model_cache_key}".encode()).hexdigest()[:40]


def _write_atomic(target: Path, write) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class EmbeddingCache:
    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, dataset_fingerprint: str, model_cache_key: str) -> tuple[Path, Path]:
        entry = _entry_id(dataset_fingerprint, model_cache_key)
        return self.root / f"{entry}.npy", self.root / f"{entry}.json"

    def get(self, dataset_fingerprint: str, model_cache_key: str) -> EmbeddingSet | None:
        _, sidecar = self._paths(dataset_fingerprint, model_cache_key)
        found = self._read(sidecar)
        if found is None or found.dataset_fingerprint != dataset_fingerprint or found.cache_key != model_cache_key:
            return None
        return found

    def put(self, dataset_fingerprint: str, model_name: str, model_cache_key: str, array) -> EmbeddingSet:
        array = np.ascontiguousarray(np.asarray(array), dtype=STORE_DTYPE)
        if array.ndim != 2:
            raise ValueError(f"embeddings must be 2-D (rows x dim), got shape {array.shape}")
        data_path, sidecar = self._paths(dataset_fingerprint, model_cache_key)
        # Withdraw the old commit marker first: between the two renames nothing is readable, never a mismatch.
        sidecar.unlink(missing_ok=True)
        _write_atomic(data_path, lambda handle: np.save(handle, array, allow_pickle=False))
        result = EmbeddingSet(model_name, dataset_fingerprint, model_cache_key, str(data_path),
                              int(array.shape[0]), int(array.shape[1]), np.dtype(STORE_DTYPE).name)
        meta = {k: v for k, v in asdict(result).items() if k != "path"}
        _write_atomic(sidecar, lambda handle: handle.write(json.dumps(meta, indent=1).encode()))
        return result

    def list(self) -> list[EmbeddingSet]:
        found = (self._read(sidecar) for sidecar in sorted(self.root.glob("*.json")))
        return [item for item in found if item is not None]

    def _read(self, sidecar: Path) -> EmbeddingSet | None:
        try:
            meta = json.loads(sidecar.read_text())
            data_path = sidecar.with_suffix(".npy")
            result = EmbeddingSet(path=str(data_path), **meta)
            header = np.load(data_path, mmap_mode="r")
        except (OSError, ValueError, TypeError):
            return None  # no marker, half-written or foreign file: not a cache entry
        if header.shape != (result.n, result.dim) or header.dtype.name != result.dtype:
            return None
        return result
