"""Job kinds: the handlers that turn a queued job's typed settings into core calls and rows in the runs DB.

A handler is registered for a settings class (core.configs) and called as
`handler(settings, reporter, workspace, engine) -> run_id | None`. `run_job` is the one way in: it
parses the stored params into the settings class, so a job with unknown or out-of-range values fails
with the validation message before any work starts.

The heavy steps (embedding images, scoring an evaluation or a grid sweep) go through a `Compute`: this
process's by default, a Ray cluster's with core.ray_executor.RayCompute. The record-keeping around them is
the handlers', whichever computes.
"""
from __future__ import annotations

import contextvars
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from sqlalchemy import Engine

from core import db
from core.cache import EmbeddingCache, EmbeddingSet, files_state
from core.configs import (ComplementarityConfig, EvaluateConfig, ExtractConfig, FuseConfig, MapConfig,
                          SelectWeightsConfig, Settings, SweepConfig, TrainHeadConfig)
from core.datasets import PROTOCOL_SPLIT, ImageSet, open_dataset
from core.errors import user_message
from core.extract import extract_embeddings, query_arrays
from core.heads import checkpoint_key, clear_checkpoint, head_label, train_fusion_head
from core.jobs import current_job_id
from core.methods import Method
from core.metrics import (METRIC_KEYS, QueryScores, depth_needed, per_query_scores, query_scores_from_ranking,
                          relevant_counts)
from core.scores import save_query_scores
from core.complementarity import complementarity
from core.ensemble_search import select_weights as search_weights
from core.selection import weights_chosen_on_train
from core.progress import JobCancelled, Reporter
from core.projection import draw, map_key, save_map
from core.sweep import grid_sweep, random_sweep
from core.workspace import Workspace

Handler = Callable[[Any, Reporter, Workspace, Engine], "int | None"]


class UnknownJobKind(ValueError):
    pass


_HANDLERS: dict[str, tuple[type[Settings], Handler]] = {}


class Compute:
    """Runs a job's heavy steps in this process, on this host's device."""

    title_suffix = ""  # added to the title of every run computed here

    def embed(self, imageset: ImageSet, models: list[str], cache: EmbeddingCache, *, device: str,
              reporter: Reporter, force: bool) -> dict[str, EmbeddingSet]:
        """core.extract.extract_embeddings: each model's embeddings of `imageset`, cached."""
        return extract_embeddings(imageset, models, cache, device=None if device == "auto" else device,
                                  reporter=reporter, force=force)

    def score(self, sets: Sequence[EmbeddingSet], rows: np.ndarray, labels: np.ndarray, k: int,
              reporter: Reporter) -> list[QueryScores]:
        """core.metrics.per_query_scores of each set's `rows`: exact search, every query scored."""
        out = []
        for i, es in enumerate(sets):
            reporter.check_cancel()
            out.append(per_query_scores(es.load()[rows], labels, k))
            reporter.progress((i + 1) / len(sets), f"evaluated {es.model_name}")
        return out

    def sweep(self, arrays: Sequence[np.ndarray], labels: np.ndarray, weights: Sequence[float], k: int,
              reporter: Reporter) -> list[dict]:
        """core.sweep.grid_sweep: every vector of the weight grid, scored exactly, best first."""
        return grid_sweep(list(arrays), labels, weights=weights, k=k, reporter=reporter)


LOCAL = Compute()


def job_kind(settings: type[Settings]) -> Callable[[Handler], Handler]:
    """Register the handler of the job kind `settings.kind` (one handler per kind)."""

    def register(handler: Handler) -> Handler:
        previous = _HANDLERS.get(settings.kind)
        if previous is not None and previous[1].__qualname__ != handler.__qualname__:
            raise ValueError(f"job kind {settings.kind!r} is already handled by {previous[1]!r}")
        _HANDLERS[settings.kind] = (settings, handler)
        return handler

    return register


