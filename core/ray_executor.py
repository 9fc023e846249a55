"""The Ray executor (`python -m core worker --executor ray [--ray-address ADDR]`): every job's handler runs in
the worker's process as with the local executor (core.tasks, the same runs and results), its extraction
(whatever the job kind), an evaluation's scoring and a grid sweep spread over a Ray cluster (RayCompute).

Extraction: Ray Data over the dataset's shards (the fixed row ranges of core.extract's grid): parallel tasks
read the files' bytes, then `map_batches` runs one actor class holding the job's models (one actor per GPU
with num_gpus=1; on a CPU-only cluster one per node), which decodes each image once, embeds it with every
model that still misses its shard, and commits the shard with `EmbeddingCache.put_shard`: the same files a
local extraction writes, so either executor resumes the other's work. This worker, the driver, reports every
committed shard to the job row and checks cancel between them (leaving the pipeline shuts its actors down),
then assembles the sets. Ray Data restarts a lost actor and redoes its shard; a lost worker's job is re-queued
by the next worker (core.jobs), whose attempt computes only the shards still missing.

Evaluation: exact k-NN with the queries split in one block per actor, each actor holding the whole gallery
(put in the object store once); the rankings are merged in query order and scored by core.metrics as in one
process, so the metrics are those of the local executor.

Grid sweeps: the weight vectors split in one share per GPU (else per node), each task scoring its share with
core.sweep's exact scorer over the whole set (put in the object store once).

Every node needs this code at the same path (or installed) and the workspace on a filesystem all of them
mount: actors read the images and write the cache there. See docs/scaling.md.
"""
from __future__ import annotations

import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from sqlalchemy import Engine

from core import db, jobs
from core.cache import CorruptEmbeddings, EmbeddingCache, EmbeddingSet
from core.datasets import DatasetError, ImageSet
from core.decode import pil_pixels
from core.devices import resolve_device
from core.extract import DEFAULT_SHARD_SIZE, EXPORTS_FOLDER, embed_batch
from core.metrics import QueryScores, depth_needed, query_scores_from_ranking, relevant_counts
from core.models import ModelError, cache_key_for, load_model
from core.progress import SILENT, Reporter
from core.search import top_k
from core.sweep import WeightGrid, score_once
from core.tasks import Compute, run_job
from core.vectors import l2_normalize
from core.workspace import Workspace

RAY_REQUIREMENT = "ray[data]==2.60.0"
READ_CPUS = 0.5  # per file-reading task: it waits on storage more than it computes


class RayUnavailable(RuntimeError):
    """Ray is not installed here, or the cluster cannot be reached."""


