"""Typed settings of every job kind, and the one place where user values (CLI, forms, URLs, job params) are checked.

A config is a frozen dataclass with defaults; `from_dict` rejects unknown keys and out-of-range values
with a message that says what to change, `to_dict` gives the JSON a job row stores. Pages, the CLI,
the demo catalog and the worker all build the same configs, so a value that passes here is one the
core can compute exactly (bounded weights, a bounded number of weight vectors, k within range).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from sqlalchemy import Engine

from core import jobs
from core.datasets import PROTOCOLS
from core.heads import HeadConfig
from core.methods import Method, MethodError
from core.models import DEMO_MODELS

DEFAULT_K = 50
DEFAULT_GRID = (0, 1, 2, 3, 4, 5)  # the reference study's grid; 0 leaves a model out, so one sweep covers every subset
DEMO_SOURCE = "demo"

# Weights are squared and summed in float32 by the sweep (DESIGN.md identity): within [MIN_WEIGHT,
# MAX_WEIGHT] the largest squared ratio is 1e8, far inside float32's exact range for the ranking.
MIN_WEIGHT = 0.01
MAX_WEIGHT = 100.0
MAX_GRID_VECTORS = 100_000  # |grid values| ** models; the demo's 0..5 over 4 models is 1,296
MAX_K = 10_000
MAX_MODELS = 16
MAX_RANDOM_SAMPLES = 100_000
MAX_TEXT = 4096  # a dataset source or model name longer than this is not one
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A setting the user gave that cannot be used; the message names it and the allowed range."""


# --- checks of single values (also used by the CLI's and the pages' parsers) ---------------------


def check_k(k: Any) -> int:
    return _bounded("k", k, 1, MAX_K)


