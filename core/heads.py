"""Fusion heads: small networks over several models' frozen embeddings, trained on the train split only."""
from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from core.fusion import check_disjoint, l2_normalize
from core.progress import SILENT, Reporter

HEAD_KINDS = ("mlp", "project_concat", "learned_ratio")
PROXY_LOSSES = ("normalized_softmax", "proxy_anchor", "arcface")
PAIR_LOSSES = ("multi_similarity",)
LOSSES = PROXY_LOSSES + PAIR_LOSSES
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class HeadConfig:
    """Everything that decides a trained head; stored beside its weights and in the runs table."""

    # Defaults = the config with the best validation map@k in bench/ablation.py --full-grid on the offline
    # demo (project_concat x {512,1024,2048} x 4 losses and mlp likewise; chosen on train's validation part).
    kind: str = "project_concat"  # "mlp" | "project_concat" | "learned_ratio"
    out_dim: int = 1024  # ignored by learned_ratio, whose output is the weighted concat itself
    hidden_dim: int = 1024  # mlp only; 0 = one linear layer
    dropout: float = 0.1
    loss: str = "multi_similarity"  # see LOSSES
    temperature: float = 0.05  # normalized_softmax
    epochs: int = 40  # 20 stopped most runs still improving; 40 (cosine over 40, early-stopped) gave +0.010 val map@k
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


def build_head(config: HeadConfig, input_dims: Sequence[int]) -> FusionHead:
    """The one way to make a head: kind from the config, sizes from the models' dims."""
    return HEADS[config.kind](list(map(int, input_dims)), config)


def build_loss(config: HeadConfig, num_classes: int, embedding_size: int) -> nn.Module:
    from pytorch_metric_learning import losses

    if config.loss == "normalized_softmax":
        return losses.NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=config.temperature)
    if config.loss == "proxy_anchor":
        return losses.ProxyAnchorLoss(num_classes, embedding_size, margin=0.1, alpha=32)
    if config.loss == "arcface":
        return losses.ArcFaceLoss(num_classes, embedding_size, margin=28.6, scale=64)
    return losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)


