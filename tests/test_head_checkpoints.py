"""Head training never trusts its checkpoint folder, and never finishes on a score that means nothing.

A checkpoint is only resumed when its JSON record matches this very training and its tensors match
the record; anything else (an old pickle, a foreign or tampered checkpoint) is reported and training
starts fresh, giving exactly the weights of a run that never saw the folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch

from core.heads import (
    CHECKPOINT_NAME,
    CHECKPOINT_TENSORS,
    HeadConfig,
    HeadTrainingError,
    clear_checkpoint,
    min_train_per_class,
    stratified_split,
    train_fusion_head,
)
from core.progress import JobCancelled, Reporter
from tests.reference import cosines, metrics_from_similarities

K = 5
pytestmark = pytest.mark.usefixtures("one_thread")


def two_models(per_class: int, classes: int = 3, seed: int = 0):
    """Two small "models" with a class signal plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    models = []
    for dim in (6, 5):
        centroids = rng.normal(size=(classes, dim))
        models.append((centroids[labels] + 0.8 * rng.normal(size=(len(labels), dim))).astype(np.float32))
    return models, labels


def tiny(**overrides) -> HeadConfig:
    values = dict(kind="mlp", out_dim=8, hidden_dim=16, loss="normalized_softmax", epochs=4, batch_size=16,
                  patience=4, k=K, seed=0)
    values.update(overrides)
    return HeadConfig(**values)


class Recorder(Reporter):
    """Keeps every progress message and curve row; cancels once `stop_after` epochs have run."""

    def __init__(self, stop_after: int | None = None):
        self.messages: list[str] = []
        self.rows: list[dict] = []
        super().__init__(on_progress=lambda fraction, message: self.messages.append(message),
                         on_metrics=self.rows.append,
                         is_cancelled=lambda: stop_after is not None and len(self.rows) >= stop_after)


@pytest.fixture(scope="module")
def data():
    return two_models(20)


@pytest.fixture(scope="module")
def uninterrupted(data):
    """The reference: the same training with no checkpoint folder at all."""
    models, labels = data
    return train_fusion_head(models, labels, tiny())


def assert_fresh_and_complete(head, reference):
    assert [row["epoch"] for row in head.history] == [1, 2, 3, 4]
    assert head.best_epoch == reference.best_epoch
    for name, tensor in reference.state.items():
        torch.testing.assert_close(head.state[name], tensor, rtol=0, atol=0)


def checkpoint_after_two_epochs(data, folder):
    """A genuine checkpoint of tiny() on `data`, left by a job cancelled after epoch 2."""
    models, labels = data
    with pytest.raises(JobCancelled):
        train_fusion_head(models, labels, tiny(), reporter=Recorder(stop_after=2), checkpoint_dir=folder)
    assert json.loads((folder / CHECKPOINT_NAME).read_text())["epoch"] == 2


