"""Where a run computes: the one rule for "auto", whether a device exists here, and the
device-specific settings of the model and the backends (their measured effect:
docs/performance.md)."""
from __future__ import annotations

import torch

from .methods import Autoencoder

DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when this machine has it, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_problem(name: str) -> str | None:
    """Why the device `name` cannot be used on this machine, in a few words; None if it can."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "not a device name (auto, cpu, cuda, cuda:<index>, mps)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "this machine has no usable CUDA GPU (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has only {torch.cuda.device_count()} CUDA device(s)"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "this machine has no usable MPS device"
    elif device.type not in DEVICE_TYPES:
        return f"device type {device.type!r} is not supported (auto, cpu, cuda, mps)"
    return None


def tune_backends(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per shape and keep the fastest
    (the shapes of a run are fixed). A process-wide setting, as in nanoGPT."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def place_model(model: Autoencoder, device: torch.device, *,
                channels_last: bool = True) -> Autoencoder:
    """The model on `device`; on CUDA its convolution weights in channels_last (NHWC), the
    layout of cuDNN's tensor-core kernels. Values and checkpoints are unchanged.
    `channels_last=False` for torch.compile: inductor (torch 2.11) failed a stride assertion
    on the channels_last conv model's backward."""
    model = model.to(device)
    if device.type == "cuda" and channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