def run_job(kind: str, params: Mapping[str, Any], reporter: Reporter, workspace: Workspace,
            engine: Engine, compute: Compute = LOCAL) -> int | None:
    """Parse `params` into the kind's settings and run its handler, its heavy steps on `compute`."""
    try:
        settings, handler = _HANDLERS[kind]
    except KeyError:
        raise UnknownJobKind(
            f"no handler for job kind {kind!r}; this worker knows {', '.join(sorted(_HANDLERS)) or 'none'}. "
            "Is the worker older than the dashboard that submitted the job?"
        ) from None
    config = settings.from_dict(params)
    token, computing = _opened_runs.set([]), _compute.set(compute)
    try:
        return handler(config, reporter, workspace, engine)
    except BaseException as error:
        # Whatever stopped the handler (an error, a cancel, Ctrl-C in the CLI), its run must not stay "running".
        status = "cancelled" if isinstance(error, (JobCancelled, KeyboardInterrupt)) else "failed"
        _close_opened_runs(engine, status, user_message(error))
        raise
    finally:
        _opened_runs.reset(token)
        _compute.reset(computing)


_opened_runs: contextvars.ContextVar[list[int]] = contextvars.ContextVar("opened_runs", default=[])
_compute: contextvars.ContextVar[Compute] = contextvars.ContextVar("compute", default=LOCAL)


def _close_opened_runs(engine: Engine, status: str, reason: str) -> None:
    try:
        with db.begin_immediate(engine) as session:
            for run_id in _opened_runs.get():
                run = session.get(db.Run, run_id)
                if run is not None and run.status == "running":
                    db.fail_run(session, run_id, reason, status=status)
    except Exception:  # noqa: BLE001 - the DB itself may be what failed; the original error says more
        pass


# --- shared steps --------------------------------------------------------------------------------


def _start(kind: str, title: str, config, workspace: Workspace, engine: Engine) -> tuple[ImageSet, int]:
    """Open and record the job's dataset and open its run, linked to the job so the dashboard shows
    the run while it works. `title` may name {dataset}. Returns (imageset, run id)."""
    imageset = open_dataset(config.dataset, workspace, limit_per_class=config.limit_per_class)
    with db.begin_immediate(engine) as session:
        dataset = db.record_dataset(
            session, name=imageset.name, source=config.dataset, fingerprint=imageset.fingerprint,
            n_images=len(imageset), n_classes=len(imageset.class_names), n_skipped=len(imageset.skipped),
        )
        run = db.start_run(session, kind=kind, title=title.format(dataset=dataset.name) + _compute.get().title_suffix,
                           config=config.to_dict(), dataset_id=dataset.id, job_id=current_job_id())
    _opened_runs.get().append(run.id)
    return imageset, run.id


def _embeddings(imageset: ImageSet, config, workspace: Workspace, reporter: Reporter, *,
                force: bool = False) -> list[EmbeddingSet]:
    """The models' embeddings of `imageset`, in the order of `config.models`: read from the cache, or
    extracted (and cached) for the ones that are missing."""
    embedded = imageset.only("eval") if config.eval_only else imageset
    sets = _compute.get().embed(embedded, list(config.models), EmbeddingCache(workspace.embeddings),
                                device=config.device, reporter=reporter, force=force)
    return [sets[m] for m in config.models]


def _finish(engine: Engine, workspace: Workspace, run_id: int, results: list[dict[str, Any]]) -> int:
    """Store the results (each may carry its per-query "scores", kept in a file beside the DB) and close the run."""
    with db.begin_immediate(engine) as session:
        rows = db.add_results(session, run_id, [{k: v for k, v in r.items() if k != "scores"} for r in results])
    for row, result in zip(rows, results):
        if result.get("scores") is not None:
            save_query_scores(workspace, row.id, result["scores"])
    with db.begin_immediate(engine) as session:
        db.finish_run(session, run_id)
    return run_id


