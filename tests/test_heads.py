"""Fusion heads: they learn, they never see eval rows, they survive a cancel, and they round-trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.fusion import weighted_concat
from core.heads import (
    CHECKPOINT_NAME,
    HEAD_KINDS,
    LOSSES,
    HeadConfig,
    TrainedHead,
    build_head,
    epoch_batches,
    stratified_split,
    train_fusion_head,
)
from core.metrics import evaluate
from core.progress import JobCancelled, Reporter

K = 10
pytestmark = pytest.mark.usefixtures("one_thread")


def two_noisy_models(per_class: int, seed: int, classes: int = 6):
    """Two "models" whose few class-signal dimensions drown in wide nuisance dimensions: a plain concat
    ranks mostly by nuisance, a head can learn to project it away."""
    rng = np.random.default_rng(1234)  # the same centroids for every split
    centroids = [rng.normal(size=(classes, 4)), rng.normal(size=(classes, 3))]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    models = []
    for c, nuisance in zip(centroids, (12, 9)):
        signal = c[labels] + 0.6 * rng.normal(size=(len(labels), c.shape[1]))
        models.append(np.hstack([signal, 1.5 * rng.normal(size=(len(labels), nuisance))]).astype(np.float32))
    return models, labels


@pytest.fixture(scope="module")
def data():
    train, y_train = two_noisy_models(40, seed=1)
    evals, y_eval = two_noisy_models(20, seed=2)
    return train, y_train, evals, y_eval


def small(**overrides) -> HeadConfig:
    values = dict(kind="mlp", out_dim=32, hidden_dim=64, loss="normalized_softmax", epochs=12, lr=2e-3, batch_size=48,
                  patience=12, k=K, seed=0)
    values.update(overrides)
    return HeadConfig(**values)


def test_training_lowers_loss_and_beats_the_concat_on_eval(data, device):
    train, y_train, evals, y_eval = data
    head = train_fusion_head(train, y_train, small(), eval_embeddings=evals, eval_labels=y_eval, device=device)
    losses = [row["loss"] for row in head.history]
    assert losses[-1] < 0.7 * losses[0]
    concat = evaluate(weighted_concat(evals, [1, 1]), y_eval, K)["map@k"]
    fused = evaluate(head.embed(evals), y_eval, K)["map@k"]
    assert fused > concat + 0.1
    assert fused > head.history[0]["eval_map"]
    out = head.embed(evals)
    assert out.shape == (len(y_eval), 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_head_and_loss_trains(data, kind, loss):
    train, y_train, evals, _ = data
    head = train_fusion_head(train, y_train, small(kind=kind, loss=loss, epochs=2))
    assert len(head.history) == 2 and all(np.isfinite(r["loss"]) for r in head.history)
    width = 28 if kind == "learned_ratio" else 32
    assert head.embed(evals).shape == (len(evals[0]), width)


def test_learned_ratio_is_a_weighted_concat():
    x = [np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32), np.ones((5, 3), np.float32)]
    head = build_head(HeadConfig(kind="learned_ratio"), [4, 3])
    with torch.no_grad():
        head.log_weights.copy_(torch.log(torch.tensor([2.0, 0.5])))
    state = {k: v.clone() for k, v in head.state_dict().items()}
    trained = TrainedHead(HeadConfig(kind="learned_ratio"), [4, 3], state)
    np.testing.assert_allclose(trained.embed(x), weighted_concat(x, [2.0, 0.5]), atol=1e-6)


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(5), [10, 20, 30, 2, 1])
    fit, val = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == len(labels)
    assert [int((labels[val] == c).sum()) for c in range(5)] == [1, 2, 3, 1, 0]
    again, _ = stratified_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(fit, again)


def test_class_balanced_batches():
    labels = np.repeat(np.arange(8), 10)
    batches = epoch_batches(labels, 16, 4, np.random.default_rng(0))
    for b in batches:
        counts = np.bincount(labels[b], minlength=8)
        assert sorted(set(counts.tolist()) - {0}) == [4] and (counts > 0).sum() == 4


def test_overlapping_eval_rows_are_refused_before_training(data):
    train, y_train, evals, y_eval = data
    train_rows = np.arange(len(y_train))
    eval_rows = np.arange(len(y_train), len(y_train) + len(y_eval))
    head = train_fusion_head(train, y_train, small(epochs=1), eval_embeddings=evals, eval_labels=y_eval,
                             train_rows=train_rows, eval_rows=eval_rows)
    assert head.split["eval"] == len(y_eval)
    leaked = eval_rows.copy()
    leaked[3] = train_rows[7]
    seen = []
    with pytest.raises(ValueError, match="eval-split rows"):
        train_fusion_head(train, y_train, small(epochs=1), eval_embeddings=evals, eval_labels=y_eval,
                          train_rows=train_rows, eval_rows=leaked, reporter=Reporter(on_metrics=seen.append))
    assert seen == []  # refused before a single epoch ran


def test_cancel_then_resume_equals_uninterrupted(data, tmp_path):
    train, y_train, evals, y_eval = data
    config = small(epochs=5, patience=5)
    full = train_fusion_head(train, y_train, config, eval_embeddings=evals, eval_labels=y_eval)

    epochs_seen = []
    stop_after_two = Reporter(on_metrics=epochs_seen.append, is_cancelled=lambda: len(epochs_seen) >= 2)
    with pytest.raises(JobCancelled):
        train_fusion_head(train, y_train, config, eval_embeddings=evals, eval_labels=y_eval,
                          reporter=stop_after_two, checkpoint_dir=tmp_path)
    assert len(epochs_seen) == 2 and (tmp_path / CHECKPOINT_NAME).exists()

    resumed_epochs = []
    resumed = train_fusion_head(train, y_train, config, eval_embeddings=evals, eval_labels=y_eval,
                                reporter=Reporter(on_metrics=resumed_epochs.append), checkpoint_dir=tmp_path)
    assert [r["epoch"] for r in resumed_epochs] == [3, 4, 5]
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]
    assert resumed.best_epoch == full.best_epoch
    for name, tensor in full.state.items():
        torch.testing.assert_close(resumed.state[name], tensor)

    # a different config never resumes from someone else's checkpoint: it starts clean
    other = train_fusion_head(train, y_train, small(epochs=1, lr=1e-3), checkpoint_dir=tmp_path)
    assert [r["epoch"] for r in other.history] == [1]


def test_save_load_round_trip(data, tmp_path):
    train, y_train, evals, _ = data
    head = train_fusion_head(train, y_train, small(kind="project_concat", epochs=2), model_names=["a", "b"])
    folder = head.save(tmp_path / "head")
    assert (folder / "head.safetensors").exists() and (folder / "head.json").exists()
    loaded = TrainedHead.load(folder)
    assert loaded.config == head.config and loaded.model_names == ["a", "b"]
    np.testing.assert_array_equal(loaded.embed(evals), head.embed(evals))
    with pytest.raises(ValueError, match="fuses 2 models"):
        loaded.embed(evals[:1])


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of"):
        HeadConfig(kind="transformer")
    with pytest.raises(ValueError, match="unknown head settings"):
        HeadConfig.from_dict({"kind": "mlp", "epochz": 3})