def check_weight(w: Any) -> float:
    try:
        value = float(w)
    except (TypeError, ValueError):
        raise ConfigError(f"weight {w!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"weight {w!r} is not a finite number")
    if value != 0 and not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise ConfigError(f"weight {value:g} is out of range: use 0 (leave the model out) or a value "
                          f"between {MIN_WEIGHT:g} and {MAX_WEIGHT:g}")
    return value


def parse_numbers(text: str) -> tuple[float, ...]:
    """'0,1,2.5' -> (0.0, 1.0, 2.5), every value a valid weight."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise ConfigError("give at least one weight, e.g. 0,1,2,3")
    return tuple(check_weight(p) for p in parts)


def parse_names(text: str) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b')."""
    return tuple(p.strip() for p in str(text).split(",") if p.strip())


def check_models(models: Any) -> tuple[str, ...]:
    if isinstance(models, str):
        models = parse_names(models)
    if not isinstance(models, (list, tuple)) or not models:
        raise ConfigError("choose at least one model")
    names = tuple(str(m).strip() for m in models)
    if any(not n or len(n) > MAX_TEXT for n in names):
        raise ConfigError("model names must be non-empty and shorter than 4,096 characters")
    if len(set(names)) != len(names):
        raise ConfigError(f"a model is listed twice: {', '.join(names)}")
    if len(names) > MAX_MODELS:
        raise ConfigError(f"at most {MAX_MODELS} models at once, got {len(names)}")
    return names


def check_grid(values: Any, n_models: int) -> tuple[float, ...]:
    grid = parse_numbers(values) if isinstance(values, str) else tuple(check_weight(v) for v in values)
    grid = tuple(sorted(set(grid)))
    if not any(grid):
        raise ConfigError("the weight grid needs at least one value above 0")
    vectors = len(grid) ** n_models
    if vectors > MAX_GRID_VECTORS:
        raise ConfigError(f"{len(grid)} weight values over {n_models} models make {vectors:,} weight vectors; "
                          f"the limit is {MAX_GRID_VECTORS:,}. Use fewer values, fewer models or the random search.")
    return grid


def check_device(device: Any) -> str:
    value = str(device or "auto")
    if value.startswith("cuda:") and value[5:].isdigit():
        return value
    return _one_of("device", value, DEVICES, " or cuda:N")


def check_source(source: Any) -> str:
    value = str(source or "").strip()
    if not value or len(value) > MAX_TEXT or "\x00" in value:
        raise ConfigError("the dataset must be 'demo', 'demo-small', an image folder or a CSV manifest path")
    return value


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def _bounded(name: str, value: Any, lower: int, upper: int) -> int:
    """`value` as a whole number within [lower, upper]."""
    number = _integer(name, value)
    if not lower <= number <= upper:
        raise ConfigError(f"{name} must be between {lower:,} and {upper:,}, got {number}")
    return number


def _one_of(name: str, value: Any, options: tuple[str, ...], more: str = "") -> str:
    if value not in options:
        raise ConfigError(f"{name} must be one of {', '.join(options)}{more}, got {value!r}")
    return value


def _optional_count(name: str, value: Any, upper: int) -> int | None:
    return None if value in (None, "", 0) else _bounded(name, value, 1, upper)


# --- job configs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """A job kind's settings: a frozen dataclass stored as a JSON object in the job row."""

    kind: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Settings":
        if not isinstance(values, Mapping):
            raise ConfigError(f"{cls.kind} settings must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.kind} settings {unknown}; known: {sorted(known)}")
        try:
            return cls(**{key: _from_json(value) for key, value in values.items()})
        except TypeError as error:  # a required setting is missing
            raise ConfigError(f"{cls.kind} settings: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_json(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def submit(self, engine: Engine) -> jobs.Job:
        """Queue this job (or join the identical one already queued or running)."""
        return jobs.submit(engine, self.kind, self.to_dict())


@dataclass(frozen=True)
class JobConfig(Settings):
    """What every job on a dataset reads: the dataset, the models, and where to compute."""

    dataset: str = DEMO_SOURCE
    models: tuple[str, ...] = DEMO_MODELS
    limit_per_class: int | None = None
    device: str = "auto"
    protocol: str = "image"  # "image": the dataset's splits; "class": eval classes never seen in training
    # Embed only the eval split (cached apart): a first look before the train split is extracted.
    eval_only: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the values once, here
        _one_of("protocol", self.protocol, PROTOCOLS)
        if self.eval_only and (self.protocol != "image" or self.kind in ("select_weights", "train_head")):
            raise ConfigError("eval_only suits jobs that only score the eval split of the image protocol")
        set_(self, "dataset", check_source(self.dataset))
        set_(self, "models", check_models(self.models))
        set_(self, "limit_per_class", _optional_count("limit_per_class", self.limit_per_class, 10_000_000))
        set_(self, "device", check_device(self.device))


@dataclass(frozen=True)
class ExtractConfig(JobConfig):
    kind: ClassVar[str] = "extract"
    force: bool = False  # drop cached embeddings of these models and extract them again


@dataclass(frozen=True)
class ScoredConfig(JobConfig):
    """A job whose results are scored at a cut-off k (every kind but extraction)."""

    k: int = DEFAULT_K

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "k", check_k(self.k))


@dataclass(frozen=True)
class EvaluateConfig(ScoredConfig):
    kind: ClassVar[str] = "evaluate"


@dataclass(frozen=True)
class SweepConfig(ScoredConfig):
    """Weights swept on the eval split: every vector is scored on eval, so the best is an oracle number."""

    kind: ClassVar[str] = "sweep"
    weights: tuple[float, ...] = DEFAULT_GRID  # grid values per model
    search: str = "grid"  # "grid" or "random" (continuous weights)
    n_samples: int = 256  # random search only

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        _one_of("search", self.search, ("grid", "random"))
        set_(self, "weights", check_grid(self.weights, len(self.models)))
        set_(self, "n_samples", _bounded("n_samples", self.n_samples, 1, MAX_RANDOM_SAMPLES))


@dataclass(frozen=True)
class SelectWeightsConfig(ScoredConfig):
    """Concat weights chosen on the train split with the same exact scorer, then scored once on eval: the
    honest counterpart of the sweep's oracle. search="grid" tries every vector of the grid; "greedy"
    (for many models, where the grid is out of reach) adds one unit of weight at a time to the best
    model (Caruana et al. 2004) and then refines by coordinate search."""

    kind: ClassVar[str] = "select_weights"
    search: str = "grid"
    weights: tuple[float, ...] = DEFAULT_GRID  # grid only
    max_steps: int = 30  # greedy only
    patience: int = 5  # greedy only: steps without a better train map@k before stopping

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        _one_of("search", self.search, ("grid", "greedy"))
        if self.search == "grid":
            set_(self, "weights", check_grid(self.weights, len(self.models)))
        for name in ("max_steps", "patience"):
            set_(self, name, _bounded(name, getattr(self, name), 1, 1000))


@dataclass(frozen=True)
class ComplementarityConfig(ScoredConfig):
    """How differently the models retrieve, per pair, on the eval split: neighbour overlap, linear CKA,
    correlation of per-query AP and the per-query oracle (core.complementarity)."""

    kind: ClassVar[str] = "complementarity"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.models) < 2:
            raise ConfigError("complementarity compares models: choose at least two")


