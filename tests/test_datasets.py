import os

import numpy as np
import pytest

from core import datasets
from core.datasets import DatasetError, open_dataset, open_demo, open_image_folder, open_manifest
from tests.images import write_image


def test_image_folder_rows_labels_and_single_eval_split(image_folder):
    imageset = open_image_folder(image_folder)
    assert len(imageset) == 12
    assert imageset.class_names == ("cat", "dog", "fox")
    assert list(imageset.paths) == sorted(imageset.paths)
    assert all(os.path.isabs(p) for p in imageset.paths)
    assert imageset.labels.dtype == np.int64
    assert [imageset.class_names[l] for l in imageset.labels] == [os.path.basename(os.path.dirname(p)) for p in imageset.paths]
    assert set(imageset.splits) == {"eval"} and len(imageset.split("train")) == 0
    np.testing.assert_array_equal(imageset.split("eval"), np.arange(12))
    assert imageset.class_counts() == {"cat": 4, "dog": 4, "fox": 4}
    image = imageset.load_image(0)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_image_folder_train_and_val_subfolders_become_splits(tmp_path):
    for s, (split, n) in enumerate([("train", 3), ("val", 2)]):
        for c, name in enumerate(["a", "b"]):
            for i in range(n):
                write_image(tmp_path / "ds" / split / name / f"{i}.png", seed=100 * s + 10 * c + i)
    imageset = open_image_folder(tmp_path / "ds")
    assert imageset.class_counts("train") == {"a": 3, "b": 3}
    assert imageset.class_counts("eval") == {"a": 2, "b": 2}
    train = imageset.split("train")
    assert train.dtype == np.int64 and list(train) == sorted(train)
    assert all("/train/" in imageset.paths[r] for r in train)


def test_manifest_relative_paths_default_split_and_single_image_class(tmp_path):
    for i in range(3):
        write_image(tmp_path / "img" / f"x{i}.png", seed=i)
    write_image(tmp_path / "img" / "lonely.jpg", seed=9, fmt="JPEG")
    (tmp_path / "m.csv").write_text("path,label,split\nimg/x0.png,x,train\nimg/x1.png,x,\nimg/x2.png,x,test\n"
                                    f"{tmp_path / 'img' / 'lonely.jpg'},y,eval\n")
    imageset = open_manifest(tmp_path / "m.csv")
    assert len(imageset) == 4
    assert imageset.class_counts("eval") == {"x": 2, "y": 1}
    assert imageset.class_counts("train") == {"x": 1, "y": 0}
    assert imageset.paths[0] == str(tmp_path / "img" / "lonely.jpg")
    (tmp_path / "nosplit.csv").write_text("path,label\nimg/x0.png,x\nimg/lonely.jpg,y\n")
    assert list(open_manifest(tmp_path / "nosplit.csv").splits) == ["eval", "eval"]


def test_limit_per_class_is_seeded_deterministic_and_sorted(tmp_path):
    for c, name in enumerate(["a", "b"]):
        for i in range(20):
            write_image(tmp_path / "ds" / name / f"{i:02d}.png", seed=100 * c + i, size=8)
    first = open_image_folder(tmp_path / "ds", limit_per_class=5, seed=3)
    again = open_image_folder(tmp_path / "ds", limit_per_class=5, seed=3)
    other = open_image_folder(tmp_path / "ds", limit_per_class=5, seed=4)
    assert first.paths == again.paths and first.fingerprint == again.fingerprint
    assert first.class_counts() == {"a": 5, "b": 5}
    assert list(first.paths) == sorted(first.paths)
    assert first.paths != other.paths and first.fingerprint != other.fingerprint


def test_fingerprint_stable_until_a_file_changes(image_folder):
    before = open_image_folder(image_folder).fingerprint
    assert open_image_folder(image_folder).fingerprint == before
    target = image_folder / "dog" / "01.png"
    write_image(target, seed=999)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert open_image_folder(image_folder).fingerprint != before


