import os
import re

import numpy as np
import pytest
import timm.data
import torch

import core.extract
from core.cache import CorruptEmbeddings, EmbeddingCache
from core.datasets import DatasetError, ImageSet, open_image_folder
from core.extract import extract_embeddings
from core.models import cache_key_for, load_model
from core.progress import JobCancelled, Reporter

MODELS = ["random:test_vit", "random:test_efficientnet"]


@pytest.fixture
def counted_loads(monkeypatch):
    """Counts real load_model calls made by extraction (the real loader still runs)."""
    calls = []

    def counting(name, device="cpu", **options):
        calls.append(name)
        return load_model(name, device, **options)

    monkeypatch.setattr(core.extract, "load_model", counting)
    return calls


def test_two_models_then_cache_hit_loads_nothing(small_demo, workspace, counted_loads, monkeypatch):
    cache = EmbeddingCache(workspace.embeddings)
    events = []
    first = extract_embeddings(small_demo, MODELS, cache, batch_size=16,
                               reporter=Reporter(on_progress=lambda f, m: events.append((f, m))))
    assert counted_loads == MODELS
    assert list(first) == MODELS
    for name, embedding_set in first.items():
        array = embedding_set.load()
        assert array.shape == (len(small_demo), embedding_set.dim) and array.dtype == np.float32
        assert embedding_set.n == len(small_demo) and embedding_set.model_name == name
        assert np.isfinite(array).all()
    assert any("60/60 images" in m for _, m in events) and events[-1][0] == 1.0
    messages = [m for _, m in events]
    assert any(re.fullmatch(r"random:test_vit, random:test_efficientnet: \d+/60 images, [\d.]+ img/s, ETA \d+ s", m)
               for m in messages)
    assert any(re.fullmatch(r"loaded random:test_vit in [\d.]+ s \(1/2\)", m) for m in messages)
    assert re.fullmatch(r"2 models ready \(0 from cache\); models loaded in [\d.]+ s, then 60 images at [\d.]+ img/s",
                        messages[-1])
    fractions = [f for f, m in events if "images" in m]
    assert fractions == sorted(fractions)

    import timm
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built on a cache hit"))
    second = extract_embeddings(small_demo, MODELS, cache)
    assert counted_loads == MODELS  # no new loads
    assert second == first


def test_rows_follow_dataset_order_and_match_single_image_embedding(small_demo, workspace, device):
    """Batched extraction on `device` against each image embedded alone on the CPU in fp32: equal on the CPU,
    within bf16 autocast's rounding on CUDA."""
    cache = EmbeddingCache(workspace.embeddings)
    result = extract_embeddings(small_demo, ["random:test_efficientnet"], cache, batch_size=7, device=device)
    array = result["random:test_efficientnet"].load()
    model = load_model("random:test_efficientnet")
    with torch.inference_mode():
        for row in [0, 13, 59]:
            one = model.embed(model.preprocess(small_demo.load_image(row))[None])[0].numpy()
            if device == "cpu":
                np.testing.assert_allclose(array[row], one, rtol=1e-4, atol=1e-5)
            else:
                assert np.dot(array[row], one) / np.linalg.norm(array[row]) / np.linalg.norm(one) > 0.98


def test_workers_give_the_same_embeddings(small_demo, tmp_path):
    plain = extract_embeddings(small_demo, ["random:test_vit"], EmbeddingCache(tmp_path / "a"), batch_size=16)
    workers = extract_embeddings(small_demo, ["random:test_vit"], EmbeddingCache(tmp_path / "b"),
                                 batch_size=16, num_workers=2)
    np.testing.assert_allclose(plain["random:test_vit"].load(), workers["random:test_vit"].load(), rtol=1e-5, atol=1e-6)


