"""Context parallelism of the J-DiT: one joint sequence split over `cp` ranks, on a (dp_shard, cp) mesh.

`setup_context_parallel(ctx, degree, mode, num_heads=..., num_kv_heads=...)` builds the 2-D DeviceMesh
(dp_shard x cp; rank = dp_rank * cp + cp_rank), the process groups, and returns a `ContextParallel`;
`attach(model, cp)` makes the J-DiT use it (`JDiT.context_parallel`): every forward then
1. shards each stream (context tokens, target tokens) of each attention segment separately and evenly over
   the cp ranks (torch.tensor_split sizes, padded to ceil(L / cp) with zero tokens);
2. runs every token-wise op on the local tokens only;
3. applies the 3D RoPE at the tokens' global positions and attends across the ranks (cp_attention: Ulysses,
   ring or hybrid), padded keys removed before the softmax, so the result is exact;
4. all-gathers the x stream's output, so every cp rank returns the full prediction (loss and sampling code
   do not change). Its backward keeps this rank's slice: parameter gradients are per-rank shares that sum
   to the gradient of the one loss; `loss_scale` (= cp) makes FSDP2's / DDP's mean over all ranks that sum.
Samples (data) are split over dp_shard only: the cp ranks of one group see the same micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lavin_fast.parallel import cp_attention

MODES = ("auto", "ulysses", "ring", "hybrid")


@dataclass
class ContextParallel:
    """Where this rank sits on the (dp_shard, cp) mesh and how attention crosses the cp ranks.

    degree: cp ranks per sequence; rank: this rank's index among them. dp_rank, dp_world: the data-parallel
    coordinates (which samples this rank sees). mode: "ulysses", "ring" or "hybrid" (resolved, never "auto").
    ulysses: the Ulysses degree of the hybrid (degree for "ulysses", 1 for "ring").
    """

    degree: int
    rank: int
    dp_rank: int
    dp_world: int
    mode: str
    ulysses: int
    group: object = None
    ulysses_group: object = None
    ring_group: object = None
    mesh: object = None

    @property
    def loss_scale(self) -> float:
        """Factor on the loss before backward: gradients are per-rank shares, the reduction is a mean."""
        return float(self.degree)

    def plan(self, hp: int, wp: int, segments, lc: int, lx: int, head_dim: int, device) -> SequencePlan:
        return SequencePlan(self, hp, wp, segments, lc, lx, head_dim, device)

    def attention(self, q, k, v, valid, softmax_scale: float, backend: str) -> torch.Tensor:
        if self.mode == "ulysses":
            return cp_attention.ulysses_attention(
                q, k, v, group=self.group, valid=valid, softmax_scale=softmax_scale, backend=backend
            )
        if self.mode == "ring":
            return cp_attention.ring_attention(q, k, v, group=self.group, valid=valid, softmax_scale=softmax_scale)
        return cp_attention.hybrid_attention(
            q,
            k,
            v,
            ulysses_group=self.ulysses_group,
            ring_group=self.ring_group,
            valid=valid,
            softmax_scale=softmax_scale,
        )


def resolve_mode(mode: str, degree: int, num_heads: int, ulysses: int = 0) -> tuple[str, int]:
    """(mode, Ulysses degree). auto: Ulysses when the query heads divide over the degree, else the hybrid with
    the largest Ulysses degree that divides both, else ring."""
    if mode not in MODES:
        raise ValueError(f"context_parallel_mode: expected one of {MODES}, got {mode!r}")
    if mode == "auto":
        u = math.gcd(degree, num_heads)
        mode = "ulysses" if u == degree else ("ring" if u == 1 else "hybrid")
        return mode, u if mode != "ring" else 1
    if mode == "ulysses":
        if num_heads % degree:
            raise ValueError(
                f"context_parallel_mode 'ulysses': {num_heads} query heads do not divide over context_parallel "
                f"{degree}; use 'ring' or 'hybrid' (or 'auto')"
            )
        return mode, degree
    if mode == "ring":
        return mode, 1
    u = ulysses or math.gcd(degree, num_heads)
    if degree % u or num_heads % u or u < 1:
        raise ValueError(
            f"context_parallel_ulysses {u}: must divide context_parallel ({degree}) and the query heads ({num_heads})"
        )
    return mode, u


def setup_context_parallel(
    ctx, degree: int, mode: str = "auto", *, num_heads: int, ulysses: int = 0
) -> ContextParallel | None:
    """The mesh and groups for `degree` cp ranks per sequence (collective: every rank calls it). None for 1."""
    if degree == 1:
        return None
    if degree < 1:
        raise ValueError(f"context_parallel: expected >= 1, got {degree}")
    if not ctx.initialized or ctx.world % degree:
        raise ValueError(
            f"context_parallel {degree} needs a process group whose size is a multiple of it; this run has "
            f"{ctx.world} process(es) (launch with torchrun --nproc-per-node)"
        )
    mode, u = resolve_mode(mode, degree, num_heads, ulysses)
    from torch.distributed.device_mesh import init_device_mesh

    dp = ctx.world // degree
    mesh = init_device_mesh(ctx.device.type, (dp, degree), mesh_dim_names=("dp_shard", "cp"))
    d, c = divmod(ctx.rank, degree)
    cp = ContextParallel(degree, c, d, dp, mode, u, group=mesh.get_group("cp"), mesh=mesh)
    if mode == "hybrid":  # cp rank = ring_rank * u + ulysses_rank, inside each dp group
        r = degree // u
        for dd in range(dp):
            base = dd * degree
            for g in range(r):
                grp = dist.new_group([base + g * u + i for i in range(u)])
                if dd == d and g == c // u:
                    cp.ulysses_group = grp
            for i in range(u):
                grp = dist.new_group([base + g * u + i for g in range(r)])
                if dd == d and i == c % u:
                    cp.ring_group = grp
    return cp


def attach(model: torch.nn.Module, cp: ContextParallel | None) -> torch.nn.Module:
    """Make the J-DiT (or the module wrapping it) shard its sequences with `cp` (None: off); returns model."""
    target = model.module if hasattr(model, "module") else model
    if not hasattr(target, "context_parallel"):
        raise ValueError(f"context parallelism needs a J-DiT (JDiT.context_parallel); got {type(target).__name__}")
    target.context_parallel = cp
    return model


def attach_for_sampling(dit: torch.nn.Module, ctx, mode: str = "auto") -> ContextParallel | None:
    """Under torchrun, sampling splits every sequence over all ranks (no data parallelism: each rank runs the
    same Euler loop on the same noise and holds the same result). One process: nothing. Collective."""
    if not ctx.initialized or ctx.world == 1:
        return None
    cp = setup_context_parallel(ctx, ctx.world, mode, num_heads=dit.cfg.num_heads)
    attach(dit, cp)
    return cp


# --------------------------------------------------------------------------------------------
# The per-forward plan: which tokens each rank holds, their positions, the attention calls
# --------------------------------------------------------------------------------------------


def _split(n: int, parts: int) -> list[int]:
    """torch.tensor_split sizes: the first n % parts ranks get one token more."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


