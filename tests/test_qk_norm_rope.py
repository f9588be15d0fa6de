"""qk_norm_rope: Triton kernels (interpreter on CPU) against the float64 reference, and input checks."""

import pytest
import torch

from lavin_fast.ops import qk_norm_rope
from lavin_fast.ops.dispatch import BackendUnavailable
from lavin_fast.ops.qk_norm_rope import reference_rms_norm_rope
from lavin_fast.testing import assert_close_to_reference, poisoned_allocations, triton_test_device

DEV = triton_test_device()

# (B, L, Hq, Hkv, hd, grid, t_offset): odd lengths, GQA ratios 1 and 4, every head dim
CASES = [
    (1, 1, 2, 2, 64, (1, 1, 1), 0),
    (2, 17, 4, 1, 72, (1, 1, 17), 3),
    (1, 200, 2, 2, 128, (2, 10, 10), 0),
    (2, 30, 4, 1, 64, (5, 2, 3), 7),
    (1, 24, 8, 2, 72, (2, 3, 4), 0),
    (2, 9, 2, 2, 72, None, 0),
]


def _inputs(B, L, Hq, Hkv, hd, dtype, strided=False):
    if strided:  # q and k as views of one fused projection [B, L, (Hq + 2 Hkv) hd]
        qkv = torch.randn(B, L, (Hq + 2 * Hkv) * hd, device=DEV, dtype=dtype)
        q = qkv[..., : Hq * hd].view(B, L, Hq, hd)
        k = qkv[..., Hq * hd : (Hq + Hkv) * hd].view(B, L, Hkv, hd)
    else:
        q = torch.randn(B, L, Hq, hd, device=DEV, dtype=dtype)
        k = torch.randn(B, L, Hkv, hd, device=DEV, dtype=dtype)
    qw = (1 + 0.5 * torch.randn(Hq * hd, device=DEV)).to(dtype)
    kw = (1 + 0.5 * torch.randn(Hkv * hd, device=DEV)).to(dtype)
    return q, k, qw, kw


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_matches_reference(case, dtype):
    B, L, Hq, Hkv, hd, grid, t_off = case
    q, k, qw, kw = _inputs(B, L, Hq, Hkv, hd, dtype, strided=(L % 2 == 0))
    with poisoned_allocations():
        qo, ko = qk_norm_rope(q, k, qw, kw, grid, rope_t_offset=t_off, backend="triton")
    for name, x, w, out in (("q", q, qw, qo), ("k", k, kw, ko)):
        ref64 = reference_rms_norm_rope(x.double(), w.double(), grid, rope_t_offset=t_off)
        ref_lp = reference_rms_norm_rope(x, w, grid, rope_t_offset=t_off)
        assert out.shape == x.shape and out.is_contiguous() and out.dtype == dtype
        assert_close_to_reference(out, ref64, ref_lp, name=name)


@pytest.mark.parametrize("case", CASES[1:5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_matches_reference(case, dtype):
    B, L, Hq, Hkv, hd, grid, t_off = case
    q, k, qw, kw = _inputs(B, L, Hq, Hkv, hd, dtype)
    leaves = [t.detach().requires_grad_() for t in (q, k, qw, kw)]
    with poisoned_allocations():
        qo, ko = qk_norm_rope(*leaves, grid, rope_t_offset=t_off, backend="triton")
        gq, gk = torch.randn_like(qo), torch.randn_like(ko)
        grads = torch.autograd.grad((qo, ko), leaves, (gq, gk))

    def ref(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in (q, k, qw, kw)]
        outs = [reference_rms_norm_rope(ls[0], ls[2], grid, rope_t_offset=t_off),
                reference_rms_norm_rope(ls[1], ls[3], grid, rope_t_offset=t_off)]  # fmt: skip
        return torch.autograd.grad(outs, ls, (gq.to(dt), gk.to(dt)))

    for name, g, r64, rlp in zip(
        ("dq", "dk", "dq_weight", "dk_weight"), grads, ref(torch.float64), ref(dtype), strict=True
    ):
        assert_close_to_reference(g, r64, rlp, name=name)


def test_auto_uses_torch_on_cpu_and_matches_reference():
    q, k, qw, kw = (t.cpu() for t in _inputs(2, 12, 4, 2, 64, torch.float32))
    qo, ko = qk_norm_rope(q, k, qw, kw, (3, 2, 2))  # auto: never the interpreter
    torch.testing.assert_close(qo, reference_rms_norm_rope(q, qw, (3, 2, 2)), rtol=0, atol=0)
    torch.testing.assert_close(ko, reference_rms_norm_rope(k, kw, (3, 2, 2)), rtol=0, atol=0)


def test_norm_is_over_the_whole_width_with_learned_weight():
    # equal rows per head but different scales across heads: a per-head norm would differ
    x = torch.ones(1, 1, 2, 64, dtype=torch.float64)
    x[:, :, 1] *= 3.0
    w = torch.full((128,), 2.0, dtype=torch.float64)
    out = reference_rms_norm_rope(x, w)
    rms = torch.sqrt(torch.tensor(5.0, dtype=torch.float64))  # mean of 1 and 9
    torch.testing.assert_close(out[0, 0, 0], torch.full((64,), 2.0 / rms.item(), dtype=torch.float64))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda q, k, qw, kw, g: (q[0], k, qw, kw, g), "q must be a \\[B, L, H, head_dim\\]"),
        (lambda q, k, qw, kw, g: (q, k, qw[:-1], kw, g), "q_weight must have shape"),
        (lambda q, k, qw, kw, g: (q, k[:, :-1], qw, kw, g), "must agree in batch, length"),
        (lambda q, k, qw, kw, g: (q, k.half(), qw, kw.half(), g), "share dtype"),
        (lambda q, k, qw, kw, g: (q, k, qw, kw, (2, 2, 2)), "rope_grid=\\(2, 2, 2\\) has 8 positions"),
        (lambda q, k, qw, kw, g: (q, k, qw, kw, (3, 4)), "must be a \\(T, H, W\\) triple"),
        (lambda q, k, qw, kw, g: (q.int(), k, qw, kw, g), "dtype"),
        (lambda q, k, qw, kw, g: (q[..., :63], k[..., :63], qw[: 4 * 63], kw[: 2 * 63], g), "head_dim 63"),
    ],
)
def test_bad_input_names_the_argument(mutate, match):
    q, k, qw, kw = (t.cpu() for t in _inputs(1, 12, 4, 2, 64, torch.float32))
    args = mutate(q, k, qw, kw, (3, 2, 2))
    with pytest.raises(ValueError, match=match):
        qk_norm_rope(*args[:4], args[4])


def test_gqa_heads_must_divide():
    q, k, qw, kw = (t.cpu() for t in _inputs(1, 4, 3, 2, 64, torch.float32))
    with pytest.raises(ValueError, match="multiple of k heads"):
        qk_norm_rope(q, k, qw, kw)


def test_triton_by_name_refuses_float64_with_reasons():
    q, k, qw, kw = (t.cpu().double() for t in _inputs(1, 4, 2, 2, 64, torch.float32))
    with pytest.raises(BackendUnavailable, match="float64 is served by the torch reference"):
        qk_norm_rope(q, k, qw, kw, backend="triton")
