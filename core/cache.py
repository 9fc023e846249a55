"""Embedding files on disk: one float32 .npy per (dataset fingerprint, model cache key), memory-mapped on read.

Stored as float32, not float16: metrics here are exact (ties ranked by index, certified pruned sweeps),
and float16 rounding (~1e-3 relative) reorders near-ties, so a cached run would not reproduce a fresh one.
Space is not the constraint (50k x 2048 x 4 B = 400 MB per model).

Layout under the cache root, per set (`<id>` hashes the fingerprint and the cache key):
  <id>.npy, <id>.json      the complete set and its commit marker (what `get`, `list` and `load` read)
  <id>.parts/<a>-<b>.npy   shards of rows a..b-1 while an extraction is under way, each with its own
  <id>.parts/<a>-<b>.json  marker (row range, shape, dtype, checksum); deleted once the set is assembled

Commit protocol: every file is written with `core.files.atomic_write` (temp name, fsync, `os.replace`), the
data before its marker, and a marker is only trusted when it agrees with the .npy header. A killed writer
therefore leaves at most temp files and a data file without a marker, which nothing reads: readers only
ever see whole sets, and a resumed extraction only reuses whole shards (checked against their checksums).

Checksums: each marker holds "sha256:<hex>" of the array's bytes (C order, little-endian float32, header
excluded). A set is verified (checksum and no NaN/inf, in one pass) the first time a process opens it
through `get` or `load`; the result is remembered per (path, inode, size, mtime, ctime), so pages do not
rehash on every rerun. Measured on this machine's CPU (Xeon with SHA-NI, 400 MB file in the page cache, two
shared cores): sha256 alone ~1.3 GB/s, sha256 + the finiteness check ~1.0-1.1 GB/s, i.e. about 0.4 s per
400 MB set, once per process; blake2b ran at ~0.7 GB/s here, hence sha256. Writers hash while they write.
A rewrite within one mtime tick that keeps the size and inode goes unnoticed until the next process opens it.

Sets written before checksums existed have markers without one: they are scanned on first open (a NaN/inf
still refuses them), and the checksum of the bytes found then is added to the marker, so later changes to
the file are caught from then on.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping

import numpy as np

from core.files import atomic_write, atomic_write_text

STORE_DTYPE = np.float32
_BLOCK_BYTES = 16 << 20  # per read while hashing: large enough for full speed, small enough for any RAM


class CorruptEmbeddings(ValueError):
    """Embeddings refused: cached bytes that differ from what was written, or NaN/inf values."""


def _fix_hint(model_name: str) -> str:
    return (f"Re-extract them: `python -m core extract --dataset <this dataset> --models {model_name} --force`, "
            "or the re-extract button on the Data & models page.")


@dataclass(frozen=True)
class EmbeddingSet:
    model_name: str
    dataset_fingerprint: str
    cache_key: str
    path: str
    n: int
    dim: int
    dtype: str
    checksum: str = ""  # "sha256:<hex>" of the array bytes; empty in markers written before checksums
    seconds_per_image: float | None = None  # the model's measured cost while extracting these (load excluded)
    device: str | None = None  # where that was measured

    def load(self) -> np.ndarray:
        """Memory-mapped and read-only: pages load on demand and no caller can corrupt the cache.
        Verified against the checksum on the first load in this process (CorruptEmbeddings if not)."""
        _verify(self)
        return np.load(self.path, mmap_mode="r")


def files_state(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, str, int]]:
    """(name, file, mtime in ns) of each memory-mapped array (EmbeddingSet.load), sorted: what a value
    computed from them depends on, so a re-extraction (or another set's files) makes it stale."""
    return sorted((name, str(a.filename), os.stat(a.filename).st_mtime_ns) for name, a in arrays.items())


def _blocks(array: np.ndarray):
    rows = max(1, _BLOCK_BYTES // max(1, array.shape[1] * array.itemsize))
    for start in range(0, len(array), rows):
        yield start, np.ascontiguousarray(array[start:start + rows])


def _scan(array: np.ndarray) -> tuple[str, int, int | None]:
    """One pass: the checksum, how many rows hold NaN/inf, and the first such row (None when all finite)."""
    digest = hashlib.sha256()
    bad_rows, first_bad = 0, None
    for start, block in _blocks(array):
        digest.update(block)
        if not np.isfinite(block).all():
            bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
            bad_rows += len(bad)
            first_bad = start + int(bad[0]) if first_bad is None else first_bad
    return f"sha256:{digest.hexdigest()}", bad_rows, first_bad


def _non_finite(what: str, bad_rows: int, first_bad: int) -> str:
    return f"{what} hold NaN or inf in {bad_rows} rows (first: row {first_bad})."


# path -> (file signature, checksum of the bytes found there), for files verified by this process.
_verified: dict[str, tuple[tuple[int, ...], str]] = {}
_verified_lock = threading.Lock()  # pages run in threads of one process


def _signature(path: str) -> tuple[int, ...]:
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _remember(path: str, checksum: str) -> None:
    with _verified_lock:
        _verified[path] = (_signature(path), checksum)


def _verify(found: EmbeddingSet) -> str:
    """The checksum of `found`'s bytes, after checking them (once per file state and process)."""
    signature = _signature(found.path)
    with _verified_lock:
        known = _verified.get(found.path)
    if known is not None and known[0] == signature and found.checksum in ("", known[1]):
        return known[1]
    checksum, bad_rows, first_bad = _scan(np.load(found.path, mmap_mode="r"))
    what = (f"The cached embeddings of model {found.model_name!r} for dataset {found.dataset_fingerprint[:12]} "
            f"({found.path})")
    if found.checksum and checksum != found.checksum:
        raise CorruptEmbeddings(f"{what} do not match their checksum: the file was changed after it was written. "
                                + _fix_hint(found.model_name))
    if bad_rows:
        raise CorruptEmbeddings(f"{_non_finite(what, bad_rows, first_bad)} {_fix_hint(found.model_name)}")
    if not found.checksum and _signature(found.path) == signature:
        try:  # a marker from before checksums: record what the file holds now
            _write_marker(Path(found.path).with_suffix(".json"), replace(found, checksum=checksum))
        except OSError:
            pass  # a read-only cache stays usable; it is simply scanned again by the next process
    with _verified_lock:
        _verified[found.path] = (signature, checksum)
    return checksum


def _write_marker(marker: Path, found: EmbeddingSet) -> None:
    meta = {k: v for k, v in asdict(found).items() if k != "path"}
    atomic_write_text(marker, json.dumps(meta, indent=1))


def _entry_id(dataset_fingerprint: str, model_cache_key: str) -> str:
    return hashlib.sha256(f"{dataset_fingerprint}\0{model_cache_key}".encode()).hexdigest()[:40]


def _as_store_array(array) -> np.ndarray:
    array = np.ascontiguousarray(np.asarray(array), dtype=STORE_DTYPE)
    if array.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (rows x dim), got shape {array.shape}")
    return array


def _save(array: np.ndarray):
    return lambda handle: np.save(handle, array, allow_pickle=False)


class EmbeddingCache:
    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, dataset_fingerprint: str, model_cache_key: str) -> tuple[Path, Path]:
        entry = _entry_id(dataset_fingerprint, model_cache_key)
        return self.root / f"{entry}.npy", self.root / f"{entry}.json"

    def _parts(self, dataset_fingerprint: str, model_cache_key: str) -> Path:
        return self.root / f"{_entry_id(dataset_fingerprint, model_cache_key)}.parts"

    def get(self, dataset_fingerprint: str, model_cache_key: str) -> EmbeddingSet | None:
        """The complete set, verified (CorruptEmbeddings when its bytes changed or hold NaN/inf), or None."""
        _, marker = self._paths(dataset_fingerprint, model_cache_key)
        found = self._read(marker)
        if found is None or found.dataset_fingerprint != dataset_fingerprint or found.cache_key != model_cache_key:
            return None
        return replace(found, checksum=_verify(found))

    def put(self, dataset_fingerprint: str, model_name: str, model_cache_key: str, array) -> EmbeddingSet:
        array = _as_store_array(array)
        checksum, bad_rows, first_bad = _scan(array)
        if bad_rows:
            raise CorruptEmbeddings(_non_finite(f"Embeddings of model {model_name!r}", bad_rows, first_bad)
                                    + " Nothing was cached.")
        data_path, marker = self._paths(dataset_fingerprint, model_cache_key)
        # Withdraw the old commit marker first: between the two renames nothing is readable, never a mismatch.
        marker.unlink(missing_ok=True)
        atomic_write(data_path, _save(array))
        result = EmbeddingSet(model_name, dataset_fingerprint, model_cache_key, str(data_path),
                              int(array.shape[0]), int(array.shape[1]), np.dtype(STORE_DTYPE).name, checksum)
        self._commit(result, marker)
        return result

    def list(self) -> list[EmbeddingSet]:
        """Every complete set (marker present and agreeing with its file); not verified until loaded."""
        found = (self._read(marker) for marker in sorted(self.root.glob("*.json")))
        return [item for item in found if item is not None]

    def drop(self, dataset_fingerprint: str, model_cache_key: str) -> None:
        """Delete the set and any shards of it (marker first, so no reader sees a half-deleted set)."""
        data_path, marker = self._paths(dataset_fingerprint, model_cache_key)
        marker.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)
        shutil.rmtree(self._parts(dataset_fingerprint, model_cache_key), ignore_errors=True)
        with _verified_lock:
            _verified.pop(str(data_path), None)

    def put_shard(self, dataset_fingerprint: str, model_cache_key: str, start: int, array, *,
                  seconds: float | None = None, device: str | None = None) -> None:
        """Commit rows start..start+len(array)-1 of a set under extraction (data, then its marker), with
        the `seconds` the model spent on them on `device`, so the set can say what an image costs."""
        array = _as_store_array(array)
        checksum, bad_rows, first_bad = _scan(array)
        stop = start + len(array)
        if bad_rows:
            raise CorruptEmbeddings(_non_finite(f"Embeddings of rows {start}..{stop - 1}", bad_rows, start + first_bad))
        stem = self._parts(dataset_fingerprint, model_cache_key) / f"{start:010d}-{stop:010d}"
        atomic_write(stem.with_suffix(".npy"), _save(array))
        meta = {"dataset_fingerprint": dataset_fingerprint, "cache_key": model_cache_key, "start": start,
                "stop": stop, "shape": list(array.shape), "dtype": array.dtype.name, "checksum": checksum,
                "seconds": seconds, "device": device}
        atomic_write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1))

    def shards(self, dataset_fingerprint: str, model_cache_key: str) -> list[tuple[int, int]]:
        """Row ranges (start, stop) of this set's committed shards, each checked against its checksum;
        a shard that fails the check is deleted, so the next extraction computes it again."""
        folder = self._parts(dataset_fingerprint, model_cache_key)
        ranges = []
        for marker in sorted(folder.glob("*.json")):
            meta = self._read_shard(marker, dataset_fingerprint, model_cache_key)
            if meta is None:
                continue
            checksum, bad_rows, _ = _scan(np.load(marker.with_suffix(".npy"), mmap_mode="r"))
            if checksum != meta["checksum"] or bad_rows:
                marker.unlink(missing_ok=True)
                marker.with_suffix(".npy").unlink(missing_ok=True)
                continue
            ranges.append((meta["start"], meta["stop"]))
        return ranges

    def assemble(self, dataset_fingerprint: str, model_name: str, model_cache_key: str,
                 ranges: list[tuple[int, int]]) -> EmbeddingSet:
        """Join the committed shards `ranges` (in order, tiling rows 0..n-1) into the set's one .npy and
        commit it; then delete the shards. Each shard's checksum is checked in the same pass that copies it."""
        folder = self._parts(dataset_fingerprint, model_cache_key)
        stems = [folder / f"{start:010d}-{stop:010d}" for start, stop in ranges]
        metas = [self._read_shard(stem.with_suffix(".json"), dataset_fingerprint, model_cache_key) for stem in stems]
        expected_start = 0
        for (start, stop), meta in zip(ranges, metas):
            if meta is None or start != expected_start:
                raise ValueError(f"shards of model {model_name!r} do not tile rows 0..{ranges[-1][1] - 1}: "
                                 f"rows {start}..{stop - 1} are missing or out of order")
            expected_start = stop
        dims = {meta["shape"][1] for meta in metas}
        if len(dims) != 1:
            raise ValueError(f"shards of model {model_name!r} disagree on the embedding width: {sorted(dims)}")
        n, dim = expected_start, dims.pop()
        digest = hashlib.sha256()

        def write(handle):
            np.lib.format.write_array_header_1_0(
                handle, {"descr": np.lib.format.dtype_to_descr(np.dtype(STORE_DTYPE)), "fortran_order": False,
                         "shape": (n, dim)})
            for stem, meta in zip(stems, metas):
                shard_digest = hashlib.sha256()
                for _, block in _blocks(np.load(stem.with_suffix(".npy"), mmap_mode="r")):
                    shard_digest.update(block)
                    digest.update(block)
                    handle.write(block.data)
                if f"sha256:{shard_digest.hexdigest()}" != meta["checksum"]:
                    stem.with_suffix(".json").unlink(missing_ok=True)
                    raise CorruptEmbeddings(
                        f"Shard {stem.name} of model {model_name!r} changed on disk after it was written; it has "
                        "been removed. Run the extraction again to recompute it.")

        data_path, marker = self._paths(dataset_fingerprint, model_cache_key)
        marker.unlink(missing_ok=True)
        atomic_write(data_path, write)
        seconds = [meta.get("seconds") for meta in metas]
        devices = {meta.get("device") for meta in metas}
        cost = sum(seconds) / n if n and None not in seconds else None
        result = EmbeddingSet(model_name, dataset_fingerprint, model_cache_key, str(data_path), n, dim,
                              np.dtype(STORE_DTYPE).name, f"sha256:{digest.hexdigest()}", cost,
                              devices.pop() if len(devices) == 1 else None)
        self._commit(result, marker)
        return result

    def _commit(self, result: EmbeddingSet, marker: Path) -> None:
        _write_marker(marker, result)
        # This process just hashed these bytes while writing them: opening the set need not hash them again.
        _remember(result.path, result.checksum)
        # Shards of an earlier, unfinished extraction are stale once a whole set is committed.
        shutil.rmtree(self._parts(result.dataset_fingerprint, result.cache_key), ignore_errors=True)

    def _read(self, marker: Path) -> EmbeddingSet | None:
        try:
            meta = json.loads(marker.read_text())
            data_path = marker.with_suffix(".npy")
            result = EmbeddingSet(path=str(data_path), **meta)
            header = np.load(data_path, mmap_mode="r")
        except (OSError, ValueError, TypeError):
            return None  # no marker, half-written or foreign file: not a cache entry
        if header.shape != (result.n, result.dim) or header.dtype.name != result.dtype:
            return None
        return result

    @staticmethod
    def _read_shard(marker: Path, dataset_fingerprint: str, model_cache_key: str) -> dict | None:
        """A shard marker that belongs to this set and agrees with its .npy header, else None."""
        try:
            meta = json.loads(marker.read_text())
            header = np.load(marker.with_suffix(".npy"), mmap_mode="r")
            agrees = (meta["dataset_fingerprint"] == dataset_fingerprint and meta["cache_key"] == model_cache_key
                      and list(header.shape) == meta["shape"] == [meta["stop"] - meta["start"], meta["shape"][1]]
                      and header.dtype.name == meta["dtype"] == np.dtype(STORE_DTYPE).name)
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            return None
        return meta if agrees else None
