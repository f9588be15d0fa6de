"""Device tests of the default GPU paths that had none (bench/gpu_suite.sh runs them; they skip on CPU).

Each compares with a precise reference (float64; float32 for the J-DiT) under lavin_fast.testing's bound:
k x (error of the same-dtype reference) + a floor at the output's RMS. For one kernel that makes a 1-3%
systematic error fail (tests/test_testing_helpers.py shows it with planted bugs). Through two whole blocks the
bf16 reference's own error is larger (on CPU: a 3% scaling of its velocity stays within 2x its error), so the
J-DiT test catches path errors (a wrong head map, dropped keys, a missing RoPE), and the kernels' own tests
the small ones.
- QK-norm-RoPE, forward and backward in bf16 at the 3.4B shapes (the bench recorded an error, asserted nothing);
- a reduced 3.4B-shaped J-DiT (head dim 72, GQA 4:1, 2 blocks, 1024 tokens) on the default path (Triton
  attention, QK-norm-RoPE and sandwich norms in bf16), forward and the gradients of one training step, against
  the float32 model on the torch backend with TF32 off and the same (bf16-rounded) weights (the sandwich-norm op
  takes no float64; float32's error is ~1e-3 of bf16's); the bf16 model on the torch backend is the yardstick.
"""

from __future__ import annotations

import pytest
import torch

from lavin_fast.models import build_dit
from lavin_fast.ops import qk_norm_rope
from lavin_fast.ops.qk_norm_rope import reference_rms_norm_rope
from lavin_fast.testing import assert_close_to_reference, rms_floor

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def _grads(fn, leaves, dtype, go):
    ls = [t.detach().to(dtype).requires_grad_() for t in leaves]
    outs = fn(*ls)
    return (*outs, *torch.autograd.grad(outs, ls, [g.to(dtype) for g in go]))


@pytest.mark.parametrize("Hq,Hkv,hd,grid", [(32, 8, 72, (10, 16, 16)), (16, 16, 64, (4, 32, 32))])
def test_gpu_qk_norm_rope_bf16_forward_backward(Hq, Hkv, hd, grid):
    L = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, L, Hq, hd, generator=g), torch.randn(2, L, Hkv, hd, generator=g)
    wq, wk = 1 + 0.3 * torch.randn(Hq * hd, generator=g), 1 + 0.3 * torch.randn(Hkv * hd, generator=g)
    go = [torch.randn(2, L, Hq, hd, generator=g), torch.randn(2, L, Hkv, hd, generator=g)]
    leaves = [t.to("cuda", BF16) for t in (q, k, wq, wk)]
    go = [t.to("cuda", BF16) for t in go]

    def ref(q, k, wq, wk):
        return reference_rms_norm_rope(q, wq, grid), reference_rms_norm_rope(k, wk, grid)

    got = _grads(lambda *a: qk_norm_rope(*a, grid), leaves, BF16, go)  # auto: the Triton kernels on CUDA
    r64 = _grads(ref, leaves, torch.float64, go)
    r16 = _grads(ref, leaves, BF16, go)
    for name, a, b, c in zip(("q", "k", "dq", "dk", "dwq", "dwk"), got, r64, r16, strict=True):
        assert a.dtype == BF16
        assert_close_to_reference(a, b, c, name=name)


def _reduced_3p4b(dtype, backend):
    torch.manual_seed(0)
    m = build_dit("3.4B", hidden_size=288, num_heads=4, depth=2, backend=backend)
    assert (m.cfg.head_dim, m.cfg.num_heads, m.cfg.num_kv_heads) == (72, 4, 1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights (the zero init makes every block the identity), rounded to bf16 once
        for name, p in m.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                std = (1.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.05
                p.copy_(torch.randn(p.shape, generator=g) * std)
            p.copy_(p.to(BF16))
    return m.to(device="cuda", dtype=dtype)


def _inputs():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 1, 32, 32, generator=g)  # 1 target + 3 context frames of 16 x 16 tokens: L = 1024
    cond = torch.randn(2, 16, 3, 32, 32, generator=g)
    t = torch.rand(2, generator=g)
    target = torch.randn(2, 16, 1, 32, 32, generator=g)
    return [a.to("cuda", BF16) for a in (x, cond)], t.cuda(), target.cuda()


def _step(model, dtype):
    """Velocity and the parameter gradients of one flow-matching-style step (MSE to a fixed target)."""
    (x, cond), t, target = _inputs()
    model.zero_grad(set_to_none=True)
    v = model(x.to(dtype), t, cond.to(dtype))
    loss = (v.double() - target.double()).pow(2).mean()
    loss.backward()
    return v.detach(), loss.detach(), {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}


def test_gpu_reduced_3p4b_jdit_default_path_forward_and_training_step(monkeypatch):
    from lavin_fast.ops import attention_kernels

    calls = []
    real = attention_kernels.flash_attention

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(attention_kernels, "flash_attention", spy)
    v, loss, grads = _step(_reduced_3p4b(BF16, "auto"), BF16)
    assert len(calls) == 2, "the default path must run the Triton attention in both blocks"
    monkeypatch.setattr(attention_kernels, "flash_attention", real)
    v16, loss16, grads16 = _step(_reduced_3p4b(BF16, "torch"), BF16)  # same dtype, reference ops: the yardstick
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    v64, loss64, grads64 = _step(_reduced_3p4b(torch.float32, "torch"), torch.float32)  # the precise reference

    assert v64.abs().max() > 0.1  # every path matters
    v64 = v64.double()
    assert_close_to_reference(v.double(), v64, v16.double(), atol=rms_floor(BF16, v64), name="velocity")
    assert abs(loss.item() - loss64.item()) <= 2 * abs(loss16.item() - loss64.item()) + 1e-3 * loss64.item()
    checked = 0
    for name, g64 in grads64.items():
        g64 = g64.double()
        if g64.abs().max() == 0:
            continue
        assert_close_to_reference(grads[name].double(), g64, grads16[name].double(), factor=3.0,
                                  atol=rms_floor(BF16, g64, ulps=8), name=f"grad {name}")  # fmt: skip
        checked += 1
    assert checked >= 0.9 * len(grads64)
