"""Query-level views (explorer) and disk thumbnails, on real arrays, files and models."""
from __future__ import annotations

import os

import numpy as np
import pytest

from tests.images import write_image
from core import explorer, thumbnails
from core.fusion import weighted_concat
from core.methods import Method
from core.vectors import l2_normalize
from core.metrics import per_query_scores


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    a = rng.normal(size=(40, 16)).astype(np.float32) + labels[:, None]
    b = rng.normal(size=(40, 8)).astype(np.float32)
    return {"a": a, "b": b}, labels


def brute_force(x: np.ndarray, q: int, k: int):
    sims = (x @ x[q]).astype(np.float64)
    sims[q] = -np.inf
    order = np.lexsort((np.arange(len(x)), -sims))[:k]
    return sims[order], order


def test_method_embeddings_match_core_fusion(data):
    arrays, _ = data
    rows = np.arange(5, 40)
    single = Method.single("a").embeddings(arrays, rows)
    np.testing.assert_allclose(single, l2_normalize(arrays["a"][rows]))
    concat = Method.concat(("a", "b"), (2.0, 1.0)).embeddings(arrays, rows)
    np.testing.assert_allclose(concat, weighted_concat([arrays["a"][rows], arrays["b"][rows]], [2.0, 1.0]))


def test_neighbours_leave_the_query_out_and_match_brute_force(data):
    arrays, _ = data
    x = Method.concat(("a", "b"), (1.0, 3.0)).embeddings(arrays, np.arange(40))
    for q in (0, 17, 39):
        sims, ids = explorer.neighbours(x, q, 7)
        ref_sims, ref_ids = brute_force(x, q, 7)
        assert q not in ids
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(sims, ref_sims, rtol=1e-5, atol=1e-6)


def test_changed_and_hardest_queries(data):
    arrays, labels = data
    good = per_query_scores(arrays["a"], labels, 5)
    bad = per_query_scores(arrays["b"], labels, 5)
    fixed = explorer.changed_queries(good, bad, improved=True)
    broke = explorer.changed_queries(good, bad, improved=False)
    diff = good.ap_at_k - bad.ap_at_k
    assert {p for p, _ in fixed} == set(np.flatnonzero(diff > 0))
    assert {p for p, _ in broke} == set(np.flatnonzero(diff < 0))
    assert [d for _, d in fixed] == sorted((d for _, d in fixed), reverse=True)
    hardest = explorer.hardest_queries(bad, limit=5)
    assert [v for _, v in hardest] == sorted(bad.ap_at_k)[:5]


def test_per_class_difference(data):
    arrays, labels = data
    a, b = per_query_scores(arrays["b"], labels, 5), per_query_scores(arrays["a"], labels, 5)
    rows = explorer.per_class_difference(a, b, labels, ["w", "x", "y", "z"])
    assert sorted(r["class"] for r in rows) == ["w", "x", "y", "z"]
    for r in rows:
        members = labels == "wxyz".index(r["class"])
        assert r["B - A"] == pytest.approx(b.ap_at_k[members].mean() - a.ap_at_k[members].mean())


def test_missing_embeddings_say_where_to_extract(tmp_path, small_demo):
    from core.cache import EmbeddingCache
    from core.extract import MissingEmbeddings, query_arrays
    with pytest.raises(MissingEmbeddings, match="Extract them on the 'Data & models' page"):
        query_arrays(EmbeddingCache(tmp_path / "cache"), small_demo, ["random:test_vit"])


def test_an_uploaded_image_embeds_like_extraction(tmp_path, small_demo):
    """The explorer's on-the-fly embedding of one image equals the cached extraction of the same image."""
    from core.cache import EmbeddingCache
    from core.extract import extract_embeddings
    from core.models import load_model
    name = "random:test_efficientnet"
    cached = extract_embeddings(small_demo, [name], EmbeddingCache(tmp_path / "cache"), device="cpu")[name].load()
    method = Method.single(name)
    vector = explorer.embed_image(small_demo.load_image(3), method, {name: load_model(name, "cpu")})
    np.testing.assert_allclose(vector[0], l2_normalize(cached[3:4])[0], rtol=1e-4, atol=1e-5)
    gallery = method.embeddings({name: cached}, np.arange(len(small_demo)))
    _, ids = explorer.search(gallery, vector, 3)
    assert ids[0] == 3


def test_thumbnails_are_cached_on_disk_until_the_file_changes(tmp_path):
    image = write_image(tmp_path / "img.png", seed=1, size=300)
    folder = tmp_path / "thumbs"
    first = thumbnails.thumbnail_path(folder, str(image), 64)
    assert first is not None and first.is_file()
    from PIL import Image
    with Image.open(first) as t:
        assert max(t.size) == 64
    assert thumbnails.thumbnail_path(folder, str(image), 64) == first
    os.utime(image, ns=(1, 1))
    changed = thumbnails.thumbnail_path(folder, str(image), 64)
    assert changed != first
    assert thumbnails.thumbnail_data_uri(folder, str(image), 64).startswith("data:image/png;base64,")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert thumbnails.thumbnail_path(folder, str(tmp_path / "broken.png")) is None


def test_tiny_images_are_upscaled(tmp_path):
    image = write_image(tmp_path / "tiny.png", seed=2, size=28)
    from PIL import Image
    with Image.open(thumbnails.thumbnail_path(tmp_path / "t", str(image), 128)) as t:
        assert max(t.size) >= 64


def test_one_query_ap_equals_the_full_evaluation(data):
    arrays, labels = data
    x = Method.concat(("a", "b"), (1.0, 2.0)).embeddings(arrays, np.arange(40))
    full = per_query_scores(x, labels, 5)
    for q in (0, 13, 39):
        one = explorer.query_ap(x, labels, q, 5)
        assert one["map@k"] == pytest.approx(full.ap_at_k[q])
        assert one["map@k_hits"] == pytest.approx(full.ap_at_k_hits[q])
        assert one["map@r"] == pytest.approx(full.ap_at_r[q])
        assert one["p@1"] == full.p_at_1[q]


def test_one_query_search_matches_the_default_backend(data):
    """The single-query backend gives exactly core.search's answer (order, ties by index)."""
    from core.search import top_k
    arrays, labels = data
    x = l2_normalize(np.round(arrays["a"], 1))  # rounding makes ties
    x = np.concatenate([x, x[:5]])  # exact duplicates too
    for q in (0, 3, 44):
        mine = top_k(x[q:q + 1], x, 12, backend=explorer.ONE_QUERY)
        reference = top_k(x[q:q + 1], x, 12)
        np.testing.assert_array_equal(mine[1], reference[1])
        np.testing.assert_allclose(mine[0], reference[0], rtol=1e-6)
    sims, ids, ap = explorer.query_view(x[:40], labels, 7, 5)
    assert len(ids) == 5 and 7 not in ids
    np.testing.assert_array_equal(ids, explorer.neighbours(x[:40], 7, 5)[1])
    assert ap["map@k"] == pytest.approx(per_query_scores(x[:40], labels, 5).ap_at_k[7])
