"""Batched embedding extraction: decode each image once, feed every missing model, write the cache at the end.

Stages (clip-retrieval style): reader (`_DecodeOnce` in a DataLoader, workers optional) -> mapper (each
model's `embed` on the device) -> writer (`EmbeddingCache.put`, only after the last batch, so a cancelled
or crashed run leaves nothing that `get` returns).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.cache import EmbeddingCache, EmbeddingSet
from core.datasets import ImageSet
from core.models import EmbeddingModel, cache_key_for, load_model
from core.progress import SILENT, Reporter


def pick_device(device: str | None = None) -> str:
    """`device` as given (checked), else "cuda" when torch sees a GPU, else "cpu"."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but torch sees no CUDA GPU here; use device='cpu'.")
    return device


class _DecodeOnce(Dataset):
    """Row -> (row, one preprocessed tensor per model) from a single PIL decode. Picklable for workers:
    it holds the ImageSet and the models' transforms, never the models."""

    def __init__(self, imageset: ImageSet, transforms):
        self.imageset = imageset
        self.transforms = tuple(transforms)

    def __len__(self) -> int:
        return len(self.imageset)

    def __getitem__(self, row: int):
        image = self.imageset.load_image(row)
        return row, tuple(transform(image) for transform in self.transforms)


def _collate(items):
    rows = torch.tensor([row for row, _ in items], dtype=torch.int64)
    per_model = tuple(torch.stack(tensors) for tensors in zip(*(inputs for _, inputs in items)))
    return rows, per_model


def embed_batch(model: EmbeddingModel, batch: torch.Tensor, device: str) -> np.ndarray:
    on_cuda = device.startswith("cuda")
    batch = batch.to(device, non_blocking=True)
    if on_cuda and model.is_torch_module:
        batch = batch.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda and model.is_torch_module):
        features = model.embed(batch)
    return features.float().cpu().numpy()


def extract_embeddings(imageset: ImageSet, model_names: list[str], cache: EmbeddingCache, *,
                       device: str | None = None, batch_size: int = 64, num_workers: int = 0,
                       reporter: Reporter | None = None) -> dict[str, EmbeddingSet]:
    """One EmbeddingSet per model name (rows = imageset rows, float32, not normalised), from cache when present."""
    reporter = reporter or SILENT
    names = list(dict.fromkeys(model_names))
    keys = {name: cache_key_for(name) for name in names}  # no weights loaded for cache hits
    found = {name: cache.get(imageset.fingerprint, keys[name]) for name in names}
    missing = [name for name in names if found[name] is None]
    if missing:
        reporter.check_cancel()
        device = pick_device(device)
        models = []
        for index, name in enumerate(missing):
            reporter.progress(0.0, f"loading {name} ({index + 1}/{len(missing)})")
            models.append(load_model(name, device))
        arrays = _run(imageset, models, device, batch_size, num_workers, reporter)
        for name, model, array in zip(missing, models, arrays):
            found[name] = cache.put(imageset.fingerprint, name, model.cache_key, array)
    reporter.progress(1.0, f"{len(names)} models ready ({len(names) - len(missing)} from cache)")
    return {name: found[name] for name in names}


def _run(imageset: ImageSet, models: list[EmbeddingModel], device: str, batch_size: int, num_workers: int,
         reporter: Reporter) -> list[np.ndarray]:
    n = len(imageset)
    loader = DataLoader(
        _DecodeOnce(imageset, [model.transform for model in models]),
        batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
        pin_memory=device.startswith("cuda"), persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    outputs: list[np.ndarray | None] = [None] * len(models)
    label = ", ".join(model.name for model in models)
    done = 0
    with torch.inference_mode():
        for rows, inputs in loader:
            reporter.check_cancel()
            index = rows.numpy()
            for position, (model, batch) in enumerate(zip(models, inputs)):
                features = embed_batch(model, batch, device)
                if outputs[position] is None:
                    outputs[position] = np.empty((n, features.shape[1]), dtype=np.float32)
                outputs[position][index] = features
            done += len(index)
            reporter.progress(done / n, f"{label}: {done}/{n} images")
    reporter.check_cancel()
    return outputs
