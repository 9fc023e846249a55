"""Labelled image sets (ImageFolder tree, CSV manifest, offline Fashion-MNIST demo) with stable rows and a fingerprint."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import shutil
import stat
import tempfile
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from core.files import atomic_write_text

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = ("train", "eval")
# Larger images are skipped at open, from their header, before any pixel is decoded: a decompression
# bomb (a few KB that decode to gigabytes) never reaches the extractor.
MAX_IMAGE_PIXELS = 64_000_000
# Evaluation protocols: split by image (classes shared) or by class (eval classes never seen in training).
PROTOCOLS = ("image", "class")
PROTOCOL_SPLIT = {"image": "eval", "class": "eval-new-classes"}  # the split label results are stored under
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


@dataclass(frozen=True)
class DuplicateImage:
    """A row dropped at open because `kept` already stands for the same image."""
    kept: str
    dropped: str
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
    duplicates: tuple[DuplicateImage, ...] = ()
    # sha256 hex of each row's file bytes, computed at open; empty for a set built by hand.
    hashes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def only(self, split: str) -> "ImageSet":
        """The rows of one split as an image set of their own (same order), with its own fingerprint,
        so its embeddings are cached apart: the demo embeds its eval split first for a quick first look."""
        rows = self.split(split)
        digest = hashlib.sha256(f"{self.fingerprint}\0{split}".encode()).hexdigest()[:32]
        return ImageSet(name=f"{self.name} ({split} only)", paths=tuple(self.paths[r] for r in rows),
                        labels=self.labels[rows], class_names=self.class_names, splits=self.splits[rows],
                        fingerprint=f"{split}-of-{digest}", skipped=(), duplicates=(),
                        hashes=tuple(self.hashes[r] for r in rows) if self.hashes else ())

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return np.flatnonzero(self.splits == name).astype(np.int64)

    def protocol_rows(self, protocol: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """(train rows, eval rows) under an evaluation protocol (PROTOCOLS):
        "image": the dataset's own splits; classes are shared, as in the reference study.
        "class": the first half of the classes (in name order) for training, the rest for eval, every
        image of each, so nothing learned has seen an eval class (the CUB/Cars/SOP protocol)."""
        if protocol == "image":
            return self.split("train"), self.split("eval")
        if protocol != "class":
            raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
        n_classes = len(self.class_names)
        if n_classes < 4:
            raise DatasetError(f"splitting by class needs at least 4 classes (2 to train, 2 to evaluate); "
                               f"{self.name!r} has {n_classes}")
        order = np.argsort(np.array(self.class_names, dtype=object), kind="stable")
        train_classes = order[: n_classes // 2]
        in_train = np.isin(self.labels, train_classes)
        return np.flatnonzero(in_train).astype(np.int64), np.flatnonzero(~in_train).astype(np.int64)

    def class_counts(self, split: str | None = None) -> dict[str, int]:
        labels = self.labels if split is None else self.labels[self.split(split)]
        counts = np.bincount(labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, counts)}

    def load_image(self, row: int) -> Image.Image:
        path = self.paths[row]
        try:
            with Image.open(path) as image:
                return to_rgb(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise undecodable(path, row, error) from error

    def check_disjoint(self, train_rows, eval_rows) -> None:
        """Raise DatasetError when a training row holds the same bytes as an eval row (the same row, the
        same file under another path, or a copy): anything fitted on it would be scored on what it saw.
        Comparing content covers the path case, since one file has one content."""
        eval_by_hash = {self._hash(int(row)): int(row) for row in eval_rows}
        clashes = [(self.paths[int(row)], self.paths[eval_by_hash[digest]])
                   for row in train_rows if (digest := self._hash(int(row))) in eval_by_hash]
        if clashes:
            raise DatasetError(
                f"{len(clashes)} training rows are also in the eval rows (same file or identical bytes), so a "
                "learned method would be scored on images it was fitted on:\n"
                + _listing([f"train {a}  =  eval {b}" for a, b in clashes])
                + "\nRemove these images from the training rows (or the copies from the dataset) and try again.")

    def _hash(self, row: int) -> str:
        return self.hashes[row] if self.hashes else _sha256(self.paths[row])


# Modes that convert("RGB") clips instead of scaling: 16-bit, 32-bit integer and float greyscale.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def undecodable(path: str, row: int, detail: object) -> DatasetError:
    """The one error for an image of an opened dataset that cannot be decoded (any decoder, any process)."""
    return DatasetError(f"Image {path} (row {row}) could not be decoded: {detail}. "
                        "Remove or replace the file and open the dataset again.")


def to_rgb(image: Image.Image) -> Image.Image:
    """The one decode to 8-bit RGB for every image mode: what gets embedded, so anything else that turns
    files into pixels for the same models must call it too.
    16-bit grey maps 0..65535 linearly onto 0..255 (value / 257, rounded); transparent pixels are composited
    over white, since the colour stored under them is arbitrary (often black, sometimes leftovers)."""
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_grey_to_uint8(np.asarray(image), image.mode), mode="L").convert("RGB")
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
        # PIL also reads 16-bit PGM/PPM (any maxval, rescaled to 65535) and some 16-bit TIFFs as "I".
        low, high = 0.0, 65535.0
    elif mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    # Otherwise (signed or wider than 16 bits) no format fixes a white point: stretch the image's own range.
    values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class _Record:
    path: str
    label: str
    split: str


@dataclass(frozen=True)
class _Probe:
    """What open time learns about one readable file."""
    real_path: str
    sha256: str
    size: int
    mtime_ns: int
    decode: str  # the mode when to_rgb rescales or composites it, else ""


class _Unreadable(Exception):
    """A file that cannot be used; the message is the reason shown in `skipped`."""


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TAIL_BYTES = 65536


def _sha256(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise _Unreadable("file not found") from None
    except OSError as error:
        raise _Unreadable(f"cannot read file: {error.strerror or error}") from None


def _probe(path: str, info: os.stat_result) -> _Probe:
    """Hash, end-marker and verify checks, from one open file (`info`: its stat). Raises _Unreadable. verify()
    checks structure without decoding pixels, so it misses a JPEG or PNG cut short; their end markers catch
    that at open time."""
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the open forever, a device could never end
        raise _Unreadable("not a regular file")
    if info.st_size == 0:
        raise _Unreadable("zero bytes")
    try:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
            handle.seek(0)
            head = handle.read(len(_PNG_SIGNATURE))
            handle.seek(max(0, info.st_size - _TAIL_BYTES))
            tail = handle.read().rstrip(b"\0")  # some writers pad files to a block size with zeros
            if head.startswith(b"\xff\xd8") and not tail.endswith(b"\xff\xd9"):
                raise _Unreadable("truncated JPEG: no end-of-image marker (FFD9) at the end of the file")
            if head == _PNG_SIGNATURE and not tail.endswith(_PNG_IEND):
                raise _Unreadable("truncated PNG: no IEND chunk at the end of the file")
            handle.seek(0)
            try:
                with Image.open(handle) as image:
                    width, height = image.size
                    if width * height > MAX_IMAGE_PIXELS:
                        raise _Unreadable(f"too large to decode safely: {width} x {height} pixels "
                                          f"(the limit is {MAX_IMAGE_PIXELS // 1_000_000} megapixels)")
                    decode = image.mode if image.mode in _HIGH_DEPTH_MODES or _has_alpha(image) else ""
                    image.verify()
            except _Unreadable:
                raise
            except Exception as error:  # PIL raises many types for broken files (SyntaxError, struct.error, ...)
                raise _Unreadable(f"not a readable image: {type(error).__name__}: {error}") from None
    except OSError as error:
        raise _Unreadable(f"cannot read file: {error.strerror or error}") from None
    return _Probe(os.path.realpath(path), digest, info.st_size, info.st_mtime_ns, decode)


class _ProbeCache:
    """The probes of one dataset's readable files, kept in the workspace (`folder`, None: kept nowhere) so
    that opening it again reads no file whose stat is unchanged: at 60,000 small JPEGs an open took 8.6 s
    on 2 cores, 2.2 s with the probes kept (bench/RESULTS.md), and a study opens its dataset once per job
    and once per dashboard process. Unchanged means the same size, mtime, ctime, inode and device, as
    git's index trusts (the fingerprint itself trusts size and mtime); ctime cannot be set back, so a file
    rewritten with its mtime restored is probed again. Unreadable files are not kept: they are probed
    every time."""

    def __init__(self, folder: Path | None, where: str):
        self.path = folder / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.json" if folder else None
        self.entries: dict[str, list] = self._read()
        self.changed = False

    def _read(self) -> dict[str, list]:
        """The stored entries, or none when the file is missing or not what save() writes."""
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8")) if self.path else {}
        except (OSError, ValueError):
            return {}
        ok = isinstance(entries, dict) and all(
            isinstance(e, list) and len(e) == 8 and all(type(v) is int for v in e[:5])
            and all(isinstance(v, str) for v in e[5:]) for e in entries.values())
        return entries if ok else {}

    def probe(self, path: str) -> _Probe:
        info = _stat(path)
        key = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev]
        entry = self.entries.get(path)
        if entry is not None and entry[:5] == key:
            return _Probe(entry[5], entry[6], info.st_size, info.st_mtime_ns, entry[7])
        probe = _probe(path, info)
        self.entries[path] = key + [probe.real_path, probe.sha256, probe.decode]
        self.changed = True
        return probe

    def save(self, listed: set[str]) -> None:
        """Keep the entries of the files the dataset still lists. A workspace that cannot be written only
        loses the speed-up, never the open."""
        kept = {path: entry for path, entry in self.entries.items() if path in listed}
        if self.path is None or not (self.changed or len(kept) < len(self.entries)):
            return
        try:
            atomic_write_text(self.path, json.dumps(kept, separators=(",", ":")))
        except OSError:
            pass


def _listing(lines: list[str], most: int = 10) -> str:
    shown = "\n".join(f"  {line}" for line in lines[:most])
    return shown + (f"\n  ... and {len(lines) - most} more" if len(lines) > most else "")


def _fingerprint(rows: list[tuple[_Record, _Probe]]) -> str:
    digest = hashlib.sha256()
    for record, probe in rows:
        line = f"{record.path}\0{probe.size}\0{probe.mtime_ns}\0{record.label}\0{record.split}"
        # Rows that to_rgb rescales or composites carry their mode, so embeddings cached from a plain
        # convert("RGB") of them (clipped to white, alpha dropped) are never reused.
        digest.update(f"{line}\0{probe.decode}\n".encode() if probe.decode else f"{line}\n".encode())
    return digest.hexdigest()


def _merge_same_path(records: list[_Record], duplicates: list[DuplicateImage],
                     conflicts: list[str]) -> list[_Record]:
    """One record per path. Done on every record before sampling, so a label conflict in the manifest is
    found even when a limit would not have sampled both rows."""
    by_path: dict[str, list[_Record]] = defaultdict(list)
    for record in records:
        by_path[record.path].append(record)
    unique = []
    for path, rows in by_path.items():
        labels = sorted({r.label for r in rows})
        if len(labels) > 1:
            conflicts.append(f"{path}: labelled {', '.join(labels)}")
            continue
        keep = min(rows, key=lambda r: r.split != "eval")  # the eval copy wins: train and eval stay disjoint
        unique.append(keep)
        for row in rows:
            if row is not keep:
                duplicates.append(DuplicateImage(path, path, _duplicate_reason("path listed again", keep, row)))
    return unique


def _duplicate_reason(what: str, kept: _Record, dropped: _Record) -> str:
    if kept.split != dropped.split:
        return f"{what}, in train and eval: the train copy is dropped so train and eval stay disjoint"
    return what


def _build(name: str, records: list[_Record], *, limit_per_class: int | None, seed: int,
           skipped: list[SkippedImage], where: str, probes: Path | None) -> ImageSet:
    """De-duplicate, sample, check and order records. Sampling walks a seeded permutation and skips broken
    files and duplicates, so a limit still yields `limit_per_class` distinct good images when enough exist,
    and only sampled files are read. Eval groups are walked first, so of a copy in both splits eval keeps it.
    `probes`: the workspace folder that keeps what was learned of each file (`_ProbeCache`)."""
    if limit_per_class is not None and limit_per_class < 1:
        raise DatasetError(f"limit_per_class must be at least 1 (got {limit_per_class}).")
    duplicates: list[DuplicateImage] = []
    conflicts: list[str] = []
    groups: dict[tuple[str, str], list[_Record]] = defaultdict(list)
    for record in _merge_same_path(records, duplicates, conflicts):
        groups[(record.split, record.label)].append(record)
    seen: dict[str, _Record] = {}  # real path and content hash -> the first record holding it
    kept: list[tuple[_Record, _Probe]] = []
    cache = _ProbeCache(probes, where)
    for key in sorted(groups, key=lambda k: (k[0] != "eval", k)):
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
            try:
                probe = cache.probe(record.path)
            except _Unreadable as error:
                skipped.append(SkippedImage(record.path, str(error)))
                continue
            first = seen.get(probe.real_path) or seen.get(probe.sha256)
            if first is not None:
                how = "same file" if probe.real_path in seen else "identical bytes"
                if first.label != record.label:
                    conflicts.append(f"{first.path} and {record.path} ({how}): labelled {first.label}, {record.label}")
                else:
                    duplicates.append(DuplicateImage(first.path, record.path, _duplicate_reason(how, first, record)))
                continue
            seen[probe.real_path] = seen[probe.sha256] = record
            kept.append((record, probe))
            taken += 1
            if limit_per_class is not None and taken >= limit_per_class:
                break
    cache.save({r.path for r in records})
    if conflicts:
        raise DatasetError(
            f"{where} gives the same image more than one label:\n{_listing(conflicts)}\n"
            "Give each image exactly one label: fix or delete the conflicting rows of the manifest (in an image "
            "folder, keep each image in one class folder only), then open the dataset again.")
    if not kept:
        detail = f" ({len(skipped)} files were skipped as unreadable)" if skipped else ""
        raise DatasetError(f"No usable images found in {where}{detail}. "
                           f"Expected image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) with class labels.")
    eval_classes = sorted({r.label for r, _ in kept if r.split == "eval"})
    if len(eval_classes) < 2:
        found = f"only class {eval_classes[0]!r}" if eval_classes else "no images"
        raise DatasetError(
            f"The eval split of {where} has {found}. Retrieval needs at least two classes in the eval split: "
            "with one, every gallery image is relevant to every query and every score is 1.0. "
            "Add images of at least one more class to the eval split (another class folder, or manifest rows "
            "with split eval or no split).")
    kept.sort(key=lambda item: item[0].path)
    class_names = tuple(sorted({r.label for r, _ in kept}))
    index_of = {c: i for i, c in enumerate(class_names)}
    return ImageSet(
        name=name,
        paths=tuple(r.path for r, _ in kept),
        labels=np.array([index_of[r.label] for r, _ in kept], dtype=np.int64),
        class_names=class_names,
        splits=np.array([r.split for r, _ in kept], dtype=str),
        fingerprint=_fingerprint(kept),
        skipped=tuple(sorted(skipped, key=lambda s: s.path)),
        duplicates=tuple(sorted(duplicates, key=lambda d: (d.dropped, d.kept))),
        hashes=tuple(p.sha256 for _, p in kept),
    )


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def open_image_folder(root, *, limit_per_class: int | None = None, seed: int = 0,
                      probes: Path | None = None) -> ImageSet:
    """`root/<class>/<image>`; or `root/{train,eval|val|test}/<class>/<image>` for explicit splits. `probes`:
    a folder that keeps what was learned of each file, so the next open reads only changed files."""
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
                  where=f"image folder {root}", probes=probes)


def open_manifest(csv_path, *, limit_per_class: int | None = None, seed: int = 0,
                  probes: Path | None = None) -> ImageSet:
    """CSV with a header `path,label[,split]`; relative paths are relative to the CSV's folder; split defaults
    to eval. `probes` as in open_image_folder."""
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
    return _build(csv_path.stem if csv_path.stem != "manifest" else base.name, records, limit_per_class=limit_per_class,
                  seed=seed, skipped=skipped, where=f"manifest {csv_path}", probes=probes)


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
    imageset = open_manifest(target / "manifest.csv", limit_per_class=limit_per_class, seed=seed,
                             probes=workspace.probes)
    return replace(imageset, name="fashion-mnist" if (eval_per_class, train_per_class) == (100, 300)
                   else f"fashion-mnist-{target.name}")


# The offline demo's sizes (eval, train images per class). "demo" is the 1,000-image eval set the
# reference numbers use; "demo-small" prepares in seconds, for a first look and the browser tests.
DEMO_SIZES = {"demo": (100, 300), "demo-small": (20, 40)}


def open_dataset(source: str, workspace, *, limit_per_class: int | None = None, seed: int = 0) -> ImageSet:
    """The one way in: "demo", "demo-small", a folder (ImageFolder layout) or a .csv manifest. The workspace
    keeps the demo and what opening a dataset learned of its files (None: a folder or manifest, kept nowhere)."""
    text = str(source).strip()
    if text.lower() in DEMO_SIZES:
        eval_per_class, train_per_class = DEMO_SIZES[text.lower()]
        return _open_demo(workspace, eval_per_class, train_per_class, limit_per_class=limit_per_class, seed=seed)
    path = Path(text).expanduser()
    probes = workspace.probes if workspace is not None else None
    if path.suffix.lower() == ".csv":
        return open_manifest(path, limit_per_class=limit_per_class, seed=seed, probes=probes)
    if path.is_dir():
        return open_image_folder(path, limit_per_class=limit_per_class, seed=seed, probes=probes)
    raise DatasetError(f"{text!r} is neither 'demo', an existing folder, nor a .csv manifest. "
                       "Give a folder with one subfolder per class, a CSV with columns path,label[,split], or 'demo'.")
