"""Attention over a sequence split across the ranks of a process group: Ulysses, ring and their hybrid.

Each rank holds a slice of one joint sequence, q [B, Ls, Hq, hd] and k, v [B, Ls, Hkv, hd], RoPE already
applied at the tokens' global positions. Slices may hold padding: `valid[j]` lists (a list or a long tensor)
the real positions of rank j's slice (None: all Ls are real), the same on every rank. Every function returns this rank's
slice of the output, [B, Ls, Hq, hd] (rows at padded positions are unspecified and must be dropped), and is
differentiable in q, k and v. Padding never reaches a softmax: padded keys are removed before attention, so
the result equals unpadded attention exactly.

- `ulysses_attention`: an all-to-all turns sequence slices into head slices [B, N*Ls, H/N, hd], the full
  sequence goes through `lavin_fast.ops.attention` (any backend), a second all-to-all turns it back.
  GQA with Hkv not divisible by N: each kv head is repeated just enough (Hkv -> lcm(Hkv, N)).
- `ring_attention`: the k/v slices travel around the ring (async P2P, the next slice in flight while the
  current one is computed); partial outputs are merged by their logsumexp; the backward (an
  autograd.Function) sends k/v around once more with their dk/dv accumulators, using the saved output and
  logsumexp (no forward recomputation). Per-block attention with its logsumexp: torch's flash kernels
  (CPU: `_scaled_dot_product_flash_attention_for_cpu`, CUDA fp16/bf16: `_scaled_dot_product_flash_attention`),
  a float32 math fallback elsewhere.
- `hybrid_attention`: Ulysses inside groups of `ulysses` ranks, ring across the groups.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------
# Differentiable collectives
# --------------------------------------------------------------------------------------------


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """[B, Ls, H, hd] sequence slice -> [B, N*Ls, H/N, hd] head slice (rank j's tokens in block j)."""
    n = dist.get_world_size(group)
    B, Ls, H, hd = x.shape
    send = x.reshape(B, Ls, n, H // n, hd).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(B, n * Ls, H // n, hd)


def _heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of _seq_to_heads: [B, N*Ls, H/N, hd] -> [B, Ls, H, hd]."""
    n = dist.get_world_size(group)
    B, L, h, hd = x.shape
    send = x.reshape(B, n, L // n, h, hd).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, L // n, n * h, hd)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g.contiguous(), ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g.contiguous(), ctx.group), None


class GatherSequence(torch.autograd.Function):
    """All-gather [B, Ls, ...] slices into [N, B, Ls, ...] on every rank. Backward: this rank's slice of the
    incoming gradient, for a result that every rank consumes identically (so each rank's gradient is its
    share of one loss, and the gradients of parameters sum over the ranks)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g):
        return g[ctx.rank], None


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid, n: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"q, k, v: expected [B, Ls, Hq, hd] and two [B, Ls, Hkv, hd], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(
            f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same B, Ls, head dim; Hq a multiple of Hkv"
        )
    if valid is not None and len(valid) != n:
        raise ValueError(f"valid: expected one entry per rank ({n}), got {len(valid)}")


def _gathered_valid(valid, n: int, ls: int, device) -> torch.Tensor | None:
    """Positions of the real tokens in the concatenation of the n slices (None: all are real)."""
    if valid is None or all(v is None or len(v) == ls for v in valid):
        return None
    idx = [torch.arange(ls, device=device) if v is None else torch.as_tensor(v, device=device).long() for v in valid]
    return torch.cat([j * ls + i for j, i in enumerate(idx)])


def repeat_kv_for(hq: int, hkv: int, n: int) -> int:
    """How often each kv head must be repeated so that n ranks each get whole kv heads (1: never)."""
    if hq % n:
        raise ValueError(
            f"Ulysses over {n} ranks needs the query heads ({hq}) divisible by {n}; use context_parallel_mode "
            "'ring' or 'hybrid' for this degree"
        )
    return n // math.gcd(hkv, n)


