"""Decoding image files to pixels on the device that embeds them: JPEG batches through torchvision (nvJPEG on a
GPU), everything else through PIL on the CPU.

On a GPU, decoding JPEGs with PIL on the host bounds extraction long before the model does (bench/RESULTS.md,
the H100 section). Here the loader only reads file bytes; the JPEGs of a batch are decoded together where the
model runs, and each model resizes, crops and normalises them there (core.models.TimmBatchTransform.on_device).
A file the tensor decoder rejects or should not take (not a JPEG, CMYK, a decode error) goes through
`core.datasets.to_rgb`, the one PIL decode every other path uses; only a file neither can decode fails the job,
with its path. torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec: when they go, this
module is the one place to change.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from core.datasets import to_rgb, undecodable

DECODERS = ("auto", "pil", "tensor")  # auto: tensor on CUDA, PIL elsewhere
_JPEG_START = b"\xff\xd8\xff"
# Start-of-frame markers (baseline, extended, progressive, lossless; arithmetic-coded too): their segment gives
# the number of colour components. C4, C8 and CC are other segments that share the range.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def resolve_decoder(decoder: str, device: str) -> str:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "auto":
        return "tensor" if device.startswith("cuda") else "pil"
    return decoder


def jpeg_components(data: bytes) -> int | None:
    """The colour components of a JPEG (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK) from its start-of-frame segment;
    None for anything that is not a readable JPEG header."""
    if not data.startswith(_JPEG_START):
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if marker in _SOF:
            return data[at + 9] if at + 9 < len(data) else None
        if marker == 0xDA or length < 2:  # image data before any frame header: not a JPEG we can read
            return None
        at += 2 + length
    return None


def decode_images(datas: Sequence[bytes], paths: Sequence[str], rows: Sequence[int], device: str) -> list[torch.Tensor]:
    """Each file's bytes as a 3 x H x W uint8 RGB tensor on `device`. Grey and colour JPEGs are decoded
    together by torchvision on `device`; CMYK JPEGs (whose conversion to RGB differs between decoders), every
    other format and any JPEG torchvision rejects go through PIL (`to_rgb`). Raises DatasetError naming a file
    that neither can decode."""
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [i for i, data in enumerate(datas) if jpeg_components(data) in (1, 3)]
    if jpegs:
        encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole batch: decode them one by one
            decoded = []
            for one in encoded:
                try:
                    decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i, image in enumerate(out):
        if image is None:
            out[i] = torch.from_numpy(pil_pixels(datas[i], paths[i], rows[i]).copy()).permute(2, 0, 1).to(device)
    return out


def pil_pixels(data: bytes, path: str, row: int) -> np.ndarray:
    """What `ImageSet.load_image` makes of a file's bytes: H x W x 3 uint8 (`to_rgb`). Raises DatasetError
    (`undecodable`) for a file PIL cannot decode."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(to_rgb(image))
    except Exception as error:  # PIL raises many types for broken files
        raise undecodable(path, row, f"{type(error).__name__}: {error}") from None
