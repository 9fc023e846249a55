"""Labelled image sets (ImageFolder tree, CSV manifest, offline Fashion-MNIST demo) with stable rows and a fingerprint."""
from __future__ import annotations

import csv
import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = ("train", "eval")
# Folder / manifest names that mean "held out": the dashboard only distinguishes fitting from scoring.
_SPLIT_ALIASES = {"train": "train", "eval": "eval", "val": "eval", "valid": "eval", "validation": "eval", "test": "eval"}

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class DatasetError(Exception):
    """A problem with the image set the user pointed at; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class SkippedImage:
    path: str
    reason: str


@dataclass(frozen=True, eq=False)
class ImageSet:
    name: str
    paths: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    splits: np.ndarray
    fingerprint: str
    skipped: tuple[SkippedImage, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return np.flatnonzero(self.splits == name).astype(np.int64)

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        labels = self.labels if split is None else self.labels[self.split(split)]
        counts = np.bincount(labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts)}

    def load_image(self, row: int) -> Image.Image:
        path = self.paths[row]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:
            raise DatasetError(
                f"Image {path} (row {row}) could not be decoded: {error}. "
                "Remove or replace the file and open the dataset again."
            ) from error


@dataclass(frozen=True)
class _Record:
    path: str
    label: str
    split: str


def _unreadable_reason(path: str) -> str | None:
    """Why an image cannot be used, or None. Header + verify only: cheap enough to run at open time."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "file not found"
    except OSError as error:
        return f"cannot read file: {error.strerror or error}"
    if size == 0:
        return "zero bytes"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for broken files (SyntaxError, struct.error, ...)
        return f"not a readable image: {type(error).__name__}: {error}"
    return None


def _fingerprint(name_free_rows: list[tuple[str, str, str]]) -> str:
    digest = hashlib.sha256()
    for path, label, split in name_free_rows:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\0{split}\n".encode())
    return digest.hexdigest()


