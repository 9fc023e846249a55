"""What a user compares: a method turns a dataset's cached per-model embeddings into one embedding per image.

A `Method` is stored as data with every result (kind, models, weights, head path), so the leaderboard,
the query explorer, the export and the sweep never guess what a result was. Kinds:
  single  one model's embeddings, L2-normalised
  concat  normalize(concat(w_i * normalize(x_i))): the reference study's weighted concatenation
  head    a trained fusion head (core.heads) over the models' embeddings, saved at `head_path`
How a method's free parameters were chosen travels beside it as `selected_on` (SELECTED_ON): numbers
tuned on the split they are reported on ("eval") are oracle numbers and are always labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from core.fusion import weighted_concat
from core.heads import TrainedHead
from core.vectors import l2_normalize, ratio_class

KINDS = ("single", "concat", "head")
SELECTED_ON = ("none", "train", "validation", "eval")
ORACLE_LABEL = "oracle (tuned on eval)"


class MethodError(ValueError):
    """A method that cannot be built or applied; the message says what to do."""


def short_name(model: str) -> str:
    """'tf_efficientnet_lite0' -> 'lite0' for ensemble labels, as the reference study wrote them."""
    name = model.split("/")[-1].split(":")[-1].split(".")[0]
    for prefix in ("tf_efficientnet_", "efficientnet_", "tf_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def concat_label(models: Sequence[str], weights: Sequence[float]) -> str:
    """'lite0(3)+lite2(1)': the reference study's way of naming a weighted concatenation."""
    parts = [f"{short_name(m)}({float(w):g})" for m, w in zip(models, weights) if w]
    return "+".join(parts)


@dataclass(frozen=True)
class Method:
    kind: str
    models: tuple[str, ...]
    weights: tuple[float, ...] | None = None  # concat: one per model as recorded (0 = left out)
    head_path: str | None = None  # head: the folder TrainedHead.save wrote
    label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MethodError(f"unknown method kind {self.kind!r}; known: {', '.join(KINDS)}")
        if not self.models:
            raise MethodError("a method needs at least one model")
        if self.kind == "concat":
            if self.weights is None or len(self.weights) != len(self.models):
                raise MethodError(f"a weighted concatenation needs one weight per model ({len(self.models)})")
            if not any(self.weights):
                raise MethodError("all weights are zero: at least one model must take part")
        if self.kind == "head" and not self.head_path:
            raise MethodError("a head method needs the folder of its trained head")
        if self.kind == "single" and len(self.models) != 1:
            raise MethodError("a single-model method has exactly one model")

    @classmethod
    def single(cls, model: str) -> "Method":
        return cls("single", (model,), label=model)

    @classmethod
    def concat(cls, models: Sequence[str], weights: Sequence[float], label: str | None = None) -> "Method":
        """A weighted concatenation; one with a single non-zero weight is that model alone."""
        weights = tuple(float(w) for w in weights)
        used = [m for m, w in zip(models, weights) if w]
        if len(used) == 1:
            return cls.single(used[0])
        return cls("concat", tuple(models), weights, label=label or concat_label(models, weights))

    @classmethod
    def head(cls, models: Sequence[str], head_path: str, label: str) -> "Method":
        return cls("head", tuple(models), None, str(head_path), label)

    @property
    def used_models(self) -> tuple[str, ...]:
        """Models that contribute (non-zero weight)."""
        if self.weights is None:
            return self.models
        return tuple(m for m, w in zip(self.models, self.weights) if w)

    @property
    def ratio(self) -> tuple[float, ...] | None:
        return ratio_class(self.weights) if self.weights is not None else None

    @property
    def identity(self) -> tuple:
        """Equal for methods that rank every query identically (weights that are multiples of each other)."""
        if self.kind == "concat":
            pairs = sorted((m, r) for m, r in zip(self.models, self.ratio) if r)
            return ("concat", tuple(pairs))
        return (self.kind, self.models, self.head_path)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "models": list(self.models),
                "weights": list(self.weights) if self.weights is not None else None,
                "head_path": self.head_path, "label": self.label}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Method":
        unknown = set(values) - {"kind", "models", "weights", "head_path", "label"}
        if unknown:
            raise MethodError(f"unknown method fields {sorted(unknown)}")
        weights = values.get("weights")
        return cls(str(values["kind"]), tuple(values["models"]),
                   tuple(float(w) for w in weights) if weights is not None else None,
                   values.get("head_path"), str(values.get("label") or ""))

    def embeddings(self, arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """This method's L2-normalised embeddings of dataset `rows` (float32, rows x dim), from each
        model's cached embeddings in `arrays` (by model name)."""
        missing = [m for m in self.used_models if m not in arrays]
        if missing:
            raise MethodError(f"{self.label}: no embeddings of {', '.join(missing)}; extract them first")
        if self.kind == "head":
            try:
                head = TrainedHead.load(self.head_path)
            except FileNotFoundError as error:
                raise MethodError(f"{self.label}: {error}. Train the head again on the Fusion page.") from error
            return head.embed([np.asarray(arrays[m][rows], dtype=np.float32) for m in self.models])
        if self.kind == "single":
            return l2_normalize(np.asarray(arrays[self.models[0]][rows], dtype=np.float32))
        used = [(m, w) for m, w in zip(self.models, self.weights) if w]
        return weighted_concat([np.asarray(arrays[m][rows], dtype=np.float32) for m, _ in used], [w for _, w in used])
