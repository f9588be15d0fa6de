"""Device resolution shared by every command: "auto" (CUDA when torch sees one, else CPU), "cpu" or "cuda"."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """The torch device for `name`; ValueError when CUDA is asked for and torch sees none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def bind_thread_device(device: torch.device | str) -> None:
    """Make `device` the calling thread's current CUDA device (no-op for the CPU). CUDA's current device is per
    thread and a new thread starts on device 0: a worker thread that builds DALI pipelines or launches kernels
    for rank r must call this with cuda:r first."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