def _build(name: str, records: list[_Record], *, limit_per_class: int | None, seed: int,
           skipped: list[SkippedImage], where: str) -> ImageSet:
    """Sample, verify and order records. Sampling walks a seeded permutation and skips broken files,
    so a limit still yields `limit_per_class` good images when enough exist, and only sampled files are verified."""
    if limit_per_class is not None and limit_per_class < 1:
        raise DatasetError(f"limit_per_class must be at least 1 (got {limit_per_class}).")
    groups: dict[tuple[str, str], list[_Record]] = defaultdict(list)
    for record in records:
        groups[(record.split, record.label)].append(record)
    kept: list[_Record] = []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda r: r.path)
        if limit_per_class is None:
            order = range(len(group))
        else:
            # One RNG per group, seeded by (seed, split, label): adding a class never reshuffles another.
            group_seed = int.from_bytes(hashlib.sha256(f"{seed}\0{key[0]}\0{key[1]}".encode()).digest()[:8], "little")
            order = np.random.default_rng(group_seed).permutation(len(group))
        taken = 0
        for index in order:
            record = group[int(index)]
            reason = _unreadable_reason(record.path)
            if reason is not None:
                skipped.append(SkippedImage(record.path, reason))
                continue
            kept.append(record)
            taken += 1
            if limit_per_class is not None and taken >= limit_per_class:
                break
    if not kept:
        detail = f" ({len(skipped)} files were skipped as unreadable)" if skipped else ""
        raise DatasetError(f"No usable images found in {where}{detail}. "
                           f"Expected image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) with class labels.")
    kept.sort(key=lambda r: r.path)
    class_names = tuple(sorted({r.label for r in kept}))
    index_of = {c: i for i, c in enumerate(class_names)}
    return ImageSet(
        name=name,
        paths=tuple(r.path for r in kept),
        labels=np.array([index_of[r.label] for r in kept], dtype=np.int64),
        class_names=class_names,
        splits=np.array([r.split for r in kept], dtype=str),
        fingerprint=_fingerprint([(r.path, r.label, r.split) for r in kept]),
        skipped=tuple(sorted(skipped, key=lambda s: s.path)),
    )


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def open_image_folder(root, *, limit_per_class: int | None = None, seed: int = 0) -> ImageSet:
    """`root/<class>/<image>`; or `root/{train,eval|val|test}/<class>/<image>` for explicit splits."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"Image folder {root} does not exist or is not a folder. "
                           "Point at a folder with one subfolder per class (ImageFolder layout).")
    root = root.resolve()
    split_dirs = {child: _SPLIT_ALIASES[child.name.lower()] for child in root.iterdir()
                  if child.is_dir() and child.name.lower() in _SPLIT_ALIASES}
    # Splits only when both sides exist: a lone `test/` folder is more likely a class than a split.
    if {"train", "eval"} <= set(split_dirs.values()):
        sources = sorted(split_dirs.items())
    else:
        sources = [(root, "eval")]
    records: list[_Record] = []
    skipped: list[SkippedImage] = []
    for folder, split in sources:
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file() and _is_image_name(path):
                    records.append(_Record(str(path), class_dir.name, split))
                elif path.is_file() and not path.name.startswith("."):
                    skipped.append(SkippedImage(str(path), f"not an image file extension ({path.suffix or 'none'})"))
    return _build(root.name, records, limit_per_class=limit_per_class, seed=seed, skipped=skipped,
                  where=f"image folder {root}")


def open_manifest(csv_path, *, limit_per_class: int | None = None, seed: int = 0) -> ImageSet:
    """CSV with a header `path,label[,split]`; relative paths are relative to the CSV's folder; split defaults to eval."""
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DatasetError(f"Manifest {csv_path} does not exist. Give the path of a CSV file with columns path,label[,split].")
    csv_path = csv_path.resolve()
    base = csv_path.parent
    records: list[_Record] = []
    skipped: list[SkippedImage] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            if "path" not in columns or "label" not in columns:
                raise DatasetError(
                    f"Manifest {csv_path} has columns {reader.fieldnames or '(none)'}; it needs a header row with "
                    "`path` and `label` (and optionally `split` = train/eval). Example: path,label,split")
            reader.fieldnames = columns
            for line_no, row in enumerate(reader, start=2):
                path, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                if not path or not label:
                    raise DatasetError(f"Manifest {csv_path} line {line_no}: empty path or label. Every row needs both.")
                raw_split = (row.get("split") or "eval").strip().lower() or "eval"
                if raw_split not in _SPLIT_ALIASES:
                    raise DatasetError(f"Manifest {csv_path} line {line_no}: split {raw_split!r} is not one of "
                                       "train, eval (val/test also mean eval).")
                full = Path(path).expanduser()
                full = full if full.is_absolute() else base / full
                records.append(_Record(os.path.normpath(str(full)), label, _SPLIT_ALIASES[raw_split]))
    except (UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"Manifest {csv_path} is not a readable UTF-8 CSV file: {error}.") from error
    return _build(csv_path.stem if csv_path.stem != "manifest" else base.name, records,
                  limit_per_class=limit_per_class, seed=seed, skipped=skipped, where=f"manifest {csv_path}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_files(download_dir: Path) -> dict[str, Path]:
    """The four raw files: Debian's package if installed, else a cached/real download of the canonical files."""
    local = {key: FASHION_MNIST_DIR / name for key, name in FASHION_MNIST_FILES.items()}
    if all(p.is_file() for p in local.values()):
        return local
    download_dir.mkdir(parents=True, exist_ok=True)
    files = {key: download_dir / name for key, name in FASHION_MNIST_FILES.items()}
    for key, target in files.items():
        if target.is_file():
            continue
        url = FASHION_MNIST_URL + FASHION_MNIST_FILES[key]
        try:
            with urllib.request.urlopen(url, timeout=30) as response, \
                    tempfile.NamedTemporaryFile(dir=download_dir, delete=False) as temp:
                shutil.copyfileobj(response, temp)
            os.replace(temp.name, target)
        except OSError as error:
            raise DatasetError(
                f"The offline demo needs Fashion-MNIST, which is not installed at {FASHION_MNIST_DIR} and could not "
                f"be downloaded from {url} ({error}). Install it with `apt-get install dataset-fashion-mnist`."
            ) from error
    return files


def _materialise_fashion_mnist(target: Path, eval_per_class: int, train_per_class: int) -> None:
    raw = _fashion_mnist_files(target.parent / "raw")
    parts = [("eval", "test", eval_per_class), ("train", "train", train_per_class)]
    temp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        rows = []
        for split, source, per_class in parts:
            if per_class <= 0:
                continue
            images, labels = _read_idx(raw[f"{source}_images"]), _read_idx(raw[f"{source}_labels"])
            for label in range(len(FASHION_MNIST_CLASSES)):
                folder = temp / split / f"{label}"
                folder.mkdir(parents=True)
                # The first N of each class in the official file order: deterministic with no RNG to pin.
                for index in np.flatnonzero(labels == label)[:per_class]:
                    name = f"{split}/{label}/{source}-{index:05d}.png"
                    Image.fromarray(images[index], mode="L").save(temp / name)
                    rows.append((name, FASHION_MNIST_CLASSES[label], split))
        with open(temp / "manifest.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split"])
            writer.writerows(rows)
        try:
            os.rename(temp, target)  # atomic: a killed process leaves only a .partial-* folder, never a half demo
        except OSError:
            if not (target / "manifest.csv").is_file():  # lost a race to another process that finished it: fine
                raise
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def open_demo(workspace, *, eval_per_class: int = 100, train_per_class: int = 300) -> ImageSet:
    """Fashion-MNIST (eval: first `eval_per_class` per class of the official test set; train: first
    `train_per_class` per class of the official train set), written once as PNGs + manifest under the workspace."""
    return _open_demo(workspace, eval_per_class, train_per_class, limit_per_class=None, seed=0)


