"""Hand-written backward passes for the torch (CPU) paths of the J-DiT's memory-bound ops.

The forwards are the references' own operations in the same order (so the values are bit-identical); only the
backward differs: autograd's backward of the decomposed references walks every intermediate (the RMSNorm's
norm, square, division, rsqrt and the products, the in-place RoPE additions on views with their zero-filled
slice copies), a dozen passes over memory and as many small calls per op. Written by hand each backward is
the closed form in a few passes:

    xhat = x * r, r = 1 / sqrt(mean(x^2) + eps):   dx = r * (g - xhat * mean(g * xhat)),  g = d(xhat)
    RoPE (a rotation by +angle per column pair):   dx = RoPE(dy) with sin negated (the rotation by -angle)

These are what the CPU trains with (the demo's tiny J-DiT is bound by per-call overhead: measured in
docs/cpu.md). Without a gradient the same forwards run as plain functions (nothing saved). Tested against
autograd of the references (tests/test_dit_cpu_grads.py).
"""

from __future__ import annotations

import torch

from lavin_fast.ops.rope import rope_rotate


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the references compute in: float32 for 16/32-bit, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def rms_rstd(xf: torch.Tensor, eps: float, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """1 / sqrt(mean(xf^2 over dim) + eps), keepdim, in xf's dtype.

    The mean of squares comes from one vector-norm reduction (||x||^2 / n) rather than pow then mean: one pass
    over xf and no [.., D] temporary, which is what an eager CPU run pays for (the same value up to rounding).
    """
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = 1
    for d in dims:
        n *= xf.shape[d]
    norm = torch.linalg.vector_norm(xf, dim=dims, keepdim=True)
    return torch.rsqrt(norm.square() / n + eps)


class _NoCtx:
    """Stands in for autograd's ctx when no gradient is needed: the forwards run as they are, nothing is kept."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


def _rms_grad(g: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dx of xhat = x * rstd over the last dim, given g = d(loss)/d(xhat): rstd * (g - xhat * mean(g * xhat))."""
    dot = torch.linalg.vecdot(g, xhat, dim=-1).unsqueeze(-1)
    return torch.addcmul(g, xhat, dot, value=-1.0 / g.shape[-1]).mul_(rstd)


class _ModulateFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, eps):
        c = compute_dtype(x)
        xf = x.to(c)
        rstd = rms_rstd(xf, eps, (-1,))
        xhat = xf * rstd
        s1 = 1 + scale.to(c)[:, None, :]
        ctx.save_for_backward(xhat, rstd, s1)
        ctx.dtypes = (x.dtype, scale.dtype)
        return (xhat * s1).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        xhat, rstd, s1 = ctx.saved_tensors
        dyf = dy.to(xhat.dtype)
        dscale = (dyf * xhat).sum(1) if ctx.needs_input_grad[1] else None
        dx = _rms_grad(dyf * s1, xhat, rstd) if ctx.needs_input_grad[0] else None
        return (
            None if dx is None else dx.to(ctx.dtypes[0]),
            None if dscale is None else dscale.to(ctx.dtypes[1]),
            None,
        )


class _GatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, h, gate, eps):
        c = compute_dtype(h)
        hf = h.to(c)
        rstd = rms_rstd(hf, eps, (-1,))
        normed = hf * rstd
        tg = torch.tanh(gate.to(c))[:, None, :]
        ctx.save_for_backward(normed, rstd, tg)
        ctx.dtypes = (residual.dtype, h.dtype, gate.dtype)
        return torch.addcmul(residual.to(c), tg, normed).to(residual.dtype)

    @staticmethod
    def backward(ctx, dy):
        normed, rstd, tg = ctx.saved_tensors
        dyf = dy.to(normed.dtype)
        dres = dy if ctx.needs_input_grad[0] else None
        dh = _rms_grad(dyf * tg, normed, rstd).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        dgate = None
        if ctx.needs_input_grad[2]:
            dgate = ((dyf * normed).sum(1) * (1 - tg[:, 0].square())).to(ctx.dtypes[2])
        return dres, dh, dgate, None


