"""A small stand-in velocity model with the J-DiT's interface (x, t, cond) -> v and a `blocks` ModuleList.

Used by the trainer's tests and CPU benchmarks where the real J-DiT would only add time: it mixes the
context by attention-free pooling, so any number of context frames (the null context has 2) works.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StandInBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(h))))


class StandInVelocity(nn.Module):
    """v = MLP(x token, pooled context, time features) per latent pixel; float32 output like the J-DiT."""

    def __init__(self, channels: int = 16, width: int = 32, depth: int = 2):
        super().__init__()
        self.channels, self.width = channels, width
        self.x_in = nn.Linear(channels, width)
        self.c_in = nn.Linear(2 * channels, width)
        self.t_in = nn.Linear(16, width)
        self.blocks = nn.ModuleList(StandInBlock(width) for _ in range(depth))
        self.out = nn.Linear(width, channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # context summary per latent pixel: mean over frames and the query (last) frame
        c = torch.cat([cond.mean(dim=2, keepdim=True), cond[:, :, -1:]], dim=1)  # [B, 2C, 1, h, w]
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, device=t.device, dtype=torch.float32) / 8)
        tf = torch.cat([torch.cos(t.float()[:, None] * freqs * 10), torch.sin(t.float()[:, None] * freqs * 10)], 1)
        h = self.x_in(x.movedim(1, -1)) + self.c_in(c.movedim(1, -1)) + self.t_in(tf.to(x.dtype))[:, None, None, None]
        for blk in self.blocks:
            h = blk(h)
        return self.out(h).movedim(-1, 1).float()