def _open_demo(workspace, eval_per_class: int, train_per_class: int, *, limit_per_class, seed) -> ImageSet:
    if eval_per_class < 1 or train_per_class < 0:
        raise DatasetError("The demo needs eval_per_class >= 1 and train_per_class >= 0.")
    home = Path(workspace.datasets) / "fashion-mnist"
    home.mkdir(parents=True, exist_ok=True)
    target = home / f"eval{eval_per_class}-train{train_per_class}"
    if not (target / "manifest.csv").is_file():
        _materialise_fashion_mnist(target, eval_per_class, train_per_class)
    imageset = open_manifest(target / "manifest.csv", limit_per_class=limit_per_class, seed=seed)
    return _renamed(imageset, "fashion-mnist" if (eval_per_class, train_per_class) == (100, 300)
                    else f"fashion-mnist-{target.name}")


def _renamed(imageset: ImageSet, name: str) -> ImageSet:
    return ImageSet(name, imageset.paths, imageset.labels, imageset.class_names, imageset.splits,
                    imageset.fingerprint, imageset.skipped)


# The offline demo's sizes (eval, train images per class). "demo" is the 1,000-image eval set the
# reference numbers use; "demo-small" prepares in seconds, for a first look and the browser tests.
DEMO_SIZES = {"demo": (100, 300), "demo-small": (20, 40)}


def open_dataset(source: str, workspace, *, limit_per_class: int | None = None, seed: int = 0) -> ImageSet:
    """The one way in: "demo", "demo-small", a folder (ImageFolder layout) or a .csv manifest."""
    text = str(source).strip()
    if text.lower() in DEMO_SIZES:
        eval_per_class, train_per_class = DEMO_SIZES[text.lower()]
        return _open_demo(workspace, eval_per_class, train_per_class, limit_per_class=limit_per_class, seed=seed)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".csv":
        return open_manifest(path, limit_per_class=limit_per_class, seed=seed)
    if path.is_dir():
        return open_image_folder(path, limit_per_class=limit_per_class, seed=seed)
    raise DatasetError(f"{text!r} is neither 'demo', an existing folder, nor a .csv manifest. "
                       "Give a folder with one subfolder per class, a CSV with columns path,label[,split], or 'demo'.")
