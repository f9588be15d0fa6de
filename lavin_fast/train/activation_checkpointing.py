"""Activation checkpointing policies for the J-DiT blocks (what the backward recomputes instead of keeping).

- "none": every activation is kept.
- "full": each block keeps only its inputs and recomputes its whole forward in the backward (~1/3 more compute).
- "selective": op-level (torch.utils.checkpoint's selective checkpointing, as torchtitan's "op" policy): the
  outputs of matrix multiplies and attention are kept (the expensive ops), pointwise ops, norms, RoPE and
  activations are recomputed (cheap, and most of the bytes).
- "every": blocks 0, k, 2k, ... in full, the others keep everything (k = activation_checkpointing_every).

`apply_activation_checkpointing(blocks, policy, every)` replaces each chosen block's `forward` by a checkpointed
call of the original (the module and its parameter names stay as they are, so checkpoints, the EMA and FSDP2's
wrapping do not change); gradients are the same under every policy (tested).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lavin_fast.train.config import AC_POLICIES as POLICIES

_aten = torch.ops.aten
SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}
"""The ops whose outputs the selective policy keeps (with lavin_fast's own attention ops, see `_keeps`)."""


def _keeps(func) -> bool:
    if func in SAVED_OPS:
        return True
    name = getattr(func, "name", lambda: "")()
    return name.startswith("lavin_fast::") and "attention" in name and "backward" not in name


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _keeps(func) else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def resolve_policy(policy: str, grad_checkpointing: bool) -> str:
    """ "auto" -> "full" with the old grad_checkpointing switch, else "none"."""
    if policy == "auto":
        return "full" if grad_checkpointing else "none"
    if policy not in POLICIES:
        raise ValueError(f"activation_checkpointing: expected one of {('auto', *POLICIES)}, got {policy!r}")
    return policy


def checkpointed_blocks(n: int, policy: str, every: int = 2) -> list[int]:
    """Indices of the blocks a policy checkpoints (fully or selectively) among n."""
    if policy == "none":
        return []
    if policy == "every":
        return list(range(0, n, every))
    return list(range(n))


def _checkpointed_forward(inner, context_fn, *args, **kwargs):
    if not torch.is_grad_enabled():
        return inner(*args, **kwargs)
    if context_fn is None:
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return checkpoint(inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def apply_activation_checkpointing(
    blocks: list[nn.Module], policy: str, every: int = 2, compile_backend: str | None = None
) -> list[int]:
    """Checkpoint the blocks `policy` chooses (in place, before FSDP wrapping). Returns their indices.

    compile_backend: also torch.compile each checkpointed block's own forward, *inside* the checkpoint. A compiled
    module whose forward is the checkpoint (`block.compile()` after this) compiled nothing for the J-DiT's blocks:
    Dynamo fell back to eager around the checkpoint, silently (measured: 0 graphs). The caller compiles the blocks
    left unchecked itself."""
    if policy not in POLICIES:
        raise ValueError(f"activation_checkpointing: expected one of {POLICIES}, got {policy!r}")
    chosen = checkpointed_blocks(len(blocks), policy, every)
    context_fn = selective_context if policy == "selective" else None
    for i in chosen:
        blk = blocks[i]
        # dynamic=False: a recompute must pick the graph its forward used; with automatic dynamic shapes it can take
        # a later dynamic graph instead and fail the checkpoint's metadata check (pytorch/pytorch#166926)
        inner = (
            blk.forward
            if compile_backend is None
            else torch.compile(blk.forward, backend=compile_backend, dynamic=False)
        )
        blk.forward = functools.partial(_checkpointed_forward, inner, context_fn)
    return chosen