class TouchMarker:
    """Unpickling this runs a shell command that creates `marker`: what a crafted checkpoint.pt can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_pickle_is_never_loaded(data, uninterrupted, tmp_path):
    armed = tmp_path / "proof"
    pickle.loads(pickle.dumps(TouchMarker(armed)))  # in memory, to show the planted payload is live
    assert armed.exists()

    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"fingerprint": "anything", "state": TouchMarker(marker)}, folder / "checkpoint.pt")

    models, labels = data
    reporter = Recorder()
    head = train_fusion_head(models, labels, tiny(), reporter=reporter, checkpoint_dir=folder)
    assert not marker.exists()
    assert not (folder / "checkpoint.pt").exists()
    assert any("checkpoint.pt" in m and "never loaded" in m and "starts fresh" in m for m in reporter.messages)
    assert [row["epoch"] for row in reporter.rows] == [1, 2, 3, 4]
    assert_fresh_and_complete(head, uninterrupted)


def test_a_valid_checkpoint_resumes_beside_a_planted_pickle(data, uninterrupted, tmp_path):
    checkpoint_after_two_epochs(data, tmp_path)
    marker = tmp_path / "pwned"
    torch.save(TouchMarker(marker), tmp_path / "checkpoint.pt")
    models, labels = data
    reporter = Recorder()
    head = train_fusion_head(models, labels, tiny(), reporter=reporter, checkpoint_dir=tmp_path)
    assert not marker.exists()
    assert [row["epoch"] for row in reporter.rows] == [3, 4]
    for name, tensor in uninterrupted.state.items():
        torch.testing.assert_close(head.state[name], tensor, rtol=0, atol=0)


def test_a_checkpoint_of_another_training_is_ignored_before_its_tensors_are_read(data, uninterrupted, tmp_path):
    checkpoint_after_two_epochs(data, tmp_path)
    record = json.loads((tmp_path / CHECKPOINT_NAME).read_text())
    record["fingerprint"] = "0" * 16
    (tmp_path / CHECKPOINT_NAME).write_text(json.dumps(record))
    (tmp_path / CHECKPOINT_TENSORS).write_bytes(b"\xff" * 64)  # would fail to parse, were it opened

    models, labels = data
    reporter = Recorder()
    head = train_fusion_head(models, labels, tiny(), reporter=reporter, checkpoint_dir=tmp_path)
    (message,) = [m for m in reporter.messages if "ignored the checkpoint" in m]
    assert "another head config or other training data" in message and "starts fresh" in message
    assert_fresh_and_complete(head, uninterrupted)


def flip_a_byte_near_the_end(path):
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x55  # inside the last tensor's data, past the header
    path.write_bytes(bytes(blob))


def truncate(path):
    path.write_bytes(path.read_bytes()[:40])


def replace_with_a_header_that_lies(path):
    """A consistent forgery: the record's hash updated to match bytes that are no safetensors file."""
    blob = (1 << 40).to_bytes(8, "little") + b"{}"
    path.write_bytes(blob)
    record_path = path.parent / CHECKPOINT_NAME
    record = json.loads(record_path.read_text())
    record["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
    record_path.write_text(json.dumps(record))


@pytest.mark.parametrize("tamper, reason", [
    (flip_a_byte_near_the_end, "does not match its record"),
    (truncate, "does not match its record"),
    (lambda path: path.unlink(), "cannot be read"),
    (lambda path: (path.parent / CHECKPOINT_NAME).write_text("{not json"), "cannot be read"),
    (lambda path: (path.parent / CHECKPOINT_NAME).write_text("[1, 2]"), "is not a"),
    (replace_with_a_header_that_lies, "ignored the checkpoint"),
])
def test_a_damaged_checkpoint_is_ignored_with_a_reason(data, uninterrupted, tmp_path, tamper, reason):
    checkpoint_after_two_epochs(data, tmp_path)
    tamper(tmp_path / CHECKPOINT_TENSORS)
    models, labels = data
    reporter = Recorder()
    head = train_fusion_head(models, labels, tiny(), reporter=reporter, checkpoint_dir=tmp_path)
    assert any(reason in m and "starts fresh" in m for m in reporter.messages), reporter.messages
    assert_fresh_and_complete(head, uninterrupted)
    # the fresh run's own checkpoint replaced the damaged one: the next call resumes it at the end
    again = Recorder()
    train_fusion_head(models, labels, tiny(), reporter=again, checkpoint_dir=tmp_path)
    assert again.rows == [] and not any("ignored" in m for m in again.messages)


def test_clear_checkpoint_removes_every_file(data, tmp_path):
    checkpoint_after_two_epochs(data, tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"old")
    clear_checkpoint(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- a validation part that can score --------------------------------------------------------------


def test_min_train_per_class_hand_computed():
    # val gets round(fraction * n) of a class, at least 1, never all: 2 needs 0.1*15 = 1.5 -> 2, 0.25*6, 0.5*3
    assert [min_train_per_class(f) for f in (0.1, 0.25, 0.5)] == [15, 6, 3]
    for n, expected in ((14, 1), (15, 2)):
        _, val = stratified_split(np.zeros(n, dtype=int), 0.1, seed=0)
        assert len(val) == expected


def test_ten_train_images_per_class_fail_before_any_epoch(tmp_path):
    models, labels = two_models(10)
    reporter = Recorder()
    with pytest.raises(HeadTrainingError) as error:
        train_fusion_head(models, labels, tiny(), reporter=reporter, checkpoint_dir=tmp_path)
    message = str(error.value)
    assert "at least 2 images in each of at least 2 classes" in message
    assert "At val_fraction=0.1 that takes at least 15 train images per class" in message
    assert "the largest class here has 10" in message
    assert reporter.rows == [] and list(tmp_path.iterdir()) == []
    assert isinstance(error.value, ValueError)


def test_a_validation_part_that_can_score_gives_a_finite_best_val():
    models, labels = two_models(15)
    head = train_fusion_head(models, labels, tiny())
    assert head.split == {"fit": 39, "val": 6, "eval": 0}
    assert np.isfinite(head.best_val)
    assert head.best_val == max(row["val_map"] for row in head.history)
    assert head.best_val == head.history[head.best_epoch - 1]["val_map"]
    # the kept weights score best_val on the validation rows, by the slow float64 reference
    _, val = stratified_split(labels, 0.1, seed=0)
    embedded = head.embed([m[val] for m in models])
    reference = metrics_from_similarities(cosines(embedded), labels[val], K)
    assert reference["n_queries"] == 6
    assert head.best_val == pytest.approx(reference["map@k"], abs=1e-12)


def test_a_nan_validation_score_is_never_an_improvement(data):
    models, labels = data
    # lr this large blows the head up after its first epoch: later epochs embed to NaN
    head = train_fusion_head(models, labels, tiny(kind="project_concat", lr=1e10, epochs=6, patience=3))
    scores = [row["val_map"] for row in head.history]
    assert np.isfinite(scores[0]) and np.isnan(scores[1:]).all()
    assert len(scores) == 4  # epoch 1, then three NaN epochs without improvement: patience ran out
    assert head.best_epoch == 1 and head.best_val == scores[0]
    assert np.isfinite(head.embed(models)).all()


def test_a_run_without_any_finite_validation_score_fails(data, tmp_path):
    models, labels = data
    reporter = Recorder()
    with pytest.raises(HeadTrainingError, match=r"none of the 3 epochs gave a finite validation map@5.*Lower lr"):
        train_fusion_head(models, labels, tiny(lr=1e30, epochs=3), reporter=reporter, checkpoint_dir=tmp_path)
    assert [np.isnan(row["val_map"]) for row in reporter.rows] == [True, True, True]