# --- splits and batches -----------------------------------------------------------------------------


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) positions: about `fraction` of every class to val, seeded; a class of one stays in fit."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(fraction * len(members))) if len(members) > 1 else 0
        n_val = min(max(n_val, 1 if len(members) > 1 else 0), len(members) - 1)
        val.extend(rng.permutation(members)[:n_val].tolist())
    val = np.sort(np.array(val, dtype=np.int64))
    fit = np.setdiff1d(np.arange(len(labels)), val)
    return fit, val


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
        """head.safetensors (weights) + head.json (config, dims, history) in `folder`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state.items()}, str(folder / "head.safetensors.tmp"))
        os.replace(folder / "head.safetensors.tmp", folder / "head.safetensors")
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
        (folder / "head.json.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(folder / "head.json.tmp", folder / "head.json")
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


# --- training ---------------------------------------------------------------------------------------


def _fingerprint(config: HeadConfig, inputs: list[np.ndarray], labels: np.ndarray) -> str:
    """Identifies (config, data) so a checkpoint resumes only the very same training."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    for x in inputs:
        h.update(str(x.shape).encode())
        h.update(np.ascontiguousarray(x[:: max(1, len(x) // 64)]).tobytes())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a kill mid-write never leaves a checkpoint that looks complete


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
    """
    from core.metrics import evaluate

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
    fit_x = [x[fit] for x in inputs]
    val_x = [x[val] for x in inputs]
    eval_x = [l2_normalize(e) for e in eval_embeddings] if eval_embeddings is not None else None

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.seed)
    dims = [x.shape[1] for x in inputs]
    head = build_head(config, dims).to(device)
    loss_fn = build_loss(config, len(classes), head.out_dim).to(device)
    groups = [{"params": list(head.parameters()), "lr": config.lr}]
    loss_params = list(loss_fn.parameters())
    if loss_params:
        groups.append({"params": loss_params, "lr": config.lr * config.proxy_lr_multiplier})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    m = config.m_per_class or (max(2, config.batch_size // len(classes)) if config.loss in PAIR_LOSSES else 0)
    autocast = device.type == "cuda"

    fit_t = [torch.from_numpy(x).to(device) for x in fit_x]
    fit_y = torch.from_numpy(codes[fit]).to(device)
    state = {"epoch": 0, "best_val": -1.0, "best_epoch": 0, "best_state": None, "bad_epochs": 0, "history": []}
    fingerprint = _fingerprint(config, inputs, codes)
    ckpt_path = None
    if checkpoint_dir is not None:
        ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists():
            saved = torch.load(ckpt_path, map_location=device, weights_only=False)
            if saved.get("fingerprint") == fingerprint:
                head.load_state_dict(saved["head"])
                loss_fn.load_state_dict(saved["loss"])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                state = saved["state"]
                reporter.progress(state["epoch"] / config.epochs, f"resumed after epoch {state['epoch']}")

    while state["epoch"] < config.epochs and state["bad_epochs"] < config.patience:
        reporter.check_cancel()
        epoch = state["epoch"] + 1
        # Seeded per epoch, so a resumed run draws the same batches and dropout as an uninterrupted one.
        rng = np.random.default_rng([config.seed, epoch])
        torch.manual_seed(config.seed * 100_003 + epoch)
        head.train()
        total, count = 0.0, 0
        for batch in epoch_batches(codes[fit], config.batch_size, m, rng):
            idx = torch.from_numpy(batch).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                emb = head([x[idx] for x in fit_t])
            loss = loss_fn(emb.float(), fit_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            count += len(batch)
        scheduler.step()

        val_map = evaluate(_embed(head, val_x, device), codes[val], config.k)["map@k"]
        row = {"epoch": epoch, "loss": total / max(count, 1), "val_map": val_map}
        if eval_x is not None:
            row["eval_map"] = evaluate(_embed(head, eval_x, device), np.asarray(eval_labels), config.k)["map@k"]
        if val_map > state["best_val"]:
            state.update(best_val=val_map, best_epoch=epoch, bad_epochs=0,
                         best_state={k: v.detach().cpu().clone() for k, v in head.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append(row)
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {
                "fingerprint": fingerprint, "head": head.state_dict(), "loss": loss_fn.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state,
            })
        reporter.metrics(**row)
        reporter.progress(epoch / config.epochs, f"epoch {epoch}: loss {row['loss']:.4f}, val map@{config.k} {val_map:.4f}")

    best = state["best_state"] or {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    return TrainedHead(
        config=copy.deepcopy(config),
        input_dims=dims,
        state=best,
        best_epoch=state["best_epoch"],
        best_val=float(state["best_val"]),
        history=list(state["history"]),
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


def run_training_job(params: dict, reporter: Reporter, workspace, engine) -> int:
    """Job kind "train_head". params: dataset, models, head (HeadConfig fields), k, device,
    limit_per_class. Trains on the dataset's train split, reports on its eval split, saves the head
    under workspace.heads/run-<id> and records one eval result; a re-run after a kill resumes."""
    from core import db
    from core.metrics import evaluate
    from core.tasks import _embedding_sets, _open, _start

    config = HeadConfig.from_dict(dict(params.get("head", {})))
    models = list(params["models"])
    if len(models) < 1:
        raise ValueError("choose at least one model for the fusion head")
    imageset = _open(params, workspace)
    train_rows, eval_rows = imageset.split("train"), imageset.split("eval")
    if len(train_rows) == 0:
        raise ValueError(f"dataset {imageset.name!r} has no train split; a fusion head is fitted on train "
                         "rows and reported on eval rows (give the manifest a split column or train/ and eval/ folders)")
    _, _, run_id = _start("train_head", f"{head_label(config)} over {', '.join(models)}", params, workspace, engine,
                          imageset=imageset)
    arrays = [es.load() for es in _embedding_sets(imageset, models, workspace, params.get("device"), reporter)]

    def record_point(values: dict) -> None:
        with db.begin_immediate(engine) as session:
            db.add_curve_point(session, run_id, int(values.get("epoch", 0)), values)
        reporter.metrics(**values)

    live = Reporter(on_progress=reporter.progress, is_cancelled=reporter.is_cancelled, on_metrics=record_point)
    checkpoints = workspace.heads / "checkpoints" / checkpoint_key(imageset.fingerprint, models, config)
    labels = np.asarray(imageset.labels)
    head = train_fusion_head(
        [a[train_rows] for a in arrays], labels[train_rows], config,
        eval_embeddings=[a[eval_rows] for a in arrays], eval_labels=labels[eval_rows],
        train_rows=train_rows, eval_rows=eval_rows, reporter=live, device=params.get("device"),
        checkpoint_dir=checkpoints, model_names=models,
    )
    folder = head.save(workspace.heads / f"run-{run_id}")
    metrics = evaluate(head.embed([a[eval_rows] for a in arrays]), labels[eval_rows], int(params.get("k", 50)))
    result = {
        "method": head_label(config), "metrics": metrics, "split": "eval", "is_oracle": False,
        "extra": {"head_path": str(folder), "models": models, "best_epoch": head.best_epoch,
                  "val_map": head.best_val, "split_sizes": head.split},
    }
    if config.kind == "learned_ratio":
        result["weights"] = head.module().weights
    with db.begin_immediate(engine) as session:
        db.finish_run(session, run_id, [result])
    (checkpoints / CHECKPOINT_NAME).unlink(missing_ok=True)
    return run_id