def _scored(method: Method, scores: QueryScores, selected_on: str, split: str, **extra) -> dict[str, Any]:
    return {"method": method, "metrics": scores.summary(), "scores": scores, "selected_on": selected_on,
            "split": split, **({"extra": extra} if extra else {})}


def _rows(imageset: ImageSet, config) -> tuple[np.ndarray, np.ndarray, str]:
    """(train rows, eval rows, the split label results are stored under) for the job's protocol; with
    eval_only, rows of the eval split's own embeddings (the same images in the same order)."""
    train_rows, eval_rows = imageset.protocol_rows(config.protocol)
    if config.eval_only:
        train_rows, eval_rows = train_rows[:0], np.arange(len(eval_rows))
    if len(eval_rows) < 2:
        raise ValueError(f"the eval split of {imageset.name!r} has {len(eval_rows)} images; retrieval needs at least 2")
    k = getattr(config, "k", None)
    if k is not None and k > len(eval_rows) - 1:
        raise ValueError(f"k={k} but the eval split has only {len(eval_rows)} images ({len(eval_rows) - 1} to "
                         f"retrieve per query); choose k of at most {max(1, len(eval_rows) - 1)}")
    return train_rows, eval_rows, PROTOCOL_SPLIT[config.protocol]


# --- job kinds -----------------------------------------------------------------------------------