def ray_module():
    """The `ray` package, or RayUnavailable saying how to install it (the dashboard and demo never need it)."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(f"--executor ray needs Ray on this machine and on every node of the cluster: "
                             f"pip install '{RAY_REQUIREMENT}'") from None
    return ray


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one `ray start` made on this host); without one, Ray's
    own default ($RAY_ADDRESS, else a new single-host instance). A session already connected is reused."""
    ray = ray_module()
    if ray.is_initialized():
        return
    host, _, port = (address or "").rpartition(":")
    if host and port.isdigit():  # a head's host:port; Ray itself would retry an unreachable one for minutes
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as error:
            raise RayUnavailable(f"No Ray cluster answers at {address} ({error.strerror or error}): start its head "
                                 f"there with `ray start --head --port={port}` (docs/scaling.md), or give the "
                                 "address that `ray start --head` printed.") from None
    ray.init(address=address, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False  # progress goes to the job row


class RayCompute(Compute):
    """A job's heavy steps on the Ray cluster this process is connected to (`connect`): extraction with
    `extract_on_ray`, an evaluation's scoring with `scores_on_ray`, a grid sweep with `sweep_on_ray`."""

    title_suffix = " (on Ray)"

    def __init__(self, shard_size: int = DEFAULT_SHARD_SIZE):
        self.shard_size = shard_size

    def embed(self, imageset: ImageSet, models: list[str], cache: EmbeddingCache, *, device: str,
              reporter: Reporter, force: bool) -> dict[str, EmbeddingSet]:
        return extract_on_ray(imageset, models, cache, device=device, reporter=reporter, force=force,
                              shard_size=self.shard_size)

    def score(self, sets: Sequence[EmbeddingSet], rows: np.ndarray, labels: np.ndarray, k: int,
              reporter: Reporter) -> list[QueryScores]:
        return scores_on_ray([es.load() for es in sets], labels, k, rows=rows, reporter=reporter)

    def sweep(self, arrays: Sequence[np.ndarray], labels: np.ndarray, weights: Sequence[float], k: int,
              reporter: Reporter) -> list[dict]:
        return sweep_on_ray(arrays, labels, weights, k, reporter=reporter)


class RayExecutor:
    """Runs every job's handler (core.tasks) in this process, with its heavy steps on Ray (RayCompute)."""

    def __init__(self, workspace: Workspace, engine: Engine, *, shard_size: int = DEFAULT_SHARD_SIZE):
        self.workspace, self.engine, self.compute = workspace, engine, RayCompute(shard_size)

    def run(self, job: db.Job, reporter: Reporter) -> int | None:
        with jobs.running(job.id):
            return run_job(job.kind, dict(job.params), reporter, self.workspace, self.engine, self.compute)


# --- extraction ----------------------------------------------------------------------------------


def extract_on_ray(imageset: ImageSet, model_names: list[str], cache: EmbeddingCache, *, device: str = "auto",
                   reporter: Reporter | None = None, force: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                   batch_size: int = 64) -> dict[str, EmbeddingSet]:
    """`core.extract.extract_embeddings` on the connected Ray cluster: the same cache files, the same batches.

    Raises DatasetError naming an image that cannot be read or decoded, ModelError, CorruptEmbeddings (NaN or
    inf), JobCancelled (finished shards kept)."""
    ray = ray_module()
    reporter = reporter or SILENT
    names = list(dict.fromkeys(model_names))
    keys = {name: cache_key_for(name) for name in names}
    fingerprint, n = imageset.fingerprint, len(imageset)
    if force:
        for name in names:
            cache.drop(fingerprint, keys[name])
    missing = [name for name in names if cache.get(fingerprint, keys[name]) is None]
    grid = [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]
    todo = {name: set(grid) - set(cache.shards(fingerprint, keys[name])) for name in missing}
    to_run = [name for name in missing if todo[name]]
    shards = [{"start": start, "stop": stop, "paths": list(imageset.paths[start:stop]),
               "models": [i for i, name in enumerate(to_run) if (start, stop) in todo[name]]}
              for start, stop in grid if any((start, stop) in todo[name] for name in to_run)]
    if shards:
        reporter.check_cancel()
        actors, gpus, cpus = _actor_shape(ray, device, spare_cpus=1)
        embedded = (ray.data.from_items(shards, override_num_blocks=len(shards))
                    .map(_file_reader(), num_cpus=READ_CPUS)
                    .map_batches(_EmbedShards, batch_size=1, num_gpus=gpus, num_cpus=cpus,
                                 # One shard embedding, the next one's bytes waiting: no actor hoards the queue.
                                 compute=ray.data.ActorPoolStrategy(size=min(actors, len(shards)),
                                                                    max_tasks_in_flight_per_actor=2),
                                 fn_constructor_kwargs={"names": to_run, "cache_root": str(cache.root),
                                                        "fingerprint": fingerprint, "device": "cuda" if gpus else "cpu",
                                                        "batch_size": batch_size}))
        done = n - sum(shard["stop"] - shard["start"] for shard in shards)  # rows every model already has
        _follow(embedded.iter_rows(), n, done, ", ".join(to_run), reporter)
    found = {name: cache.get(fingerprint, keys[name]) or cache.assemble(fingerprint, name, keys[name], grid)
             for name in names}
    reporter.progress(1.0, f"{len(names)} models ready ({len(names) - len(missing)} from cache)")
    return found


def _actor_shape(ray, device: str, spare_cpus: int) -> tuple[int, int, int]:
    """(actors, GPUs each, CPUs each): one actor per GPU with its share of its node's CPUs, else (CPU-only
    cluster, or device "cpu") one per node with all its CPUs; `spare_cpus` of each share stay free."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    gpus = sum(int(node.get("GPU", 0)) for node in nodes)
    if gpus and not device.startswith("cpu"):
        per_gpu = min(node.get("CPU", 1) / node["GPU"] for node in nodes if node.get("GPU", 0) >= 1)
        return gpus, 1, max(1, int(per_gpu) - spare_cpus)
    if device.startswith("cuda"):
        raise ValueError(f"Device {device!r} was requested but the Ray cluster has no GPU; use device 'cpu' or "
                         "start GPU nodes with `ray start --address=... --num-gpus=1`.")
    cpu_nodes = [node for node in nodes if node.get("CPU", 0) >= 1]
    return len(cpu_nodes), 0, max(1, int(min(node["CPU"] for node in cpu_nodes)) - spare_cpus)


def _file_reader():
    """The Ray Data task that reads a shard's image bytes, off the model actors. Made here, not at module level,
    so that Ray ships it by value: its worker processes then never import this module (and torch)."""

    def read_files(shard: dict[str, Any]) -> dict[str, Any]:
        images, failure = [], ""
        for row, path in enumerate(shard["paths"], start=shard["start"]):
            try:
                with open(path, "rb") as handle:
                    images.append(handle.read())
            except OSError as error:
                failure = (f"DatasetError: Image {path} (row {row}) could not be read: {error.strerror or error}. "
                           "Every node of the Ray cluster must see the dataset at the same path (a shared "
                           "filesystem).")
                images = []
                break
        return {**shard, "images": images, "failure": failure}

    return read_files


class _EmbedShards:
    """A Ray Data actor: the job's models loaded once, then one shard per call, decoded once for every model
    that needs it, embedded in the local executor's batches and committed to the shared cache.

    Errors are returned, not raised: Ray would hand the driver only their text inside its own traceback (and
    restart an actor whose models failed to load). The driver raises them again (`_raise`)."""

    def __init__(self, names: list[str], cache_root: str, fingerprint: str, device: str, batch_size: int):
        self.node = ray_module().get_runtime_context().get_node_id()
        self.cache, self.fingerprint, self.batch_size = EmbeddingCache(cache_root), fingerprint, batch_size
        self.decoders = ThreadPoolExecutor(max(1, torch.get_num_threads()))  # PIL decodes without the GIL
        self.failure = ""
        try:
            self.device = resolve_device(device)
            self.models = [load_model(name, self.device, export_dir=Path(cache_root) / EXPORTS_FOLDER)
                           for name in names]
        except Exception as error:  # reported with every shard this actor is given
            self.failure = _failure(error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start, stop = int(batch["start"][0]), int(batch["stop"][0])
        failure = self.failure or str(batch["failure"][0])
        if not failure:
            try:
                self._embed(start, list(batch["paths"][0]), list(batch["images"][0]),
                            [int(i) for i in batch["models"][0]])
            except Exception as error:
                failure = _failure(error)
        return {"start": np.array([start]), "stop": np.array([stop]), "node": np.array([self.node]),
                "failure": np.array([failure])}

    def _embed(self, start: int, paths: list[str], data: list[bytes], models: list[int]) -> None:
        """Commit the shard for each of `models`."""
        decoded = list(self.decoders.map(pil_pixels, data, paths, range(start, start + len(data))))
        with torch.inference_mode():
            for index in models:
                model, parts, seconds = self.models[index], [], 0.0
                for first in range(0, len(decoded), self.batch_size):
                    started = time.perf_counter()
                    parts.append(embed_batch(model, model.batch_transform(decoded[first:first + self.batch_size]),
                                             self.device))
                    seconds += time.perf_counter() - started
                self.cache.put_shard(self.fingerprint, model.cache_key, start, np.concatenate(parts),
                                     seconds=seconds, device=self.device)


# Errors an actor reports that the driver raises again as themselves; any other becomes a RuntimeError.
_REPORTED = {error.__name__: error for error in (DatasetError, CorruptEmbeddings, ModelError)}


def _failure(error: Exception) -> str:
    """An actor's error as "ClassName: message"; its traceback goes to the actor's output, which Ray forwards
    to the worker's log."""
    traceback.print_exc()
    return f"{type(error).__name__}: {error}"


def _raise(failure: str) -> None:
    name, _, message = failure.partition(": ")
    if name in _REPORTED:
        raise _REPORTED[name](message)
    raise RuntimeError(f"An extraction actor on Ray failed: {failure} (its traceback is in the worker's log)")


def _follow(outputs, n: int, done: int, label: str, reporter: Reporter) -> None:
    """Report each committed shard and check cancel between them. Leaving early (cancel, a failure) closes the
    pipeline's iterator, which shuts its tasks and actors down; the shards committed so far stay."""
    outputs = iter(outputs)  # a generator: closing it shuts the pipeline down
    nodes, started, processed = set(), time.perf_counter(), 0
    try:
        for shard in outputs:
            if shard["failure"]:
                _raise(shard["failure"])
            rows = int(shard["stop"]) - int(shard["start"])
            done, processed = done + rows, processed + rows
            nodes.add(shard["node"])
            speed = processed / max(time.perf_counter() - started, 1e-9)
            reporter.progress(done / n, f"{label}: {done:,}/{n:,} images on Ray ({len(nodes)} nodes), "
                                        f"{speed:,.1f} img/s")
            reporter.check_cancel()
    finally:
        outputs.close()


# --- evaluation ----------------------------------------------------------------------------------


class _QueryBlocks:
    """A Ray actor holding one L2-normalised gallery at a time; ranks blocks of its rows as queries."""

    def __init__(self):
        self.gallery, self.node = None, ray_module().get_runtime_context().get_node_id()

    def hold(self, gallery: np.ndarray) -> None:
        self.gallery = gallery  # zero-copy from the object store when on the same node as its copy

    def rank(self, start: int, stop: int, depth: int) -> tuple[np.ndarray, str]:
        """Rows start..stop-1: the `depth` best other rows each, by (-similarity, index). Searching the whole
        gallery one deeper and then dropping each query's own row gives exactly the list without it."""
        _, ids = top_k(self.gallery[start:stop], self.gallery, depth + 1)
        keep = ids != np.arange(start, stop)[:, None]
        keep[keep.sum(axis=1) > depth, -1] = False  # own row not among them: the last one goes instead
        return ids[keep].reshape(stop - start, depth), self.node


def scores_on_ray(embeddings: Sequence[np.ndarray], labels: np.ndarray, k: int, *, rows: np.ndarray | None = None,
                  reporter: Reporter | None = None) -> list[QueryScores]:
    """`core.metrics.per_query_scores(embeddings[i][rows], labels, k)` for each set i (`rows`: default all; a
    memory-mapped set is read one at a time), with the queries split across actors (one per GPU, else one per
    node) started once for all the sets."""
    ray = ray_module()
    reporter = reporter or SILENT
    labels = np.asarray(labels)
    depth = depth_needed(relevant_counts(labels), k, len(labels) - 1)
    actors, gpus, cpus = _actor_shape(ray, "auto", spare_cpus=0)
    blocks = [(int(b[0]), int(b[-1]) + 1) for b in np.array_split(np.arange(len(labels)), actors) if len(b)]
    holders = [ray.remote(num_gpus=gpus, num_cpus=cpus, scheduling_strategy="SPREAD")(_QueryBlocks).remote()
               for _ in blocks]
    scores = []
    try:
        for array in embeddings:
            array = np.asarray(array if rows is None else array[rows], dtype=np.float32)
            shared = ray.put(l2_normalize(array))  # once, for every actor
            ray.get([holder.hold.remote(shared) for holder in holders])
            pending = {holder.rank.remote(start, stop, depth): index
                       for index, (holder, (start, stop)) in enumerate(zip(holders, blocks))}
            ranked = _collect(ray, pending, reporter, lambda done, nodes: reporter.progress(
                (len(scores) + done / len(blocks)) / len(embeddings), f"set {len(scores) + 1}/{len(embeddings)}: "
                f"ranked {done}/{len(blocks)} query blocks on Ray ({nodes} nodes)"))
            scores.append(query_scores_from_ranking(np.concatenate([ranked[i] for i in range(len(blocks))]), labels, k))
    finally:
        for holder in holders:  # also stops the blocks still running when the job was cancelled
            ray.kill(holder)
    return scores


def _collect(ray, pending: dict, reporter: Reporter, report: Callable[[int, int], None]) -> dict[int, Any]:
    """The values of `pending` (object ref -> index; each task returns (value, node id)) by index, as they
    finish: cancel is checked between them, and `report(finished, nodes seen)` called after each. Refs still
    pending when it raises stay in `pending`."""
    out, nodes = {}, set()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        reporter.check_cancel()
        for ref in ready:
            out[pending.pop(ref)], node = ray.get(ref)
            nodes.add(node)
            report(len(out), len(nodes))
    return out


# --- sweeps --------------------------------------------------------------------------------------


def _score_share(embeddings: list[np.ndarray], labels: np.ndarray, k: int, vectors: list[tuple]) -> tuple[list[dict], str]:
    """A Ray task: the exact scorer (core.sweep) over every model, for its share of the weight vectors."""
    return score_once(embeddings, labels, np.array(vectors), k), ray_module().get_runtime_context().get_node_id()


def sweep_on_ray(embeddings: Sequence[np.ndarray], labels: np.ndarray, weights: Sequence[float], k: int, *,
                 reporter: Reporter | None = None) -> list[dict]:
    """`core.sweep.grid_sweep` with the weight vectors split across tasks (one per GPU, else one per node),
    each scoring its share with the same exact scorer over the whole set: the same rows, whichever computes."""
    ray = ray_module()
    reporter = reporter or SILENT
    grid = WeightGrid(weights, len(embeddings))
    tasks, gpus, cpus = _actor_shape(ray, "auto", spare_cpus=0)
    shares = [share for share in np.array_split(np.arange(len(grid.scored)), tasks) if len(share)]
    shared = ray.put([np.asarray(e, dtype=np.float32) for e in embeddings])  # once, for every task
    score = ray.remote(num_gpus=gpus, num_cpus=cpus, scheduling_strategy="SPREAD", max_retries=2)(_score_share)
    pending = {score.remote(shared, np.asarray(labels), k, [grid.scored[i] for i in share]): index
               for index, share in enumerate(shares)}
    try:
        scored = _collect(ray, pending, reporter, lambda done, nodes: reporter.progress(
            done / len(shares), f"scored {done}/{len(shares)} shares of {len(grid.scored):,} weight vectors on Ray "
                                f"({nodes} nodes)"))
    finally:
        for ref in pending:  # cancelled: stop the shares still running
            ray.cancel(ref, force=True)
    return grid.rows([row for index in range(len(shares)) for row in scored[index]])
