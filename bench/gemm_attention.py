"""Attention by batched GEMMs with a hand-written backward: a measured CPU alternative to SDPA, not a default.

The idea (issue 34): at the demo J-DiT's shapes (8 sequences of a few hundred tokens, 2 heads of 32) run the
attention as plain batched GEMMs, the backward as four GEMMs after one recomputation of P, in chunks of heads
whose score matrix stays in a core's L2 (CHUNK_ELEMENTS; saving the whole P instead measured slower still):

    S = scale * Q K^T,  P = softmax(S),  O = P V
    dV = P^T dO,  dS = P * (dO V^T - rowsum(dO * O)),  dQ = scale * dS K,  dK = scale * dS^T Q

Grouped-query attention without copying K or V: the query heads of one kv group are stacked along the row
axis ([B * Hkv, rep * L, hd] rows against [B * Hkv, L, hd] keys), so dK and dV sum over the group inside the GEMM.

Measured (docs/attention.md, "On the CPU"; bench/cpu_attention.py): torch 2.13's CPU flash kernel is faster
forward + backward at every demo-sized shape (L = 24 .. 384), and the demo's training step slows down with this
path, so lavin_fast.ops.attention does not route to it and it lives under bench/, not in the library: the tested
GEMM formulation, the benchmark's contender, to rerun on a CPU or torch build whose flash kernel may be slower.

Layout as lavin_fast.ops.attention: q [B, L, Hq, hd], k and v [B, L, Hkv, hd]; no RoPE. `small_attention`
checks only what it needs (4-D, matching kv shapes, Hq % Hkv == 0); `reference_small_attention` is the plain
formula the tests differentiate by autograd.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 17
"""Score elements per chunk (512 KiB float32: one chunk's S/P stays in a core's L2); at least one (b, kv head)."""


def _rows(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, L, H, hd] -> [B * Hkv, (H // Hkv) * L, hd]: the group's heads stacked along rows (a view when x is
    a transpose of a head-major contiguous tensor, else one copy)."""
    B, L, H, hd = x.shape
    return x.transpose(1, 2).reshape(B * hkv, (H // hkv) * L, hd)


def _unrows(x: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """[B * Hkv, rep * L, hd] -> [B, L, H, hd] (a view of the head-major result)."""
    return x.view(B, H, -1, x.shape[-1]).transpose(1, 2)


class _SmallAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, L, Hq, hd = q.shape
        Hkv = k.shape[2]
        qs, kr, vr = _rows(q, Hkv) * scale, _rows(k, Hkv), _rows(v, Hkv)
        n, R = qs.shape[0], qs.shape[1]
        step = max(1, CHUNK_ELEMENTS // (R * L))
        o = qs.new_empty(n, R, hd)
        for a in range(0, n, step):
            b = min(a + step, n)
            p = torch.softmax(torch.bmm(qs[a:b], kr[a:b].transpose(1, 2)), dim=-1)
            torch.bmm(p, vr[a:b], out=o[a:b])
        ctx.save_for_backward(qs, kr, vr, o)
        ctx.scale, ctx.shape, ctx.step = scale, (B, Hq, Hkv), step
        return _unrows(o, B, Hq)

    @staticmethod
    def backward(ctx, do):
        qs, kr, vr, o = ctx.saved_tensors
        B, Hq, Hkv = ctx.shape
        dor = _rows(do, Hkv)
        delta = (dor * o).sum(-1, keepdim=True)
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(kr), torch.empty_like(vr)
        n, step = qs.shape[0], ctx.step
        for a in range(0, n, step):
            b = min(a + step, n)
            p = torch.softmax(torch.bmm(qs[a:b], kr[a:b].transpose(1, 2)), dim=-1)
            torch.bmm(p.transpose(1, 2), dor[a:b], out=dv[a:b])
            ds = torch.bmm(dor[a:b], vr[a:b].transpose(1, 2)).sub_(delta[a:b]).mul_(p)
            torch.bmm(ds, kr[a:b], out=dq[a:b])
            torch.bmm(ds.transpose(1, 2), qs[a:b], out=dk[a:b])
        dq.mul_(ctx.scale)
        return _unrows(dq, B, Hq), _unrows(dk, B, Hkv), _unrows(dv, B, Hkv), None


def small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Non-causal GQA attention [B, L, Hq, hd] by batched GEMMs (softmax saved for a four-GEMM backward).

    The softmax runs in the inputs' dtype (meant for float32 / float64 CPU tensors); scale multiplies Q K^T."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, L, Hq, hd] and k, v [B, L, Hkv, hd]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)}: same B, L, hd and Hq % Hkv == 0")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _SmallAttention.apply(q, k, v, scale)
    B, L, Hq, hd = q.shape
    Hkv = k.shape[2]
    s = torch.bmm(_rows(q, Hkv) * scale, _rows(k, Hkv).transpose(1, 2))
    return _unrows(torch.bmm(torch.softmax(s, dim=-1), _rows(v, Hkv)), B, Hq)


def reference_small_attention(q, k, v, scale):
    """The plain formula with kv heads repeated (the tests' independent yardstick; autograd gives its gradients)."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    p = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) * scale, dim=-1)
    return torch.einsum("bhlm,bmhd->blhd", p, v)
