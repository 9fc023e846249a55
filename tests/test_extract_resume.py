"""Resumable extraction on real files: a cancel and a SIGKILLed process keep their finished shards, and
the next run decodes and embeds only the rest, ending with the same array as a one-shot extraction."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import core.extract
from core.cache import EmbeddingCache
from core.datasets import ImageSet, open_image_folder
from core.models import cache_key_for, load_model
from core.progress import JobCancelled, Reporter
from tests.images import write_image

ROOT = Path(__file__).resolve().parent.parent
MODEL = "random:test_vit"
OTHER = "random:test_byobnet"
SHARD, BATCH = 8, 4  # 40 images: shards of rows 0-7, 8-15, ..., 32-39; two batches per shard


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("forty")
    for c in range(4):
        for i in range(10):
            write_image(root / f"class{c}" / f"{i:02d}.png", seed=100 * c + i, size=24)
    return root


@pytest.fixture(scope="module")
def one_shot(folder, tmp_path_factory) -> dict[str, np.ndarray]:
    """Each model's embeddings from a single uninterrupted extraction (default shard size, same batches)."""
    cache = EmbeddingCache(tmp_path_factory.mktemp("one-shot"))
    sets = core.extract.extract_embeddings(open_image_folder(folder), [MODEL, OTHER], cache, device="cpu",
                                           batch_size=BATCH)
    return {name: np.array(found.load()) for name, found in sets.items()}


@pytest.fixture
def counted(monkeypatch):
    """Rows each model embeds and rows decoded, as the extraction really runs them (num_workers=0)."""
    embedded: dict[str, int] = {}
    decoded: list[int] = []

    def counting_load(name, device="cpu", **options):
        model = load_model(name, device, **options)
        embed = model.embed

        def counting_embed(batch):
            embedded[name] = embedded.get(name, 0) + len(batch)
            return embed(batch)

        model.embed = counting_embed
        return model

    real_load_image = ImageSet.load_image

    def counting_load_image(self, row):
        decoded.append(row)
        return real_load_image(self, row)

    monkeypatch.setattr(core.extract, "load_model", counting_load)
    monkeypatch.setattr(ImageSet, "load_image", counting_load_image)
    return embedded, decoded


def assert_same_embeddings(actual, expected):
    """Equal up to float32 rounding: CPU kernels may round differently between processes and runs (2e-6 was
    seen), while a lost, repeated or shifted row differs by far more than this."""
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def shard_markers(cache_root: Path) -> list[str]:
    return sorted(marker.name for marker in cache_root.glob("*.parts/*.json"))


def extract(imageset, models, cache, **kwargs):
    return core.extract.extract_embeddings(imageset, models, cache, device="cpu", batch_size=BATCH,
                                           shard_size=SHARD, **kwargs)


def test_cancel_keeps_finished_shards_and_the_next_run_computes_only_the_rest(folder, one_shot, counted, tmp_path):
    embedded, decoded = counted
    imageset, cache = open_image_folder(folder), EmbeddingCache(tmp_path)
    batches = []
    reporter = Reporter(on_progress=lambda f, m: batches.append(m) if "img/s" in m else None,
                        is_cancelled=lambda: len(batches) >= 5)
    with pytest.raises(JobCancelled):
        extract(imageset, [MODEL], cache, reporter=reporter)
    # Five batches of four: shards 0-7 and 8-15 are committed, the half of 16-23 is lost.
    assert embedded == {MODEL: 20} and decoded == list(range(20))
    assert shard_markers(tmp_path) == ["0000000000-0000000008.json", "0000000008-0000000016.json"]
    assert cache.get(imageset.fingerprint, cache_key_for(MODEL)) is None and cache.list() == []

    embedded.clear(), decoded.clear()
    messages = []
    result = extract(imageset, [MODEL], cache, reporter=Reporter(on_progress=lambda f, m: messages.append(m)))
    assert embedded == {MODEL: 24} and decoded == list(range(16, 40))
    assert_same_embeddings(result[MODEL].load(), one_shot[MODEL])
    assert any("resuming, 16/40 images" in m for m in messages)
    assert any(m.startswith(f"{MODEL}: 40/40 images, ") and " img/s, ETA " in m for m in messages)
    assert shard_markers(tmp_path) == [] and not list(tmp_path.glob("*.parts"))
    assert cache.list() == [result[MODEL]]


