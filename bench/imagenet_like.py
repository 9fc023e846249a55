"""An ImageNet-val-sized image set made offline: N JPEGs (default 1,000 classes x 50) at ImageNet-like
sizes and quality, with class-dependent content, deterministic from a seed, as an ImageFolder.

Each class has its own low-frequency colour field; each image is a randomly shifted, scaled and tinted
crop of it with fine texture noise, so retrieval by class is learnable but not trivial, and JPEG
sizes (~60-110 KB at 500 x 375, quality 90) are close to ImageNet val's. The same (seed, class, index)
always gives the same bytes, so a benchmark set can be rebuilt anywhere instead of shipped.

    python bench/imagenet_like.py OUT [--classes 1000] [--per-class 50] [--seed 0] [--scale 1] [--workers 2]
"""
from __future__ import annotations

import argparse
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (450, 500))  # ImageNet val's common shapes


def class_field(seed: int, label: int) -> np.ndarray:
    """A class's colour field: a coarse random grid, smoothly upsampled (float32, 96 x 96 x 3)."""
    rng = np.random.default_rng([seed, label])
    coarse = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((96, 96), Image.BICUBIC), dtype=np.float32)


def image_bytes(seed: int, label: int, index: int, field: np.ndarray, quality: int = 90, scale: float = 1.0) -> bytes:
    """One image's JPEG bytes; `scale` shrinks ImageNet's shapes (small sets for page tests, not for extraction)."""
    rng = np.random.default_rng([seed, label, index, 1])
    width, height = (max(8, round(side * scale)) for side in SIZES[int(rng.integers(len(SIZES)))])
    # A random window of the class field (shift and zoom), tinted, then upsampled to the image size.
    zoom = rng.uniform(0.5, 0.9)
    size = int(96 * zoom)
    top, left = rng.integers(0, 96 - size + 1, size=2)
    window = field[top:top + size, left:left + size] * rng.uniform(0.8, 1.2, size=3) + rng.normal(0, 12, size=3)
    base = Image.fromarray(np.clip(window, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(base, dtype=np.float32) + rng.normal(0, 10, size=(height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


def _write_class(args: tuple[str, int, int, int, int, float]) -> int:
    root, seed, label, per_class, quality, scale = args
    folder = Path(root) / f"class_{label:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    field = class_field(seed, label)
    written = 0
    for index in range(per_class):
        target = folder / f"{index:05d}.jpg"
        if target.exists():  # rerunnable: an interrupted build resumes
            continue
        temp = target.with_suffix(".tmp")
        temp.write_bytes(image_bytes(seed, label, index, field, quality, scale))
        os.replace(temp, target)
        written += 1
    return written


def write_imagenet_like(root: str | os.PathLike, classes: int = 1000, per_class: int = 50, *, seed: int = 0,
                        quality: int = 90, scale: float = 1.0, workers: int = 1) -> Path:
    """Write `classes` x `per_class` JPEGs under root/class_XXXX/NNNNN.jpg; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), seed, label, per_class, quality, scale) for label in range(classes)]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_class, jobs, chunksize=8))
    else:
        for job in jobs:
            _write_class(job)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the images (e.g. 0.2: about 100 x 75)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    root = write_imagenet_like(args.out, args.classes, args.per_class, seed=args.seed, quality=args.quality,
                               scale=args.scale, workers=args.workers)
    files = list(root.rglob("*.jpg"))
    total = sum(f.stat().st_size for f in files)
    print(f"{len(files):,} JPEGs in {root}, {total / len(files) / 1024:.0f} KB each on average")


if __name__ == "__main__":
    main()
