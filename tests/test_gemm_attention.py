"""bench.gemm_attention: the GEMM attention with a hand-written backward (a measured CPU alternative to
SDPA) against autograd of an independent float64 formula and against torch's SDPA, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from bench import gemm_attention as sa


def _formula64(q, k, v, scale):
    """Independent float64 attention: explicit per-head loops over the kv groups, no repeat_interleave."""
    q, k, v = (t.double() for t in (q, k, v))
    Hq, Hkv = q.shape[2], k.shape[2]
    rep = Hq // Hkv
    outs = []
    for h in range(Hq):
        s = torch.matmul(q[:, :, h], k[:, :, h // rep].transpose(1, 2)) * scale  # [B, L, L]
        p = torch.exp(s - s.amax(-1, keepdim=True))
        outs.append(torch.matmul(p / p.sum(-1, keepdim=True), v[:, :, h // rep]))
    return torch.stack(outs, dim=2)


def _inputs(B, L, Hq, Hkv, hd, dtype, seed=0):
    """q, k, v as the J-DiT passes them: [B, L, H, hd] transposes of one head-major [B, Hq + 2 Hkv, L, hd] tensor."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(B, Hq + 2 * Hkv, L, hd, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    base.requires_grad_(True)
    q, k, v = (t.transpose(1, 2) for t in base.split([Hq, Hkv, Hkv], dim=1))
    return base, q, k, v


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)])
@pytest.mark.parametrize("chunk", [1 << 17, 300])  # the default; and several chunks with a remainder
def test_forward_and_grads_match_float64_autograd(dtype, tol, heads, chunk, monkeypatch):
    monkeypatch.setattr(sa, "CHUNK_ELEMENTS", chunk)
    Hq, Hkv = heads
    B, L, hd, scale = 3, 10, 8, 8**-0.5
    base, q, k, v = _inputs(B, L, Hq, Hkv, hd, dtype)
    out = sa.small_attention(q, k, v, scale)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (got,) = torch.autograd.grad(out, base, g.to(dtype))

    base64 = base.detach().double().requires_grad_(True)
    q64, k64, v64 = (t.transpose(1, 2) for t in base64.split([Hq, Hkv, Hkv], dim=1))
    ref = _formula64(q64, k64, v64, scale)
    (want,) = torch.autograd.grad(ref, base64, g)
    assert out.dtype == dtype and out.shape == (B, L, Hq, hd)
    assert _rel(out, ref) < tol
    for i, name in enumerate(("dq", "dk", "dv")):
        sl = slice(*[(0, Hq), (Hq, Hq + Hkv), (Hq + Hkv, Hq + 2 * Hkv)][i])
        assert _rel(got[:, sl], want[:, sl]) < 10 * tol, name


def test_matches_sdpa_float32_forward_and_backward():
    B, L, H, hd = 4, 96, 2, 32
    base, q, k, v = _inputs(B, L, H, H, hd, torch.float32, seed=3)
    g = torch.randn(B, L, H, hd, generator=torch.Generator().manual_seed(4))
    out = sa.small_attention(q, k, v, hd**-0.5)
    (got,) = torch.autograd.grad(out, base, g)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    (want,) = torch.autograd.grad(ref, base, g)
    assert _rel(out, ref) < 1e-5
    assert _rel(got, want) < 1e-4


def test_no_grad_path_equals_autograd_forward():
    _, q, k, v = _inputs(2, 12, 4, 2, 8, torch.float64, seed=7)
    with_grad = sa.small_attention(q, k, v, 0.3)
    with torch.no_grad():
        plain = sa.small_attention(q, k, v, 0.3)
    assert _rel(plain, _formula64(q.detach(), k.detach(), v.detach(), 0.3)) < 1e-12
    assert _rel(with_grad.detach(), plain) < 1e-12


def test_reference_matches_independent_formula():
    _, q, k, v = _inputs(2, 7, 6, 2, 4, torch.float64, seed=2)
    assert _rel(sa.reference_small_attention(q, k, v, 0.5), _formula64(q, k, v, 0.5)) < 1e-12


@pytest.mark.parametrize(
    "qs,ks,vs,match",
    [
        ((2, 5, 2, 8), (2, 5, 2, 8), (2, 5, 2, 4), "k, v"),
        ((2, 5, 3, 8), (2, 5, 2, 8), (2, 5, 2, 8), "Hq % Hkv"),
        ((2, 5, 2, 8), (2, 6, 2, 8), (2, 6, 2, 8), "do not match"),
        ((5, 2, 8), (2, 5, 2, 8), (2, 5, 2, 8), r"q \[B, L, Hq, hd\]"),
    ],
)
def test_bad_shapes_raise_clear_errors(qs, ks, vs, match):
    with pytest.raises(ValueError, match=match):
        sa.small_attention(torch.zeros(qs), torch.zeros(ks), torch.zeros(vs), 1.0)