def rms_norm_modulate(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`sandwich_norm.reference_rms_norm_modulate` (the same forward values) with a hand-written backward."""
    if not _needs_grad(x, scale):
        return _ModulateFn.forward(_NoCtx(), x, scale, eps)
    return _ModulateFn.apply(x, scale, eps)


def gated_rms_norm_residual(
    residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """`sandwich_norm.reference_gated_rms_norm_residual` (the same forward values) with a hand-written backward."""
    if not _needs_grad(residual, h, gate):
        return _GatedFn.forward(_NoCtx(), residual, h, gate, eps)
    return _GatedFn.apply(residual, h, gate, eps)


class _QKNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, num_q_heads, q_weight, k_weight, eps):
        Hq = num_q_heads
        B, L, Hs, hd = qk.shape
        xf = qk.to(compute_dtype(qk))
        rq = rms_rstd(xf[:, :, :Hq], eps, (-2, -1))
        rk = rms_rstd(xf[:, :, Hq:], eps, (-2, -1))
        rstd = torch.cat([rq.expand(B, L, Hq, 1), rk.expand(B, L, Hs - Hq, 1)], dim=2)
        weight = torch.cat([q_weight, k_weight]).to(qk.dtype).view(Hs, hd)
        xhat = xf * rstd
        ctx.save_for_backward(xhat, rq, rk, weight)
        ctx.meta = (Hq, qk.dtype, q_weight.dtype, k_weight.dtype)
        return xhat.to(qk.dtype) * weight

    @staticmethod
    def backward(ctx, dy):
        xhat, rq, rk, weight = ctx.saved_tensors
        Hq, dtype, q_dtype, k_dtype = ctx.meta
        dy = dy.contiguous()  # it arrives as a view of the head-major attention gradient: one copy, then dense passes
        dqw = dkw = dqk = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw = (dy * xhat.to(dtype)).sum((0, 1)).flatten()
            n = Hq * xhat.shape[-1]
            dqw, dkw = dw[:n].to(q_dtype), dw[n:].to(k_dtype)
        if ctx.needs_input_grad[0]:
            # per group (q heads, k heads): rstd * (g - xhat * mean(g * xhat) over the group's whole width)
            g = (dy * weight).to(xhat.dtype)
            dots = torch.linalg.vecdot(g, xhat, dim=-1)  # [B, L, Hs] per head; summed per group below
            B, L, Hs, hd = xhat.shape
            dq = dots[:, :, :Hq].sum(-1, keepdim=True)[..., None] * (-1.0 / (Hq * hd))
            dk = dots[:, :, Hq:].sum(-1, keepdim=True)[..., None] * (-1.0 / ((Hs - Hq) * hd))
            dotn = torch.cat([dq.expand(B, L, Hq, 1), dk.expand(B, L, Hs - Hq, 1)], dim=2)
            rstd = torch.cat([rq.expand(B, L, Hq, 1), rk.expand(B, L, Hs - Hq, 1)], dim=2)
            dqk = torch.addcmul(g, xhat, dotn).mul_(rstd).to(dtype)
        return dqk, None, dqw, dkw, None


def qk_norm(
    qk: torch.Tensor, num_q_heads: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """`qk_norm_rope.reference_qk_norm` (the same forward values) with a hand-written backward."""
    if not _needs_grad(qk, q_weight, k_weight):
        return _QKNormFn.forward(_NoCtx(), qk, num_q_heads, q_weight, k_weight, eps)
    return _QKNormFn.apply(qk, num_q_heads, q_weight, k_weight, eps)


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, split):
        ctx.save_for_backward(cos, sin)
        ctx.split = split
        return rope_rotate(x, cos, sin, split)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        # the transpose of a rotation is the rotation by the opposite angle (u and v columns share a frequency)
        return rope_rotate(dy.contiguous(), cos, -sin, ctx.split), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, split: tuple[int, int, int]) -> torch.Tensor:
    """`rope.rope_rotate` (the same forward values) with a hand-written backward (tables carry no gradient)."""
    if not _needs_grad(x):
        return rope_rotate(x, cos, sin, split)
    return _RopeFn.apply(x, cos, sin, split)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu):
        g, u = gu.chunk(2, dim=-1)
        sg = torch.nn.functional.silu(g)
        ctx.save_for_backward(g, u, sg)
        return sg * u

    @staticmethod
    def backward(ctx, dy):
        g, u, sg = ctx.saved_tensors
        # d(gate | up) written into one tensor: no concatenation of the two halves' gradients
        dgu = dy.new_empty((*dy.shape[:-1], 2 * dy.shape[-1]))
        dg, du = dgu.chunk(2, dim=-1)
        torch.ops.aten.silu_backward(dy * u, g, grad_input=dg)
        torch.mul(dy, sg, out=du)
        return dgu


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of gu = [gate | up] along the last dim, with a hand-written backward (one gradient tensor
    for both halves instead of autograd's chunk, SiLU and product backward plus their concatenation) on the CPU
    in eager mode; elsewhere the plain form."""
    if not _needs_grad(gu) or gu.device.type != "cpu" or torch.compiler.is_compiling():  # Inductor fuses its own
        g, u = gu.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u
    return _SwiGLUFn.apply(gu)
