"""Job kinds: the handlers that turn a queued job into core calls and rows in the runs database.

A handler is `handler(params, reporter, workspace, engine) -> run_id | None`. It is the only place
where a job's params become function arguments, so pages and the CLI submit plain JSON and never
import the heavy modules; those are imported inside the handlers, in the worker process only.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from sqlalchemy import Engine

from core.progress import Reporter
from core.workspace import Workspace


class Handler(Protocol):
    def __call__(self, params: dict[str, Any], reporter: Reporter, workspace: Workspace, engine: Engine) -> int | None: ...


class UnknownJobKind(ValueError):
    pass


_HANDLERS: dict[str, Handler] = {}


def job_kind(name: str) -> Callable[[Handler], Handler]:
    """Register a handler under a job kind (one handler per kind)."""

    def register(handler: Handler) -> Handler:
        previous = _HANDLERS.get(name)
        if previous is not None and getattr(previous, "__qualname__", None) != getattr(handler, "__qualname__", None):
            raise ValueError(f"job kind {name!r} is already handled by {previous!r}")
        _HANDLERS[name] = handler
        return handler

    return register


def handler_for(kind: str) -> Handler:
    try:
        return _HANDLERS[kind]
    except KeyError:
        raise UnknownJobKind(
            f"no handler for job kind {kind!r}; this worker knows {', '.join(sorted(_HANDLERS)) or 'none'}. "
            "Is the worker older than the dashboard that submitted the job?"
        ) from None


# --- shared steps --------------------------------------------------------------------------------


def _open(params: dict[str, Any], workspace: Workspace):
    from core.datasets import open_dataset

    return open_dataset(params["dataset"], workspace, limit_per_class=params.get("limit_per_class"))


def _record_dataset(session, imageset, source: str):
    from core import db

    return db.record_dataset(
        session,
        name=imageset.name,
        source=source,
        fingerprint=imageset.fingerprint,
        n_images=len(imageset),
        n_classes=len(imageset.class_names),
        n_skipped=len(imageset.skipped),
    )


def _embedding_sets(imageset, models: list[str], workspace: Workspace, device: str | None, reporter: Reporter):
    """The models' embeddings of `imageset`, in the order of `models`: read from the cache, or
    extracted (and cached) for the ones that are missing."""
    from core.cache import EmbeddingCache
    from core.extract import extract_embeddings

    sets = extract_embeddings(
        imageset, models, EmbeddingCache(workspace.embeddings), device=device, reporter=reporter
    )
    return [sets[m] for m in models]


def _eval_rows(imageset):
    return imageset.split("eval")


def _short_name(model: str) -> str:
    """'tf_efficientnet_lite0' -> 'lite0' for ensemble labels, as the reference study wrote them."""
    name = model.split("/")[-1].split(":")[-1].split(".")[0]
    for prefix in ("tf_efficientnet_", "efficientnet_", "tf_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _start(kind: str, title: str, params: dict[str, Any], workspace: Workspace, engine: Engine, imageset=None):
    """Open (unless given) and record the job's dataset and open its run, linked to the job so the
    dashboard shows the run while it works. `title` may name {dataset}. Returns (imageset, dataset id, run id)."""
    from core import db
    from core.jobs import current_job_id

    imageset = imageset if imageset is not None else _open(params, workspace)
    with db.begin_immediate(engine) as session:
        dataset = _record_dataset(session, imageset, params["dataset"])
        run = db.start_run(session, kind=kind, title=title.format(dataset=dataset.name), config=params,
                           dataset_id=dataset.id, job_id=current_job_id())
        return imageset, dataset.id, run.id


# --- job kinds -----------------------------------------------------------------------------------


@job_kind("extract")
def extract(params: dict[str, Any], reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """params: dataset (source: "demo" | folder | csv), limit_per_class, models, device."""
    from core import db

    imageset, dataset_id, run_id = _start("extract", f"extract {', '.join(params['models'])} on {{dataset}}",
                                          params, workspace, engine)
    sets = _embedding_sets(imageset, list(params["models"]), workspace, params.get("device"), reporter)
    with db.begin_immediate(engine) as session:
        for es in sets:
            db.record_model(session, name=es.model_name, dim=es.dim)
            db.record_embedding_set(
                session, dataset_id=dataset_id, model_name=es.model_name, cache_key=es.cache_key,
                path=str(es.path), n=es.n, dim=es.dim, dtype=es.dtype,
            )
        db.finish_run(session, run_id, [])
    return run_id


@job_kind("evaluate")
def evaluate(params: dict[str, Any], reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """params: dataset, models, k (and limit_per_class, device as for extract). One result per model."""
    from core import db
    from core.metrics import evaluate as evaluate_embeddings

    k = int(params.get("k", 50))
    imageset, _, run_id = _start("evaluate", f"evaluate {len(params['models'])} models, k={k}", params, workspace, engine)
    sets = _embedding_sets(imageset, list(params["models"]), workspace, params.get("device"), reporter)
    rows = _eval_rows(imageset)
    labels = imageset.labels[rows]
    results = []
    for i, (model, es) in enumerate(zip(params["models"], sets)):
        reporter.check_cancel()
        metrics = evaluate_embeddings(es.load()[rows], labels, k)
        results.append({"method": model, "metrics": metrics, "split": "eval", "is_oracle": False})
        reporter.progress((i + 1) / len(sets), f"evaluated {model}")
    with db.begin_immediate(engine) as session:
        db.finish_run(session, run_id, results)
    return run_id


@job_kind("sweep")
def sweep(params: dict[str, Any], reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """params: dataset, models, weights (the grid values, e.g. 0..5), k; or search="random" with
    n_samples for continuous weights. Every weight vector is a result, labelled like "lite0(3)+lite2(1)"
    and marked oracle: it is tuned on the eval split."""
    from core import db
    from core.sweep import grid_sweep, label_weights, random_sweep

    k = int(params.get("k", 50))
    models = list(params["models"])
    imageset, _, run_id = _start("sweep", f"weight sweep over {len(models)} models, k={k}", params, workspace, engine)
    sets = _embedding_sets(imageset, models, workspace, params.get("device"), reporter)
    rows = _eval_rows(imageset)
    arrays, labels = [es.load()[rows] for es in sets], imageset.labels[rows]
    if params.get("search") == "random":
        rows_by_weights = random_sweep(arrays, labels, n_samples=int(params.get("n_samples", 256)), k=k,
                                       reporter=reporter)
    else:
        rows_by_weights = grid_sweep(arrays, labels, weights=params.get("weights", (0, 1, 2, 3, 4, 5)), k=k,
                                     reporter=reporter)
    names = [_short_name(m) for m in models]
    results = []
    for row in rows_by_weights:
        weights = list(row["weights"])
        metrics = {key: value for key, value in row.items() if key not in ("weights", "ratio")}
        results.append(
            {
                "method": label_weights(weights, names),
                "weights": weights,
                "metrics": metrics,
                "split": "eval",
                "is_oracle": True,
                "extra": {"ratio": list(row.get("ratio", ())), "models": models},
            }
        )
    with db.begin_immediate(engine) as session:
        db.finish_run(session, run_id, results)
    return run_id


@job_kind("train_head")
def train_head(params: dict[str, Any], reporter: Reporter, workspace: Workspace, engine: Engine) -> int | None:
    """Fusion-head training lives in core.heads; it starts its own run (with job_id=current_job_id())
    so its curve shows while it trains."""
    from core.heads import run_training_job

    return run_training_job(params, reporter, workspace, engine)