def test_fingerprint_changes_when_labels_or_splits_change(tmp_path):
    for seed, name in enumerate(["a", "b", "c"]):
        write_image(tmp_path / f"{name}.png", seed=seed)
    others = "b.png,z,eval\nc.png,w,eval\n"
    (tmp_path / "one.csv").write_text("path,label,split\na.png,x,eval\n" + others)
    (tmp_path / "two.csv").write_text("path,label,split\na.png,y,eval\n" + others)
    (tmp_path / "three.csv").write_text("path,label,split\na.png,x,train\n" + others)
    prints = {open_manifest(tmp_path / f"{n}.csv").fingerprint for n in ["one", "two", "three"]}
    assert len(prints) == 3


def test_broken_files_are_skipped_and_listed(image_folder):
    (image_folder / "cat" / "empty.png").write_bytes(b"")
    (image_folder / "cat" / "text.jpg").write_text("this is not an image")
    good = (image_folder / "dog" / "00.png").read_bytes()
    (image_folder / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (image_folder / "fox" / "notes.txt").write_text("readme")
    imageset = open_image_folder(image_folder)
    assert len(imageset) == 12
    reasons = {os.path.basename(s.path): s.reason for s in imageset.skipped}
    assert set(reasons) == {"empty.png", "text.jpg", "truncated.png", "notes.txt"}
    assert reasons["empty.png"] == "zero bytes"
    assert "not a readable image" in reasons["text.jpg"]


def test_manifest_missing_file_is_skipped_not_fatal(tmp_path):
    write_image(tmp_path / "a.png", seed=1)
    write_image(tmp_path / "b.png", seed=2)
    (tmp_path / "m.csv").write_text("path,label\na.png,x\ngone.png,x\nb.png,y\n")
    imageset = open_manifest(tmp_path / "m.csv")
    assert len(imageset) == 2
    assert [(os.path.basename(s.path), s.reason) for s in imageset.skipped] == [("gone.png", "file not found")]


@pytest.mark.parametrize("content, words", [
    ("file,class\na.png,x\n", "path"),
    ("", "path"),
    ("path,label,split\na.png,x,holdout\n", "holdout"),
    ("path,label\na.png,\n", "empty path or label"),
])
def test_bad_manifest_raises_clear_error(tmp_path, content, words):
    write_image(tmp_path / "a.png", seed=1)
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError, match=words):
        open_manifest(tmp_path / "m.csv")


def test_missing_and_empty_sources_raise_clear_errors(tmp_path, workspace):
    with pytest.raises(DatasetError, match="does not exist"):
        open_image_folder(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="does not exist"):
        open_manifest(tmp_path / "nowhere.csv")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="No usable images"):
        open_image_folder(tmp_path / "empty")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="1 files were skipped"):
        open_image_folder(tmp_path / "bad")
    with pytest.raises(DatasetError, match="neither"):
        open_dataset(str(tmp_path / "nowhere"), workspace)


def test_open_dataset_dispatches_folder_and_csv(image_folder, workspace, tmp_path):
    assert len(open_dataset(str(image_folder), workspace, limit_per_class=2)) == 6
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{p},{os.path.basename(os.path.dirname(p))}\n"
                                                               for p in open_image_folder(image_folder).paths))
    assert len(open_dataset(str(tmp_path / "m.csv"), workspace)) == 12


