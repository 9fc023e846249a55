"""What a user compares: a method turns a dataset's cached per-model embeddings into one embedding per image.

A `Method` is stored as data with every result (kind, models, weights, head path, options), so the
leaderboard, the query explorer, the export and the sweep never guess what a result was. Kinds:
  single  one model's embeddings, L2-normalised
  concat  normalize(concat(w_i * normalize(x_i))): the reference study's weighted concatenation
  head    a trained fusion head (core.heads) over the models' embeddings, saved at `head_path`
  rank    merging each model's result list (options: rule = rrf | max | combsum); ranks, no embedding
  qe      alpha query expansion over the single model or concatenation of models/weights; ranks
  dba     database-side augmentation of that base: an embedding per image, but one that depends on
          the whole gallery, so it cannot embed a new image on its own
Only single, concat and head export as an artifact that embeds new images (EXPORTABLE).
How a method's free parameters were chosen travels beside it as `selected_on` (SELECTED_ON): numbers
tuned on the split they are reported on ("eval") are oracle numbers and are always labelled so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from core.fusion import (AlphaQueryExpansion, DatabaseAugmentation, MaxSimilarity, ReciprocalRank, combsum_zscore,
                         rank_fusion, weighted_concat)
from core.heads import TrainedHead
from core.search import top_k
from core.vectors import l2_normalize, ratio_class

KINDS = ("single", "concat", "head", "rank", "qe", "dba")
EMBEDDING_KINDS = ("single", "concat", "head", "dba")  # the rest rank without one embedding per image
EXPORTABLE = ("single", "concat", "head")
RANK_RULES = ("rrf", "max", "combsum")
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
    options: tuple[tuple[str, Any], ...] = ()  # rank: rule (and rrf_k); qe / dba: n, alpha

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
        if self.kind == "rank" and self.option("rule") not in RANK_RULES:
            raise MethodError(f"rank fusion needs a rule, one of {', '.join(RANK_RULES)}")
        if self.weights is not None and len(self.weights) != len(self.models):
            raise MethodError(f"{len(self.models)} models but {len(self.weights)} weights")

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def yields_embedding(self) -> bool:
        return self.kind in EMBEDDING_KINDS

    @property
    def exportable(self) -> bool:
        return self.kind in EXPORTABLE

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

    @classmethod
    def fused(cls, kind: str, models: Sequence[str], weights: Sequence[float] | None = None,
              **options: Any) -> "Method":
        """A rank fusion (kind "rank", options rule=...) or a re-ranking (kind "qe" / "dba", options n,
        alpha) over the single model or weighted concatenation of `models` / `weights`."""
        weights = tuple(float(w) for w in weights) if weights is not None else None
        base = concat_label(models, weights) if weights is not None and len(models) > 1 else \
            " + ".join(short_name(m) for m in models)
        detail = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(options.items()))
        label = f"{options.get('rule', kind)} over {base}" + (f" ({detail})" if kind != "rank" and detail else "")
        return cls(kind, tuple(models), weights, None, label, tuple(sorted(options.items())))

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
        return (self.kind, self.models, self.ratio, self.head_path, self.options)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "models": list(self.models),
                "weights": list(self.weights) if self.weights is not None else None,
                "head_path": self.head_path, "label": self.label, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Method":
        unknown = set(values) - {"kind", "models", "weights", "head_path", "label", "options"}
        if unknown:
            raise MethodError(f"unknown method fields {sorted(unknown)}")
        weights = values.get("weights")
        return cls(str(values["kind"]), tuple(values["models"]),
                   tuple(float(w) for w in weights) if weights is not None else None,
                   values.get("head_path"), str(values.get("label") or ""),
                   tuple(sorted(dict(values.get("options") or {}).items())))

    @classmethod
    def from_result(cls, result) -> "Method":
        """The method a stored result (core.db.Result) was measured with."""
        weights = tuple(float(w) for w in result.weights) if result.weights is not None else None
        return cls(result.kind, tuple(result.models or ()), weights, result.head_path, result.method,
                   tuple(sorted((result.options or {}).items())))

    def embeddings(self, arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """This method's L2-normalised embeddings of dataset `rows` (float32, rows x dim), from each
        model's cached embeddings in `arrays` (by model name). Rank and qe methods have none."""
        missing = [m for m in self.used_models if m not in arrays]
        if missing:
            raise MethodError(f"{self.label}: no embeddings of {', '.join(missing)}; extract them first")
        if not self.yields_embedding:
            raise MethodError(f"{self.label} ranks each query's results without one embedding per image")
        if self.kind == "head":
            try:
                head = TrainedHead.load(self.head_path)
            except FileNotFoundError as error:
                raise MethodError(f"{self.label}: {error}. Train the head again on the Fusion page.") from error
            return head.embed([np.asarray(arrays[m][rows], dtype=np.float32) for m in self.models])
        base = self._base_embeddings(arrays, rows)
        if self.kind == "dba":
            return DatabaseAugmentation(int(self.option("n", 2)), float(self.option("alpha", 3.0)))(base)
        return base

    def ranking(self, arrays: Mapping[str, np.ndarray], rows: np.ndarray, depth: int) -> np.ndarray:
        """Each of `rows` as a query against the others: the top-`depth` positions (into `rows`), best
        first, ties by position; the same answer the method's metrics were computed from."""
        depth = min(int(depth), len(rows) - 1)
        if self.yields_embedding:
            x = self.embeddings(arrays, rows)
            return top_k(x, x, depth, exclude_self=True)[1]
        if self.kind == "qe":
            return AlphaQueryExpansion(int(self.option("n", 2)), float(self.option("alpha", 3.0)))(
                self._base_embeddings(arrays, rows), depth)
        per_model = [np.asarray(arrays[m][rows], dtype=np.float32) for m in self.used_models]
        if self.option("rule") == "combsum":
            weights = [w for w in self.weights if w] if self.weights is not None else None
            return combsum_zscore(per_model, depth, weights=weights)
        rule = ReciprocalRank(float(self.option("rrf_k", 60.0))) if self.option("rule") == "rrf" else MaxSimilarity()
        return rank_fusion(per_model, depth, rule, depth=depth)

    def _base_embeddings(self, arrays: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
        """The single model or weighted concatenation a re-ranking (qe, dba) starts from."""
        if self.weights is None:
            if len(self.models) != 1:
                return weighted_concat([np.asarray(arrays[m][rows], dtype=np.float32) for m in self.models],
                                       [1.0] * len(self.models))
            return l2_normalize(np.asarray(arrays[self.models[0]][rows], dtype=np.float32))
        used = [(m, w) for m, w in zip(self.models, self.weights) if w]
        return weighted_concat([np.asarray(arrays[m][rows], dtype=np.float32) for m, _ in used], [w for _, w in used])
