"""The embedding cache on real files: commit markers, checksums, NaN refusal, old markers, shards.

Checksums are recomputed here with hashlib over the array bytes (the documented format), not by the cache.
"""
import hashlib
import json
import os

import numpy as np
import pytest

import core.cache
from core.cache import CorruptEmbeddings, EmbeddingCache


def sha256_of(array) -> str:
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def overwrite_in_place(path: str, values) -> None:
    """Rewrite the data bytes of an .npy without changing its size or inode, as a stray tool would."""
    view = np.load(path, mmap_mode="r+")
    view[:] = values
    view.flush()
    del view
    # Move mtime on by a second, as any later rewrite would: a rewrite inside the same mtime tick is
    # documented as unnoticed until the next process opens the set.
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def old_format_set(root, array, fingerprint="fp", key="key", model="m"):
    """A set as the code before checksums wrote it: the .npy and a marker without a checksum."""
    entry = hashlib.sha256(f"{fingerprint}\0{key}".encode()).hexdigest()[:40]
    np.save(root / f"{entry}.npy", np.asarray(array, dtype=np.float32))
    marker = root / f"{entry}.json"
    marker.write_text(json.dumps({"model_name": model, "dataset_fingerprint": fingerprint, "cache_key": key,
                                  "n": len(array), "dim": len(array[0]), "dtype": "float32"}))
    return marker


def test_cache_never_returns_an_uncommitted_file(tmp_path):
    cache = EmbeddingCache(tmp_path)
    stored = cache.put("fp", "m", "key", np.arange(6, dtype=np.float64).reshape(2, 3))
    assert stored.dtype == "float32" and cache.get("fp", "key") == stored
    view = stored.load()
    assert not view.flags.writeable and view.dtype == np.float32
    np.testing.assert_array_equal(view, [[0, 1, 2], [3, 4, 5]])
    assert stored.checksum == sha256_of([[0, 1, 2], [3, 4, 5]])
    # A crash after the .npy was replaced but before the marker: the marker is gone, nothing is returned.
    marker = tmp_path / (stored.path.rsplit("/", 1)[1].replace(".npy", ".json"))
    marker.unlink()
    assert cache.get("fp", "key") is None and cache.list() == []
    # A marker that disagrees with the data file (torn write) is not returned either.
    cache.put("fp", "m", "key", np.zeros((2, 3)))
    np.save(stored.path, np.zeros((5, 3), dtype=np.float32))
    assert cache.get("fp", "key") is None
    assert cache.get("other-fp", "key") is None


def test_in_place_overwrite_with_other_numbers_is_refused(tmp_path):
    cache = EmbeddingCache(tmp_path)
    rng = np.random.default_rng(0)
    stored = cache.put("fingerprint-abc", "tf_efficientnet_lite0", "key", rng.standard_normal((50, 8)))
    size = os.path.getsize(stored.path)
    overwrite_in_place(stored.path, rng.standard_normal((50, 8)))
    assert os.path.getsize(stored.path) == size  # same shape, same size: only the checksum can tell
    with pytest.raises(CorruptEmbeddings, match="do not match their checksum") as error:
        cache.get("fingerprint-abc", "key")
    message = str(error.value)
    assert "tf_efficientnet_lite0" in message and "fingerprint-" in message
    assert "python -m core extract" in message and "--force" in message and "re-extract button" in message
    with pytest.raises(CorruptEmbeddings):
        stored.load()
    assert isinstance(error.value, ValueError)


def test_nan_embeddings_are_refused(tmp_path):
    cache = EmbeddingCache(tmp_path)
    values = np.ones((6, 4), dtype=np.float32)
    values[3, 1] = np.nan
    values[5, 0] = np.inf
    with pytest.raises(CorruptEmbeddings, match=r"NaN or inf in 2 rows \(first: row 3\)"):
        cache.put("fp", "m", "key", values)
    assert cache.list() == []
    # NaN on disk under a marker whose checksum matches (written by hand, not by the cache): still refused.
    marker = old_format_set(tmp_path, values)
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "checksum": sha256_of(values)}))
    [listed] = cache.list()
    with pytest.raises(CorruptEmbeddings, match="row 3.*--force"):
        cache.get("fp", "key")
    with pytest.raises(CorruptEmbeddings, match="NaN"):
        listed.load()


