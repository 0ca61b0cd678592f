"""Which device to run on: one rule for training and generation."""

from __future__ import annotations

import re

import torch

DEVICE_NAMES = "auto, cpu, cuda, cuda:N, mps"


def check_device_name(name: str) -> None:
    """Raise ValueError unless `name` is one of the devices minilm runs on (DEVICE_NAMES)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ValueError(f"invalid choice {name!r} (allowed: {DEVICE_NAMES})")


def resolve_device(name: str = "auto", local_rank: int = 0, key: str = "device") -> torch.device:
    """auto: cuda, then mps, then cpu. A bare "cuda" means this process's GPU (torchrun's
    LOCAL_RANK). Raises ValueError, naming `key` (the setting it came from), for a name minilm
    does not run on or a device that isn't here."""
    try:
        check_device_name(name)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}: {name!r} requested but CUDA is not available")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{key}: {name!r} requested but there are only "
                             f"{torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{key}: {name!r} requested but MPS is not available")
    return device
