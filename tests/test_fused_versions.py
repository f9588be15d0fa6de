"""Fused Adam / AdamW steps bump the parameters' version counters (train/fused_versions.py), so the ST-VAE's
inference convolutions, which cache derived weights keyed by the counter, never reuse weights from before a step."""

from __future__ import annotations

import pytest
import torch

from lavin_fast.ops.causal_conv3d import causal_conv3d, reference_causal_conv3d
from lavin_fast.train.fused_versions import bump_versions_after_step


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_a_fused_step_with_the_hook_bumps_every_parameter(opt_cls):
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = opt_cls(params, lr=1e-2, fused=True)
    bump_versions_after_step(opt)
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p._version for p in params]
    opt.step()
    assert all(p._version > v for p, v in zip(params, before, strict=True))


def test_an_eval_conv_after_a_fused_step_uses_the_new_weights():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4, 3, 3, 3) * 0.2)
    x = torch.randn(2, 4, 1, 8, 8)  # one frame: the folded 2D conv, whose folded weight is cached on `weight`
    opt = torch.optim.Adam([weight], lr=0.1, fused=True)
    bump_versions_after_step(opt)
    with torch.no_grad():
        causal_conv3d(x, weight, backend="torch")  # fills the cache
    weight.grad = torch.randn_like(weight)
    opt.step()  # lr 0.1: every weight moves by ~0.1, far above float32 rounding
    with torch.no_grad():
        got = causal_conv3d(x, weight, backend="torch")
        want = reference_causal_conv3d(x.double(), weight.detach().double()).float()
    assert (got - want).abs().max() < 1e-5