@job_kind(ExtractConfig)
def extract(config: ExtractConfig, reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    imageset, run_id = _start("extract", f"extract {', '.join(config.models)} on {{dataset}}", config, workspace, engine)
    sets = _embeddings(imageset, config, workspace, reporter, force=config.force)
    with db.begin_immediate(engine) as session:
        dataset = db.get_dataset(session, imageset.fingerprint)
        for es in sets:
            db.record_model(session, name=es.model_name, dim=es.dim)
            db.record_embedding_set(
                session, dataset_id=dataset.id, model_name=es.model_name, cache_key=es.cache_key,
                path=str(es.path), n=es.n, dim=es.dim, dtype=es.dtype,
                seconds_per_image=es.seconds_per_image, device=es.device,
            )
    return _finish(engine, workspace, run_id, [])


@job_kind(EvaluateConfig)
def evaluate(config: EvaluateConfig, reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """One result per model, scored on the eval split."""
    imageset, run_id = _start("evaluate", f"evaluate {len(config.models)} models, k={config.k}", config, workspace, engine)
    _, rows, split = _rows(imageset, config)
    sets = _embeddings(imageset, config, workspace, reporter)
    scores = _compute.get().score(sets, rows, imageset.labels[rows], config.k, reporter)
    results = [_scored(Method.single(model), s, "none", split) for model, s in zip(config.models, scores)]
    return _finish(engine, workspace, run_id, results)


@job_kind(SweepConfig)
def sweep(config: SweepConfig, reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """Every weight vector is a result, labelled like "lite0(3)+lite2(1)". Vectors over two or more
    models are oracle numbers (tuned on the eval split they are scored on); a vector with one non-zero
    weight is that model alone, with nothing tuned. The best vector of each model subset (what the
    leaderboard shows) also keeps its per-query scores."""
    models = list(config.models)
    imageset, run_id = _start("sweep", f"weight sweep over {len(models)} models, k={config.k}", config, workspace, engine)
    _, rows, split = _rows(imageset, config)
    sets = _embeddings(imageset, config, workspace, reporter)
    arrays, labels = [es.load()[rows] for es in sets], imageset.labels[rows]
    if config.search == "random":
        scored = random_sweep(arrays, labels, n_samples=config.n_samples, k=config.k, reporter=reporter)
    else:
        scored = _compute.get().sweep(arrays, labels, config.weights, config.k, reporter)
    by_model = dict(zip(models, arrays))
    results, best_of_subset = [], set()
    for row in scored:  # best first
        method = Method.concat(models, row["weights"])
        result = {"method": method, "metrics": {key: v for key, v in row.items() if key not in ("weights", "ratio")},
                  "selected_on": "eval" if method.kind == "concat" else "none", "split": split,
                  "extra": {"vector": [float(w) for w in row["weights"]]}}
        if method.used_models not in best_of_subset:
            best_of_subset.add(method.used_models)
            reporter.check_cancel()
            result["scores"] = per_query_scores(method.embeddings(by_model, np.arange(len(rows))), labels, config.k)
        results.append(result)
    return _finish(engine, workspace, run_id, results)


@job_kind(SelectWeightsConfig)
def select_weights(config: SelectWeightsConfig, reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """Concat weights chosen by the exact scorer on the train rows alone (grid, or greedy + refinement
    whose path is kept for a plot), then scored once on eval."""
    models = list(config.models)
    imageset, run_id = _start("select_weights", f"weights chosen on train ({config.search}) over {len(models)} "
                              f"models, k={config.k}", config, workspace, engine)
    train_rows, eval_rows, split = _rows(imageset, config)
    if len(train_rows) < 2:
        raise ValueError(f"dataset {imageset.name!r} has no train split to choose weights on (give the manifest a "
                         "split column or train/ and eval/ folders)")
    imageset.check_disjoint(train_rows, eval_rows)
    arrays = [es.load() for es in _embeddings(imageset, config, workspace, reporter)]
    extra = {}
    if config.search == "greedy":
        greedy, refined = search_weights([a[train_rows] for a in arrays], imageset.labels[train_rows], config.k,
                                         max_steps=config.max_steps, patience=config.patience, reporter=reporter)
        chosen = {**refined.metrics, "weights": refined.weights}
        extra["path"] = {"greedy": greedy.path, "refined": refined.path}
    else:
        chosen = weights_chosen_on_train(arrays, imageset.labels, train_rows, eval_rows, config.weights, config.k,
                                         reporter=reporter)
    method = Method.concat(models, chosen["weights"])
    scores = per_query_scores(method.embeddings(dict(zip(models, arrays)), eval_rows), imageset.labels[eval_rows],
                              config.k)
    extra.update(train_metrics={key: chosen[key] for key in METRIC_KEYS}, vector=[float(w) for w in chosen["weights"]])
    return _finish(engine, workspace, run_id, [_scored(method, scores, "train", split, **extra)])


@job_kind(ComplementarityConfig)
def model_complementarity(config: ComplementarityConfig, reporter: Reporter, workspace: Workspace,
                          engine: Engine) -> int:
    """Pairwise complementarity of the models on the eval rows, kept as the run's summary."""
    models = list(config.models)
    imageset, run_id = _start("complementarity", f"complementarity of {len(models)} models, k={config.k}", config,
                              workspace, engine)
    _, rows, split = _rows(imageset, config)
    arrays = [es.load()[rows] for es in _embeddings(imageset, config, workspace, reporter)]
    reporter.progress(0.5, "comparing the models' neighbours")
    summary = {"split": split, **complementarity(arrays, imageset.labels[rows], config.k, names=models)}
    with db.begin_immediate(engine) as session:
        db.finish_run(session, run_id, summary=summary)
    return run_id


@job_kind(FuseConfig)
def fuse(config: FuseConfig, reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """A rank fusion or re-ranking scored on the eval split from the ranking it produces, deep enough
    for every metric to be exact. Its parameters are fixed, not tuned: selected_on none."""
    models = list(config.models)
    imageset, run_id = _start("fuse", f"{config.method} over {len(models)} models, k={config.k}", config, workspace, engine)
    _, rows, split = _rows(imageset, config)
    labels = imageset.labels[rows]
    if config.method in ("rrf", "max", "combsum"):
        method = Method.fused("rank", models, config.weights if config.method == "combsum" else None,
                              rule=config.method, **({"rrf_k": config.rrf_k} if config.method == "rrf" else {}))
    else:
        method = Method.fused(config.method, models, config.weights, n=config.n, alpha=config.alpha)
    arrays = dict(zip(models, (es.load() for es in _embeddings(imageset, config, workspace, reporter))))
    reporter.progress(0.5, f"ranking every query by {method.label}")
    depth = depth_needed(relevant_counts(labels), config.k, len(rows) - 1)
    scores = query_scores_from_ranking(method.ranking(arrays, rows, depth), labels, config.k)
    return _finish(engine, workspace, run_id, [_scored(method, scores, "none", split)])


@job_kind(TrainHeadConfig)
def train_head(config: TrainHeadConfig, reporter: Reporter, workspace: Workspace, engine: Engine) -> int:
    """Trains on the train rows (early-stopped on a validation part of them), reports on the eval rows,
    saves the head under workspace.heads/run-<id>; a re-run after a kill resumes from the last epoch's
    checkpoint."""
    head_config, models = config.head, list(config.models)
    imageset, run_id = _start("train_head", f"{head_label(head_config)} over {', '.join(models)}", config,
                              workspace, engine)
    train_rows, eval_rows, split = _rows(imageset, config)
    if len(train_rows) == 0:
        raise ValueError(f"dataset {imageset.name!r} has no train split; a fusion head is fitted on train "
                         "rows and reported on eval rows (give the manifest a split column or train/ and eval/ folders)")
    imageset.check_disjoint(train_rows, eval_rows)
    arrays = [es.load() for es in _embeddings(imageset, config, workspace, reporter)]

    def record_point(values: dict) -> None:
        with db.begin_immediate(engine) as session:
            db.add_curve_point(session, run_id, int(values.get("epoch", 0)), values)
        reporter.metrics(**values)

    live = Reporter(on_progress=reporter.progress, is_cancelled=reporter.is_cancelled, on_metrics=record_point)
    labels = np.asarray(imageset.labels)
    checkpoints = workspace.heads / "checkpoints" / checkpoint_key(
        f"{imageset.fingerprint}:{config.protocol}", models, head_config)
    head = train_fusion_head(
        [a[train_rows] for a in arrays], labels[train_rows], head_config,
        eval_embeddings=[a[eval_rows] for a in arrays], eval_labels=labels[eval_rows],
        train_rows=train_rows, eval_rows=eval_rows, reporter=live,
        device=None if config.device == "auto" else config.device,
        checkpoint_dir=checkpoints, model_names=models,
    )
    folder = head.save(workspace.heads / f"run-{run_id}")
    scores = per_query_scores(head.embed([a[eval_rows] for a in arrays]), labels[eval_rows], config.k)
    extra = {"best_epoch": head.best_epoch, "val_map": head.best_val, "split_sizes": head.split}
    if head_config.kind == "learned_ratio":
        extra["learned_weights"] = head.module().weights
    _finish(engine, workspace, run_id, [_scored(Method.head(models, str(folder), head_label(head_config)), scores,
                                                "validation", split, **extra)])
    clear_checkpoint(checkpoints)  # finished: nothing left to resume
    return run_id


@job_kind(MapConfig)
def embedding_map(config: MapConfig, reporter: Reporter, workspace: Workspace, engine: Engine) -> None:
    """A 2-D map of the method's cached eval embeddings, kept in the workspace under core.projection.map_key
    (a picture, not a result: no run is recorded). Extract the embeddings first: a map never starts an
    extraction."""
    imageset = open_dataset(config.dataset, workspace, limit_per_class=config.limit_per_class)
    method = config.method
    arrays, rows = query_arrays(EmbeddingCache(workspace.embeddings), imageset, list(method.used_models))
    reporter.progress(0.01, f"building the embeddings of {method.label}")
    positions, coords = draw(method.embeddings(arrays, rows), imageset.labels[imageset.protocol_rows("image")[1]],
                             config.projection, config.max_points, config.seed, reporter)
    key = map_key(imageset.fingerprint, method.to_dict(), files_state(arrays), config.projection, config.max_points,
                  config.seed)
    save_map(workspace, key, positions, coords)
    reporter.progress(1.0, f"{config.projection.upper()} map of {len(positions):,} points saved")
    return None
