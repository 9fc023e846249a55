"""Batched embedding extraction in resumable shards: decode each image once, feed every model that misses it.

Stages (clip-retrieval style): reader (`_DecodeOnce` in a DataLoader, workers optional: each image of a batch
decoded once to uint8 RGB, then each model's `batch_transform` on the whole batch) -> mapper (each model's
`embed` on the device) -> writer (`EmbeddingCache.put_shard` for every finished shard, then
`EmbeddingCache.assemble` into the one .npy readers see, once all of a model's shards exist).

Rows are cut into a fixed grid of shards [0, s), [s, 2s), ... (s = `shard_size`) and batches never cross a
shard boundary, so a resumed run feeds each model exactly the batches a one-shot run would. A cancel or a
killed process loses only the shards under way; the next extraction of the same (dataset fingerprint,
model cache key) decodes only the rows of the shards still missing for some model. Shards left by a run
with another shard size are not on the grid and are computed again.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.cache import CorruptEmbeddings, EmbeddingCache, EmbeddingSet
from core.datasets import DatasetError, ImageSet, undecodable
from core.decode import decode_images, resolve_decoder
from core.devices import resolve_device
from core.models import EmbeddingModel, TimmBatchTransform, cache_key_for, load_model, rgb_array
from core.progress import SILENT, Reporter

# Models that run through ONNX Runtime on the CPU keep their exported graphs beside the embeddings they make.
EXPORTS_FOLDER = "onnx"
DEFAULT_SHARD_SIZE = 512  # rows per committed shard: ~2.6 MB per 1280-d model, seconds of work on a GPU

Shard = tuple[int, int]  # rows start..stop-1


def _shard_grid(n: int, shard_size: int) -> list[Shard]:
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def _decode_failure(imageset: ImageSet, row: int, error: Exception) -> str:
    if isinstance(error, DatasetError):
        return str(error)
    return str(undecodable(imageset.paths[row], row, f"{type(error).__name__}: {error}"))


class _DecodeOnce(Dataset):
    """One batch of rows -> (rows, one NCHW batch per model that needs the rows' shard (else None), failure
    message or None): each image decoded once to uint8 RGB, then every model's batched preprocessing. A
    failure is returned, not raised: raised in a loader worker it would reach the user wrapped in a
    traceback. Picklable for workers: it holds the ImageSet, the models' batch transforms and which shard
    each model needs, never the models."""

    def __init__(self, imageset: ImageSet, batch_transforms, needs: dict[int, tuple[bool, ...]], shard_size: int):
        self.imageset = imageset
        self.batch_transforms = tuple(batch_transforms)
        self.needs = needs  # shard index -> per model: does it still miss this shard
        self.shard_size = shard_size

    def __getitem__(self, rows: list[int]):
        images = []
        for row in rows:
            try:
                images.append(rgb_array(self.imageset.load_image(row)))
            except Exception as error:  # the backstop for broken files: PIL raises many types
                return rows, (), _decode_failure(self.imageset, row, error)
        needs = self.needs[rows[0] // self.shard_size]  # a batch never crosses a shard boundary
        try:
            batches = tuple(transform(images) if need else None
                            for transform, need in zip(self.batch_transforms, needs))
        except Exception as error:
            return rows, (), (f"The images of rows {rows[0]}..{rows[-1]} (from {self.imageset.paths[rows[0]]}) were "
                              f"decoded but could not be preprocessed: {type(error).__name__}: {error}. Check those "
                              "images (size, aspect ratio); remove the odd one and open the dataset again.")
        return rows, batches, None


class _ReadFiles(Dataset):
    """One batch of rows -> (rows, the files' bytes, failure message or None): the loader of the tensor
    decoder, which decodes on the models' device (core.decode), so the loader only reads."""

    def __init__(self, imageset: ImageSet):
        self.imageset = imageset

    def __getitem__(self, rows: list[int]):
        datas = []
        for row in rows:
            try:
                with open(self.imageset.paths[row], "rb") as handle:
                    datas.append(handle.read())
            except OSError as error:
                return rows, (), (f"Image {self.imageset.paths[row]} (row {row}) could not be read: "
                                  f"{error.strerror or error}. Restore the file and open the dataset again.")
        return rows, datas, None


def _decoded_on_device(imageset: ImageSet, models: list[EmbeddingModel], need: tuple[bool, ...], rows: list[int],
                       datas: list[bytes], device: str) -> tuple[torch.Tensor | None, ...]:
    """The tensor decoder's batches: the files decoded once on `device`, then each model's preprocessing there
    (a model without a tensor version of it gets the pixels back on the host)."""
    images = decode_images(datas, [imageset.paths[row] for row in rows], rows, device)
    batches = []
    for model, needed in zip(models, need):
        transform = model.batch_transform
        if not needed:
            batches.append(None)
        elif isinstance(transform, TimmBatchTransform):
            batches.append(transform.on_device(images))
        else:
            batches.append(transform([image.permute(1, 2, 0).cpu().numpy() for image in images]))
    return tuple(batches)


def _as_loaded(batch):
    """The loader's collate step: `_DecodeOnce` already returns whole batches."""
    return batch


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
                       reporter: Reporter | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                       force: bool = False, decoder: str = "auto") -> dict[str, EmbeddingSet]:
    """One EmbeddingSet per model name (rows = imageset rows, float32, not normalised), from cache when present.

    Work is committed every `shard_size` rows per model and resumed from there. `force` first drops the
    models' cached sets and shards. Raises CorruptEmbeddings for a cached set that fails its check (`force`
    fixes it), DatasetError naming an image that cannot be decoded, JobCancelled (finished shards are kept).

    On a small CPU keep `num_workers` 0: decoding and batched preprocessing (well under a tenth of the model's
    time) then take the cores in turn with the model instead of competing with its threads;
    bench/bench_extraction.py measures 0 against 1. `decoder` (core.decode.DECODERS): "pil" decodes in the
    loader, "tensor" reads bytes there and decodes on the device; "auto" picks tensor on CUDA.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1 (got {shard_size})")
    reporter = reporter or SILENT
    names = list(dict.fromkeys(model_names))
    keys = {name: cache_key_for(name) for name in names}  # no weights loaded for cache hits
    fingerprint = imageset.fingerprint
    if force:
        for name in names:
            cache.drop(fingerprint, keys[name])
    found = {name: cache.get(fingerprint, keys[name]) for name in names}
    missing = [name for name in names if found[name] is None]
    grid = _shard_grid(len(imageset), shard_size)
    todo: dict[str, set[Shard]] = {}
    for name in missing:
        todo[name] = set(grid) - set(cache.shards(fingerprint, keys[name]))
    to_run = [name for name in missing if todo[name]]
    summary = ""
    if to_run:
        reporter.check_cancel()
        device = resolve_device(device)
        models, load_seconds = _load(to_run, device, Path(cache.root) / EXPORTS_FOLDER, reporter)
        images, seconds = _run(imageset, models, [todo[name] for name in to_run], shard_size, cache, device,
                               batch_size, num_workers, reporter, resolve_decoder(decoder, device))
        summary = (f"; models loaded in {load_seconds:.1f} s, then {images:,} images at "
                   f"{images / max(seconds, 1e-9):,.1f} img/s")
    for name in missing:
        # Another worker may have finished the same set meanwhile (and removed the shards).
        found[name] = cache.get(fingerprint, keys[name]) or cache.assemble(fingerprint, name, keys[name], grid)
    reporter.progress(1.0, f"{len(names)} models ready ({len(names) - len(missing)} from cache){summary}")
    return {name: found[name] for name in names}


def _load(names: list[str], device: str, export_dir: Path, reporter: Reporter) -> tuple[list[EmbeddingModel], float]:
    models, total = [], 0.0
    for index, name in enumerate(names):
        reporter.progress(0.0, f"loading {name} ({index + 1}/{len(names)})")
        started = time.perf_counter()
        models.append(load_model(name, device, export_dir=export_dir))
        seconds = time.perf_counter() - started
        total += seconds
        reporter.progress(0.0, f"loaded {name} in {seconds:.1f} s ({index + 1}/{len(names)})")
    return models, total


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _run(imageset: ImageSet, models: list[EmbeddingModel], todo: list[set[Shard]], shard_size: int,
         cache: EmbeddingCache, device: str, batch_size: int, num_workers: int,
         reporter: Reporter, decoder: str = "pil") -> tuple[int, float]:
    """Embed the shards in `todo` (per model) and commit each as it completes. Returns (images decoded, seconds)."""
    n = len(imageset)
    needed = sorted(set().union(*todo))
    needs = {start // shard_size: tuple((start, stop) in shards for shards in todo) for start, stop in needed}
    batches = [list(range(first, min(first + batch_size, stop)))
               for start, stop in needed for first in range(start, stop, batch_size)]
    reads = (_ReadFiles(imageset) if decoder == "tensor"
             else _DecodeOnce(imageset, [model.batch_transform for model in models], needs, shard_size))
    loader = DataLoader(
        reads,
        sampler=batches, batch_size=None, num_workers=num_workers, collate_fn=_as_loaded,
        pin_memory=device.startswith("cuda"), persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    label = ", ".join(model.name for model in models)
    done = n - sum(stop - start for start, stop in needed)  # rows every model already has
    if done:
        reporter.progress(done / n, f"{label}: resuming, {done:,}/{n:,} images done by an earlier run")
    pending: list[list[np.ndarray]] = [[] for _ in models]
    spent = [0.0 for _ in models]  # each model's own time on its pending shard: what an image costs it
    processed, started = 0, time.perf_counter()
    with torch.inference_mode():
        for rows, inputs, failure in loader:
            if failure:
                raise DatasetError(failure)
            if decoder == "tensor":
                inputs = _decoded_on_device(imageset, models, needs[rows[0] // shard_size], rows, inputs, device)
            shard_start = rows[0] - rows[0] % shard_size
            shard_ends = rows[-1] + 1 == min(shard_start + shard_size, n)
            for position, (model, batch) in enumerate(zip(models, inputs)):
                if batch is None:
                    continue
                tick = time.perf_counter()
                pending[position].append(embed_batch(model, batch, device))
                spent[position] += time.perf_counter() - tick
                if shard_ends:
                    _commit_shard(cache, imageset, model, shard_start, np.concatenate(pending[position]),
                                  spent[position], device)
                    pending[position], spent[position] = [], 0.0
            processed += len(rows)
            done += len(rows)
            speed = processed / max(time.perf_counter() - started, 1e-9)
            reporter.progress(done / n, f"{label}: {done:,}/{n:,} images, {speed:,.1f} img/s, "
                                        f"ETA {_duration((n - done) / speed)}")
            reporter.check_cancel()
    return processed, time.perf_counter() - started


def _commit_shard(cache: EmbeddingCache, imageset: ImageSet, model: EmbeddingModel, start: int,
                  array: np.ndarray, seconds: float, device: str) -> None:
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad):
        examples = ", ".join(imageset.paths[start + int(row)] for row in bad[:3])
        raise CorruptEmbeddings(
            f"Model {model.name!r} produced NaN or inf embeddings for {len(bad)} images of rows "
            f"{start}..{start + len(array) - 1} (e.g. {examples}); nothing of them was cached. Check the model's "
            "weights, and on a GPU try device 'cpu' to rule out reduced precision.")
    cache.put_shard(imageset.fingerprint, model.cache_key, start, array, seconds=seconds,
                    device=f"{device} ({model.backend})")


class MissingEmbeddings(Exception):
    """Something the user can fix: extract the missing embeddings first (the message says where)."""


def cached_arrays(cache: EmbeddingCache, imageset: ImageSet, models: Sequence[str]) -> dict[str, np.ndarray]:
    """Each model's cached embeddings of the dataset, memory-mapped; a clear error for any not extracted."""
    out, missing = {}, []
    for model in models:
        found = cache.get(imageset.fingerprint, cache_key_for(model))
        if found is None:
            missing.append(model)
        else:
            out[model] = found.load()
    if missing:
        raise MissingEmbeddings(f"No cached embeddings of {imageset.name!r} for {', '.join(missing)}. "
                                "Extract them on the 'Data & models' page first.")
    return out


def query_arrays(cache: EmbeddingCache, imageset: ImageSet, models: Sequence[str], protocol: str = "image"
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The models' cached embeddings and the rows of the query split in them: the whole dataset's, or,
    before the train split is embedded (the demo's first look), the eval split's own set
    (core.datasets.ImageSet.only), which holds the eval rows in order."""
    try:
        return cached_arrays(cache, imageset, models), imageset.protocol_rows(protocol)[1]
    except MissingEmbeddings as missing:
        if protocol != "image":
            raise
        part = imageset.only("eval")
        try:
            return cached_arrays(cache, part, models), np.arange(len(part))
        except MissingEmbeddings:
            raise missing from None