def test_truncated_or_half_written_files_are_not_visible(tmp_path):
    cache = EmbeddingCache(tmp_path)
    stored = cache.put("fp", "m", "key", np.ones((100, 16)))
    with open(stored.path, "r+b") as handle:  # cut short outside the cache (a partial copy, a full disk)
        handle.truncate(os.path.getsize(stored.path) // 2)
    assert cache.get("fp", "key") is None and cache.list() == []
    # A killed writer's temp file and a set that only has shards so far are not sets either.
    (tmp_path / f".{os.path.basename(stored.path)}.x1y2.tmp").write_bytes(b"\x93NUMPY partial")
    cache.put_shard("fp2", "key2", 0, np.ones((8, 4)))
    assert cache.get("fp2", "key2") is None and cache.list() == []


def test_old_format_marker_is_checked_then_gets_its_checksum(tmp_path, monkeypatch):
    values = np.random.default_rng(1).standard_normal((20, 5)).astype(np.float32)
    marker = old_format_set(tmp_path, values)
    cache = EmbeddingCache(tmp_path)
    [listed] = cache.list()
    assert listed.checksum == ""
    found = cache.get("fp", "key")
    np.testing.assert_array_equal(found.load(), values)
    assert found.checksum == sha256_of(values)
    assert json.loads(marker.read_text())["checksum"] == sha256_of(values)  # migrated on first open
    assert listed.load().shape == (20, 5)  # the object listed before the migration still loads
    # From now on a change of the bytes is caught like for any new set.
    overwrite_in_place(found.path, values + 1)
    with pytest.raises(CorruptEmbeddings, match="checksum"):
        cache.get("fp", "key")
    # An old set holding NaN is refused and keeps no checksum that would bless it.
    bad = values.copy()
    bad[7] = np.nan
    marker = old_format_set(tmp_path, bad, key="other")
    with pytest.raises(CorruptEmbeddings, match="row 7"):
        cache.get("fp", "other")
    assert "checksum" not in json.loads(marker.read_text())


def test_verification_is_remembered_per_file_state(tmp_path, monkeypatch):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    old_format_set(tmp_path, values)
    cache = EmbeddingCache(tmp_path)
    first = cache.get("fp", "key")
    monkeypatch.setattr(core.cache, "_scan", lambda array: pytest.fail("rehashed an unchanged file"))
    assert cache.get("fp", "key") == first
    first.load()
    monkeypatch.undo()
    overwrite_in_place(first.path, values)  # same numbers, new mtime: hashed again, and still valid
    calls = []
    real_scan = core.cache._scan
    monkeypatch.setattr(core.cache, "_scan", lambda array: calls.append(1) or real_scan(array))
    assert cache.get("fp", "key") == first and calls == [1]


def test_shards_assemble_into_one_set_and_a_damaged_shard_is_dropped(tmp_path):
    cache = EmbeddingCache(tmp_path)
    values = np.random.default_rng(2).standard_normal((21, 6)).astype(np.float32)
    for start in (0, 8, 16):
        cache.put_shard("fp", "key", start, values[start:start + 8])
    assert cache.shards("fp", "key") == [(0, 8), (8, 16), (16, 21)]
    assert cache.get("fp", "key") is None

    damaged = next((tmp_path).glob("*.parts")) / "0000000008-0000000016.npy"
    overwrite_in_place(str(damaged), values[8:16] * 2)
    assert cache.shards("fp", "key") == [(0, 8), (16, 21)]  # and its files are gone, to be recomputed
    assert not damaged.exists()
    cache.put_shard("fp", "key", 8, values[8:16])

    assembled = cache.assemble("fp", "m", "key", [(0, 8), (8, 16), (16, 21)])
    np.testing.assert_array_equal(np.load(assembled.path), values)
    assert (assembled.n, assembled.dim, assembled.checksum) == (21, 6, sha256_of(values))
    assert cache.get("fp", "key") == assembled and cache.list() == [assembled]
    assert not list(tmp_path.glob("*.parts"))


def test_assemble_refuses_gaps(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put_shard("fp", "key", 0, np.ones((4, 2)))
    with pytest.raises(ValueError, match="rows 4..7 are missing"):
        cache.assemble("fp", "m", "key", [(0, 4), (4, 8)])
    assert cache.get("fp", "key") is None


def test_drop_removes_the_set_and_its_shards(tmp_path):
    cache = EmbeddingCache(tmp_path)
    cache.put("fp", "m", "key", np.ones((3, 2)))
    cache.put_shard("fp", "key", 0, np.ones((2, 2)))
    cache.put("fp", "m", "other", np.ones((3, 2)))
    cache.drop("fp", "key")
    assert cache.get("fp", "key") is None and cache.shards("fp", "key") == []
    assert [s.cache_key for s in cache.list()] == ["other"]
