"""Building blocks of the ST-VAE (see models/vae.py and docs/numerics.md, "ST-VAE").

Module and parameter names reproduce the published state-dict names exactly (encoder.down_blocks.0.
resnets.0.conv1.conv.weight, ...), so the published file loads without a name map.

How the blocks differ from the published code (same function, fewer passes over memory):
- GroupNorm + SiLU in front of a causal conv is one op argument: one read of the input gives the
  statistics (`group_norm_stats`) and `causal_conv3d(norm=GroupNormSiLU(...))` normalises each element
  once (one norm pass writing the conv input, no separate GroupNorm and SiLU tensors).
- The causal time padding is the op's business (no padded copy where the backend allows).
- SpatialNorm: conv_y/conv_b are pointwise, so they commute with the nearest resize; they run at the
  latent resolution and are folded with the GroupNorm statistics into one per-(latent pixel, channel)
  scale and shift (float32), which causal_conv3d applies with the SiLU in its norm pass
  (`SpatialNormSiLU`): no resized latent, no separate normalised tensor.
- Downsample writes the time average straight into its zero-padded buffer; Upsample writes the
  nearest-resized frames with one broadcast copy; their per-frame 2D convs run as (1, 3, 3) Conv3d
  on the 5D tensor (no per-frame reshuffle), or as Conv2d on the frame for T = 1 (the 2D fast path).
- float64 inputs (used to check the fast path exactly) take torch's float64 GroupNorm instead of the
  fused float32-statistics norm; every other dtype takes the fused ops, except a whole clip on the CPU
  (`native_norms`), where torch's native kernels beat the op's decomposed CPU form: plain GroupNorm + SiLU
  as F.group_norm and F.silu (`norm_silu_conv`); SpatialNorm as F.group_norm, then one in-place broadcast
  addcmul by conv_y/conv_b and an in-place SiLU (`SpatialNorm.forward_native`), the conv_y/conv_b of every
  SpatialNorm computed once per decode as one GEMM over the latent (`Decoder.modulations`); one-frame clips'
  causal convs as the folded F.conv2d with a cached weight in x's layout (`CausalConv3d._folded_conv2d`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from lavin_fast.ops.causal_conv3d import causal_conv3d, conv3d, folded_weight, reference_causal_conv3d
from lavin_fast.ops.group_norm_silu import GroupNormSiLU, GroupNormStatsState, SpatialNormSiLU, group_norm_stats

# The ops' Python dispatch (validation, backend choice, weight caches kept on the weight tensor) is not
# traceable by torch.compile: under compile each op call is left to eager mode (a graph break), so that
# compiling the model works and fuses the glue between the ops.
_causal_conv3d = torch.compiler.disable(causal_conv3d)
_group_norm_stats = torch.compiler.disable(group_norm_stats)


@dataclass
class Stream:
    """State carried between the time chunks of one clip (chunked encode/decode with conv caches).

    first: True while the chunk being processed is the clip's first (holds frame 0).
    caches: per causal conv, the last kt - 1 frames of its effective input in the previous chunk.
    running_stats: GroupNorms use the statistics of all frames so far (else of the chunk alone).
    norm_states: per GroupNorm, the running statistics (with running_stats).
    """

    first: bool = True
    caches: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    running_stats: bool = False
    norm_states: dict[nn.Module, GroupNormStatsState] = field(default_factory=dict)


@dataclass
class RunContext:
    """Per-call options threaded through the blocks.

    fast: allow the one-frame 2D forms (conv weights summed over time taps, 2D down/upsample) for T = 1.
    stream: chunk state for chunked processing; None for a whole clip.
    modulation: per SpatialNorm, conv_y(zq) | conv_b(zq) [B, 2C, Tz, h, w'] computed ahead for the whole decoder
        (`Decoder.modulations`; w' = w or, widened, f's W); None: each norm computes its own.
    """

    fast: bool = True
    stream: Stream | None = None
    modulation: dict[nn.Module, torch.Tensor] | None = None

    def single_frame(self, x: torch.Tensor) -> bool:
        """Whether x is a whole one-frame clip that may take the 2D forms."""
        return self.fast and x.shape[2] == 1 and self.stream is None


def norm_stats(x: torch.Tensor, norm: nn.GroupNorm, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) [B, G] of GroupNorm `norm`'s input x: float32 from the fused op (float64 for float64 x).

    In a stream with running statistics, the statistics cover every frame of the clip seen so far (this
    chunk included), accumulated with Welford's parallel update; otherwise they cover x alone.
    """
    G, eps = norm.num_groups, norm.eps
    stream = ctx.stream
    running = stream is not None and stream.running_stats
    if x.dtype != torch.float64:
        if not running:
            return _group_norm_stats(x, G, eps)
        state = _group_norm_stats(x, G, eps, state=stream.norm_states.get(norm), finalize=False)
        stream.norm_states[norm] = state
        return state.finalize(eps)
    xg = x.reshape(x.shape[0], G, -1)
    var, mean = torch.var_mean(xg, dim=2, correction=0)
    if not running:
        return mean, torch.rsqrt(var + eps)
    n = xg.shape[2]
    state = stream.norm_states.get(norm, GroupNormStatsState(0, None, None))  # type: ignore[arg-type]
    state = state.merge(n, mean, var * n)
    stream.norm_states[norm] = state
    var = state.m2 / state.count
    return state.mean, torch.rsqrt(var + eps)


class CausalConv3d(nn.Module):
    """Causal 3D conv (published name `<name>.conv.weight`): time front-padded by repeating frame 0."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(cin, cout, kernel_size)

    @torch.compiler.disable  # see _causal_conv3d: the whole thin wrapper, so that it is not recompiled per shape
    def forward(
        self,
        x: torch.Tensor,
        ctx: RunContext,
        norm: GroupNormSiLU | SpatialNormSiLU | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """conv(norm(x)) (+ residual, added in the op's epilogue)."""
        w, b = self.conv.weight, self.conv.bias
        if self.kernel_size == 1 and norm is None and residual is None:
            return conv3d(x, w, b)
        if norm is None and self.kernel_size > 1 and ctx.single_frame(x) and native_norms(x, ctx):
            return self._folded_conv2d(x, residual)
        # float64 (exact checks only) runs the op's plain-PyTorch specification; the op's kernels take 16/32-bit
        op = reference_causal_conv3d if x.dtype == torch.float64 else _causal_conv3d
        stream = ctx.stream
        if stream is None or self.kernel_size == 1:
            return op(x, w, b, norm=norm, fold_single_frame=ctx.fast, residual=residual)
        out, cache = op(
            x, w, b, norm=norm, cache=stream.caches.get(self), return_cache=True, fold_single_frame=ctx.fast,
            residual=residual,
        )  # fmt: skip
        # keep the cache in x's layout: a mixed-layout time concatenation sends CPU conv3d to its slow kernel
        stream.caches[self] = cache.contiguous(memory_format=_format_of(x))
        return out

    def _folded_conv2d(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """A whole one-frame clip on the CPU: the exact time-summed 2D conv (the op's fold) straight through F.conv2d,
        without the op's per-call validation and dispatch, the folded weight cached in x's memory format (oneDNN
        takes a much slower kernel for a channels-last input with a contiguous weight: ~12x at 32 channels)."""
        fmt = torch.channels_last if x.stride(1) == 1 and x.shape[1] > 1 else torch.contiguous_format
        wf = folded_weight(self.conv.weight, fmt)  # the op's fold and weight cache
        out = F.conv2d(x[:, :, 0], wf, self.conv.bias, padding=self.kernel_size // 2)[:, :, None]
        return out if residual is None else out + residual


def native_norms(x: torch.Tensor, ctx: RunContext) -> bool:
    """Whether x's norms take torch's native GroupNorm (+ SiLU, + SpatialNorm's modulation): a whole clip (no
    stream: streams need running statistics) on the CPU, in 16/32-bit (float64 takes the exact-check forms)."""
    return x.device.type == "cpu" and ctx.stream is None and x.dtype != torch.float64


def norm_silu_conv(
    conv: CausalConv3d, x: torch.Tensor, norm: nn.GroupNorm, ctx: RunContext, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """conv(silu(group_norm(x))) (+ residual) with the GroupNorm + SiLU fused into the conv's input load.

    On the CPU a whole clip (no stream) takes torch's native GroupNorm and SiLU instead: their kernels beat the op's
    decomposed CPU form (bench.cpu_vae --quick, 2 idle threads: image encode 1.45x -> 2.34x the published
    structure, clip encode 2.33x -> 2.98x, decodes unchanged; the demo's VAE fit step ~15% with fused Adam); the
    conv is unchanged. Chunked streams keep the op (running statistics)."""
    if native_norms(x, ctx):
        a = F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))
        return conv(a, ctx, residual=residual)
    mean, rstd = norm_stats(x, norm, ctx)
    if x.dtype == torch.float64:
        B, C = x.shape[:2]
        G = norm.num_groups
        xg = (x.reshape(B, G, -1) - mean[:, :, None]) * rstd[:, :, None]
        a = F.silu(xg.view(x.shape) * norm.weight.view(1, C, 1, 1, 1) + norm.bias.view(1, C, 1, 1, 1))
        return conv(a, ctx, residual=residual)
    return conv(x, ctx, norm=GroupNormSiLU(mean, rstd, norm.weight, norm.bias, norm.num_groups), residual=residual)


def pointwise(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 Conv3d (the channel-changing shortcut)."""
    return conv3d(x, conv.weight, conv.bias)


def _time_pairs(Tf: int, Tz: int, ctx: RunContext) -> list[tuple[slice, slice, int]]:
    """(frames of f, frames of the latent, time factor) groups of the SpatialNorm resize (see SpatialNorm)."""
    if ctx.stream is not None and not ctx.stream.first:
        pairs = [(slice(0, Tf), slice(0, Tz))]
    elif Tf == 1 or Tz > 1:
        pairs = [(slice(0, 1), slice(0, 1))] + ([(slice(1, Tf), slice(1, Tz))] if Tf > 1 else [])
    else:  # a one-frame latent never feeds several frames in the decoder
        raise ValueError(f"SpatialNorm: {Tf} frames from a {Tz}-frame latent")
    out = []
    for fs, zs in pairs:
        nf, nz = fs.stop - fs.start, zs.stop - zs.start
        if nf % nz:
            raise ValueError(f"SpatialNorm: {nf} frames do not map onto {nz} latent frames")
        out.append((fs, zs, nf // nz))
    return out


_T_INDEX: dict[tuple, torch.Tensor] = {}


def _t_index(Tf: int, Tz: int, ctx: RunContext, device: torch.device) -> torch.Tensor:
    """Latent frame of each of f's frames, as an int32 tensor on f's device (cached per shape)."""
    first = ctx.stream is None or ctx.stream.first
    key = (Tf, Tz, first, str(device))
    t = _T_INDEX.get(key)
    if t is None:
        idx: list[int] = []
        for fs, zs, st in _time_pairs(Tf, Tz, ctx):
            idx += [zs.start + j // st for j in range(fs.stop - fs.start)]
        t = _T_INDEX[key] = torch.tensor(idx, dtype=torch.int32, device=device)
    return t


class SpatialNorm(nn.Module):
    """GroupNorm(f) * conv_y(zq') + conv_b(zq'), zq' = zq resized (nearest) to f's (T, H, W); then SiLU.

    Published time rule of the resize (whole clip): for odd T_f > 1, frame 0 of f takes frame 0 of zq and
    the other frames take the other latent frames resized together; so with s = (T_f - 1) / (T_z - 1),
    f frame j >= 1 takes latent frame 1 + (j - 1) // s. In a later chunk of a stream (no frame 0), f frame j
    takes the chunk's latent frame j // s, which is the same global mapping.
    """

    def __init__(self, channels: int, zq_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=eps)
        self.conv_y = CausalConv3d(zq_channels, channels, 1)
        self.conv_b = CausalConv3d(zq_channels, channels, 1)

    def _fold(self, f: torch.Tensor, zq: torch.Tensor, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, c) [B, C, Tz, h, w] with spatial_norm(f, zq) = f * a' + c', a', c' = a, c resized to f (float32,
        float64 for float64 f)."""
        C = f.shape[1]
        gn = self.norm_layer
        mean, rstd = norm_stats(f, gn, ctx)
        cd = torch.float64 if f.dtype == torch.float64 else torch.float32
        cg = C // gn.num_groups
        scale = rstd.to(cd).repeat_interleave(cg, dim=1) * gn.weight.to(cd)  # [B, C]
        shift = gn.bias.to(cd) - mean.to(cd).repeat_interleave(cg, dim=1) * scale
        # conv_y / conv_b at the latent resolution, then folded with the norm's affine:
        # norm(f) * y + b = f * (scale * y) + (shift * y + b)
        yb = conv3d(zq.to(cd), *_cat_weights(self, cd))
        y, b = yb[:, :C], yb[:, C:]
        a = y * scale[:, :, None, None, None]
        c = torch.addcmul(b, y, shift[:, :, None, None, None])
        return a, c

    def record(self, f: torch.Tensor, zq: torch.Tensor, ctx: RunContext) -> SpatialNormSiLU:
        """The SpatialNorm + SiLU of f as a record that causal_conv3d applies in its norm pass."""
        _time_pairs(f.shape[2], zq.shape[2], ctx)  # validates the frame mapping
        a, c = self._fold(f, zq, ctx)
        return SpatialNormSiLU(a, c, _t_index(f.shape[2], zq.shape[2], ctx, f.device))

    def forward_silu(self, f: torch.Tensor, zq: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """silu(spatial_norm(f, zq)) as one new tensor in f's dtype and memory format (float64 checks)."""
        _check_multiple(f, zq)
        a, c = self._fold(f, zq, ctx)
        return _modulate_silu(f, a, c, ctx, inplace=False)

    def forward_native(self, f: torch.Tensor, zq: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        """silu(spatial_norm(f, zq)) for a whole clip on the CPU, the published math on torch's native kernels:
        F.group_norm (with its affine) writes GroupNorm(f), which is modulated in place by conv_y(zq) and conv_b(zq)
        (one GEMM at the latent's resolution, broadcast over each latent pixel's block: no resized latent), then an
        in-place SiLU. The modulation is computed in float32 (float64 for float64 f)."""
        _check_multiple(f, zq)
        gn = self.norm_layer
        n = F.group_norm(f, gn.num_groups, gn.weight, gn.bias, gn.eps)
        yb = ctx.modulation.get(self) if ctx.modulation is not None else None
        if yb is None:
            cd = torch.float64 if f.dtype == torch.float64 else torch.float32
            yb = _latent_pointwise(zq.to(cd), *_cat_weights(self, cd))
        W = f.shape[4]
        if W > yb.shape[4] and n.stride(-1) == 1 and n.stride(1) > 1:
            # W innermost (not channels-last): widen y and b to W (1/(st*sh) of f's size), so that the innermost
            # loop of the broadcast runs over whole rows instead of W // w-element runs (measured ~2x faster)
            yb = yb.repeat_interleave(W // yb.shape[4], dim=-1)
        C = f.shape[1]
        return _modulate_silu(n, yb[:, :C], yb[:, C:], ctx, inplace=True)


def _latent_pointwise(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The 1x1x1 conv of the latent z [B, Cz, T, h, w] as one GEMM in z's memory format: at the latent's few pixels
    a batched matrix product costs a fraction of a convolution call (measured ~14 us against ~90 us)."""
    B, Cz = z.shape[:2]
    w2 = weight.reshape(weight.shape[0], Cz)
    if z.stride(1) == 1 and z.shape[1] > 1:  # channels-last: the channels are rows of a [pixels, Cz] matrix
        return F.linear(z.movedim(1, -1), w2, bias).movedim(-1, 1)
    out = torch.baddbmm(bias[None, :, None], w2.expand(B, -1, -1), z.reshape(B, Cz, -1))
    return out.view(B, -1, *z.shape[2:])


def _check_multiple(f: torch.Tensor, zq: torch.Tensor) -> None:
    H, W = f.shape[3:]
    h, w = zq.shape[3:]
    if H % h or W % w:
        raise ValueError(f"SpatialNorm: f's size {(H, W)} is not a multiple of the latent's {(h, w)}")


def _cat_weights(norm: SpatialNorm, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_y's and conv_b's weights and biases stacked along the output channels, in dtype cd."""
    wy = torch.cat([norm.conv_y.conv.weight, norm.conv_b.conv.weight]).to(cd)
    by = torch.cat([norm.conv_y.conv.bias, norm.conv_b.conv.bias]).to(cd)
    return wy, by


def _modulate_silu(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, ctx: RunContext, inplace: bool) -> torch.Tensor:
    """silu(x * a' + c') with a', c' = a, c [B, C, Tz, h, w] resized (nearest; SpatialNorm's time rule) to x, in x's
    dtype and memory format, computed in a's dtype. Each piece is one broadcast addcmul on an 8-dim view of x's
    frames, written into x itself (inplace) or a new tensor; under autograd the pieces are new tensors (out= is not
    differentiable)."""
    B, C, Tf, H, W = x.shape
    h, w = a.shape[3:]
    sh, sw = H // h, W // w
    grad = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or c.requires_grad)
    out = None if grad else x if inplace else torch.empty_like(x)
    pieces = []
    for fs, zs, st in _time_pairs(Tf, a.shape[2], ctx):
        xp, ap, cp = x[:, :, fs], a[:, :, zs], c[:, :, zs]
        nz = ap.shape[2]
        shape8 = (B, C, nz, st, h, sh, w, sw)
        args = (cp[:, :, :, None, :, None, :, None], xp.view(shape8), ap[:, :, :, None, :, None, :, None])
        if grad:
            pieces.append(torch.addcmul(*args).to(x.dtype).reshape(xp.shape))
        else:
            torch.addcmul(*args, out=out[:, :, fs].view(shape8))
    if grad:
        return F.silu(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2))
    return F.silu(out, inplace=True)


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus the (1x1x1-projected) input.

    zq_channels given: the decoder's block, whose norms are SpatialNorms conditioned on the latent.
    """

    def __init__(self, cin: int, cout: int, groups: int, eps: float, zq_channels: int | None = None) -> None:
        super().__init__()
        self.spatial = zq_channels is not None
        if self.spatial:
            self.norm1 = SpatialNorm(cin, zq_channels, groups, eps)
            self.norm2 = SpatialNorm(cout, zq_channels, groups, eps)
        else:
            self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
            self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv1 = CausalConv3d(cin, cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.conv_shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor, ctx: RunContext, zq: torch.Tensor | None = None) -> torch.Tensor:
        # the residual add happens in conv2's epilogue (no extra pass over the output)
        shortcut = x if self.conv_shortcut is None else pointwise(self.conv_shortcut, x)
        if self.spatial and x.dtype == torch.float64:  # exact checks: the op's kernels take 16/32-bit
            h = self.conv1(self.norm1.forward_silu(x, zq, ctx), ctx)
            return self.conv2(self.norm2.forward_silu(h, zq, ctx), ctx, residual=shortcut)
        if self.spatial and native_norms(x, ctx):
            h = self.conv1(self.norm1.forward_native(x, zq, ctx), ctx)
            return self.conv2(self.norm2.forward_native(h, zq, ctx), ctx, residual=shortcut)
        if self.spatial:
            h = self.conv1(x, ctx, norm=self.norm1.record(x, zq, ctx))
            return self.conv2(h, ctx, norm=self.norm2.record(h, zq, ctx), residual=shortcut)
        h = norm_silu_conv(self.conv1, x, self.norm1, ctx)
        return norm_silu_conv(self.conv2, h, self.norm2, ctx, residual=shortcut)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when x is laid out channels-last (and not also plainly contiguous), else contiguous."""
    if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def _frames_as_batch(x: torch.Tensor) -> torch.Tensor:
    """[B, C, 1, H, W] -> [B, C, H, W] (a view)."""
    return x[:, :, 0]


class Downsample(nn.Module):
    """Optional time average of frame pairs (frame 0 kept when T is odd), zero pad right/bottom, 3x3 stride-2 conv."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if ctx.single_frame(x):
            # 2D form: averaging leaves a single frame as is
            return F.conv2d(F.pad(_frames_as_batch(x), (0, 1, 0, 1)), self.conv.weight, self.conv.bias, stride=2)[
                :, :, None
            ]
        keep_first = self.compress_time and T % 2 == 1
        Tn = (T + 1) // 2 if self.compress_time else T
        buf = torch.empty((B, C, Tn, H + 1, W + 1), dtype=x.dtype, device=x.device, memory_format=_format_of(x))
        buf[:, :, :, H].zero_()
        buf[:, :, :, :H, W].zero_()
        inner = buf[:, :, :, :H, :W]
        if not self.compress_time:
            inner.copy_(x)
        else:
            t0 = 0
            if keep_first:
                inner[:, :, :1].copy_(x[:, :, :1])
                t0 = 1
            if T > t0:
                dst = inner[:, :, t0:]
                torch.add(x[:, :, t0::2], x[:, :, t0 + 1 :: 2], out=dst)
                dst.mul_(0.5)
        return conv3d(buf, self.conv.weight[:, :, None], self.conv.bias, stride=(1, 2, 2))


class Upsample(nn.Module):
    """Nearest 2x (time too at time-expanding levels, frame 0 in space only), then a 3x3 conv per frame."""

    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if ctx.single_frame(x):
            up = F.interpolate(_frames_as_batch(x), scale_factor=2.0, mode="nearest")
            return F.conv2d(up, self.conv.weight, self.conv.bias, padding=1)[:, :, None]
        first = ctx.stream is None or ctx.stream.first
        if self.compress_time and first:
            groups = [(0, 1, 1, 1), (1, T, 1, 2)] if T > 1 else [(0, 1, 1, 1)]  # (t0, t1, out t0, time factor)
        elif self.compress_time:
            groups = [(0, T, 0, 2)]
        else:
            groups = [(0, T, 0, 1)]
        Tn = sum((t1 - t0) * s for t0, t1, _, s in groups)
        up = torch.empty((B, C, Tn, 2 * H, 2 * W), dtype=x.dtype, device=x.device, memory_format=_format_of(x))
        o = 0
        for t0, t1, _, s in groups:
            n = t1 - t0
            dst = up[:, :, o : o + n * s].view(B, C, n, s, H, 2, W, 2)
            dst.copy_(x[:, :, t0:t1, None, :, None, :, None].expand(B, C, n, s, H, 2, W, 2))
            o += n * s
        return conv3d(up, self.conv.weight[:, :, None], self.conv.bias, padding=(0, 1, 1))


class Level(nn.Module):
    """One encoder/decoder level: `resnets` and optionally `downsamplers` / `upsamplers` (published names)."""

    def __init__(
        self,
        resnets: list[ResnetBlock],
        downsample: Downsample | None = None,
        upsample: Upsample | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if downsample is not None:
            self.downsamplers = nn.ModuleList([downsample])
        if upsample is not None:
            self.upsamplers = nn.ModuleList([upsample])


class Encoder(nn.Module):
    """conv_in -> levels of ResnetBlocks (Downsample after all but the last) -> mid -> GroupNorm, SiLU, conv_out."""

    def __init__(
        self, channels: tuple[int, ...], layers: int, latent: int, groups: int, eps: float, time_levels: int
    ) -> None:
        super().__init__()
        self.conv_in = CausalConv3d(3, channels[0])
        self.down_blocks = nn.ModuleList()
        cin = channels[0]
        for i, cout in enumerate(channels):
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, groups, eps) for j in range(layers)]
            down = Downsample(cout, compress_time=i < time_levels) if i < len(channels) - 1 else None
            self.down_blocks.append(Level(resnets, downsample=down))
            cin = cout
        self.mid_block = Level([ResnetBlock(cin, cin, groups, eps) for _ in range(2)])
        self.norm_out = nn.GroupNorm(groups, cin, eps=eps)
        self.conv_out = CausalConv3d(cin, 2 * latent)

    def forward(self, x: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        h = self.conv_in(x, ctx)
        for level in self.down_blocks:
            for block in level.resnets:
                h = block(h, ctx)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h, ctx)
        for block in self.mid_block.resnets:
            h = block(h, ctx)
        return norm_silu_conv(self.conv_out, h, self.norm_out, ctx)


class Decoder(nn.Module):
    """conv_in -> mid -> levels of ResnetBlocks (Upsample after all but the last) -> SpatialNorm, SiLU, conv_out."""

    def __init__(
        self, channels: tuple[int, ...], layers: int, latent: int, groups: int, eps: float, time_levels: int
    ) -> None:
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = CausalConv3d(latent, rev[0])
        self.mid_block = Level([ResnetBlock(rev[0], rev[0], groups, eps, latent) for _ in range(2)])
        self.up_blocks = nn.ModuleList()
        cin = rev[0]
        for i, cout in enumerate(rev):
            resnets = [ResnetBlock(cin if j == 0 else cout, cout, groups, eps, latent) for j in range(layers + 1)]
            up = Upsample(cout, compress_time=i < time_levels) if i < len(rev) - 1 else None
            self.up_blocks.append(Level(resnets, upsample=up))
            cin = cout
        self.norm_out = SpatialNorm(cin, latent, groups, eps)
        self.conv_out = CausalConv3d(cin, 3)

    def spatial_levels(self) -> list[list[SpatialNorm]]:
        """The SpatialNorms grouped by the resolution of their input: the mid block's with the first level's, then
        one list per level (each Upsample doubles H and W), the last with norm_out."""
        levels: list[list[SpatialNorm]] = []
        for i, level in enumerate(self.up_blocks):
            blocks = ([*self.mid_block.resnets] if i == 0 else []) + [*level.resnets]
            levels.append([n for b in blocks for n in (b.norm1, b.norm2)])
        levels[-1].append(self.norm_out)
        return levels

    def modulations(self, z: torch.Tensor) -> dict[nn.Module, torch.Tensor]:
        """conv_y(z) | conv_b(z) of every SpatialNorm from one GEMM over the latent (float32, float64 for float64 z),
        each level's share widened once to its frames' W when the layout has W innermost (see forward_native)."""
        cd = torch.float64 if z.dtype == torch.float64 else torch.float32
        levels = self.spatial_levels()
        pairs = [_cat_weights(n, cd) for lv in levels for n in lv]
        yb = _latent_pointwise(z.to(cd), torch.cat([w for w, _ in pairs]), torch.cat([b for _, b in pairs]))
        widen = z.stride(-1) == 1 and z.stride(1) > 1
        out: dict[nn.Module, torch.Tensor] = {}
        o = 0
        for i, lv in enumerate(levels):
            width = sum(2 * n.norm_layer.num_channels for n in lv)
            piece = yb[:, o : o + width]
            o += width
            if widen and i:
                piece = piece.repeat_interleave(2**i, dim=-1)
            k = 0
            for n in lv:
                out[n] = piece[:, k : k + 2 * n.norm_layer.num_channels]
                k += 2 * n.norm_layer.num_channels
        return out

    def forward(self, z: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        if native_norms(z, ctx) and ctx.modulation is None:
            ctx = replace(ctx, modulation=self.modulations(z))
        h = self.conv_in(z, ctx)
        for block in self.mid_block.resnets:
            h = block(h, ctx, z)
        for level in self.up_blocks:
            for block in level.resnets:
                h = block(h, ctx, z)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h, ctx)
        if h.dtype == torch.float64:
            return self.conv_out(self.norm_out.forward_silu(h, z, ctx), ctx)
        if native_norms(h, ctx):
            return self.conv_out(self.norm_out.forward_native(h, z, ctx), ctx)
        return self.conv_out(h, ctx, norm=self.norm_out.record(h, z, ctx))
