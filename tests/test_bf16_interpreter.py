"""bfloat16 on CPU for the Triton kernels that use no tl.dot (the interpreter computes bf16 tl.dot wrongly, but
elementwise and reduction code in bf16 right): QK-norm-RoPE, the sandwich norms and the GroupNorm statistics
and apply, forward and backward, against float64 with the bf16 reference as the yardstick
(lavin_fast.testing.assert_close_to_reference). Before these, bf16 was checked on the GPU only."""

import pytest
import torch

from lavin_fast.ops import gated_rms_norm_residual, qk_norm_rope, rms_norm_modulate
from lavin_fast.ops.group_norm_silu import (
    GroupNormSiLU,
    group_norm_silu,
    group_norm_stats,
    reference_group_norm_silu,
    reference_group_norm_stats,
)
from lavin_fast.ops.qk_norm_rope import reference_rms_norm_rope
from lavin_fast.ops.sandwich_norm import reference_gated_rms_norm_residual, reference_rms_norm_modulate
from lavin_fast.testing import assert_close_to_reference, poisoned_allocations, triton_test_device

DEV = triton_test_device()
BF16 = torch.bfloat16


def _grads(fn, leaves, dtype, go):
    ls = [t.detach().to(dtype).requires_grad_() for t in leaves]
    out = fn(*ls)
    outs = out if isinstance(out, tuple) else (out,)
    gos = [g.to(dtype) for g in go]
    return (*outs, *torch.autograd.grad(outs, ls, gos))


@pytest.mark.parametrize("grid,heads,hd", [((2, 3, 4), (4, 1), 72), ((1, 5, 3), (2, 2), 64)])
def test_qk_norm_rope_bf16_forward_backward(grid, heads, hd):
    Hq, Hkv = heads
    L = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, L, Hq, hd, generator=g), torch.randn(2, L, Hkv, hd, generator=g)
    wq, wk = 1 + 0.5 * torch.randn(Hq * hd, generator=g), 1 + 0.5 * torch.randn(Hkv * hd, generator=g)
    go = [torch.randn(2, L, Hq, hd, generator=g), torch.randn(2, L, Hkv, hd, generator=g)]
    leaves = [t.to(DEV, BF16) for t in (q, k, wq, wk)]
    go_dev = [t.to(DEV, BF16) for t in go]

    def ref(q, k, wq, wk):
        return reference_rms_norm_rope(q, wq, grid), reference_rms_norm_rope(k, wk, grid)

    with poisoned_allocations():
        got = _grads(lambda *a: qk_norm_rope(*a, grid, backend="triton"), leaves, BF16, go_dev)
    r64 = _grads(ref, [t.cpu() for t in leaves], torch.float64, [t.cpu() for t in go_dev])
    r16 = _grads(ref, [t.cpu() for t in leaves], BF16, [t.cpu() for t in go_dev])
    for name, a, b, c in zip(("q", "k", "dq", "dk", "dwq", "dwk"), got, r64, r16, strict=True):
        assert a.dtype == BF16
        assert_close_to_reference(a.cpu(), b, c, name=name)


@pytest.mark.parametrize("D", [72, 1000])
def test_sandwich_norms_bf16_forward_backward(D):
    g = torch.Generator().manual_seed(1)
    x, h, r = (torch.randn(2, 33, D, generator=g) for _ in range(3))
    scale, gate = 0.5 * torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
    go = [torch.randn(2, 33, D, generator=g).to(DEV, BF16)]
    cases = [
        ("modulate", rms_norm_modulate, reference_rms_norm_modulate, [x, scale]),
        ("gated", gated_rms_norm_residual, reference_gated_rms_norm_residual, [r, h, gate]),
    ]
    for kind, op, ref, leaves in cases:
        leaves = [t.to(DEV, BF16) for t in leaves]
        with poisoned_allocations():
            got = _grads(lambda *a, op=op: op(*a, backend="triton"), leaves, BF16, go)
        r64 = _grads(ref, [t.cpu() for t in leaves], torch.float64, [go[0].cpu()])
        r16 = _grads(ref, [t.cpu() for t in leaves], BF16, [go[0].cpu()])
        for i, (a, b, c) in enumerate(zip(got, r64, r16, strict=True)):
            assert_close_to_reference(a.cpu(), b, c, name=f"{kind} output {i}")


def test_group_norm_stats_and_apply_bf16():
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 16, 3, 5, 7, generator=g) * 2 + 3).to(DEV, BF16)
    with poisoned_allocations():
        mean, rstd = group_norm_stats(x, 4, backend="triton")
    m64, r64 = reference_group_norm_stats(x.cpu(), 4)  # of the bf16 values, in float64
    assert mean.dtype == rstd.dtype == torch.float32
    torch.testing.assert_close(mean.cpu().double(), m64, rtol=1e-5, atol=1e-5)  # float32 accumulation
    torch.testing.assert_close(rstd.cpu().double(), r64, rtol=1e-5, atol=1e-5)
    w, b = (1 + 0.3 * torch.randn(16, generator=g)), 0.3 * torch.randn(16, generator=g)
    norm = GroupNormSiLU(mean, rstd, w.to(DEV), b.to(DEV), 4)
    with poisoned_allocations():
        y = group_norm_silu(x, norm, backend="triton")
    cpu_norm = GroupNormSiLU(mean.cpu(), rstd.cpu(), w, b, 4)
    y64 = reference_group_norm_silu(x.cpu().double(), cpu_norm)
    y16 = reference_group_norm_silu(x.cpu(), cpu_norm, compute_dtype=BF16)
    assert y.dtype == BF16
    assert_close_to_reference(y.cpu(), y64, y16, name="group_norm_silu")