# --------------------------------------------------------------------------------------------
# Ulysses
# --------------------------------------------------------------------------------------------


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group,
    valid=None,
    softmax_scale: float | None = None,
    backend: str = "auto",
    inner=None,
) -> torch.Tensor:
    """Ulysses attention of this rank's slice (see the module doc). inner(q, k, v, keep) replaces the local
    full-sequence attention (used by the hybrid); keep: positions of real tokens in the gathered sequence."""
    from lavin_fast.ops.attention import attention

    n = dist.get_world_size(group)
    _check(q, k, v, valid, n)
    rep = repeat_kv_for(q.shape[2], k.shape[2], n)
    if rep > 1:  # GQA with fewer kv heads than ranks: every rank needs whole kv heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    qh, kh, vh = (_SeqToHeads.apply(t, group) for t in (q, k, v))
    keep = _gathered_valid(valid, n, q.shape[1], q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if inner is not None:
        oh = inner(qh, kh, vh, keep)
    elif keep is None:
        oh = attention(qh, kh, vh, softmax_scale=scale, backend=backend)
    else:  # padded tokens leave before the softmax and come back as zero rows
        o = attention(qh[:, keep], kh[:, keep], vh[:, keep], softmax_scale=scale, backend=backend)
        oh = o.new_zeros(qh.shape).index_copy(1, keep, o)
    return _HeadsToSeq.apply(oh, group)


# --------------------------------------------------------------------------------------------
# Ring: per-block attention with its logsumexp, forward and backward
# --------------------------------------------------------------------------------------------
# Inside the ring q is folded [B, Hkv, rep*Lq, hd] (GQA without repeating k/v: the rep query heads of a kv
# head are just more query rows) and k, v are [B, Hkv, Lk, hd].


def _fold_q(q: torch.Tensor, hkv: int) -> torch.Tensor:
    B, L, H, hd = q.shape
    return q.reshape(B, L, hkv, H // hkv, hd).permute(0, 2, 3, 1, 4).reshape(B, hkv, (H // hkv) * L, hd)


def _unfold_q(x: torch.Tensor, hq: int) -> torch.Tensor:
    B, hkv, RL, hd = x.shape
    L = RL // (hq // hkv)
    return x.reshape(B, hkv, hq // hkv, L, hd).permute(0, 3, 1, 2, 4).reshape(B, L, hq, hd)


def _uses_flash(q: torch.Tensor) -> bool:
    if q.device.type == "cpu":
        return True
    return q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0


def block_forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, Lq, hd] in q's dtype, logsumexp [B, H, Lq] float32) of q against one k/v block."""
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
        return o, lse.float()
    if _uses_flash(q):
        o, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
        return o, lse.float()
    return math_block_forward(q, k, v, scale)


def math_block_forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """block_forward in float32 math (materialises the [Lq, Lk] scores: the fallback, and the tests' yardstick)."""
    s = torch.einsum("bhld,bhmd->bhlm", q.float(), k.float()) * scale
    lse = s.logsumexp(-1)
    return torch.einsum("bhlm,bhmd->bhld", (s - lse[..., None]).exp(), v.float()).to(q.dtype), lse


def block_backward(do, q, k, v, out, lse, scale: float) -> tuple[torch.Tensor, ...]:
    """dq, dk, dv of one block given the *merged* output and logsumexp (P = exp(S - lse))."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, False, scale=scale
        )
    if _uses_flash(q):
        empty = torch.empty(0, device=q.device)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse, empty, empty, q.shape[2], k.shape[2], 0.0, False, seed, seed, scale=scale
        )
    return math_block_backward(do, q, k, v, out, lse, scale)


def math_block_backward(do, q, k, v, out, lse, scale: float) -> tuple[torch.Tensor, ...]:
    """block_backward in float32 math."""
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    p = (torch.einsum("bhld,bhmd->bhlm", qf, kf) * scale - lse[..., None]).exp()
    dv = torch.einsum("bhlm,bhld->bhmd", p, dof)
    dp = torch.einsum("bhld,bhmd->bhlm", dof, vf)
    delta = (dof * out.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bhlm,bhmd->bhld", ds, kf)
    dk = torch.einsum("bhlm,bhld->bhmd", ds, qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _Ring:
    """Send to rank + 1 and receive from rank - 1 of `group`, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.n, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.n)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.n)

    def start(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group), dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(reqs: list) -> None:
        for r in reqs:
            r.wait()


