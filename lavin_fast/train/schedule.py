"""Learning-rate schedule: linear warmup, then constant or cosine decay to min_lr."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str, lr: float, min_lr: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based: the factor used by the step-th update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        floor = min_lr / lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule: expected 'constant' or 'cosine', got {schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, steps: int, warmup_steps: int, schedule: str, lr: float, min_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose state (the step count) goes into checkpoints; the function is rebuilt from the config."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(s, steps=steps, warmup_steps=warmup_steps, schedule=schedule, lr=lr, min_lr=min_lr),
    )
