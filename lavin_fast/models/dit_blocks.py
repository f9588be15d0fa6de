"""Building blocks of the J-DiT: joint attention, SwiGLU, the joint block, time embedding, final layer.

Every hot path (QK RMSNorm + RoPE, attention, the sandwich norms) goes through `lavin_fast.ops`, so
the kernels switch with the backend; the rest is plain PyTorch (GEMMs, SiLU, the embedders).

Fused layouts (the loader in dit.py maps the published names onto these):
- per stream one `qkv` Linear(D -> (H + 2 Hkv) hd): rows [q | k | v] (published q, k, v stacked);
- per stream one SwiGLU `gate_up` Linear(D -> 2F): rows [gate | up];
- per stream one modulation Linear(D -> 4D) taking SiLU(c) (computed once per forward for all blocks).

Token layout ("segments"): the cond stream is [B, Lc, D] and the x stream [B, Lx, D]. A segment is one
attention sequence made of a run of cond frames and a run of x frames; a plain forward has one segment,
the packed guided forward has two (conditional and null context, each with its copy of x), so that all
token-wise work runs in one call and only attention is per segment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lavin_fast import ops
from lavin_fast.models.dit_configs import DiTConfig
from lavin_fast.ops import cpu_fused, torch_grads
from lavin_fast.ops.dispatch import requested_backend
from lavin_fast.ops.qk_norm_rope import selected_backend as qk_norm_rope_backend
from lavin_fast.ops.rope import check_grid, rope_split, rope_tables


@dataclass(frozen=True)
class Segment:
    """One joint-attention sequence: cond frames [c_frame, c_frame + c_frames) of the cond stream and x frames
    [x_frame, x_frame + x_frames) of the x stream; RoPE time positions start at t_offset (cond first)."""

    c_frame: int
    c_frames: int
    x_frame: int
    x_frames: int
    t_offset: int = 0


@dataclass(frozen=True)
class Layout:
    """Token geometry shared by every block of one forward: patch grid (hp, wp) and the segments."""

    hp: int
    wp: int
    segments: tuple[Segment, ...]
    cp: object | None = None
    """Context parallelism: the plan of how the tokens sit on the ranks (lavin_fast.parallel.context_parallel's
    SequencePlan); the streams then hold this rank's tokens only. None: the whole sequence is here."""

    @property
    def hw(self) -> int:
        return self.hp * self.wp


def cpu_kernels_wanted(backend: str) -> bool:
    """Whether the model may use the C++ CPU kernels (ops/cpu_fused.py) for the ops that have no dispatcher of
    their own (SwiGLU, the QKV layout chain): when the sandwich norm's backend in force (argument, `use_backend`
    scope, environment) is auto or cpu, never when the torch forms were asked for by name."""
    if torch.compiler.is_compiling():  # Inductor fuses the torch forms
        return False
    return requested_backend("rms_norm_modulate", backend) in ("auto", "cpu")


def _xavier_(weight: torch.Tensor, row_splits: list[int] | None = None) -> None:
    """Xavier-uniform init; a fused weight is initialised part by part, as the separate published linears."""
    parts = torch.split(weight, row_splits, dim=0) if row_splits else [weight]
    with torch.no_grad():
        for p in parts:
            nn.init.xavier_uniform_(p)


