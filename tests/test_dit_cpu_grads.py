"""The torch (CPU) paths' hand-written backward passes (ops/torch_grads.py) against autograd of the references,
and the permutation-GEMM RoPE against the rotate-half formula."""

from __future__ import annotations

import pytest
import torch

from lavin_fast.ops import torch_grads
from lavin_fast.ops.qk_norm_rope import reference_qk_norm
from lavin_fast.ops.rope import rope_rotate, rope_split, rope_tables, rotate_half_chunks
from lavin_fast.ops.sandwich_norm import reference_gated_rms_norm_residual, reference_rms_norm_modulate


def _grads(fn, inputs, weight):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


CASES = {
    "modulate": (
        lambda x, s: torch_grads.rms_norm_modulate(x, s, 1e-6),
        lambda x, s: reference_rms_norm_modulate(x, s, 1e-6),
        lambda dt: [3 * torch.randn(3, 40, 24, dtype=dt), torch.randn(3, 24, dtype=dt)],
    ),
    "gated": (
        lambda r, h, g: torch_grads.gated_rms_norm_residual(r, h, g, 1e-6),
        lambda r, h, g: reference_gated_rms_norm_residual(r, h, g, 1e-6),
        lambda dt: [
            torch.randn(3, 40, 24, dtype=dt),
            2 * torch.randn(3, 40, 24, dtype=dt),
            torch.randn(3, 24, dtype=dt),
        ],
    ),
    "qk_norm (GQA 3:1)": (
        lambda x, wq, wk: torch_grads.qk_norm(x, 3, wq, wk, 1e-6),
        lambda x, wq, wk: reference_qk_norm(x, 3, wq, wk, 1e-6),
        lambda dt: [torch.randn(2, 30, 4, 16, dtype=dt), 1 + torch.randn(48, dtype=dt), 1 + torch.randn(16, dtype=dt)],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_hand_written_backward_matches_autograd_of_the_reference(name, dtype, tol):
    fast, ref, make = CASES[name]
    torch.manual_seed(0)
    inputs = make(dtype)
    weight = torch.randn_like(ref(*inputs))
    out_ref, g_ref = _grads(ref, inputs, weight)
    out_fast, g_fast = _grads(fast, inputs, weight)
    assert torch.equal(out_fast, out_ref)  # the same forward operations: bit-identical values
    for i, (a, b) in enumerate(zip(g_fast, g_ref, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < tol, (name, i, _rel(a, b))


@pytest.mark.parametrize("hd", [32, 24])  # unequal chunks (8/12/12: the permutation GEMM) and equal thirds
def test_rope_backward_is_the_inverse_rotation(hd):
    torch.manual_seed(1)
    split = rope_split(hd)
    cos, sin = rope_tables((3, 4, 5), hd, 2, "cpu", torch.float64)
    x = torch.randn(2, 3, 60, hd, dtype=torch.float64)
    w = torch.randn_like(x)
    _, (g_fast,) = _grads(lambda t: torch_grads.rope(t, cos, sin, split), [x], w)
    _, (g_ref,) = _grads(lambda t: t * cos + rotate_half_chunks(t, split) * sin, [x], w)
    assert _rel(g_fast, g_ref) < 1e-13


@pytest.mark.parametrize("hd", [32, 64, 40])
def test_rope_permutation_gemm_equals_the_rotate_half_formula(hd):
    split = rope_split(hd)
    assert len(set(split)) > 1  # these head dims take the GEMM form
    cos, sin = rope_tables((2, 3, 4), hd, 1, "cpu", torch.float32)
    x = torch.randn(2, 2, 24, hd)
    want = x.double() * cos.double() + rotate_half_chunks(x, split).double() * sin.double()
    got = rope_rotate(x, cos, sin, split)
    assert (got.double() - want).abs().max() < 1e-6 * want.abs().max()
    # the permutation itself is exact: with cos 0 and sin 1 the result is rotate_half exactly
    assert torch.equal(rope_rotate(x, torch.zeros_like(cos), torch.ones_like(sin), split), rotate_half_chunks(x, split))


def test_model_gradients_match_the_decomposed_references(monkeypatch):
    """A training forward + backward of a small J-DiT (head dim 16: unequal RoPE chunks, GQA, two segments via
    the null-context call) with the hand-written backward passes against the same model run through autograd of
    the references, in float32 (the ops take no float64): every parameter's gradient within float32 rounding."""
    from lavin_fast.models import build_dit

    torch.manual_seed(0)
    model = build_dit("tiny", hidden_size=64, depth=2, num_heads=4, kv_group=2, patch_size=2, in_channels=4)
    model = model.train()
    with torch.no_grad():  # adaLN-zero starts every gate at 0: give the modulations weights so every path carries
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 1, 8, 8)
    cond = torch.randn(2, 4, 3, 8, 8)
    t = torch.rand(2)

    def run():
        model.zero_grad(set_to_none=True)
        v = model(x, t, cond)
        (v.square().mean() + model.guided(x, t, cond, scale=2.0).square().mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = run()
    monkeypatch.setattr(torch_grads, "_needs_grad", lambda *ts: False)  # every op: the plain reference
    ref = run()
    assert fast.keys() == ref.keys() and len(ref) > 20
    worst = max(_rel(fast[n], ref[n]) for n in ref if ref[n].norm() > 0)
    assert worst < 1e-4, worst


def test_swiglu_backward_matches_autograd():
    torch.manual_seed(2)
    gu = 2 * torch.randn(3, 40, 2 * 24, dtype=torch.float64)
    w = torch.randn(3, 40, 24, dtype=torch.float64)

    def plain(t):
        g, u = t.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    out_fast, (g_fast,) = _grads(torch_grads.swiglu, [gu], w)
    out_ref, (g_ref,) = _grads(plain, [gu], w)
    assert torch.equal(out_fast, out_ref)
    assert _rel(g_fast, g_ref) < 1e-13