def test_cancel_stops_between_batches_and_writes_nothing(small_demo, workspace):
    cache = EmbeddingCache(workspace.embeddings)
    batches = []
    reporter = Reporter(on_progress=lambda f, m: batches.append(m) if "images" in m else None,
                        is_cancelled=lambda: len(batches) >= 2)
    with pytest.raises(JobCancelled):
        extract_embeddings(small_demo, MODELS, cache, batch_size=8, reporter=reporter)
    assert len(batches) == 2  # stopped right after the second batch, not at the end
    assert cache.list() == []
    assert all(cache.get(small_demo.fingerprint, cache_key_for(n)) is None for n in MODELS)
    assert not list(workspace.embeddings.iterdir())



@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_image_that_breaks_after_open_fails_with_its_name(image_folder, tmp_path, num_workers):
    imageset = open_image_folder(image_folder)
    broken = imageset.paths[5]
    with open(broken, "r+b") as handle:  # truncated after the dataset was opened and checked
        handle.truncate(os.path.getsize(broken) // 2)
    with pytest.raises(DatasetError) as error:
        extract_embeddings(imageset, ["random:test_vit"], EmbeddingCache(tmp_path / "cache"), batch_size=4,
                           num_workers=num_workers)
    message = str(error.value)
    assert broken in message and "(row 5)" in message and "Remove or replace the file" in message
    assert "Traceback" not in message


def test_a_batch_that_cannot_be_preprocessed_fails_with_its_rows(small_demo, tmp_path, monkeypatch):
    def broken_transform(images):
        raise ValueError("height and width must be > 0")

    def loading(name, device="cpu", **options):
        model = load_model(name, device, **options)
        model.batch_transform = broken_transform
        return model

    monkeypatch.setattr(core.extract, "load_model", loading)
    with pytest.raises(DatasetError) as error:
        extract_embeddings(small_demo, ["random:test_vit"], EmbeddingCache(tmp_path), batch_size=8)
    message = str(error.value)
    assert "rows 0..7" in message and small_demo.paths[0] in message and "could not be preprocessed" in message
    assert "ValueError: height and width must be > 0" in message and "remove the odd one" in message

def test_a_corrupted_set_is_refused_until_force_reextracts_it(small_demo, workspace):
    cache = EmbeddingCache(workspace.embeddings)
    name = "random:test_vit"
    first = extract_embeddings(small_demo, [name], cache)[name]
    original = np.array(first.load())
    view = np.load(first.path, mmap_mode="r+")
    view[:] = original[::-1]  # other numbers, same shape, written in place
    view.flush()
    del view
    stat = os.stat(first.path)
    os.utime(first.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a later rewrite than this process saw
    with pytest.raises(CorruptEmbeddings, match="--force"):
        extract_embeddings(small_demo, [name], cache)
    again = extract_embeddings(small_demo, [name], cache, force=True)[name]
    np.testing.assert_array_equal(again.load(), original)


LITE = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]


def test_the_packaged_models_fast_path_matches_the_per_image_pil_and_torch_path(small_demo, tmp_path):
    """Extraction (decode once, batched preprocessing, each model's CPU backend) on real demo images of every
    class against the way extraction ran before: timm's PIL transform per image, the fp32 torch module."""
    rows = np.arange(0, len(small_demo), 6)
    subset = ImageSet(small_demo.name, tuple(small_demo.paths[r] for r in rows), small_demo.labels[rows],
                      small_demo.class_names, small_demo.splits[rows], f"{small_demo.fingerprint}-every-6th")
    cache = EmbeddingCache(tmp_path)
    found = extract_embeddings(subset, LITE, cache, batch_size=4)
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == len(LITE)  # exported once, kept beside the cache
    for name in LITE:
        module = load_model(name, cpu_backend="eager").module
        pil_transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=module),
                                                   is_training=False)
        x = torch.stack([pil_transform(subset.load_image(row)) for row in range(len(subset))])
        with torch.inference_mode():
            before = module.forward_head(module.forward_features(x), pre_logits=True).numpy().astype(np.float64)
        now = found[name].load().astype(np.float64)
        cosine = (before * now).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(now, axis=1)
        assert cosine.min() >= 0.9999, (name, cosine.min())
