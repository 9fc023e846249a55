"""A chosen method as one artifact folder (JSON manifest + safetensors) that embeds new images.

The manifest stores the method as data (core.methods.Method), each model's cache key (so weights that
changed since are refused), how the method was chosen (`selected_on`, `is_oracle`) and its metrics.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from core import db
from core.datasets import to_rgb
from core.devices import resolve_device
from core.extract import embed_batch
from core.files import atomic_write, atomic_write_text
from core.heads import TrainedHead
from core.methods import Method, MethodError
from core.models import cache_key_for, load_model

FORMAT = "ensemble-explorer/method@2"
MANIFEST = "manifest.json"
HEAD_FOLDER = "head"


def save_method(path: str | os.PathLike, method: Method, *, metrics: dict | None = None, selected_on: str = "none",
                split: str = "eval", description: str = "") -> Path:
    """Write `path/` with manifest.json and, for a head, head/head.safetensors + head/head.json. Models
    with weight 0 are left out, so embedding new images never runs a model whose features are thrown
    away. The folder appears complete or not at all (built beside it, then renamed)."""
    if method.kind == "concat":
        used = [(m, w) for m, w in zip(method.models, method.weights) if w]
        method = Method("concat", tuple(m for m, _ in used), tuple(w for _, w in used), label=method.label)
    head = TrainedHead.load(method.head_path) if method.kind == "head" else None
    manifest = {
        "format": FORMAT,
        "description": description,
        "method": {**method.to_dict(), "head_path": HEAD_FOLDER if head is not None else None},
        "cache_keys": {m: cache_key_for(m) for m in method.models},
        "selected_on": selected_on,
        "is_oracle": selected_on == "eval",
        "split": split,
        "metrics": metrics or {},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if head is not None:
            head.save(staging / HEAD_FOLDER)
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_result(engine, result_id: int, path: str | os.PathLike) -> Path:
    """Save a stored result (a single model, a weighted concatenation or a trained head) as an artifact."""
    with db.read_session(engine) as session:
        result = session.get(db.Result, int(result_id))
        if result is None:
            raise ValueError(f"result {result_id} does not exist: `python -m core report` and the Runs page list them")
        method = Method.from_result(result)
        if not method.exportable:
            raise MethodError(f"{method.label} ranks against the whole gallery and has no embedding of a new image "
                              "to export; export a single model, a weighted concatenation or a head")
        return save_method(path, method, metrics=dict(result.metrics or {}), selected_on=result.selected_on,
                           split=result.split, description=f"{result.method} (result {result.id}, run {result.run_id})")


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its method (a head's path points inside the artifact) and its manifest."""

    folder: Path
    method: Method
    manifest: dict


def load_artifact(path: str | os.PathLike) -> Artifact:
    """Read an artifact written by `save_method`. Refuses one whose model weights changed since."""
    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not an exported method (no {MANIFEST}); export one from the "
                                "Leaderboard or with `python -m core export` first")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest_path} is not a readable manifest ({error}); export the method again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: unsupported artifact format {manifest.get('format') if isinstance(manifest, dict) else None!r}; "
                         f"this version reads {FORMAT}. Export the method again.")
    spec = dict(manifest["method"])
    if spec.get("head_path"):
        spec["head_path"] = str(folder / HEAD_FOLDER)
    method = Method.from_dict(spec)
    for name, key in manifest["cache_keys"].items():
        now = cache_key_for(name)
        if now != key:
            raise ValueError(f"model {name!r} now resolves to different weights ({now}) than when this method "
                             f"was exported ({key}); its vectors would not match. Re-export it.")
    return Artifact(folder, method, manifest)


def embed_images(artifact: Artifact, images: Sequence[Image.Image | str | os.PathLike], *, device: str | None = None,
                 batch_size: int = 32, export_dir: str | os.PathLike | None = None) -> np.ndarray:
    """PIL images or image paths -> N x dim float32, L2-normalised, as the dashboard embedded them.
    `export_dir`: where CPU model exports are kept (a workspace's), so they are not rebuilt each call."""
    device = resolve_device(device)
    models = [load_model(name, device, export_dir=export_dir) for name in artifact.method.models]
    outputs: list[list[np.ndarray]] = [[] for _ in models]
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pil = [_as_rgb(image) for image in images[start : start + batch_size]]
            for out, model in zip(outputs, models):
                out.append(embed_batch(model, torch.stack([model.preprocess(image) for image in pil]), device))
    if not images:
        raise MethodError("no images to embed")
    arrays = {name: np.concatenate(out) for name, out in zip(artifact.method.models, outputs)}
    return artifact.method.embeddings(arrays, np.arange(len(images)))


def _as_rgb(image) -> Image.Image:
    # The same decode as ImageSet.load_image, so a path gives the pixels the dashboard embedded.
    if isinstance(image, Image.Image):
        return to_rgb(image)
    with Image.open(image) as opened:
        return to_rgb(opened)


def embed_command(artifact_path: str | os.PathLike, image_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                  *, device: str | None = None, batch_size: int = 32, export_dir: str | os.PathLike | None = None) -> Path:
    """`python -m core embed`: embed images with an exported method into a float32 .npy (rows in the
    order given). Returns the written path."""
    missing = [str(p) for p in image_paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image paths do not exist, e.g. {missing[:3]}")
    vectors = embed_images(load_artifact(artifact_path), list(image_paths), device=device, batch_size=batch_size,
                           export_dir=export_dir)
    return atomic_write(out_path, lambda handle: np.save(handle, vectors.astype(np.float32), allow_pickle=False))
