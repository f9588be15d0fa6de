"""Activation checkpointing policies (train/activation_checkpointing.py): the same gradients under every policy,
and the kept activations ordered full < selective < every-2 < none (measured live bytes after the forward)."""

from __future__ import annotations

import copy

import pytest
import torch
from memprobe import LiveBytes

from lavin_fast.models.dit import build_dit
from lavin_fast.train.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpointed_blocks,
    resolve_policy,
)

POLICIES = ("none", "full", "selective", "every")


def _run(base, policy):
    m = copy.deepcopy(base).train()
    chosen = apply_activation_checkpointing(list(m.blocks), policy, every=2)
    g = torch.Generator().manual_seed(1)
    x, cond, t = torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(2, 16, 3, 8, 8, generator=g), torch.rand(2)
    with LiveBytes() as probe:
        out = m(x, t, cond)
        kept = probe.live
        out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return out.detach(), grads, kept, chosen


def test_policies_give_the_same_gradients_and_keep_less():
    torch.manual_seed(0)
    base = build_dit("tiny", hidden_size=64, depth=4, num_heads=4)
    runs = {p: _run(base, p) for p in POLICIES}
    ref_out, ref_grads, _, _ = runs["none"]
    for policy, (out, grads, _, _) in runs.items():
        assert torch.equal(out, ref_out), policy
        assert grads.keys() == ref_grads.keys(), policy
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=f"{policy}: {name}")
    kept = {p: r[2] for p, r in runs.items()}
    assert kept["full"] < kept["selective"] < kept["none"], kept
    assert kept["full"] < kept["every"] < kept["none"], kept
    assert runs["every"][3] == [0, 2] and runs["none"][3] == [] and runs["full"][3] == [0, 1, 2, 3]


def test_policy_names():
    assert resolve_policy("auto", True) == "full" and resolve_policy("auto", False) == "none"
    assert checkpointed_blocks(5, "every", 3) == [0, 3]
    with pytest.raises(ValueError, match="activation_checkpointing"):
        resolve_policy("some", False)
