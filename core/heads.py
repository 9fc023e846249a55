"""Fusion heads: small networks over several models' frozen embeddings, trained on the train split only."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from core.devices import resolve_device
from core.files import atomic_write_bytes, atomic_write_text
from core.metrics import evaluate
from core.progress import SILENT, Reporter
from core.selection import check_disjoint
from core.vectors import l2_normalize

log = logging.getLogger("core.heads")


class HeadTrainingError(ValueError):
    """The train split or the settings cannot give a head whose validation score means anything."""


@dataclass
class HeadConfig:
    """Everything that decides a trained head; stored beside its weights and in the runs table."""

    # Defaults = the config with the best validation map@k in bench/ablation.py --full-grid on the offline
    # demo (project_concat x {512,1024,2048} x 4 losses and mlp likewise; chosen on train's validation part).
    kind: str = "project_concat"  # see HEAD_KINDS
    out_dim: int = 1024  # ignored by learned_ratio, whose output is the weighted concat itself
    hidden_dim: int = 1024  # mlp only; 0 = one linear layer
    dropout: float = 0.1
    loss: str = "multi_similarity"  # see LOSSES
    temperature: float = 0.05  # normalized_softmax
    epochs: int = 40  # an upper bound: early stopping on validation map@k ends most runs sooner
    lr: float = 2e-3
    proxy_lr_multiplier: float = 10.0  # proxies (class centres inside the loss) learn faster than the head
    batch_size: int = 512  # few large steps: also what keeps a CPU epoch short
    weight_decay: float = 1e-4
    m_per_class: int = 0  # >0: class-balanced batches of m per class; 0: plain shuffled batches (auto-balanced for pair losses)
    val_fraction: float = 0.1  # stratified part of TRAIN held out for early stopping
    patience: int = 5  # epochs without a better validation map@k before stopping
    k: int = 50  # map@k used for early stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {self.kind!r}; choose one of {HEAD_KINDS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        for name in ("out_dim", "epochs", "batch_size", "patience", "k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown head settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)


# --- the heads --------------------------------------------------------------------------------------


class FusionHead(nn.Module):
    """Takes each model's L2-normalised embeddings (a list of N x d_i tensors), returns N x out_dim, L2-normalised."""

    out_dim: int

    def fuse(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return nn.functional.normalize(self.fuse(inputs), dim=1)


class MLPHead(FusionHead):
    """concat -> Linear -> GELU -> Dropout -> Linear ("embedding fixed, finetune fusion layer")."""

    def __init__(self, input_dims: Sequence[int], config: HeadConfig):
        super().__init__()
        d = int(sum(input_dims))
        self.out_dim = int(config.out_dim)
        if config.hidden_dim > 0:
            self.net = nn.Sequential(
                nn.Linear(d, config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(config.hidden_dim, self.out_dim)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(d, self.out_dim))

    def fuse(self, inputs):
        return self.net(torch.cat(inputs, dim=1))


class ProjectConcatHead(FusionHead):
    """Each model projected on its own to an equal share of out_dim, then concatenated."""

    def __init__(self, input_dims: Sequence[int], config: HeadConfig):
        super().__init__()
        self.out_dim = int(config.out_dim)
        shares = [self.out_dim // len(input_dims)] * len(input_dims)
        shares[-1] += self.out_dim - sum(shares)
        self.drop = nn.Dropout(config.dropout)
        self.projections = nn.ModuleList(nn.Linear(d, s) for d, s in zip(input_dims, shares))

    def fuse(self, inputs):
        return torch.cat([p(self.drop(x)) for p, x in zip(self.projections, inputs)], dim=1)


class LearnedRatioHead(FusionHead):
    """Only the concat weights are learned: output = normalize(concat(w_i x_i)), w_i = exp(log_w_i)."""

    def __init__(self, input_dims: Sequence[int], config: HeadConfig):
        super().__init__()
        self.out_dim = int(sum(input_dims))
        self.log_weights = nn.Parameter(torch.zeros(len(input_dims)))

    @property
    def weights(self) -> list[float]:
        return torch.exp(self.log_weights.detach()).tolist()

    def fuse(self, inputs):
        w = torch.exp(self.log_weights)
        return torch.cat([w[i] * x for i, x in enumerate(inputs)], dim=1)


HEADS: dict[str, type[FusionHead]] = {"mlp": MLPHead, "project_concat": ProjectConcatHead, "learned_ratio": LearnedRatioHead}
HEAD_KINDS = tuple(HEADS)


def build_head(config: HeadConfig, input_dims: Sequence[int]) -> FusionHead:
    """The one way to make a head: kind from the config, sizes from the models' dims."""
    return HEADS[config.kind](list(map(int, input_dims)), config)


# --- the losses -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """How to build one metric-learning loss from (config, number of classes, embedding size)."""

    build: Callable[[HeadConfig, int, int], nn.Module]
    needs_pairs: bool = False  # learns from pairs inside a batch, so batches need several images per class


def _metric_losses():
    from pytorch_metric_learning import losses  # imported on first use: pages list the names without it

    return losses


LOSS_REGISTRY: dict[str, LossSpec] = {
    "normalized_softmax": LossSpec(lambda c, n, d: _metric_losses().NormalizedSoftmaxLoss(n, d, temperature=c.temperature)),
    "proxy_anchor": LossSpec(lambda c, n, d: _metric_losses().ProxyAnchorLoss(n, d, margin=0.1, alpha=32)),
    "arcface": LossSpec(lambda c, n, d: _metric_losses().ArcFaceLoss(n, d, margin=28.6, scale=64)),
    "multi_similarity": LossSpec(lambda c, n, d: _metric_losses().MultiSimilarityLoss(alpha=2, beta=50, base=0.5),
                                 needs_pairs=True),
}
LOSSES = tuple(LOSS_REGISTRY)


def build_loss(config: HeadConfig, num_classes: int, embedding_size: int) -> nn.Module:
    return LOSS_REGISTRY[config.loss].build(config, num_classes, embedding_size)


# --- splits and batches -----------------------------------------------------------------------------

# A validation query scores only if another image of its class is in validation too; with a single
# such class every relevant item is that class, and the score says nothing about telling classes apart.
MIN_VAL_PER_CLASS = 2
MIN_VAL_CLASSES = 2


def validation_count(class_size: int, fraction: float) -> int:
    """How many of one class's train images go to validation: about `fraction`, at least one, never
    all of them; a class of one stays in fit."""
    if class_size < 2:
        return 0
    return min(max(int(round(fraction * class_size)), 1), class_size - 1)


def min_train_per_class(fraction: float) -> int:
    """The fewest train images a class needs for MIN_VAL_PER_CLASS of them to go to validation."""
    # start just below the real-number bound; the loop settles float rounding exactly as the split rounds
    n = max(MIN_VAL_PER_CLASS + 1, int((MIN_VAL_PER_CLASS - 0.5) / fraction) - 1)
    while validation_count(n, fraction) < MIN_VAL_PER_CLASS:
        n += 1
    return n


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) positions: `validation_count` of every class to val, seeded."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        val.extend(rng.permutation(members)[: validation_count(len(members), fraction)].tolist())
    val = np.sort(np.array(val, dtype=np.int64))
    fit = np.setdiff1d(np.arange(len(labels)), val)
    return fit, val


def _check_validation_part(codes: np.ndarray, val: np.ndarray, fraction: float) -> None:
    """Refuse a validation part whose map@k is undefined (NaN) before any epoch runs."""
    per_class = np.bincount(codes[val], minlength=int(codes.max()) + 1)
    if int((per_class >= MIN_VAL_PER_CLASS).sum()) >= MIN_VAL_CLASSES:
        return
    raise HeadTrainingError(
        f"too few train images per class to early-stop on: the validation part needs at least {MIN_VAL_PER_CLASS} "
        f"images in each of at least {MIN_VAL_CLASSES} classes (otherwise its queries have nothing relevant to "
        f"find and its map@k is undefined). At val_fraction={fraction} that takes at least "
        f"{min_train_per_class(fraction)} train images per class; the largest class here has "
        f"{int(np.bincount(codes).max())}. Add train images or raise val_fraction."
    )


def epoch_batches(labels: np.ndarray, batch_size: int, m_per_class: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches (positions into labels): shuffled, or class-balanced (m per class) when m > 0."""
    n = len(labels)
    if m_per_class <= 0:
        order = rng.permutation(n)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    cursor = {c: 0 for c in classes}
    per_batch = max(1, min(len(classes), batch_size // m_per_class))
    batches = []
    for _ in range(int(np.ceil(n / batch_size))):
        chosen = rng.choice(classes, size=per_batch, replace=False)
        batch = []
        for c in chosen:
            pool = pools[c]
            take = [pool[(cursor[c] + j) % len(pool)] for j in range(m_per_class)]
            cursor[c] += m_per_class
            batch.extend(take)
        batches.append(np.array(batch, dtype=np.int64))
    return batches


# --- the trained artefact ---------------------------------------------------------------------------


@dataclass
class TrainedHead:
    """A head's best (by validation map@k) weights with the config and dims that rebuild it."""

    config: HeadConfig
    input_dims: list[int]
    state: dict[str, torch.Tensor]
    best_epoch: int = 0
    best_val: float = float("nan")  # validation map@k of the kept weights
    history: list[dict] = field(default_factory=list)
    split: dict = field(default_factory=dict)  # sizes of fit / val / eval, for the record
    model_names: list[str] | None = None
    _module: FusionHead | None = field(default=None, repr=False, compare=False)

    def module(self) -> FusionHead:
        if self._module is None:
            head = build_head(self.config, self.input_dims)
            head.load_state_dict(self.state)
            self._module = head.eval()
        return self._module

    @property
    def out_dim(self) -> int:
        return self.module().out_dim

    def embed(self, embeddings: Sequence[np.ndarray], batch_size: int = 8192) -> np.ndarray:
        """Each model's raw embeddings (same rows, same model order as training) -> N x out_dim, L2-normalised."""
        if len(embeddings) != len(self.input_dims):
            raise ValueError(f"this head fuses {len(self.input_dims)} models but got {len(embeddings)} embedding sets")
        for e, d in zip(embeddings, self.input_dims):
            if e.ndim != 2 or e.shape[1] != d:
                raise ValueError(f"expected model embeddings of width {self.input_dims}, got {[x.shape for x in embeddings]}")
        return _embed(self.module(), [l2_normalize(e) for e in embeddings], torch.device("cpu"), batch_size)

    def save(self, folder: str | os.PathLike) -> Path:
        """head.safetensors (weights) + head.json (config, dims, history) in `folder`; the JSON goes last,
        so a folder with both files holds a complete head."""
        from safetensors.torch import save

        folder = Path(folder)
        atomic_write_bytes(folder / "head.safetensors", save({k: v.detach().cpu().contiguous() for k, v in self.state.items()}))
        meta = {
            "format": "ensemble-explorer/head@1",
            "config": self.config.to_dict(),
            "input_dims": self.input_dims,
            "best_epoch": self.best_epoch,
            "best_val": self.best_val,
            "history": self.history,
            "split": self.split,
            "model_names": self.model_names,
        }
        atomic_write_text(folder / "head.json", json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TrainedHead":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "head.json").exists() or not (folder / "head.safetensors").exists():
            raise FileNotFoundError(f"{folder} holds no trained head (head.json + head.safetensors)")
        meta = json.loads((folder / "head.json").read_text())
        return cls(
            config=HeadConfig.from_dict(meta["config"]),
            input_dims=list(meta["input_dims"]),
            state=load_file(str(folder / "head.safetensors")),
            best_epoch=meta.get("best_epoch", 0),
            best_val=meta.get("best_val", float("nan")),
            history=meta.get("history", []),
            split=meta.get("split", {}),
            model_names=meta.get("model_names"),
        )


@torch.no_grad()
def _embed(head: FusionHead, inputs: list[np.ndarray], device: torch.device, batch_size: int = 8192) -> np.ndarray:
    was_training = head.training
    head.eval()
    out = []
    for start in range(0, len(inputs[0]), batch_size):
        xs = [torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(device) for x in inputs]
        out.append(head(xs).float().cpu().numpy())
    head.train(was_training)
    return l2_normalize(np.concatenate(out)) if out else np.zeros((0, head.out_dim), np.float32)


def _map_at_k(head: FusionHead, inputs: list[np.ndarray], labels: np.ndarray, k: int, device: torch.device) -> float:
    """map@k of the head's embeddings; NaN when they are not finite (a diverged head has no score)."""
    embedded = _embed(head, inputs, device)
    if not np.isfinite(embedded).all():
        return float("nan")
    return evaluate(embedded, labels, k)["map@k"]


# --- resumable training state -----------------------------------------------------------------------


@dataclass
class _Run:
    """Everything an epoch changes: what a checkpoint saves and a resume restores."""

    head: FusionHead
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    epoch: int = 0
    best_epoch: int = 0
    best_val: float = float("nan")
    best_state: dict[str, torch.Tensor] | None = None  # None until an epoch has a finite validation score
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)


def _new_run(config: HeadConfig, dims: list[int], num_classes: int, device: torch.device) -> _Run:
    torch.manual_seed(config.seed)  # every start, fresh or restored into, begins from the same weights
    head = build_head(config, dims).to(device)
    loss = build_loss(config, num_classes, head.out_dim).to(device)
    groups = [{"params": list(head.parameters()), "lr": config.lr}]
    if list(loss.parameters()):
        groups.append({"params": list(loss.parameters()), "lr": config.lr * config.proxy_lr_multiplier})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return _Run(head, loss, optimizer, scheduler)


def _fingerprint(config: HeadConfig, inputs: list[np.ndarray], labels: np.ndarray) -> str:
    """Identifies (config, data) so a checkpoint resumes only the very same training."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    for x in inputs:
        h.update(str(x.shape).encode())
        h.update(np.ascontiguousarray(x[:: max(1, len(x) // 64)]).tobytes())
    return h.hexdigest()[:16]


# A checkpoint is two files: the tensors, then a JSON record that names their SHA-256. The record is
# written last (the commit marker) and read first; it is the only file opened before the fingerprint
# matches, and the tensors are parsed only once their hash matches too. Nothing is ever unpickled.
# No random-generator state is saved: every epoch reseeds from (seed, epoch).
CHECKPOINT_NAME = "checkpoint.json"
CHECKPOINT_TENSORS = "checkpoint.safetensors"
PICKLED_CHECKPOINT = "checkpoint.pt"  # what older versions wrote: deleted unread
CHECKPOINT_FORMAT = "ensemble-explorer/head-checkpoint@1"


def _save_checkpoint(folder: Path, run: _Run, fingerprint: str) -> None:
    from safetensors.torch import save

    tensors = {f"head.{k}": v for k, v in run.head.state_dict().items()}
    tensors.update({f"loss.{k}": v for k, v in run.loss.state_dict().items()})
    tensors.update({f"best.{k}": v for k, v in (run.best_state or {}).items()})
    optimizer = run.optimizer.state_dict()
    optimizer_scalars: dict[str, dict] = {}
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                optimizer_scalars.setdefault(str(index), {})[key] = value
    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(folder / CHECKPOINT_TENSORS, blob)
    record = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "epoch": run.epoch,
        "best_epoch": run.best_epoch,
        "best_val": run.best_val,
        "bad_epochs": run.bad_epochs,
        "history": run.history,
        "optimizer": {"param_groups": optimizer["param_groups"], "state": optimizer_scalars},
        "scheduler": run.scheduler.state_dict(),
    }
    atomic_write_text(folder / CHECKPOINT_NAME, json.dumps(record))


def _read_checkpoint(folder: Path, fingerprint: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The record and tensors of the checkpoint in `folder`; ValueError says why it cannot resume this training."""
    from safetensors.torch import load

    try:
        record = json.loads((folder / CHECKPOINT_NAME).read_text())
    except (OSError, ValueError) as error:  # ValueError: not UTF-8 or not JSON
        raise ValueError(f"{CHECKPOINT_NAME} cannot be read ({error})") from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{CHECKPOINT_NAME} is not a {CHECKPOINT_FORMAT} record")
    if record.get("fingerprint") != fingerprint:
        raise ValueError("it belongs to another head config or other training data")
    try:
        blob = (folder / CHECKPOINT_TENSORS).read_bytes()
    except OSError as error:
        raise ValueError(f"{CHECKPOINT_TENSORS} cannot be read ({error})") from None
    if hashlib.sha256(blob).hexdigest() != record.get("tensors_sha256"):
        raise ValueError(f"{CHECKPOINT_TENSORS} does not match its record (changed, or a write was cut short)")
    return record, load(blob)


def _restore(run: _Run, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    parts: dict[str, dict[str, torch.Tensor]] = {"head": {}, "loss": {}, "best": {}, "optimizer": {}}
    for name, tensor in tensors.items():
        part, key = name.split(".", 1)
        parts[part][key] = tensor
    run.head.load_state_dict(parts["head"])
    run.loss.load_state_dict(parts["loss"])
    optimizer_state: dict[int, dict] = {}
    for key, tensor in parts["optimizer"].items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = tensor
    for index, values in record["optimizer"]["state"].items():
        optimizer_state.setdefault(int(index), {}).update(values)
    run.optimizer.load_state_dict({"state": optimizer_state, "param_groups": record["optimizer"]["param_groups"]})
    run.scheduler.load_state_dict(record["scheduler"])
    run.epoch, run.best_epoch, run.bad_epochs = int(record["epoch"]), int(record["best_epoch"]), int(record["bad_epochs"])
    run.best_val = float(record["best_val"])
    run.best_state = parts["best"] or None
    run.history = list(record["history"])


def _resume_or_start(folder: Path, fingerprint: str, start: Callable[[], _Run], reporter: Reporter) -> _Run:
    """The run checkpointed in `folder` when it is this very training, else a fresh one. A checkpoint
    that cannot be used is reported and later overwritten, never trusted."""
    problems = []
    if (folder / PICKLED_CHECKPOINT).exists():
        (folder / PICKLED_CHECKPOINT).unlink()
        problems.append(f"deleted {PICKLED_CHECKPOINT} unread (an older version's pickle; pickles are never loaded)")
    if (folder / CHECKPOINT_NAME).exists():
        run = start()
        try:
            _restore(run, *_read_checkpoint(folder, fingerprint))
        except Exception as error:  # whatever is wrong with the files, the answer is the same: do not use them
            problems.append(f"ignored the checkpoint: {error}")
        else:
            for problem in problems:
                _report_checkpoint_problem(reporter, folder, problem)
            return run
    for problem in problems:
        _report_checkpoint_problem(reporter, folder, f"{problem}; training starts fresh")
    return start()


def _report_checkpoint_problem(reporter: Reporter, folder: Path, message: str) -> None:
    log.warning("%s: %s", folder, message)
    reporter.progress(0.0, message)


def clear_checkpoint(folder: str | os.PathLike) -> None:
    """Remove a finished training's checkpoint; the record goes first, so a kill midway leaves nothing resumable."""
    for name in (CHECKPOINT_NAME, CHECKPOINT_TENSORS, PICKLED_CHECKPOINT):
        (Path(folder) / name).unlink(missing_ok=True)


# --- training ---------------------------------------------------------------------------------------


def train_fusion_head(
    train_embeddings: Sequence[np.ndarray],
    train_labels: np.ndarray,
    config: HeadConfig,
    *,
    eval_embeddings: Sequence[np.ndarray] | None = None,
    eval_labels: np.ndarray | None = None,
    train_rows: np.ndarray | None = None,
    eval_rows: np.ndarray | None = None,
    reporter: Reporter | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    model_names: Sequence[str] | None = None,
) -> TrainedHead:
    """Train a fusion head on the train split; early-stop on a stratified validation part of it.

    `train_rows` / `eval_rows` are the image-set row indices behind the arrays; when given (the job
    path always gives them) any overlap raises before anything is fitted. The eval arrays are only
    ever scored for the live curve, never used to choose anything. With `checkpoint_dir`, the state
    after every epoch is saved there and a later call with the same config and data resumes from it.
    Raises HeadTrainingError before any epoch when the validation part is too small to score, and
    after training when no epoch had a finite validation score.
    """
    reporter = reporter or SILENT
    if train_rows is not None:
        if len(train_rows) != len(train_labels):
            raise ValueError(f"{len(train_rows)} train rows but {len(train_labels)} train labels")
        if eval_rows is not None:
            check_disjoint(train_rows, eval_rows)
    if (eval_embeddings is None) != (eval_labels is None):
        raise ValueError("give eval_embeddings and eval_labels together")
    inputs = [l2_normalize(e) for e in train_embeddings]
    if len({len(x) for x in inputs} | {len(train_labels)}) != 1:
        raise ValueError("every model's train embeddings and the train labels must have the same rows")
    classes, codes = np.unique(np.asarray(train_labels), return_inverse=True)
    if len(classes) < 2:
        raise ValueError("training a fusion head needs at least two classes in the train split")
    fit, val = stratified_split(codes, config.val_fraction, config.seed)
    _check_validation_part(codes, val, config.val_fraction)
    fit_x = [x[fit] for x in inputs]
    val_x = [x[val] for x in inputs]
    eval_x = [l2_normalize(e) for e in eval_embeddings] if eval_embeddings is not None else None

    device = torch.device(resolve_device(None if device is None else str(device)))
    dims = [x.shape[1] for x in inputs]

    def start() -> _Run:
        return _new_run(config, dims, len(classes), device)

    fingerprint = _fingerprint(config, inputs, codes)
    if checkpoint_dir is None:
        run = start()
    else:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        run = _resume_or_start(checkpoint_dir, fingerprint, start, reporter)
        if run.epoch:
            reporter.progress(run.epoch / config.epochs, f"resumed after epoch {run.epoch}")

    pairs = LOSS_REGISTRY[config.loss].needs_pairs
    m = config.m_per_class or (max(2, config.batch_size // len(classes)) if pairs else 0)
    autocast = device.type == "cuda"
    fit_t = [torch.from_numpy(x).to(device) for x in fit_x]
    fit_y = torch.from_numpy(codes[fit]).to(device)
    while run.epoch < config.epochs and run.bad_epochs < config.patience:
        reporter.check_cancel()
        epoch = run.epoch + 1
        # Seeded per epoch, so a resumed run draws the same batches and dropout as an uninterrupted one.
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)
        run.head.train()
        total, count = 0.0, 0
        for batch in epoch_batches(codes[fit], config.batch_size, m, rng):
            idx = torch.from_numpy(batch).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                emb = run.head([x[idx] for x in fit_t])
            loss = run.loss(emb.float(), fit_y[idx])
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        run.scheduler.step()

        val_map = _map_at_k(run.head, val_x, codes[val], config.k, device)
        row = {"epoch": epoch, "loss": total / max(count, 1), "val_map": val_map}
        if eval_x is not None:
            row["eval_map"] = _map_at_k(run.head, eval_x, np.asarray(eval_labels), config.k, device)
        # NaN is never a score: a diverged epoch counts as one without improvement
        if math.isfinite(val_map) and (run.best_state is None or val_map > run.best_val):
            run.best_val, run.best_epoch, run.bad_epochs = val_map, epoch, 0
            run.best_state = {k: v.detach().cpu().clone() for k, v in run.head.state_dict().items()}
        else:
            run.bad_epochs += 1
        run.epoch = epoch
        run.history.append(row)
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, run, fingerprint)
        reporter.metrics(**row)
        reporter.progress(epoch / config.epochs, f"epoch {epoch}: loss {row['loss']:.4f}, val map@{config.k} {val_map:.4f}")

    if run.best_state is None:
        raise HeadTrainingError(
            f"none of the {run.epoch} epochs gave a finite validation map@{config.k}: the head's outputs became NaN "
            f"or infinite (training diverged), so no weights are worth keeping. Lower lr (now {config.lr}) or "
            "check the embeddings for NaN or infinite values."
        )
    return TrainedHead(
        config=copy.deepcopy(config),
        input_dims=dims,
        state=run.best_state,
        best_epoch=run.best_epoch,
        best_val=run.best_val,
        history=list(run.history),
        split={"fit": int(len(fit)), "val": int(len(val)), "eval": 0 if eval_x is None else int(len(eval_x[0]))},
        model_names=list(model_names) if model_names else None,
    )


# --- the worker's job -------------------------------------------------------------------------------


def checkpoint_key(dataset_fingerprint: str, models: Sequence[str], config: HeadConfig) -> str:
    """Same dataset, models and config -> same checkpoint folder, so a re-queued job resumes."""
    blob = json.dumps({"dataset": dataset_fingerprint, "models": list(models), "config": config.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def head_label(config: HeadConfig) -> str:
    if config.kind == "learned_ratio":
        return f"learned ratio ({config.loss})"
    return f"{config.kind} head {config.out_dim}-d ({config.loss})"
