"""Exponential moving average of the model weights, kept in float32.

Works on plain tensors and on FSDP2's sharded DTensors alike (each rank averages its own shard), so the EMA
costs 4 bytes per parameter divided by the number of FSDP ranks, and is saved sharded with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * param, in float32, for every trainable parameter of `model`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: expected a value in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in _named_trainable(model)
        }

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(_named_trainable(model))
        if params.keys() != self.shadow.keys():
            raise ValueError("model: its parameters are not the ones this EMA was built from")
        shadow = list(self.shadow.values())
        new = [params[n].detach().to(torch.float32) for n in self.shadow]
        torch._foreach_lerp_(shadow, new, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())[:5]
            unexpected = sorted(state.keys() - self.shadow.keys())[:5]
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {unexpected}")
        for name, t in state.items():
            self.shadow[name].copy_(t)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into `model` (cast to each parameter's dtype)."""
        for name, p in _named_trainable(model):
            p.copy_(self.shadow[name].to(p.dtype))


def _named_trainable(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield clean_param_name(name), p


def clean_param_name(name: str) -> str:
    """Strip wrapper prefixes (DDP's module., torch.compile's _orig_mod., checkpoint wrappers)."""
    for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name