class JointAttention(nn.Module):
    """Per-stream fused QKV projections, QK RMSNorm (learned weight over the whole width) + 3D RoPE,
    grouped-query joint attention over [cond ; x], per-stream output projections."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D, H, Hkv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg = cfg
        self.num_heads, self.num_kv_heads, self.head_dim = H, Hkv, hd
        self.qkv_splits = [H * hd, Hkv * hd, Hkv * hd]
        for s in ("cond", "x"):
            setattr(self, f"{s}_qkv", nn.Linear(D, sum(self.qkv_splits), bias=False))
            setattr(self, f"{s}_qnorm", nn.Parameter(torch.ones(H * hd)))
            setattr(self, f"{s}_knorm", nn.Parameter(torch.ones(Hkv * hd)))
            setattr(self, f"{s}_proj", nn.Linear(H * hd, D, bias=False))

    def reset_parameters(self) -> None:
        for s in ("cond", "x"):
            _xavier_(getattr(self, f"{s}_qkv").weight, self.qkv_splits)
            _xavier_(getattr(self, f"{s}_proj").weight)
            nn.init.ones_(getattr(self, f"{s}_qnorm"))
            nn.init.ones_(getattr(self, f"{s}_knorm"))

    def _split_qkv(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, (H+2Hkv) hd] -> strided views q [B, L, H, hd], k, v [B, L, Hkv, hd] (no copies)."""
        B, L, _ = t.shape
        q, k, v = t.split(self.qkv_splits, dim=-1)
        hd = self.head_dim
        return q.unflatten(-1, (self.num_heads, hd)), k.unflatten(-1, (-1, hd)), v.unflatten(-1, (-1, hd))

    def forward(
        self, hc: torch.Tensor, hx: torch.Tensor, layout: Layout, need_cond: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Attention outputs (a_cond, a_x); a_cond is None when need_cond is False (the last block)."""
        cfg = self.cfg
        tc, tx = self.cond_qkv(hc), self.x_qkv(hx)
        qc, kc, vc = self._split_qkv(tc)
        qx, kx, vx = self._split_qkv(tx)
        if layout.cp is not None:  # context parallelism: RoPE at global positions, attention across ranks
            qc, kc = ops.qk_norm_rope(qc, kc, self.cond_qnorm, self.cond_knorm, None, eps=cfg.eps, backend=cfg.backend)
            qx, kx = ops.qk_norm_rope(qx, kx, self.x_qnorm, self.x_knorm, None, eps=cfg.eps, backend=cfg.backend)
            oc, ox = layout.cp.joint_attention(
                qc, kc, vc, qx, kx, vx, softmax_scale=self.head_dim**-0.5, backend=cfg.backend
            )
            return (self.cond_proj(oc.flatten(2)) if need_cond else None), self.x_proj(ox.flatten(2))
        if qk_norm_rope_backend(qc, self.cond_qnorm, cfg.backend) == "torch":
            return self._forward_torch(tc, tx, layout, need_cond)
        hw = layout.hw
        in_attn = cfg.rope_in_attention
        if in_attn:  # norm only here (one call per stream); RoPE inside attention, per segment
            qc, kc = ops.qk_norm_rope(qc, kc, self.cond_qnorm, self.cond_knorm, None, eps=cfg.eps, backend=cfg.backend)
            qx, kx = ops.qk_norm_rope(qx, kx, self.x_qnorm, self.x_knorm, None, eps=cfg.eps, backend=cfg.backend)
        outs_c, outs_x = [], []
        for seg in layout.segments:
            cs = slice(seg.c_frame * hw, (seg.c_frame + seg.c_frames) * hw)
            xs = slice(seg.x_frame * hw, (seg.x_frame + seg.x_frames) * hw)
            q_c, k_c, q_x, k_x = qc[:, cs], kc[:, cs], qx[:, xs], kx[:, xs]
            if not in_attn:
                # per-stream norm weights, joint positions: the x stream's frames follow the cond frames
                q_c, k_c = ops.qk_norm_rope(
                    q_c,
                    k_c,
                    self.cond_qnorm,
                    self.cond_knorm,
                    (seg.c_frames, layout.hp, layout.wp),
                    eps=cfg.eps,
                    rope_t_offset=seg.t_offset,
                    backend=cfg.backend,
                )
                q_x, k_x = ops.qk_norm_rope(
                    q_x,
                    k_x,
                    self.x_qnorm,
                    self.x_knorm,
                    (seg.x_frames, layout.hp, layout.wp),
                    eps=cfg.eps,
                    rope_t_offset=seg.t_offset + seg.c_frames,
                    backend=cfg.backend,
                )
            q = torch.cat([q_c, q_x], dim=1)
            k = torch.cat([k_c, k_x], dim=1)
            v = torch.cat([vc[:, cs], vx[:, xs]], dim=1)
            grid = (seg.c_frames + seg.x_frames, layout.hp, layout.wp) if in_attn else None
            o = ops.attention(
                q,
                k,
                v,
                softmax_scale=self.head_dim**-0.5,
                rope_grid=grid,
                rope_t_offset=seg.t_offset,
                backend=cfg.backend,
            )
            lc = seg.c_frames * hw
            outs_c.append(o[:, :lc])
            outs_x.append(o[:, lc:])
        oc = outs_c[0] if len(outs_c) == 1 else torch.cat(outs_c, dim=1)
        ox = outs_x[0] if len(outs_x) == 1 else torch.cat(outs_x, dim=1)
        return (self.cond_proj(oc.flatten(2)) if need_cond else None), self.x_proj(ox.flatten(2))

    def _forward_torch(
        self, tc: torch.Tensor, tx: torch.Tensor, layout: Layout, need_cond: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The plain-PyTorch path (the CPU; whenever the QK-norm op would run its torch reference): the same
        function as the op path with fewer passes over memory. Per stream one QK norm of q and k together
        (their own widths and weights), per segment one concatenation of q|k and one of v, then one RoPE pass
        over q and k together on the joint grid (the x frames follow the cond frames, so this equals the
        per-stream rotation with offsets) in the head-major layout that SDPA's CPU flash kernel reads fastest."""
        cfg = self.cfg
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        hw = layout.hw
        fused = self._qkv_cpu_kernel(tc, tx, layout) if tc.is_cpu and cpu_kernels_wanted(cfg.backend) else None
        if fused is not None:  # norm, RoPE and both concatenations in one C++ pass per stream and segment
            return self._attend(fused, layout, need_cond)
        wqk = (H + Hkv) * hd
        # split, not two slices: its backward writes the fused projection's gradient in one concatenation
        qk_c, vc = (t.unflatten(-1, (-1, hd)) for t in tc.split([wqk, Hkv * hd], dim=-1))
        qk_x, vx = (t.unflatten(-1, (-1, hd)) for t in tx.split([wqk, Hkv * hd], dim=-1))
        # the reference's values; with a gradient, a hand-written backward (ops/torch_grads.py)
        qk_c = torch_grads.qk_norm(qk_c, H, self.cond_qnorm, self.cond_knorm, cfg.eps)
        qk_x = torch_grads.qk_norm(qk_x, H, self.x_qnorm, self.x_knorm, cfg.eps)
        prepared = []
        for seg in layout.segments:
            cs = slice(seg.c_frame * hw, (seg.c_frame + seg.c_frames) * hw)
            xs = slice(seg.x_frame * hw, (seg.x_frame + seg.x_frames) * hw)
            # head-major [B, H + Hkv, L, hd]: the concatenation writes the layout SDPA's CPU kernel reads fastest
            qk = torch.cat([qk_c[:, cs].transpose(1, 2), qk_x[:, xs].transpose(1, 2)], dim=2)
            v = torch.cat([vc[:, cs].transpose(1, 2), vx[:, xs].transpose(1, 2)], dim=2)
            grid = check_grid((seg.c_frames + seg.x_frames, layout.hp, layout.wp), qk.shape[2])
            cos, sin = rope_tables(grid, hd, seg.t_offset, qk.device, qk.dtype)  # [L, hd]
            prepared.append((torch_grads.rope(qk, cos, sin, rope_split(hd)), v))
        return self._attend(prepared, layout, need_cond)

    def _qkv_cpu_kernel(
        self, tc: torch.Tensor, tx: torch.Tensor, layout: Layout
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """_forward_torch's per-segment (qk rotated, v), head-major, from the C++ kernel; None where it does not
        apply (then the torch chain runs)."""
        hw, hd = layout.hw, self.head_dim
        segments = []
        for seg in layout.segments:
            grid = (seg.c_frames + seg.x_frames, layout.hp, layout.wp)
            cos, sin = rope_tables(grid, hd, seg.t_offset, tc.device, tc.dtype)
            segments.append(
                {"c_start": seg.c_frame * hw, "c_len": seg.c_frames * hw, "x_start": seg.x_frame * hw,
                 "x_len": seg.x_frames * hw, "cos": cos, "sin": sin}
            )  # fmt: skip
        weights = (self.cond_qnorm, self.cond_knorm, self.x_qnorm, self.x_knorm)
        heads = (self.num_heads, self.num_kv_heads, hd)
        return cpu_fused.qkv_prep(tc, tx, weights, heads, segments, self.cfg.eps)

    def _attend(
        self, prepared: list[tuple[torch.Tensor, torch.Tensor]], layout: Layout, need_cond: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Attention per segment over (qk [B, H + Hkv, L, hd] rotated, v [B, Hkv, L, hd]), then the output
        projections of the two streams."""
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        hw = layout.hw
        outs_c, outs_x = [], []
        for seg, (qk, v) in zip(layout.segments, prepared, strict=True):
            q, k = (t.transpose(1, 2) for t in qk.split([H, Hkv], dim=1))
            o = ops.attention(q, k, v.transpose(1, 2), softmax_scale=hd**-0.5, backend=self.cfg.backend)
            o = o.flatten(2)  # one copy to token-major rows; the two streams' parts are then row views
            o_c, o_x = o.split([seg.c_frames * hw, seg.x_frames * hw], dim=1)
            outs_c.append(o_c)
            outs_x.append(o_x)
        oc = outs_c[0] if len(outs_c) == 1 else torch.cat(outs_c, dim=1)
        ox = outs_x[0] if len(outs_x) == 1 else torch.cat(outs_x, dim=1)
        return (self.cond_proj(oc) if need_cond else None), self.x_proj(ox)


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x)) with gate and up fused into one GEMM (rows [gate | up]), no biases."""

    def __init__(self, dim: int, hidden: int, cfg: DiTConfig | None = None):
        super().__init__()
        self.cfg = cfg  # for the backend in force (JDiT.configure replaces it with the model's)
        self.hidden = hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def reset_parameters(self) -> None:
        _xavier_(self.gate_up.weight, [self.hidden, self.hidden])
        _xavier_(self.down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        backend = "auto" if self.cfg is None else self.cfg.backend
        h = cpu_fused.swiglu(gu) if gu.is_cpu and cpu_kernels_wanted(backend) else None  # None: not float32
        return self.down(torch_grads.swiglu(gu) if h is None else h)


class JointBlock(nn.Module):
    """One J-DiT block: sandwich-normed joint attention and per-stream SwiGLU, (1 + scale) modulation,
    tanh gates, drop path on both residual branches."""

    def __init__(self, cfg: DiTConfig, drop_path: float = 0.0, last: bool = False):
        super().__init__()
        D = cfg.hidden_size
        self.cfg = cfg
        self.drop_path = float(drop_path)
        # Only the x stream reaches the final layer: the last block's cond-side output projection, residuals
        # and SwiGLU cannot change the prediction (no gradient either), so they are skipped. Their weights
        # stay, as published, for checkpoint compatibility.
        self.last = last
        self.attn = JointAttention(cfg)
        self.cond_mlp = SwiGLU(D, cfg.mlp_hidden, cfg)
        self.x_mlp = SwiGLU(D, cfg.mlp_hidden, cfg)
        # input: SiLU(c) computed once per forward; output chunks: scale_attn, gate_attn, scale_mlp, gate_mlp
        self.cond_mod = nn.Linear(D, 4 * D)
        self.x_mod = nn.Linear(D, 4 * D)
        if last:  # frozen: they get no gradient, so DDP and the optimizer never wait for one
            for p in (*self.attn.cond_proj.parameters(), *self.cond_mlp.parameters()):
                p.requires_grad_(False)

    def reset_parameters(self) -> None:
        self.attn.reset_parameters()
        self.cond_mlp.reset_parameters()
        self.x_mlp.reset_parameters()
        for m in (self.cond_mod, self.x_mod):  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _residual(self, residual: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """residual + drop_path(tanh(gate) * RMSNorm(h)); without post_norm, residual + drop_path(tanh(gate) * h)."""
        eps, backend = self.cfg.eps, self.cfg.backend
        h = h.to(residual.dtype)  # no-op unless under torch.autocast
        p = self.drop_path
        if not self.cfg.post_norm:
            branch = torch.tanh(gate.to(residual.dtype))[:, None, :] * h
            if self.training and p > 0.0:
                keep = torch.rand(residual.shape[0], 1, 1, device=residual.device) >= p
                branch = branch * (keep.to(residual.dtype) / (1.0 - p))
            return residual + branch
        if self.training and p > 0.0:
            # the op computes the gated branch (zero residual); the per-sample keep mask scales it
            keep = torch.rand(residual.shape[0], 1, 1, device=residual.device) >= p
            scale = keep.to(residual.dtype) / (1.0 - p)
            branch = ops.gated_rms_norm_residual(torch.zeros_like(residual), h, gate, eps=eps, backend=backend)
            return residual + scale * branch
        return ops.gated_rms_norm_residual(residual, h, gate, eps=eps, backend=backend)

    def forward(
        self, cs: torch.Tensor, xs: torch.Tensor, silu_c: torch.Tensor, silu_x: torch.Tensor, layout: Layout
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eps, backend = self.cfg.eps, self.cfg.backend
        # the .to() are no-ops unless under torch.autocast (float32 residual streams, bf16 GEMM outputs)
        sa_c, ga_c, sm_c, gm_c = self.cond_mod(silu_c).to(cs.dtype).chunk(4, dim=-1)
        sa_x, ga_x, sm_x, gm_x = self.x_mod(silu_x).to(xs.dtype).chunk(4, dim=-1)
        hc = ops.rms_norm_modulate(cs, sa_c, eps=eps, backend=backend)
        hx = ops.rms_norm_modulate(xs, sa_x, eps=eps, backend=backend)
        ac, ax = self.attn(hc, hx, layout, need_cond=not self.last)
        xs = self._residual(xs, ax, ga_x)
        mx = self.x_mlp(ops.rms_norm_modulate(xs, sm_x, eps=eps, backend=backend))
        xs = self._residual(xs, mx, gm_x)
        if not self.last:
            cs = self._residual(cs, ac, ga_c)
            mc = self.cond_mlp(ops.rms_norm_modulate(cs, sm_c, eps=eps, backend=backend))
            cs = self._residual(cs, mc, gm_c)
        return cs, xs


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t (128 cosines then 128 sines, float32) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def reset_parameters(self) -> None:
        for i in (0, 2):
            nn.init.normal_(self.mlp[i].weight, std=0.02)
            nn.init.zeros_(self.mlp[i].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    """RMSNorm(x) * (1 + Linear(SiLU(c_x))) then Linear(D -> patch * patch * C)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.modulation = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_dim)

    def reset_parameters(self) -> None:
        for m in (self.modulation, self.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, xs: torch.Tensor, silu_x: torch.Tensor) -> torch.Tensor:
        scale = self.modulation(silu_x).to(xs.dtype)
        h = ops.rms_norm_modulate(xs, scale, eps=self.cfg.eps, backend=self.cfg.backend)
        return self.linear(h)
