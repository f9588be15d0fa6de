"""torch.distributed plumbing: process group from torchrun's environment, DDP or FSDP2 wrapping.

Launch many processes with torchrun (`torchrun --nproc-per-node 8 -m lavin_fast.cli train cfg.yaml`); a plain
`lavin-fast train` is one process and wraps nothing. CPU runs use the gloo backend (the tests run 2 processes).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lavin_fast.devices import resolve_device


@dataclass
class DistContext:
    """Where this process sits.

    rank: global rank; world: number of processes; local_rank: rank on this node.
    device: this process's device; initialized: whether a process group exists (world > 1 or torchrun).
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    initialized: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto", backend: str = "auto") -> DistContext:
    """Initialise the process group when launched by torchrun (WORLD_SIZE set), else a one-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    initialized = dist.is_available() and dist.is_initialized()
    if world > 1 and not initialized:
        be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=be, timeout=datetime.timedelta(minutes=30))
        initialized = True
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev, initialized=initialized)


def teardown(ctx: DistContext) -> None:
    if ctx.initialized and dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another is still in a collective
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.initialized:
        dist.barrier()


def all_reduce_mean(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a small float tensor (returned on the same device)."""
    if not ctx.initialized or ctx.world == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world


def all_reduce_max(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over processes of a small float tensor (keep NaN out of it: backends differ on NaN)."""
    if not ctx.initialized or ctx.world == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a J-DiT (model.blocks), the units of FSDP sharding, checkpointing, compile."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"model: expected a `blocks` nn.ModuleList (J-DiT), {type(model).__name__} has none")
    return list(blocks)


def wrap_model(model: nn.Module, ctx: DistContext, *, parallel: str, bf16: bool, mesh=None) -> nn.Module:
    """Wrap for data parallelism. FSDP2: fully_shard per block then the root, bf16 params / fp32 gradient
    reduction when bf16, over `mesh` (parallel/mesh.py: 2-D for HSDP; None: 1-D over all ranks);
    DDP: DistributedDataParallel. One process: the model itself."""
    if not ctx.initialized or ctx.world == 1:
        return model
    if parallel == "fsdp":  # imported here: a one-process run never loads FSDP
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = mesh if mesh is not None else init_device_mesh(ctx.device.type, (ctx.world,))
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for block in blocks_of(model):
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # no find_unused_parameters: the J-DiT freezes its last block's unread context outputs (models/dit_blocks.py)
        return DistributedDataParallel(model, device_ids=ids)
    raise ValueError(f"parallel: expected 'fsdp' or 'ddp', got {parallel!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model
    )


def set_grad_sync(model: nn.Module, enabled: bool):
    """Context manager that skips gradient all-reduce / reduce-scatter on accumulation micro-steps."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