def _block_keys(valid, j: int, ls: int, device):
    if valid is None or valid[j] is None or len(valid[j]) == ls:
        return None
    return torch.as_tensor(valid[j], device=device, dtype=torch.long)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, valid, scale):
        ring = _Ring(group)
        hq, hkv = q.shape[2], k.shape[2]
        qf = _fold_q(q, hkv).contiguous()
        kv = torch.cat([k, v], dim=-1).transpose(1, 2).contiguous()  # [B, Hkv, Ls, 2 hd]: one message
        hd, ls = q.shape[-1], q.shape[1]
        out = torch.zeros(qf.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(qf.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
        for i in range(ring.n):
            reqs = None
            if i < ring.n - 1:
                nxt, reqs = ring.start(kv)  # the next block travels while this one is computed
            j = (ring.rank - i) % ring.n
            keys = _block_keys(valid, j, ls, q.device)
            kb, vb = kv[..., :hd], kv[..., hd:]
            if keys is not None:
                kb, vb = kb.index_select(2, keys), vb.index_select(2, keys)
            if kb.shape[2] > 0:
                o_b, lse_b = block_forward(qf, kb.contiguous(), vb.contiguous(), scale)
                new = torch.logaddexp(lse, lse_b)
                out = out * (lse - new).exp()[..., None] + o_b.float() * (lse_b - new).exp()[..., None]
                lse = new
            if reqs is not None:
                ring.wait(reqs)
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(qf, k, v, out, lse)
        ctx.group, ctx.valid, ctx.scale, ctx.hq = group, valid, scale, hq
        return _unfold_q(out, hq)

    @staticmethod
    def backward(ctx, g):
        qf, k, v, out, lse = ctx.saved_tensors
        ring = _Ring(ctx.group)
        hkv, hd, ls = k.shape[2], k.shape[3], k.shape[1]
        do = _fold_q(g, hkv).contiguous()
        kv = torch.cat([k, v], dim=-1).transpose(1, 2).contiguous()
        dq = torch.zeros(qf.shape, dtype=torch.float32, device=qf.device)
        dkv = None  # the accumulator of the block in hand; it travels with its k/v
        dkv_reqs = None
        for i in range(ring.n):
            kv_reqs = None
            if i < ring.n - 1:
                kv_next, kv_reqs = ring.start(kv)
            j = (ring.rank - i) % ring.n
            keys = _block_keys(ctx.valid, j, ls, qf.device)
            kb, vb = kv[..., :hd], kv[..., hd:]
            if keys is not None:
                kb, vb = kb.index_select(2, keys), vb.index_select(2, keys)
            contrib = torch.zeros(kv.shape, dtype=torch.float32, device=qf.device)
            if kb.shape[2] > 0:
                dq_b, dk_b, dv_b = block_backward(do, qf, kb.contiguous(), vb.contiguous(), out, lse, ctx.scale)
                dq += dq_b.float()
                dkv_b = torch.cat([dk_b, dv_b], dim=-1).float()
                if keys is None:
                    contrib = dkv_b
                else:
                    contrib.index_copy_(2, keys, dkv_b)
            if dkv_reqs is not None:
                ring.wait(dkv_reqs)
                contrib = contrib + dkv
            dkv, dkv_reqs = ring.start(contrib)  # to the next rank, which holds this block next
            if kv_reqs is not None:
                ring.wait(kv_reqs)
                kv = kv_next
        ring.wait(dkv_reqs)  # after n hops every accumulator is back with its block's owner
        dk, dv = dkv[..., :hd].transpose(1, 2), dkv[..., hd:].transpose(1, 2)
        return _unfold_q(dq.to(qf.dtype), ctx.hq), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, valid=None, softmax_scale: float | None = None
) -> torch.Tensor:
    """Ring attention of this rank's slice (see the module doc); any head counts and any degree."""
    _check(q, k, v, valid, dist.get_world_size(group))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k, v, group, valid, scale)


# --------------------------------------------------------------------------------------------
# Hybrid
# --------------------------------------------------------------------------------------------


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    ulysses_group,
    ring_group,
    valid=None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Ulysses inside `ulysses_group` (size u), ring across `ring_group` (size r); degree u * r.

    Ranks are laid out ring-major: cp rank = ring_rank * u + ulysses_rank, so `valid` (one entry per cp rank)
    is read in that order. After the all-to-all a rank holds the u slices of its Ulysses group, and the ring
    passes these u-slice blocks between the r groups."""
    u, r = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    _check(q, k, v, valid, u * r)
    ls = q.shape[1]
    ring_valid = None
    if valid is not None:
        ring_valid = []
        for g in range(r):
            keep = _gathered_valid(valid[g * u : (g + 1) * u], u, ls, q.device)
            ring_valid.append(keep)

    def inner(qh, kh, vh, keep):
        return ring_attention(qh, kh, vh, group=ring_group, valid=ring_valid, softmax_scale=softmax_scale)

    return ulysses_attention(q, k, v, group=ulysses_group, softmax_scale=softmax_scale, inner=inner)