def test_each_batch_is_decoded_once_for_every_model_that_misses_its_shard(folder, one_shot, counted, tmp_path):
    embedded, decoded = counted
    imageset, cache = open_image_folder(folder), EmbeddingCache(tmp_path)
    batches = []
    with pytest.raises(JobCancelled):
        extract(imageset, [MODEL], cache, reporter=Reporter(
            on_progress=lambda f, m: batches.append(m) if "img/s" in m else None,
            is_cancelled=lambda: len(batches) >= 4))
    embedded.clear(), decoded.clear()

    result = extract(imageset, [MODEL, OTHER], cache)
    # MODEL misses shards 16..39, OTHER misses everything: every row decoded once, each model fed its part.
    assert decoded == list(range(40))
    assert embedded == {MODEL: 24, OTHER: 40}
    for name in (MODEL, OTHER):
        assert_same_embeddings(result[name].load(), one_shot[name])


def test_force_recomputes_everything(folder, one_shot, counted, tmp_path):
    embedded, _ = counted
    imageset, cache = open_image_folder(folder), EmbeddingCache(tmp_path)
    extract(imageset, [MODEL], cache)
    embedded.clear()
    extract(imageset, [MODEL], cache)
    assert embedded == {}
    result = extract(imageset, [MODEL], cache, force=True)
    assert embedded == {MODEL: 40}
    assert_same_embeddings(result[MODEL].load(), one_shot[MODEL])


# Runs extract_embeddings in a real process with a model slowed down (0.2 s per batch) so that the test can
# kill it between shards. argv: image folder, cache folder.
SLOW_EXTRACTION = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import core.extract
from core.cache import EmbeddingCache
from core.datasets import open_image_folder
from core.models import load_model

def slow_load(name, device="cpu", **options):
    model = load_model(name, device, **options)
    embed = model.embed
    model.embed = lambda batch: (time.sleep(0.2), embed(batch))[1]
    return model

core.extract.load_model = slow_load
core.extract.extract_embeddings(open_image_folder(sys.argv[1]), [{MODEL!r}], EmbeddingCache(sys.argv[2]),
                                device="cpu", batch_size={BATCH}, shard_size={SHARD})
"""


def test_a_killed_extraction_process_resumes_from_its_committed_shards(folder, one_shot, counted, tmp_path):
    embedded, decoded = counted
    cache_root = tmp_path / "cache"
    log = tmp_path / "extract.log"
    process = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACTION, str(folder), str(cache_root)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    try:
        deadline = time.monotonic() + 60
        while len(shard_markers(cache_root)) < 2:
            assert process.poll() is None, f"the extraction process ended early:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no shard committed within 60 s"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    assert process.returncode == -signal.SIGKILL

    committed = shard_markers(cache_root)
    assert 2 <= len(committed) < 5, committed  # killed mid-run, not after it
    done_rows = SHARD * len(committed)
    assert committed == [f"{s:010d}-{s + SHARD:010d}.json" for s in range(0, done_rows, SHARD)]
    imageset, cache = open_image_folder(folder), EmbeddingCache(cache_root)
    assert cache.get(imageset.fingerprint, cache_key_for(MODEL)) is None and cache.list() == []

    result = extract(imageset, [MODEL], cache)
    assert embedded == {MODEL: 40 - done_rows} and decoded == list(range(done_rows, 40))
    assert_same_embeddings(result[MODEL].load(), one_shot[MODEL])
    assert not list(cache_root.glob("*.parts"))
