"""Which device work runs on: the one place that decides between CUDA and the CPU."""
from __future__ import annotations


def resolve_device(device: str | None = None) -> str:
    """`device` as given (checked), else "cuda" when torch sees a GPU, else "cpu"."""
    import torch  # optional at import time: pages and the CLI import this module without loading torch

    if device is None or device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but torch sees no CUDA GPU here; use device='cpu'.")
    return device
