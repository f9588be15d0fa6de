"""A small stand-in velocity model with the J-DiT's interface (x, t, cond) -> v and a `blocks` ModuleList.

Test scaffolding for tests/test_train.py (not part of the package), where the real J-DiT would only add time:
it mixes the context by attention-free pooling, so any number of context frames (the null context has 2) works.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from lavin_fast.models.dit import build_dit
from lavin_fast.parallel.distributed import teardown
from lavin_fast.train.config import load_config
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer


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


class _Interrupted(Exception):
    pass


def standin_training_run(
    overrides: dict,
    result_path: str | None = None,
    *,
    num_samples: int = 8,
    interrupt_after: int | None = None,
    model: str = "standin",
) -> dict:
    """Train the stand-in on synthetic latents with TrainConfig `overrides` (under torchrun or spawned ranks:
    the process group comes from the environment). Returns (and rank 0 writes as JSON to result_path)
    the losses and the gathered EMA weights. interrupt_after: simulate a crash right after that step.
    model: "standin" or "tiny-dit" (the real J-DiT at a small size)."""
    cfg = load_config(None, overrides)
    trainer = Trainer(
        cfg,
        model_factory=lambda c, d: StandInVelocity() if model == "standin" else _tiny_dit(),
        source_factory=lambda c, ctx: SyntheticLatentSource(
            micro_batch=c.micro_batch_size, rank=ctx.rank, world=ctx.world, num_samples=num_samples, device=ctx.device
        ),
    )
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if interrupt_after is not None and step >= interrupt_after:
            raise _Interrupted

    try:
        trainer.fit(on_step=on_step)
    except _Interrupted:
        pass
    ema = trainer.ema_state_dict()
    out = {
        "losses": losses,
        "step": trainer.step,
        "ema": {k: v.flatten().tolist() for k, v in sorted(ema.items())},
        "resumed": trainer.resumed_from is not None,
        # graphs torch.compile produced in this process (0: nothing was compiled, whatever the config said)
        "compiled_graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
    }
    if trainer.ctx.is_main and result_path is not None:
        with open(result_path, "w") as f:
            json.dump(out, f)
    teardown(trainer.ctx)
    return out


def spawned_rank(rank: int, world: int, port: int, overrides: dict, result_path: str, model: str = "standin") -> None:
    """Entry point of one process of a CPU gloo run started with torch.multiprocessing.spawn (tests)."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    standin_training_run(overrides, result_path, model=model)


def _tiny_dit() -> nn.Module:
    return build_dit("tiny", hidden_size=32, depth=2, num_heads=2)