class _Stream:
    """The tokens of one stream (cond or x) as split over the ranks, segment by segment."""

    def __init__(self, ranges: list[tuple[int, int]], n: int):
        self.pad = [-(-size // n) for _, size in ranges]  # local (padded) length of each segment
        self.local_len = sum(self.pad)
        self.counts = [_split(size, n) for _, size in ranges]  # [segment][rank] real tokens
        rows = []  # per rank: [local_len] global token index, -1 for padding
        for r in range(n):
            parts = []
            for (start, _), pad, counts in zip(ranges, self.pad, self.counts, strict=True):
                part = torch.full((pad,), -1, dtype=torch.long)
                first = start + sum(counts[:r])
                part[: counts[r]] = torch.arange(first, first + counts[r])
                parts.append(part)
            rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
        self.index = torch.stack(rows)  # [n, local_len]
        self.offsets = [sum(self.pad[:s]) for s in range(len(ranges))]
        self.total = sum(size for _, size in ranges)


class SequencePlan:
    """How one forward's sequences sit on the cp ranks (built by JDiT._run; carried by the Layout)."""

    def __init__(self, cp: ContextParallel, hp: int, wp: int, segments, lc: int, lx: int, head_dim: int, device):
        from lavin_fast.ops.rope import rope_inv_freq, rope_split

        self.cp, self.segments = cp, tuple(segments)
        n, hw = cp.degree, hp * wp
        self.cond = _Stream([(s.c_frame * hw, s.c_frames * hw) for s in segments], n)
        self.x = _Stream([(s.x_frame * hw, s.x_frames * hw) for s in segments], n)
        if self.cond.total > lc or self.x.total > lx:
            raise ValueError(f"segments cover {self.cond.total} / {self.x.total} tokens, the streams hold {lc} / {lx}")
        self.lx = lx
        # global (t, y, x) RoPE positions of this rank's tokens (cond frames first in each segment)
        pos = []
        for stream, first_frame in ((self.cond, lambda s: s.c_frame), (self.x, lambda s: s.x_frame)):
            p = torch.zeros(stream.local_len, 3)
            for si, s in enumerate(segments):
                t0 = s.t_offset + (s.c_frames if stream is self.x else 0)
                o, cnt = stream.offsets[si], stream.counts[si][cp.rank]
                g = stream.index[cp.rank, o : o + cnt] - first_frame(s) * hw
                p[o : o + cnt] = torch.stack([t0 + g // hw, (g // wp) % hp, g % wp], dim=-1).float()
            pos.append(p)
        axis = torch.cat([torch.full((d,), i) for i, d in enumerate(rope_split(head_dim))])
        self.split = rope_split(head_dim)
        # per segment, every rank's real positions in its local joint slice [cond part ; x part] (None: no padding)
        self.valid = []
        for si in range(len(segments)):
            cpad, xpad = self.cond.pad[si], self.x.pad[si]
            cc, xc = self.cond.counts[si], self.x.counts[si]
            if all(cc[r] == cpad and xc[r] == xpad for r in range(n)):
                self.valid.append(None)
            else:
                ar = torch.arange(max(cpad, xpad, 1), device=device)
                self.valid.append([torch.cat([ar[: cc[r]], cpad + ar[: xc[r]]]) for r in range(n)])
        self.rope = []
        for p in pos:
            angle = p.to(device)[:, axis] * rope_inv_freq(head_dim, device)[None, :]
            self.rope.append((angle.cos(), angle.sin()))

    # ---------------------------------------------------------------- tokens
    def _shard(self, tokens: torch.Tensor, stream: _Stream) -> torch.Tensor:
        idx = stream.index[self.cp.rank].to(tokens.device)
        padded = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, *tokens.shape[2:])], dim=1)
        return padded[:, torch.where(idx < 0, tokens.shape[1], idx)]

    def shard_cond(self, cs: torch.Tensor) -> torch.Tensor:
        return self._shard(cs, self.cond)

    def shard_x(self, xs: torch.Tensor) -> torch.Tensor:
        return self._shard(xs, self.x)

    def gather_x(self, local: torch.Tensor) -> torch.Tensor:
        """[B, local x tokens, ...] on every rank -> [B, Lx, ...] (x tokens outside every segment are zeros)."""
        parts = cp_attention.GatherSequence.apply(local, self.cp.group)  # [N, B, Ll, ...]
        n, ll = parts.shape[0], parts.shape[2]
        flat = parts.transpose(0, 1).reshape(parts.shape[1], n * ll, *parts.shape[3:])
        index = self.x.index.flatten()  # gathered position r * ll + i -> global token (or -1)
        src = (index >= 0).nonzero().flatten()
        dst = index[src]
        out = flat.new_zeros(flat.shape[0], self.lx, *flat.shape[2:])
        return out.index_copy(1, dst.to(flat.device), flat[:, src.to(flat.device)])

    # ---------------------------------------------------------------- attention
    def _rotate(self, t: torch.Tensor, which: int) -> torch.Tensor:
        from lavin_fast.ops.rope import rotate_half_chunks

        cos, sin = (a.to(t.dtype)[None, :, None, :] for a in self.rope[which])
        return t * cos + rotate_half_chunks(t, self.split) * sin

    def joint_attention(self, qc, kc, vc, qx, kx, vx, *, softmax_scale: float, backend: str):
        """Local outputs (oc [B, Lc_local, H, hd], ox) of joint attention over every rank's tokens, per segment;
        q and k normalised but not rotated (RoPE is applied here, at global positions)."""
        qc, kc, qx, kx = self._rotate(qc, 0), self._rotate(kc, 0), self._rotate(qx, 1), self._rotate(kx, 1)
        outs_c, outs_x = [], []
        for si in range(len(self.segments)):
            co, cpad = self.cond.offsets[si], self.cond.pad[si]
            xo, xpad = self.x.offsets[si], self.x.pad[si]
            cs, xs = slice(co, co + cpad), slice(xo, xo + xpad)
            q = torch.cat([qc[:, cs], qx[:, xs]], dim=1)
            k = torch.cat([kc[:, cs], kx[:, xs]], dim=1)
            v = torch.cat([vc[:, cs], vx[:, xs]], dim=1)
            o = self.cp.attention(q, k, v, self.valid[si], softmax_scale, backend)
            outs_c.append(o[:, :cpad])
            outs_x.append(o[:, cpad:])
        oc = outs_c[0] if len(outs_c) == 1 else torch.cat(outs_c, dim=1)
        ox = outs_x[0] if len(outs_x) == 1 else torch.cat(outs_x, dim=1)
        return oc, ox
