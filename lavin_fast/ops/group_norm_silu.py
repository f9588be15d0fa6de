"""GroupNorm statistics and the fused GroupNorm + SiLU of the ST-VAE.

The ST-VAE's ResnetBlock runs GroupNorm (32 groups, eps 1e-6, over channels-of-group x T x H x W)
then SiLU before every causal conv. We split it in two:
- `group_norm_stats(x, G)`: per (sample, group) mean and rstd in float32 from one read of x,
  optionally accumulated over time chunks of a long clip through a running Welford state.
- the normalisation itself, `silu((x - mean) * rstd * weight + bias)`, described by a small
  `GroupNormSiLU` record that `causal_conv3d(..., norm=...)` applies once per element (on the GPU
  `group_norm_silu` writes the activation in x's dtype in one pass, in front of the implicit GEMM or
  cuDNN).

The decoder's SpatialNorm + SiLU has the same treatment through a `SpatialNormSiLU` record
(per-position scale and shift on the latent's coarse grid, gathered by the norm pass).

Numerics: each tile's per-channel mean and sum of squared deviations are computed in float32
(two passes over the tile in registers) and merged across tiles, splits and channels of a group
with Chan's parallel formula (all terms positive: no E[x^2] - E[x]^2 cancellation); the running
state across time chunks is float64. The normalisation is computed in float32, cast to x's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lavin_fast.ops._triton import interpreter_active, next_power_of_2, triton_refusals
from lavin_fast.ops.dispatch import Backend, OpDispatcher
from lavin_fast.ops.group_norm_silu_kernels import (
    _gn_silu_kernel,
    _gn_stats_combine_kernel,
    _gn_stats_kernel,
    triton,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class GroupNormSiLU:
    """GroupNorm followed by SiLU, with precomputed statistics.

    mean: [B, G] float32, per (sample, group) mean of the norm's input.
    rstd: [B, G] float32, 1 / sqrt(var + eps) (biased variance, as nn.GroupNorm).
    weight: [C] GroupNorm affine scale (float32 or the input's dtype).
    bias: [C] GroupNorm affine shift.
    num_groups: G; C must be divisible by it.
    """

    mean: torch.Tensor
    rstd: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    num_groups: int

    @classmethod
    def from_input(
        cls, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float = 1e-6
    ) -> GroupNormSiLU:
        """Statistics of x (one read) plus the affine: the record for nn.GroupNorm(G, C, eps) + SiLU."""
        mean, rstd = group_norm_stats(x, num_groups, eps)
        return cls(mean, rstd, weight, bias, num_groups)

    def frames(self, t0: int, t1: int) -> GroupNormSiLU:
        """The record for x's frames [t0, t1): the same (statistics are per clip)."""
        return self

    def scale_shift(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (sample, channel) float32 scale and shift: norm(x) = x * scale + shift; [B, C] each."""
        G = self.num_groups
        cg = channels // G
        rstd_c = self.rstd.float().repeat_interleave(cg, dim=1)
        mean_c = self.mean.float().repeat_interleave(cg, dim=1)
        scale = rstd_c * self.weight.float()[None, :]
        shift = self.bias.float()[None, :] - mean_c * scale
        return scale.contiguous(), shift.contiguous()


@dataclass
class SpatialNormSiLU:
    """The decoder's SpatialNorm followed by SiLU, folded to per-position scale and shift on a
    coarse grid (the latent's): the effective input is
        silu(x[b, c, t, y, x] * scale[b, c, t_index[t], y // sy, x // sx] + shift[...]),
    sy = H // h, sx = W // w (nearest-neighbour upsampling; H and W must be multiples of h and w).
    With SpatialNorm(f, zq) = GroupNorm(f) * conv_y(zq') + conv_b(zq') and GroupNorm(f) = f * a + d
    (a, d per sample and channel), scale = a * conv_y(zq) and shift = d * conv_y(zq) + conv_b(zq),
    both at the latent's resolution (a 1x1x1 conv commutes with nearest upsampling).

    scale, shift: [B, C, Tz, h, w] float32.
    t_index: [T] integer tensor, the frame of scale/shift that each frame of x uses (values in [0, Tz)).
    """

    scale: torch.Tensor
    shift: torch.Tensor
    t_index: torch.Tensor

    def frames(self, t0: int, t1: int) -> SpatialNormSiLU:
        """The record for x's frames [t0, t1)."""
        return SpatialNormSiLU(self.scale, self.shift, self.t_index[t0:t1])


@dataclass
class GroupNormStatsState:
    """Running Welford state of `group_norm_stats` over chunks of a clip.

    count: elements per (sample, group) seen so far.
    mean: [B, G] float64 running mean.
    m2: [B, G] float64 running sum of squared deviations from the mean.
    """

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    def merge(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> GroupNormStatsState:
        """Chan's parallel combination with another partial (count, mean, m2)."""
        if self.count == 0:
            return GroupNormStatsState(count, mean, m2)
        n = self.count + count
        delta = mean - self.mean
        new_mean = self.mean + delta * (count / n)
        new_m2 = self.m2 + m2 + delta * delta * (self.count * count / n)
        return GroupNormStatsState(n, new_mean, new_m2)

    def finalize(self, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, rstd) float32 [B, G] from the accumulated state."""
        if self.count <= 0:
            raise ValueError("GroupNormStatsState.finalize: no elements were accumulated (count 0)")
        var = self.m2 / self.count
        return self.mean.float(), torch.rsqrt(var + eps).float()


# ----------------------------------------------------------------------------- validation


def check_norm_input(x: torch.Tensor, num_groups: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{name} must be [B, C, T, H, W] (5 dims), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype {x.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    if x.shape[1] % num_groups:
        raise ValueError(f"{name} has {x.shape[1]} channels, which is not divisible by num_groups={num_groups}")
    if min(x.shape) < 1:
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(x.shape)}")


def check_norm(norm: GroupNormSiLU | SpatialNormSiLU, x: torch.Tensor, name: str = "norm") -> None:
    """Validate a GroupNormSiLU or SpatialNormSiLU record against the input it normalises."""
    if isinstance(norm, SpatialNormSiLU):
        check_spatial_norm(norm, x, name)
        return
    if not isinstance(norm, GroupNormSiLU):
        raise ValueError(f"{name} must be a GroupNormSiLU or SpatialNormSiLU, got {type(norm).__name__}")
    B, C = x.shape[:2]
    G = norm.num_groups
    if isinstance(G, bool) or not isinstance(G, int) or G < 1:
        raise ValueError(f"{name}.num_groups must be a positive int, got {G!r}")
    if C % G:
        raise ValueError(f"x has {C} channels, which is not divisible by {name}.num_groups={G}")
    for field, t, shape in (("mean", norm.mean, (B, G)), ("rstd", norm.rstd, (B, G))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != torch.float32:
            seen = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{field} must be a float32 tensor of shape {shape} (B, G), got {seen}")
        if t.device != x.device:
            raise ValueError(f"{name}.{field} is on {t.device} but x is on {x.device}")
    for field, t in (("weight", norm.weight), ("bias", norm.bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,) or t.dtype not in (torch.float32, x.dtype):
            seen = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{field} must be a [{C}] tensor of dtype float32 or {x.dtype}, got {seen}")
        if t.device != x.device:
            raise ValueError(f"{name}.{field} is on {t.device} but x is on {x.device}")


def check_spatial_norm(norm: SpatialNormSiLU, x: torch.Tensor, name: str = "norm") -> None:
    B, C, T, H, W = x.shape
    sc, sh, ti = norm.scale, norm.shift, norm.t_index
    for field, t in (("scale", sc), ("shift", sh)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.dtype != torch.float32:
            seen = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}.{field} must be a float32 [B, C, Tz, h, w] tensor, got {seen}")
        if t.device != x.device:
            raise ValueError(f"{name}.{field} is on {t.device} but x is on {x.device}")
    if sh.shape != sc.shape:
        raise ValueError(f"{name}.shift shape {tuple(sh.shape)} != {name}.scale shape {tuple(sc.shape)}")
    Bs, Cs, Tz, h, w = sc.shape
    if (Bs, Cs) != (B, C) or min(Tz, h, w) < 1 or H % h or W % w:
        raise ValueError(
            f"{name}.scale shape {tuple(sc.shape)} does not fit x {tuple(x.shape)}: expected [B={B}, C={C}, Tz, h, w] "
            f"with h dividing H={H} and w dividing W={W}"
        )
    if (
        not isinstance(ti, torch.Tensor)
        or ti.dim() != 1
        or ti.shape[0] != T
        or ti.dtype not in (torch.int32, torch.int64)
    ):
        seen = (tuple(ti.shape), ti.dtype) if isinstance(ti, torch.Tensor) else type(ti).__name__
        raise ValueError(
            f"{name}.t_index must be an int32/int64 tensor of shape [{T}] (one entry per frame), got {seen}"
        )
    if ti.device != x.device:
        raise ValueError(f"{name}.t_index is on {ti.device} but x is on {x.device}")
    lo, hi = torch.stack(torch.aminmax(ti)).tolist()  # one device sync, not two
    if lo < 0 or hi >= Tz:
        raise ValueError(f"{name}.t_index values must lie in [0, {Tz}) (the frames of scale/shift), got [{lo}, {hi}]")


# ----------------------------------------------------------------------------- references


def reference_group_norm_stats(
    x: torch.Tensor, num_groups: int, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) [B, G] in float64 (the specification; any device)."""
    B = x.shape[0]
    xg = x.double().reshape(B, num_groups, -1)
    var, mean = torch.var_mean(xg, dim=2, correction=0)
    return mean, torch.rsqrt(var + eps)


def reference_group_norm_silu(
    x: torch.Tensor, norm: GroupNormSiLU | SpatialNormSiLU, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """silu(group_norm(x)) with the given statistics (or the SpatialNorm form), computed in
    `compute_dtype` (float32 unless x is float64), returned in x's dtype."""
    cd = compute_dtype or (torch.float64 if x.dtype == torch.float64 else torch.float32)
    if isinstance(norm, SpatialNormSiLU):
        scale, shift = _spatial_full(norm, x.shape, cd)
        return F.silu(x.to(cd) * scale + shift).to(x.dtype)
    B, C = x.shape[:2]
    G = norm.num_groups
    ones = (1,) * (x.dim() - 2)
    xg = x.to(cd).reshape(B, G, C // G, *x.shape[2:])
    y = (xg - norm.mean.to(cd).reshape(B, G, 1, *ones)) * norm.rstd.to(cd).reshape(B, G, 1, *ones)
    y = y.reshape(x.shape) * norm.weight.to(cd).reshape(1, C, *ones) + norm.bias.to(cd).reshape(1, C, *ones)
    return F.silu(y).to(x.dtype)


def _spatial_full(norm: SpatialNormSiLU, shape, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and shift upsampled (nearest) to x's [B, C, T, H, W], in dtype cd."""
    H, W = shape[3:]
    h, w = norm.scale.shape[3:]
    idx = norm.t_index.long()
    out = []
    for t in (norm.scale, norm.shift):
        out.append(t.to(cd).index_select(2, idx).repeat_interleave(H // h, 3).repeat_interleave(W // w, 4))
    return out[0], out[1]


# ----------------------------------------------------------------------------- torch paths


def _chunk_stats_torch(xc: torch.Tensor, G: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean, m2) of one chunk, float32 reductions per chunk, float64 results."""
    B, C = xc.shape[:2]
    xg = xc.unflatten(1, (G, C // G)).float()  # a view: no channels-first copy of channels-last x
    dims = tuple(range(2, xg.dim()))
    var, mean = torch.var_mean(xg, dim=dims, correction=0)
    n = xg[0, 0].numel()
    return n, mean.double(), var.double() * n


def _stats_torch(x: torch.Tensor, G: int, state: GroupNormStatsState | None, finalize: bool, eps: float):
    # float32 copies of at most ~64 Mi elements at a time (the frames of a long clip in chunks)
    per_frame = x[:, :, :1].numel()
    frames = max(1, (64 << 20) // max(per_frame, 1))
    st = state if state is not None else GroupNormStatsState(0, None, None)  # type: ignore[arg-type]
    for t0 in range(0, x.shape[2], frames):
        st = st.merge(*_chunk_stats_torch(x[:, :, t0 : t0 + frames], G))
    return st.finalize(eps) if finalize else st


def _frame_format(x: torch.Tensor) -> torch.memory_format:
    """The 2D memory format of x's frames: channels-last when x's channels are its innermost dimension
    (by stride order, so that a time slice of a channels-last-3d batch still counts), else contiguous."""
    return torch.channels_last if x.stride(1) < x.stride(-1) else torch.contiguous_format


def _apply_torch(x: torch.Tensor, norm, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x * scale + shift) in float32, cast to x's dtype, one frame at a time on a dense copy of the
    frame: PyTorch's vectorised CPU loops round their scalar tail (and each thread's share) differently
    from the vector body, so an element's bits would depend on the tensor's size and strides. Frame by
    frame, every frame goes through the same calls on same-shaped dense tensors, so a clip cut into time
    chunks gets exactly the whole clip's values (causal_conv3d's chunked == whole)."""
    B, C, T = x.shape[:3]
    fmt = _frame_format(x)
    y = out if out is not None else torch.empty_like(x, memory_format=torch.preserve_format)
    if isinstance(norm, SpatialNormSiLU):
        H, W = x.shape[3:]
        h, w = norm.scale.shape[3:]
        per_tz: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def frame_affine(t: int) -> tuple[torch.Tensor, torch.Tensor]:
            tz = t_index[t]
            if tz not in per_tz:
                per_tz[tz] = tuple(  # type: ignore[assignment]
                    v[:, :, tz].float().repeat_interleave(H // h, 2).repeat_interleave(W // w, 3).contiguous()
                    for v in (norm.scale, norm.shift)
                )
            return per_tz[tz]

        t_index = norm.t_index.tolist()
    else:
        scale, shift = norm.scale_shift(C)
        affine = (scale.view(B, C, 1, 1), shift.view(B, C, 1, 1))

        def frame_affine(t: int) -> tuple[torch.Tensor, torch.Tensor]:
            return affine

    for t in range(T):
        sc, sh = frame_affine(t)
        frame = torch.addcmul(sh, x[:, :, t].contiguous(memory_format=fmt), sc)
        y[:, :, t].copy_(F.silu(frame, inplace=True))
    return y


def _pos_strides(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    return tuple(int(s) for s in x.stride())  # type: ignore[return-value]


def _stats_config(C: int) -> tuple[int, int]:
    if interpreter_active():
        return 16, min(next_power_of_2(C), 32)
    block_c = min(next_power_of_2(C), 128)
    return max(16, 4096 // block_c), block_c


def _stats_triton(x: torch.Tensor, G: int, state: GroupNormStatsState | None, finalize: bool, eps: float):
    B, C, T, H, W = x.shape
    P = T * H * W
    block_p, block_c = _stats_config(C)
    # enough programs to fill the GPU (~4 per SM on 132 SMs), each a run of TILES whole tiles; TILES
    # is a power of two (a constexpr: few compiled variants)
    target = 8 if interpreter_active() else max(1, 528 // (B * triton.cdiv(C, block_c)))
    tiles = next_power_of_2(triton.cdiv(triton.cdiv(P, target), block_p))
    rows = tiles * block_p
    S = triton.cdiv(P, rows)
    part = torch.empty((B, S, 2, C), device=x.device, dtype=torch.float32)
    _gn_stats_kernel[(B, S, triton.cdiv(C, block_c))](
        x, part, C, P, W, H * W, *_pos_strides(x), TILES=tiles, BLOCK_P=block_p, BLOCK_C=block_c
    )
    # combine the (split, channel) partials of each group in one more launch (Chan's formula)
    cg = C // G
    direct = finalize and state is None
    first = torch.empty((B, G), device=x.device, dtype=torch.float32)
    second = torch.empty((B, G), device=x.device, dtype=torch.float32)
    _gn_stats_combine_kernel[(B * G,)](
        part, first, second, C, G, cg, S, rows, P, eps,
        FINALIZE=direct, BLOCK_S=next_power_of_2(S), BLOCK_CG=next_power_of_2(cg),
    )  # fmt: skip
    if direct:
        return first, second
    st = state if state is not None else GroupNormStatsState(0, None, None)  # type: ignore[arg-type]
    st = st.merge(P * cg, first.double(), second.double())
    return st.finalize(eps) if finalize else st


def norm_kernel_args(norm, x: torch.Tensor) -> tuple[list, bool]:
    """The norm arguments shared by the conv and norm kernels: (mean, rstd, gamma, beta, sp_scale,
    sp_shift, t_index, SY, SX, G, CG, 5 coarse-grid strides) and SPATIAL; placeholders (x) for the
    form not in use."""
    C, H, W = x.shape[1], x.shape[3], x.shape[4]
    if isinstance(norm, SpatialNormSiLU):
        sc = norm.scale.contiguous(memory_format=torch.channels_last_3d)
        sh = norm.shift.contiguous(memory_format=torch.channels_last_3d)  # same strides as sc
        ti = norm.t_index.to(torch.int32)
        h, w = sc.shape[3:]
        return [x, x, x, x, sc, sh, ti, H // h, W // w, 1, C, *sc.stride()], True
    G = norm.num_groups
    mean, rstd, gamma, beta = (t.contiguous() for t in (norm.mean, norm.rstd, norm.weight, norm.bias))
    return [mean, rstd, gamma, beta, mean, mean, mean, 1, 1, G, C // G, 0, 0, 0, 0, 0], False


def _apply_triton(x: torch.Tensor, norm, out: torch.Tensor | None = None) -> torch.Tensor:
    B, C, T, H, W = x.shape
    nargs, spatial = norm_kernel_args(norm, x)
    y = out if out is not None else torch.empty_like(x, memory_format=torch.channels_last_3d)
    P = T * H * W
    if interpreter_active():
        block_p, block_c = 16, min(next_power_of_2(C), 32)
    else:
        block_c = min(next_power_of_2(C), 128)
        block_p = max(16, 4096 // block_c)  # 32 elements per thread at 4 warps: no spills
    grid = (triton.cdiv(P, block_p), triton.cdiv(C, block_c), B)
    mean, rstd, gamma, beta, sp_scale, sp_shift, t_index, sy, sx, G, CG = nargs[:11]
    _gn_silu_kernel[grid](
        x, y, mean, rstd, gamma, beta, sp_scale, sp_shift, t_index, sy, sx, C, G, CG, P, W, H * W,
        *_pos_strides(x), *_pos_strides(y), *nargs[11:],
        SPATIAL=spatial, BLOCK_P=block_p, BLOCK_C=block_c,
    )  # fmt: skip
    return y


def _int32_refusals(x: torch.Tensor) -> list[str]:
    # in-sample offsets are int32 in the kernels; the batch offset is int64
    span = sum((s - 1) * abs(st) for s, st in zip(x.shape[1:], x.stride()[1:], strict=True)) + 1
    if span >= 2**31:
        return [f"one sample spans {span} elements (>= 2^31); the kernel uses int32 in-sample offsets"]
    return []


def _triton_refusals(x: torch.Tensor, *args, **kwargs) -> list[str]:
    return triton_refusals(x) + _int32_refusals(x)


_stats_dispatch = OpDispatcher(
    "group_norm_stats",
    [
        Backend("triton", _stats_triton, lambda x, G, state: _triton_refusals(x) + _grad_refusals(x)),
        Backend("torch", _stats_torch),
    ],
)


def _select(dispatcher: OpDispatcher, backend: str | None, x: torch.Tensor, *args):
    name = dispatcher.requested(backend)
    if name == "auto":
        # Triton on CUDA when it accepts; CPU tensors always take the torch path under `auto`
        if x.is_cuda and not dispatcher.backends["triton"].refusals(x, *args):
            return dispatcher.backends["triton"]
        return dispatcher.backends["torch"]
    return dispatcher.select(name, x, *args)


def group_norm_stats(
    x: torch.Tensor,
    num_groups: int,
    eps: float = 1e-6,
    *,
    state: GroupNormStatsState | None = None,
    finalize: bool = True,
    backend: str | None = "auto",
) -> tuple[torch.Tensor, torch.Tensor] | GroupNormStatsState:
    """Per (sample, group) GroupNorm statistics of x [B, C, T, H, W], one read, float32 results.

    Returns (mean, rstd) [B, G] float32 when `finalize` (the default), else the updated running
    `GroupNormStatsState`. For a long clip, feed its time chunks in order with `state=` the
    previous call's result and `finalize=False`, and finalize on the last chunk (or call
    `state.finalize(eps)`): the result equals the whole-clip statistics up to rounding.
    """
    check_norm_input(x, num_groups)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if state is not None:
        if not isinstance(state, GroupNormStatsState):
            raise ValueError(f"state must be a GroupNormStatsState or None, got {type(state).__name__}")
        want = (x.shape[0], num_groups)
        if state.count and (tuple(state.mean.shape) != want or state.mean.device != x.device):
            raise ValueError(
                f"state holds statistics of shape {tuple(state.mean.shape)} on {state.mean.device}; "
                f"this chunk needs {want} on {x.device} (same batch and num_groups)"
            )
    impl = _select(_stats_dispatch, backend, x, num_groups, state)
    return impl.impl(x, num_groups, state, finalize, float(eps))


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def norm_tensors(norm) -> tuple[torch.Tensor, ...]:
    """The tensors of a norm record (for autograd checks)."""
    if isinstance(norm, SpatialNormSiLU):
        return (norm.scale, norm.shift)
    return (norm.weight, norm.bias, norm.mean, norm.rstd)


def _grad_refusals(*tensors: torch.Tensor | None) -> list[str]:
    if needs_grad(*tensors):
        return ["autograd is needed but the Triton kernel has no backward (the ST-VAE is frozen)"]
    return []


def _apply_impl_refusals(x, norm, out=None) -> list[str]:
    reasons = _triton_refusals(x) + (_int32_refusals(out) if out is not None else [])
    return reasons + _grad_refusals(x, *norm_tensors(norm))


_apply_dispatch = OpDispatcher(
    "group_norm_silu",
    [Backend("triton", _apply_triton, _apply_impl_refusals), Backend("torch", _apply_torch)],
)


def group_norm_silu(
    x: torch.Tensor,
    norm: GroupNormSiLU | SpatialNormSiLU,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = "auto",
) -> torch.Tensor:
    """silu(group_norm(x)) with precomputed statistics (or the SpatialNormSiLU form), computed in
    float32, in x's dtype.

    out: optional destination of x's shape and dtype, possibly a strided view (for example the
    interior of a padded conv input); default a new channels-last-3d tensor.
    """
    check_norm_input(x, norm.num_groups if isinstance(norm, GroupNormSiLU) else 1)
    check_norm(norm, x)
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
            seen = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor) else type(out)
            raise ValueError(
                f"out must be a tensor of shape {tuple(x.shape)}, dtype {x.dtype} on {x.device}; got {seen}"
            )
    impl = _select(_apply_dispatch, backend, x, norm, out)
    return impl.impl(x, norm, out)