@dataclass(frozen=True)
class FuseConfig(ScoredConfig):
    """A fusion method with fixed parameters (nothing tuned, so nothing oracle): rank fusion of the
    models' result lists (rrf, max, combsum) or re-ranking of their single model / concatenation
    (`weights`, default equal) by alpha query expansion (qe) or database augmentation (dba)."""

    kind: ClassVar[str] = "fuse"
    method: str = "rrf"
    weights: tuple[float, ...] | None = None  # combsum, qe, dba: one per model (default: all 1)
    rrf_k: float = 60.0  # rrf: the constant in 1 / (rrf_k + rank)
    n: int = 2  # qe, dba: neighbours averaged in
    alpha: float = 3.0  # qe, dba: similarity exponent of the neighbours' weights

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        _one_of("fusion method", self.method, FUSE_METHODS)
        if self.method in ("rrf", "max", "combsum") and len(self.models) < 2:
            raise ConfigError(f"{self.method} merges several models' results: choose at least two models")
        if self.weights is not None:
            weights = parse_numbers(self.weights) if isinstance(self.weights, str) else tuple(check_weight(w) for w in self.weights)
            if len(weights) != len(self.models) or not any(weights):
                raise ConfigError(f"give one weight per model ({len(self.models)}), at least one above 0")
            set_(self, "weights", weights)
        for name, low, high in (("rrf_k", 0.0, 10_000.0), ("alpha", 0.0, 100.0)):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {getattr(self, name)!r}")
            set_(self, name, value)
        set_(self, "n", _bounded("n", self.n, 0, 100))


FUSE_METHODS = ("rrf", "max", "combsum", "qe", "dba")


@dataclass(frozen=True)
class TrainHeadConfig(ScoredConfig):
    """A fusion head fitted on the train split, early-stopped on a validation part of it, scored on eval
    at `k` (the one k: the head's early stopping uses it too)."""

    kind: ClassVar[str] = "train_head"
    head: HeadConfig = field(default_factory=HeadConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        set_ = object.__setattr__
        head = self.head
        if isinstance(head, Mapping):
            if "k" in head:
                raise ConfigError("set k on the job, not inside the head settings")
            try:
                head = HeadConfig.from_dict(dict(head))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"head settings: {error}") from None
        set_(self, "head", dataclasses.replace(head, k=self.k))

    def to_dict(self) -> dict[str, Any]:
        values = super().to_dict()
        values["head"] = {key: value for key, value in self.head.to_dict().items() if key != "k"}
        return values


MAP_PROJECTIONS = ("pca", "umap")
MAX_MAP_POINTS = 1_000_000


@dataclass(frozen=True)
class MapConfig(JobConfig):
    """A 2-D map (core.projection) of one method's eval embeddings, at most `max_points` of them sampled
    per class, computed in the background and kept in the workspace (UMAP takes minutes at 50,000)."""

    kind: ClassVar[str] = "embedding_map"
    method: Method | None = None
    projection: str = "umap"
    max_points: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        method = self.method
        if isinstance(method, Mapping):
            try:
                method = Method.from_dict(method)
            except (KeyError, TypeError, ValueError, MethodError) as error:
                raise ConfigError(f"map settings: not a method ({error})") from None
        if not isinstance(method, Method):
            raise ConfigError("a map needs the method whose embeddings it draws")
        if not method.yields_embedding:
            raise ConfigError(f"{method.label} ranks each query without one embedding per image: nothing to map")
        set_(self, "method", method)
        set_(self, "models", method.used_models)
        super().__post_init__()
        _one_of("projection", self.projection, MAP_PROJECTIONS)
        set_(self, "max_points", _bounded("max_points", self.max_points, 3, MAX_MAP_POINTS))
        set_(self, "seed", _bounded("seed", self.seed, 0, 2**31 - 1))


def demo_jobs(source: str = DEMO_SOURCE) -> list[JobConfig]:
    """The jobs that prepare the offline demo, in the order that fills the dashboard soonest: each model
    embeds and scores the eval split alone (one leaderboard row per model as it finishes), the oracle
    sweep follows, then the whole set is embedded for what learns on the train split: the weights
    chosen on train (the honest ensemble) and the default fusion head."""
    first_look = [EvaluateConfig(dataset=source, models=(model,), eval_only=True) for model in DEMO_MODELS]
    return [*first_look, SweepConfig(dataset=source, eval_only=True), ExtractConfig(dataset=source),
            SelectWeightsConfig(dataset=source), TrainHeadConfig(dataset=source)]


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, (HeadConfig, Method)):
        return value.to_dict()
    return value


def _from_json(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def describe(config: JobConfig) -> str:
    """One line for job lists: 'sweep · demo · 4 models · k=50'."""
    parts = [config.kind, config.dataset, f"{len(config.models)} model{'s' * (len(config.models) != 1)}"]
    if hasattr(config, "k"):
        parts.append(f"k={config.k}")
    return " · ".join(parts)
