"""torch.distributed plumbing: process group from torchrun's environment, DDP or FSDP2 wrapping.

Launch many processes with torchrun (`torchrun --nproc-per-node 8 -m lavin_fast.cli train cfg.yaml`); a plain
`lavin-fast train` is one process and wraps nothing. CPU runs use the gloo backend (the tests run 2 processes).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lavin_fast.devices import resolve_device

log = logging.getLogger(__name__)


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


def rank_device(device: str = "auto") -> torch.device:
    """The one device of this process, made current before any CUDA or Triton work.

    `device`: "auto", "cpu", "cuda" or "cuda:K". Under torchrun (LOCAL_RANK set) "auto" / "cuda" is
    cuda:(LOCAL_RANK mod the visible device count); "cuda:K" is taken as given. A CUDA device is bound with
    `torch.cuda.set_device` in the calling thread: Triton launches on the current device and DALI and many
    torch calls default to it, so a rank that skipped this would run its kernels on GPU 0 with pointers of
    its own GPU. Every entry point (train, sample, data build-cache, eval) calls this (through `setup`) first.
    """
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is None:
        count = torch.cuda.device_count()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= count:
            log.warning(
                "LOCAL_RANK %d but %d visible CUDA device(s): rank shares cuda:%d",
                local_rank,
                count,
                local_rank % count,
            )
        dev = torch.device("cuda", local_rank % count)
    torch.cuda.set_device(dev)
    return dev


def setup(device: str = "auto", backend: str = "auto", timeout: datetime.timedelta | None = None) -> DistContext:
    """Bind this rank's device (`rank_device`), then initialise the process group when launched by torchrun
    (WORLD_SIZE set), else a one-process context. Pair it with `teardown` on success and `abort` on failure,
    or use `process_group()`, which does both."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = rank_device(device)
    initialized = dist.is_available() and dist.is_initialized()
    if world > 1 and not initialized:
        be = backend if backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=be, timeout=timeout or datetime.timedelta(minutes=30))
        initialized = True
    return DistContext(rank=rank, world=world, local_rank=local_rank, device=dev, initialized=initialized)


def teardown(ctx: DistContext) -> None:
    """The success path: every rank reaches this barrier, then the group is destroyed. A rank that failed must
    call `abort` instead: a barrier on its failure path would be matched with whatever collective the other
    ranks are in (their next barrier, or a mismatched all_reduce), and the group would go on or hang."""
    if ctx.initialized and dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another is still in a collective
        dist.destroy_process_group()


def abort(ctx: DistContext) -> None:
    """The failure path: leave the group at once, with no collective. The other ranks' next collective then
    fails (gloo: the connection closes; NCCL: the communicators are aborted, and torchrun stops the job when
    this process exits non-zero) instead of being matched with a barrier that only this rank's failure made.

    NCCL: `destroy_process_group` flushes the rank's pending collectives since torch 2.6 (ncclCommFinalize), which
    hangs when the failure left one of them unmatched; the abort API (`_abort_process_group`, all groups at once)
    stops them instead. Other backends: destroy_process_group."""
    if not (ctx.initialized and dist.is_available() and dist.is_initialized()):
        return
    try:
        from torch.distributed import distributed_c10d as c10d

        if dist.get_backend() == "nccl" and hasattr(c10d, "_abort_process_group"):
            c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (already failing: the original error is the one to report)
        log.exception("leaving the process group after a failure")


@contextlib.contextmanager
def process_group(device: str = "auto", backend: str = "auto", timeout: datetime.timedelta | None = None):
    """`with process_group(args.device) as ctx:` -- setup(), then teardown() when the body returns and abort()
    when it raises (the error propagates)."""
    ctx = setup(device, backend, timeout)
    try:
        yield ctx
    except BaseException:
        abort(ctx)
        raise
    teardown(ctx)


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