def test_demo_materialises_fashion_mnist_once(small_demo, tmp_path):
    assert small_demo.class_names == tuple(sorted(datasets.FASHION_MNIST_CLASSES))
    assert set(small_demo.class_counts("eval").values()) == {4}
    assert set(small_demo.class_counts("train").values()) == {2}
    assert len(small_demo) == 60 and not small_demo.skipped
    image = small_demo.load_image(0)
    assert image.size == (28, 28) and image.mode == "RGB"
    # eval rows come from the official test file, train rows from the train file
    assert all("/test-" in small_demo.paths[r] for r in small_demo.split("eval"))
    assert all("/train-" in small_demo.paths[r] for r in small_demo.split("train"))
    # Same content from the raw files: first eval image of class 0 is the first 0 label in t10k
    labels = datasets._read_idx(datasets.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    first = int(np.flatnonzero(labels == 0)[0])
    assert any(p.endswith(f"eval/0/test-{first:05d}.png") for p in small_demo.paths)


def test_demo_is_idempotent_and_leaves_no_partial_folders(workspace):
    first = open_demo(workspace, eval_per_class=2, train_per_class=1)
    manifest = workspace.datasets / "fashion-mnist" / "eval2-train1" / "manifest.csv"
    mtime = manifest.stat().st_mtime_ns
    second = open_demo(workspace, eval_per_class=2, train_per_class=1)
    assert second.fingerprint == first.fingerprint and manifest.stat().st_mtime_ns == mtime
    assert not [p for p in (workspace.datasets / "fashion-mnist").iterdir() if p.name.startswith(".partial")]


def test_demo_without_debian_files_or_network_says_apt_get(workspace, monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setattr(datasets, "FASHION_MNIST_URL", "http://127.0.0.1:9/")  # closed port: refused at once
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        open_demo(workspace, eval_per_class=1, train_per_class=0)
    assert not (workspace.datasets / "fashion-mnist" / "eval1-train0").exists()


def same_imageset(a, b) -> bool:
    return (a.paths, a.class_names, a.fingerprint, a.hashes, a.skipped, a.duplicates) == (
        b.paths, b.class_names, b.fingerprint, b.hashes, b.skipped, b.duplicates) and (
        np.array_equal(a.labels, b.labels) and np.array_equal(a.splits, b.splits))


@pytest.fixture
def counted_probes(monkeypatch):
    """The paths whose bytes an open reads (hash, end markers, verify)."""
    read = []
    real = datasets._probe
    monkeypatch.setattr(datasets, "_probe", lambda path, info: (read.append(path), real(path, info))[1])
    return read


def test_a_reopened_dataset_reads_only_the_files_that_changed(image_folder, tmp_path, counted_probes):
    probes = tmp_path / "probes"
    first = open_image_folder(image_folder, probes=probes)
    assert len(counted_probes) == 12
    counted_probes.clear()
    assert same_imageset(open_image_folder(image_folder, probes=probes), first) and counted_probes == []

    # One byte of an image's pixel data flipped, its size unchanged and its mtime set back: the ctime still
    # moved, so it is read again and found broken, as an open that keeps nothing finds it.
    broken = sorted(image_folder.glob("dog/*.png"))[1]
    data, before = bytearray(broken.read_bytes()), broken.stat()
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    os.utime(broken, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert broken.stat().st_size == before.st_size
    again = open_image_folder(image_folder, probes=probes)
    assert counted_probes == [str(broken)]
    assert same_imageset(again, open_image_folder(image_folder))
    assert [s.path for s in again.skipped] == [str(broken)] and len(again) == 11
    counted_probes.clear()
    open_image_folder(image_folder, probes=probes)
    assert counted_probes == [str(broken)]  # an unreadable file is not kept: it is read at every open


@pytest.mark.parametrize("garbage", ["not json", '{"x": [1, 2]}', '[]', '{"x": [1, 2, 3, 4, 5, "a", "b", 7]}'])
def test_a_garbled_probe_file_is_ignored(image_folder, tmp_path, counted_probes, garbage):
    probes = tmp_path / "probes"
    reference = open_image_folder(image_folder, probes=probes)
    (stored,) = probes.iterdir()
    stored.write_text(garbage)
    counted_probes.clear()
    assert same_imageset(open_image_folder(image_folder, probes=probes), reference)
    assert len(counted_probes) == 12


def test_open_dataset_keeps_probes_in_the_workspace(image_folder, workspace, counted_probes):
    open_dataset(str(image_folder), workspace)
    counted_probes.clear()
    open_dataset(str(image_folder), workspace)
    assert counted_probes == [] and len(list(workspace.probes.iterdir())) == 1
