"""The offline ImageNet-like benchmark set: deterministic, ImageNet-shaped JPEGs, and learnable by class."""
from __future__ import annotations

import numpy as np
from PIL import Image

from bench.imagenet_like import write_imagenet_like
from core.datasets import open_image_folder
from tests.reference import reference_metrics


def test_same_seed_same_bytes_and_imagenet_like_files(tmp_path):
    a = write_imagenet_like(tmp_path / "a", classes=3, per_class=4, seed=5)
    b = write_imagenet_like(tmp_path / "b", classes=3, per_class=4, seed=5)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 12 and files == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = write_imagenet_like(tmp_path / "c", classes=3, per_class=4, seed=6)
    assert (a / files[0]).read_bytes() != (other / files[0]).read_bytes()
    for f in files:
        with Image.open(a / f) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and max(image.size) == 500
    sizes = [(a / f).stat().st_size for f in files]
    assert 30_000 < np.mean(sizes) < 200_000


def test_classes_are_retrievable_better_than_chance(tmp_path):
    """Mean colour of a downsized image is enough to retrieve its class well above chance (1/4)."""
    root = write_imagenet_like(tmp_path / "set", classes=4, per_class=6, seed=0)
    imageset = open_image_folder(root)
    assert len(imageset) == 24 and len(imageset.class_names) == 4 and not imageset.skipped
    features = np.stack([np.asarray(imageset.load_image(i).resize((8, 8)), np.float32).ravel() - 128
                         for i in range(len(imageset))])
    assert reference_metrics(features, imageset.labels, 5)["p@1"] > 0.5
