"""The backends of the causal 3D conv (see causal_conv3d.py for the op, its reference, validation and dispatch):
the problem record every backend receives, the effective-input and cache helpers, and the "torch", "hybrid" and
"triton" implementations (the Triton launcher, its launch configs and its custom op; kernels in
causal_conv3d_kernels.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lavin_fast.ops._triton import interpreter_active, next_power_of_2, triton_refusals, use_tma_scratch
from lavin_fast.ops.group_norm_silu import (
    GroupNormSiLU,
    SpatialNormSiLU,
    _apply_torch,
    _frame_format,
    _int32_refusals,
    group_norm_silu,
    needs_grad,
    norm_tensors,
)


def _fold_weight(weight: torch.Tensor) -> torch.Tensor:
    """[Cout, Cin, kt, kh, kw] -> [Cout, Cin, kh, kw] summed over time taps (in float32 for 16-bit)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return weight.to(acc).sum(dim=2).to(weight.dtype)


# ----------------------------------------------------------------------------- shared pieces


@dataclass
class _Problem:
    """The normalised arguments every backend receives."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    norm: GroupNormSiLU | SpatialNormSiLU | None
    cache: torch.Tensor | None
    return_cache: bool
    fold: bool  # fold_single_frame and T == 1 and no cache and kt > 1
    residual: torch.Tensor | None = None

    @property
    def kernel(self) -> tuple[int, int, int]:
        return tuple(self.weight.shape[2:])  # type: ignore[return-value]


def _conv_input(p: _Problem, pad: int) -> torch.Tensor:
    """The conv's effective input with `pad` front frames (the cache if given, else frame 0 repeated),
    written once: the norm pass's output (`group_norm_silu`, each element normalised once), or x itself
    when there is neither a norm nor a front to prepend."""
    x = p.x
    B, C, T, H, W = x.shape
    if p.norm is None and pad == 0:
        return x
    ap = torch.empty((B, C, T + pad, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    if p.norm is not None:
        group_norm_silu(x, p.norm, out=ap[:, :, pad:], backend="triton")
    else:
        ap[:, :, pad:] = x
    if pad:
        ap[:, :, :pad] = p.cache if p.cache is not None else ap[:, :, pad : pad + 1]
    return ap


def _cache_from_input(ap: torch.Tensor, pad: int, kt: int) -> torch.Tensor:
    """The new cache (last kt-1 frames of cat([front, effective input])) from `_conv_input`'s output,
    a copy (never a view of the input) in channels-last-3d."""
    n = kt - 1
    if n == 0:
        return ap[:, :, :0].clone()
    if ap.shape[2] >= n:  # the front is in ap (pad == kt-1), or ap alone has kt-1 frames
        return ap[:, :, ap.shape[2] - n :].clone(memory_format=torch.channels_last_3d)
    # no front in ap and fewer than kt-1 frames: frame 0 repeated, then ap
    first = ap[:, :, :1].expand(-1, -1, n - ap.shape[2], -1, -1)
    return torch.cat([first, ap], dim=2).contiguous(memory_format=torch.channels_last_3d)


# ----------------------------------------------------------------------------- torch backend


def conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int, int] = (1, 1, 1),
    padding: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """F.conv3d, except that on CPU without autograd it calls oneDNN directly: F.conv3d's heuristic sends
    small inputs (N*C*T*H <= 20480: a chunk of a clip, the VAE's deeper levels) to its im2col kernel,
    measured 2-9x slower on the ST-VAE's shapes. Same arithmetic (a convolution in x's dtype)."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32  # oneDNN's bf16 path needs AVX512-BF16-class CPUs
        and torch.backends.mkldnn.is_available()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.compiler.is_compiling()  # inductor picks its own convolution
    ):
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride=stride, padding=padding)


