import numpy as np
import pytest
import torch

import core.extract
from core.cache import EmbeddingCache
from core.extract import extract_embeddings, pick_device
from core.models import load_model
from core.progress import JobCancelled, Reporter

MODELS = ["random:test_vit", "random:test_efficientnet"]


@pytest.fixture
def counted_loads(monkeypatch):
    """Counts real load_model calls made by extraction (the real loader still runs)."""
    calls = []

    def counting(name, device="cpu"):
        calls.append(name)
        return load_model(name, device)

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
    fractions = [f for f, m in events if "images" in m]
    assert fractions == sorted(fractions)

    import timm
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("a model was built on a cache hit"))
    second = extract_embeddings(small_demo, MODELS, cache)
    assert counted_loads == MODELS  # no new loads
    assert second == first


def test_rows_follow_dataset_order_and_match_single_image_embedding(small_demo, workspace):
    cache = EmbeddingCache(workspace.embeddings)
    result = extract_embeddings(small_demo, ["random:test_efficientnet"], cache, batch_size=7)
    array = result["random:test_efficientnet"].load()
    model = load_model("random:test_efficientnet")
    with torch.inference_mode():
        for row in [0, 13, 59]:
            one = model.embed(model.preprocess(small_demo.load_image(row))[None])[0].numpy()
            np.testing.assert_allclose(array[row], one, rtol=1e-4, atol=1e-5)


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
    from core.models import cache_key_for
    assert all(cache.get(small_demo.fingerprint, cache_key_for(n)) is None for n in MODELS)
    assert not list(workspace.embeddings.iterdir())


def test_cache_never_returns_an_uncommitted_file(tmp_path):
    cache = EmbeddingCache(tmp_path)
    stored = cache.put("fp", "m", "key", np.arange(6, dtype=np.float64).reshape(2, 3))
    assert stored.dtype == "float32" and cache.get("fp", "key") == stored
    view = stored.load()
    assert not view.flags.writeable and view.dtype == np.float32
    np.testing.assert_array_equal(view, [[0, 1, 2], [3, 4, 5]])
    # A crash after the .npy was replaced but before the sidecar: the marker is gone, nothing is returned.
    sidecar = tmp_path / (stored.path.rsplit("/", 1)[1].replace(".npy", ".json"))
    sidecar.unlink()
    assert cache.get("fp", "key") is None and cache.list() == []
    # A sidecar that disagrees with the data file (torn write) is not returned either.
    cache.put("fp", "m", "key", np.zeros((2, 3)))
    np.save(stored.path, np.zeros((5, 3), dtype=np.float32))
    assert cache.get("fp", "key") is None
    assert cache.get("other-fp", "key") is None


def test_pick_device():
    assert pick_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            pick_device("cuda")
