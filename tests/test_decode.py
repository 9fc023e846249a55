"""The tensor decoder (core.decode: JPEGs decoded together where the model runs, everything else through PIL) against
the PIL path it replaces on a GPU: the same pixels within rounding, the same embeddings within cosine 0.999."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from core.cache import EmbeddingCache
from core.datasets import DatasetError, open_image_folder, to_rgb
from core.decode import decode_images, jpeg_components, resolve_decoder
from core.extract import extract_embeddings
from tests.images import header_only_png


def photo(seed: int, size=(75, 50)) -> Image.Image:
    """Smooth colour gradients plus noise: JPEG-like content with edges worth resampling."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + rng.integers(0, 128)], axis=-1)
    return Image.fromarray((base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


FILES = {  # the kinds of file a real image folder holds, and which decoder should take each
    "rgb.jpg": (lambda: encoded(photo(1), "JPEG", quality=90), 3),
    "grey.jpg": (lambda: encoded(photo(2).convert("L"), "JPEG", quality=90), 1),
    "progressive.jpg": (lambda: encoded(photo(3, (64, 96)), "JPEG", quality=85, progressive=True), 3),
    "cmyk.jpg": (lambda: encoded(photo(4).convert("CMYK"), "JPEG", quality=90), 4),
    "alpha.png": (lambda: encoded(photo(5).convert("RGBA"), "PNG"), None),
}


def test_jpeg_components_reads_the_frame_header():
    for name, (make, components) in FILES.items():
        assert jpeg_components(make()) == components, name
    assert jpeg_components(b"\xff\xd8\xff\xe0") is None  # cut before any frame header
    assert jpeg_components(header_only_png(4, 4)) is None


def test_every_kind_of_file_decodes_to_the_pil_paths_pixels(device):
    names = list(FILES)
    datas = [FILES[name][0]() for name in names]
    decoded = decode_images(datas, names, list(range(len(names))), device)
    for name, data, image in zip(names, datas, decoded):
        with Image.open(io.BytesIO(data)) as source:
            want = np.asarray(to_rgb(source))
        assert image.device.type == torch.device(device).type and image.dtype == torch.uint8, name
        got = image.permute(1, 2, 0).cpu().numpy()
        assert got.shape == want.shape, name
        diff = np.abs(got.astype(int) - want.astype(int))
        if name.endswith(".png") or image.device.type == "cpu":
            # PIL's own decode, or another libjpeg build: the inverse DCT and colour conversion may round apart
            assert diff.max() <= (0 if name.endswith(".png") else 3), name
        else:  # nvJPEG upsamples chroma its own way: close on average, not pixel for pixel at colour edges
            assert diff.mean() <= 1.5, (name, diff.mean())


def test_a_file_no_decoder_can_read_fails_with_its_name(device):
    good = FILES["rgb.jpg"][0]()
    broken = good[:200]  # a JPEG cut short: the tensor decoder refuses it, and so does PIL
    with pytest.raises(DatasetError, match=r"broken\.jpg \(row 7\) could not be decoded"):
        decode_images([good, broken], ["fine.jpg", "broken.jpg"], [6, 7], device)


def test_resolve_decoder():
    assert resolve_decoder("auto", "cuda:0") == "tensor" and resolve_decoder("auto", "cpu") == "pil"
    assert resolve_decoder("tensor", "cpu") == "tensor"
    with pytest.raises(ValueError, match="decoder must be one of"):
        resolve_decoder("nvjpeg", "cpu")


def test_extraction_through_the_tensor_decoder_matches_the_pil_path(tmp_path, device):
    """Images larger and smaller than the model's input, JPEG, CMYK JPEG and PNG: every embedding within
    cosine 0.999 of the PIL path's (the resampling kernels differ; DESIGN.md's tolerance for it)."""
    sizes = [(500, 375), (375, 500), (40, 30), (160, 160)]
    for c in range(2):
        for i, size in enumerate(sizes):
            image = photo(10 * c + i, size)
            folder = tmp_path / "images" / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            if i == 3:
                image.convert("CMYK").save(folder / f"{i}.jpg", quality=90) if c else image.save(folder / f"{i}.png")
            else:
                image.save(folder / f"{i}.jpg", quality=90)
    images = open_image_folder(tmp_path / "images")
    model = "random:test_efficientnet"
    pil = extract_embeddings(images, [model], EmbeddingCache(tmp_path / "pil"), device="cpu", decoder="pil",
                             batch_size=4)[model].load()
    tensor = extract_embeddings(images, [model], EmbeddingCache(tmp_path / "tensor"), device=device,
                                decoder="tensor", batch_size=4)[model].load()
    cosine = (pil * tensor).sum(1) / np.linalg.norm(pil, axis=1) / np.linalg.norm(tensor, axis=1)
    assert cosine.min() >= (0.999 if device == "cpu" else 0.98), cosine  # CUDA adds bf16 autocast
