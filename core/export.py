"""The chosen ensemble as one artifact folder (JSON manifest + safetensors) that embeds new images."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from core.fusion import weighted_concat
from core.heads import TrainedHead

FORMAT = "ensemble-explorer/ensemble@1"
MANIFEST = "manifest.json"
HEAD_FOLDER = "head"


def save_ensemble(
    path: str | os.PathLike,
    models: Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    head: TrainedHead | None = None,
    metrics: dict | None = None,
    description: str = "",
) -> Path:
    """Write `path/` with manifest.json (models, their cache keys and dims, weights or head) and, for a
    head, head/head.safetensors + head/head.json. Exactly one of `weights` and `head`. The folder
    appears complete or not at all (built beside it, then renamed)."""
    from core.models import cache_key_for

    models = list(models)
    if not models:
        raise ValueError("an ensemble needs at least one model")
    if (weights is None) == (head is None):
        raise ValueError("give either concat weights or a trained head, not both and not neither")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != len(models):
            raise ValueError(f"{len(models)} models but {len(weights)} weights")
        if not any(weights) or any(w < 0 for w in weights):
            raise ValueError("weights must be non-negative with at least one above zero")
        # a zero weight leaves the model out of the concat: leave it out of the artifact too, so
        # embedding new images never runs a model whose features are thrown away
        models, weights = [m for m, w in zip(models, weights) if w], [w for w in weights if w]
    if head is not None and len(head.input_dims) != len(models):
        raise ValueError(f"the head fuses {len(head.input_dims)} models but {len(models)} model names were given")
    manifest = {
        "format": FORMAT,
        "description": description,
        "models": [{"name": m, "cache_key": cache_key_for(m)} for m in models],
        "fusion": "weighted_concat" if head is None else "head",
        "weights": weights,
        "head": None if head is None else HEAD_FOLDER,
        "input_dims": None if head is None else list(head.input_dims),
        "metrics": metrics or {},
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if head is not None:
            head.save(staging / HEAD_FOLDER)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_result(engine, result_id: int, path: str | os.PathLike) -> Path:
    """Save a stored result (a single model, a weighted concatenation or a trained head) as an artifact."""
    from core import db

    with db.read_session(engine) as session:
        result = session.get(db.Result, int(result_id))
        if result is None:
            raise ValueError(f"result {result_id} does not exist: `python -m core report` and the Runs page list them")
        extra, weights = dict(result.extra or {}), result.weights
        models = list(extra.get("models") or [result.method])
        described = f"{result.method} (result {result.id}, run {result.run_id})"
        metrics = dict(result.metrics or {})
    if extra.get("head_path"):
        return save_ensemble(path, models, head=TrainedHead.load(extra["head_path"]), metrics=metrics,
                             description=described)
    return save_ensemble(path, models, weights=weights or [1.0] * len(models), metrics=metrics,
                         description=described)


@dataclass
class Ensemble:
    """A loaded artifact. `embed_arrays` is the dashboard path (cached per-model embeddings ->
    L2-normalise -> weighted concat or head); `embed_images` runs the models first."""

    models: list[str]
    weights: list[float] | None = None
    head: TrainedHead | None = None
    cache_keys: list[str] = field(default_factory=list)
    device: str = "cpu"
    manifest: dict = field(default_factory=dict)
    _loaded: list = field(default_factory=list, repr=False)

    def embed_arrays(self, per_model: Sequence[np.ndarray]) -> np.ndarray:
        if len(per_model) != len(self.models):
            raise ValueError(f"this ensemble uses {len(self.models)} models but got {len(per_model)} embedding sets")
        if self.head is not None:
            return self.head.embed([np.asarray(e) for e in per_model])
        return weighted_concat([np.asarray(e) for e in per_model], self.weights)

    def _models(self):
        if not self._loaded:
            from core.models import load_model

            self._loaded = [load_model(name, self.device) for name in self.models]
        return self._loaded

    def embed_images(self, images: Sequence[Image.Image | str | os.PathLike], batch_size: int = 32) -> np.ndarray:
        """PIL images or image paths -> N x dim float32, L2-normalised, as the dashboard would embed them."""
        import torch

        from core.extract import embed_batch  # the same batch step extraction uses (autocast on CUDA)

        models = self._models()
        outputs: list[list[np.ndarray]] = [[] for _ in models]
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                pil = [_as_rgb(image) for image in images[start : start + batch_size]]
                for out, model in zip(outputs, models):
                    batch = torch.stack([model.preprocess(image) for image in pil])
                    out.append(embed_batch(model, batch, self.device))
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.embed_arrays([np.concatenate(out) for out in outputs])

    @property
    def dim(self) -> int:
        if self.head is not None:
            return self.head.out_dim
        return sum(m.dim for m, w in zip(self._models(), self.weights) if w != 0)


def _as_rgb(image) -> Image.Image:
    # Same decode as ImageSet.load_image, so a path gives the pixels the dashboard embedded.
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def load_ensemble(path: str | os.PathLike, device: str | None = None) -> Ensemble:
    """Read an artifact written by `save_ensemble`. Refuses one whose model weights changed since."""
    from core.models import cache_key_for

    folder = Path(path)
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{folder} is not an ensemble artifact (no {MANIFEST}); export one from the dashboard first")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}: unsupported artifact format {manifest.get('format')!r}; this version reads {FORMAT}")
    models = [m["name"] for m in manifest["models"]]
    keys = [m["cache_key"] for m in manifest["models"]]
    for name, key in zip(models, keys):
        now = cache_key_for(name)
        if now != key:
            raise ValueError(f"model {name!r} now resolves to different weights ({now}) than when this ensemble "
                             f"was exported ({key}); its vectors would not match. Re-export the ensemble.")
    head = TrainedHead.load(folder / manifest["head"]) if manifest.get("head") else None
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Ensemble(models=models, weights=manifest.get("weights"), head=head, cache_keys=keys, device=device, manifest=manifest)


def embed_command(artifact_path: str | os.PathLike, image_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                  *, device: str | None = None, batch_size: int = 32) -> Path:
    """`python -m core embed`: embed images with an exported ensemble into a float32 .npy (rows in the
    order given). Returns the written path."""
    missing = [str(p) for p in image_paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image paths do not exist, e.g. {missing[:3]}")
    vectors = load_ensemble(artifact_path, device).embed_images(list(image_paths), batch_size=batch_size)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, vectors.astype(np.float32))
    os.replace(tmp, out)
    return out