def _torch_impl(p: _Problem):
    """Frame by frame: output frame t is one conv3d call on its kt-frame input window (a view of the
    activation, or of a (kt-1) + (kt-1) frame head holding the cache), so every output frame is computed
    by the same call on the same shapes whatever the chunk (chunked == whole bit for bit; one call over
    the whole clip lets the library choose its algorithm and blocking by T), and no time-padded copy of
    the clip is written. The norm is applied frame by frame for the same reason (`_apply_torch`). Everything
    stays in x's layout (layout changes cost more than the library's own copy of a strided window)."""
    x, weight, bias = p.x, p.weight, p.bias
    kt, kh, kw = p.kernel
    n = kt - 1
    B, C, T, H, W = x.shape
    cl = torch.channels_last_3d
    if p.fold:
        a = _apply_torch(x, p.norm) if p.norm is not None else x
        out = F.conv2d(a[:, :, 0], folded_weight(weight), bias, padding=(kh // 2, kw // 2)).unsqueeze(2)
        head = None
    else:
        a = _apply_torch(x, p.norm) if p.norm is not None else x
        fmt = cl if _frame_format(x) == torch.channels_last else torch.contiguous_format
        head = None
        if n:
            front = p.cache if p.cache is not None else a[:, :, :1].expand(-1, -1, n, -1, -1)
            head = torch.cat([front, a[:, :, :n]], dim=2).contiguous(memory_format=fmt)
        grad = needs_grad(x, weight, bias, p.cache, *(norm_tensors(p.norm) if p.norm else ()))
        out = None if grad else torch.empty((B, weight.shape[0], T, H, W), dtype=x.dtype, device=x.device,
                                            memory_format=fmt)  # fmt: skip
        frames = []
        for t in range(T):
            window = head[:, :, t : t + kt] if t < n else a[:, :, t - n : t + 1]  # type: ignore[index]
            frame = conv3d(window, weight, bias, padding=(0, kh // 2, kw // 2))
            if out is None:
                frames.append(frame)
            else:  # written straight into x's layout (out= is not differentiable)
                out[:, :, t : t + 1].copy_(frame)
        if out is None:
            out = torch.cat(frames, dim=2).contiguous(memory_format=fmt)
    if p.residual is not None:
        out = out + p.residual
    if not p.return_cache:
        return out
    if n == 0:
        return out, x[:, :, :0].clone()
    if head is None:  # the folded single frame: the cache is that frame repeated
        cache = a[:, :, :1].expand(-1, -1, n, -1, -1)
    else:  # the last kt-1 frames of cat([front, a]); head is cat([front, a]) when T < kt-1
        cache = a[:, :, T - n :] if T >= n else head[:, :, head.shape[2] - n :]
    return out, cache.clone(memory_format=cl)


# ----------------------------------------------------------------------------- hybrid backend


def _hybrid_impl(p: _Problem):
    """The norm pass (Triton) writing the time-padded conv input, then cuDNN."""
    weight, bias = p.weight, p.bias
    kt, kh, kw = p.kernel
    pad = 0 if (p.fold or kt == 1) else kt - 1
    ap = _conv_input(p, pad)
    if p.fold:
        w2 = folded_weight(weight, torch.channels_last)
        out = F.conv2d(ap[:, :, 0], w2, bias, padding=(kh // 2, kw // 2)).unsqueeze(2)
    else:
        w = _cached_on(weight, "cl", lambda w: w.contiguous(memory_format=torch.channels_last_3d))
        out = F.conv3d(ap, w, bias, padding=(0, kh // 2, kw // 2))
    if p.residual is not None:
        out.add_(p.residual)
    if not p.return_cache:
        return out
    return out, _cache_from_input(ap, pad, kt)


# ----------------------------------------------------------------------------- triton backend


def _cached_on(weight: torch.Tensor, tag: str, make):
    """make(weight), cached on the weight tensor itself and keyed by its version counter (an in-place
    update such as load_state_dict's copy_ re-derives it); plain computation under autograd."""
    if weight.requires_grad and torch.is_grad_enabled():
        return make(weight)
    key = (weight._version, weight.data_ptr(), weight.dtype, tuple(weight.shape))
    store = weight.__dict__.setdefault("_lavin_causal_conv3d", {})
    hit = store.get(tag)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make(weight.detach())
    store[tag] = (key, value)
    return value


def folded_weight(weight: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The one-frame fold's 2D weight (time taps summed in float32 for 16-bit) in `memory_format` (contiguous or
    channels_last: give it the input's, oneDNN takes a much slower kernel when they differ), cached on the weight."""
    if memory_format == torch.channels_last:
        return _cached_on(weight, "fold_cl", lambda w: _fold_weight(w).contiguous(memory_format=torch.channels_last))
    return _cached_on(weight, "fold", _fold_weight)


def _packed_weight(weight: torch.Tensor, fold: bool) -> torch.Tensor:
    """[taps, Cin, Cout rounded up to 8] (taps ordered (dt, dh, dw), zero extra columns: the kernel's TMA
    descriptor needs 16-byte row strides), cached on the weight tensor."""

    def pack(w: torch.Tensor) -> torch.Tensor:
        w = _fold_weight(w).unsqueeze(2) if fold else w
        Cout, Cin, kt, kh, kw = w.shape
        packed = w.new_zeros((kt * kh * kw, Cin, -(-Cout // 8) * 8))
        packed[:, :, :Cout] = w.permute(2, 3, 4, 1, 0).reshape(kt * kh * kw, Cin, Cout)
        return packed

    return _cached_on(weight, "packed_fold" if fold else "packed", pack)


@dataclass
class ConvConfig:
    """Launch configuration of the implicit-GEMM kernel."""

    block_m: int
    """output positions per tile"""
    block_n: int
    """output channels per tile"""
    block_k: int
    """input channels per reduction step"""
    group_m: int = 8
    """row tiles grouped for L2 reuse of input tiles"""
    num_warps: int = 8
    num_stages: int = 3


def conv_config(C: int, Cout: int, P: int, residual: bool = False) -> ConvConfig:
    """Tile sizes: the interpreter gets few, large programs (its cost is per operation, not per
    element) and BLOCK_K = 16; the GPU `gpu_conv_config`."""
    if interpreter_active():
        return ConvConfig(128, min(32, max(16, next_power_of_2(Cout))), 16, 4, 4, 1)
    return gpu_conv_config(C, Cout, residual)


def gpu_conv_config(C: int, Cout: int, residual: bool = False) -> ConvConfig:
    """The sm_90 rule (all compile without spills, see the AOT report): 128 x 256 x 64 tiles for
    Cout >= 256 (wgmma's widest N: each activation tile loaded serves 256 output channels),
    else (and with a residual, whose epilogue tile would spill at N = 256) 128 x 128 x 64; 8 warps (two
    consumer warpgroups), 3 stages. bench/gpu_causal_conv3d.py times the alternatives on the GPU."""
    block_n = 256 if Cout >= 256 and not residual else 128 if Cout >= 128 else max(16, next_power_of_2(Cout))
    block_k = 64 if C >= 64 else max(16, next_power_of_2(C))
    return ConvConfig(128, block_n, block_k, 8, 8 if block_n >= 128 else 4, 3)


def _triton_conv(
    ap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    fold: bool,
    pad: int,
    cfg: ConvConfig | None = None,
) -> torch.Tensor:
    """The implicit GEMM on the effective input `ap` whose first `pad` frames are the front (output
    frames = ap's frames - pad); without a front the kernel replicates frame 0 itself."""
    import triton

    from lavin_fast.ops.causal_conv3d_kernels import causal_conv3d_fwd_kernel

    B, C, Tin, H, W = ap.shape
    T = Tin - pad
    Cout = weight.shape[0]
    kt, kh, kw = weight.shape[2:]
    KT = 1 if fold else kt
    wp = _packed_weight(weight, fold)
    out = torch.empty((B, Cout, T, H, W), dtype=ap.dtype, device=ap.device, memory_format=torch.channels_last_3d)
    res = residual if residual is not None else out  # unused when HAS_RES False
    P = T * H * W
    cfg = cfg or conv_config(C, Cout, P, residual is not None)
    use_tma_scratch()
    grid = (triton.cdiv(P, cfg.block_m) * triton.cdiv(Cout, cfg.block_n), B)
    causal_conv3d_fwd_kernel[grid](
        ap, wp, bias if bias is not None else wp, res, out,
        C, H, W, Cout, wp.shape[2], P, pad - (KT - 1),
        *ap.stride(), *res.stride(), *out.stride(),
        KT=KT, KH=kh, KW=kw,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        NUM_CBLK=triton.cdiv(C, cfg.block_k),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION="ieee" if ap.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


@torch.library.custom_op("lavin_fast::causal_conv3d_triton", mutates_args=())
def _triton_op(
    ap: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    fold: bool,
    pad: int,
) -> torch.Tensor:
    """One opaque op for torch.compile (no autograd: forward only): the implicit GEMM on the effective
    input (see `_triton_conv`)."""
    return _triton_conv(ap, weight, bias, residual, fold, pad)


@_triton_op.register_fake
def _(ap, weight, bias, residual, fold, pad):
    B, _, Tin, H, W = ap.shape
    return ap.new_empty((B, weight.shape[0], Tin - pad, H, W)).contiguous(memory_format=torch.channels_last_3d)


def _triton_impl(p: _Problem):
    """The norm pass writes the effective input once (with the cache frames in front when streaming);
    the implicit GEMM reads it."""
    kt = p.kernel[0]
    pad = kt - 1 if (p.cache is not None and not p.fold and kt > 1) else 0
    ap = _conv_input(p, pad)
    out = _triton_op(ap, p.weight, p.bias, p.residual, p.fold, pad)
    if not p.return_cache:
        return out
    return out, _cache_from_input(ap, pad, kt)


def _grad_refusal(p: _Problem) -> list[str]:
    tensors = [p.x, p.weight, p.bias, p.cache, p.residual]
    if p.norm is not None:
        tensors += list(norm_tensors(p.norm))
    if needs_grad(*tensors):
        return ["autograd is needed but this backend is forward-only (the ST-VAE is frozen); use backend='torch'"]
    return []


def _triton_refusals(p: _Problem) -> list[str]:
    tensors = [p.x, p.weight] + [t for t in (p.bias, p.cache, p.residual) if t is not None]
    reasons = triton_refusals(*tensors) + _int32_refusals(p.x) + _grad_refusal(p)
    _, _, T, H, W = p.x.shape
    out_span = p.weight.shape[0] * T * H * W  # elements of one output sample (int32 in-sample offsets)
    if out_span >= 2**31:
        reasons.append(f"one output sample has {out_span} elements (>= 2^31); the kernel uses int32 offsets")
    if p.residual is not None:
        reasons += _int32_refusals(p.residual)
    return reasons


def _hybrid_refusals(p: _Problem) -> list[str]:
    reasons = []
    if p.norm is None:
        reasons.append("no norm to fuse (the hybrid backend is the fused norm kernel in front of cuDNN)")
    return reasons + triton_refusals(p.x) + _int32_refusals(p.x) + _grad_refusal(p)
