"""Causal 3D convolution of the ST-VAE, with GroupNorm + SiLU optionally fused into its input.

Specification (`reference_causal_conv3d`, plain PyTorch):
    a      = silu(group_norm(x))             if `norm` is given, else x   (the effective input)
    front  = cache                           if given, else a[:, :, :1] repeated kt-1 times
    out    = conv3d(cat([front, a], time), weight, bias, padding=(0, kh//2, kw//2)), stride 1
             (+ residual, added before rounding to x's dtype, when given)
    new_cache = last kt-1 frames of cat([front, a], time)                  (with return_cache)
The cache holds frames of the *effective* input (normalised and activated when a norm is fused),
so a clip cut into time chunks, each passed the previous chunk's new_cache, gives exactly the
whole-clip output. For T == 1 without a cache every time tap sees the same frame, so the conv
folds to a kh x kw 2D conv with the weights summed over time (`fold_single_frame`).

Backends (see `choose_backend` for `auto`):
- "triton": with a norm, the GroupNorm/SpatialNorm+SiLU Triton pass writes the effective input once
  (x's dtype, each element normalised once; a streaming cache copied in front), then the implicit-GEMM
  kernel (causal_conv3d_kernels.py) reads it: causal clamp and spatial zero padding by index, no padded
  copy, weights by TMA. Without a norm the kernel reads x in place. Forward only.
- "hybrid": the same norm pass writes the time-padded conv input, then cuDNN (F.conv3d with its own
  spatial padding). Only with a norm. Forward only.
- "torch": torch ops frame by frame (norm as addcmul + SiLU, one conv call per output frame on its
  kt-frame window, oneDNN directly on CPU; F.conv2d for the fold); differentiable; accepts everything;
  chunked == whole bit for bit on any CPU.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from lavin_fast.ops.aot import AotSpec, register_aot
from lavin_fast.ops.causal_conv3d_backends import (
    _fold_weight,
    _hybrid_impl,
    _hybrid_refusals,
    _Problem,
    _torch_impl,
    _triton_impl,
    _triton_refusals,
    conv3d,
    folded_weight,
    gpu_conv_config,
)
from lavin_fast.ops.dispatch import Backend, OpDispatcher, selection_is_explicit
from lavin_fast.ops.group_norm_silu import (
    SUPPORTED_DTYPES,
    GroupNormSiLU,
    GroupNormStatsState,
    SpatialNormSiLU,
    check_norm,
    group_norm_silu,
    group_norm_stats,
    reference_group_norm_silu,
    reference_group_norm_stats,
)

__all__ = [
    "GroupNormSiLU",
    "GroupNormStatsState",
    "SpatialNormSiLU",
    "causal_conv3d",
    "choose_backend",
    "conv3d",
    "folded_weight",
    "group_norm_silu",
    "group_norm_stats",
    "reference_causal_conv3d",
    "reference_group_norm_stats",
]

MAX_KERNEL = 3


# ----------------------------------------------------------------------------- reference


def reference_causal_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: GroupNormSiLU | SpatialNormSiLU | None = None,
    cache: torch.Tensor | None = None,
    return_cache: bool = False,
    fold_single_frame: bool = True,
    residual: torch.Tensor | None = None,
):
    """The specification in plain PyTorch (any dtype incl. float64, any device, no validation).

    The norm is computed in float32 (float64 for float64 x) and cast to x's dtype, as the kernels do.
    """
    kt, kh, kw = weight.shape[2:]
    a = reference_group_norm_silu(x, norm) if norm is not None else x
    T = x.shape[2]
    front = cache if cache is not None else a[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
    if fold_single_frame and T == 1 and cache is None:
        out = F.conv2d(a[:, :, 0], _fold_weight(weight), bias, padding=(kh // 2, kw // 2)).unsqueeze(2)
    else:
        ap = torch.cat([front.to(a.dtype), a], dim=2)
        out = F.conv3d(ap, weight, bias, padding=(0, kh // 2, kw // 2))
    if residual is not None:
        out = out + residual
    if not return_cache:
        return out
    full = torch.cat([front.to(a.dtype), a[:, :, max(0, T - (kt - 1)) :]], dim=2)
    return out, full[:, :, full.shape[2] - (kt - 1) :].clone()


# ----------------------------------------------------------------------------- validation


def _check(x, weight, bias, norm, cache, return_cache, fold_single_frame, residual=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"x must be [B, C, T, H, W] (5 dims), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    if min(x.shape) < 1:
        raise ValueError(f"x must have no empty dimension, got shape {tuple(x.shape)}")
    B, C, T, H, W = x.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 5:
        seen = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be [Cout, Cin, kt, kh, kw] (5 dims), got {seen}")
    Cout, Cin, kt, kh, kw = weight.shape
    if Cin != C:
        raise ValueError(f"weight has Cin={Cin} but x has C={C} channels (weight shape {tuple(weight.shape)})")
    if Cout < 1:
        raise ValueError(f"weight must have Cout >= 1, got shape {tuple(weight.shape)}")
    if not all(1 <= k <= MAX_KERNEL for k in (kt, kh, kw)):
        raise ValueError(f"kernel size (kt, kh, kw)={(kt, kh, kw)} must be in 1..{MAX_KERNEL} on every axis")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel size (kh, kw)={(kh, kw)} must be odd (zero padding kh//2, kw//2 keeps H, W)")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (Cout,):
            seen = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must be a [{Cout}] tensor (Cout), got {seen}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must have x's dtype {x.dtype} on {x.device}, got {bias.dtype} on {bias.device}")
    if norm is not None:
        check_norm(norm, x)
    if cache is not None:
        want = (B, C, kt - 1, H, W)
        if not isinstance(cache, torch.Tensor) or tuple(cache.shape) != want:
            seen = tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache).__name__
            raise ValueError(f"cache must be [B, Cin, kt-1, H, W] = {want}, got {seen}")
        if cache.dtype != x.dtype or cache.device != x.device:
            raise ValueError(f"cache must have x's dtype {x.dtype} on {x.device}, got {cache.dtype} on {cache.device}")
    if residual is not None:
        want = (B, Cout, T, H, W)
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != want:
            seen = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"residual must be [B, Cout, T, H, W] = {want}, got {seen}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"residual must have x's dtype {x.dtype} on {x.device}, got {residual.dtype} on {residual.device}"
            )
    if not isinstance(return_cache, bool):
        raise ValueError(f"return_cache must be a bool, got {return_cache!r}")
    if not isinstance(fold_single_frame, bool):
        raise ValueError(f"fold_single_frame must be a bool, got {fold_single_frame!r}")


# ----------------------------------------------------------------------------- dispatch

# Per-shape backend choice: key from `shape_key`, value a backend name. ESTIMATED, not measured: filled
# from the sm_90 static estimates (`lavin-fast kernels --report --op causal_conv3d`) for the full ST-VAE's
# 3x3x3 convs (512x512 images, folded; 17x256x256 clips), bf16. The Triton GEMM estimates 778 TFLOP/s at
# every C 128-512 shape (tensor-bound, at the plain-GEMM anchor's 738); the hybrid runs the same norm pass
# and then cuDNN, which can at best match a plain GEMM and also reads a time-padded copy, so triton is
# taken everywhere. bench/gpu_causal_conv3d.py's "choice" rows (measured) replace these entries; a JSON
# file named by LAVIN_FAST_CAUSAL_CONV3D_TABLE overrides/extends the table at import.
MEASURED_CHOICES_SOURCE = "estimated"
MEASURED_CHOICES: dict[str, str] = {
    "bfloat16/128x128/k333/norm/fold/M262144": "triton",
    "bfloat16/128x256/k333/norm/fold/M65536": "triton",
    "bfloat16/256x256/k333/norm/fold/M65536": "triton",
    "bfloat16/256x512/k333/norm/fold/M16384": "triton",
    "bfloat16/512x512/k333/norm/fold/M16384": "triton",
    "bfloat16/512x512/k333/norm/fold/M4096": "triton",
    "bfloat16/512x512/k333/spatial/fold/M4096": "triton",
    "bfloat16/512x512/k333/spatial/fold/M16384": "triton",
    "bfloat16/512x256/k333/spatial/fold/M65536": "triton",
    "bfloat16/256x256/k333/spatial/fold/M65536": "triton",
    "bfloat16/256x128/k333/spatial/fold/M262144": "triton",
    "bfloat16/128x128/k333/spatial/fold/M262144": "triton",
    "bfloat16/128x128/k333/norm/conv/M2097152": "triton",
    "bfloat16/128x256/k333/norm/conv/M262144": "triton",
    "bfloat16/256x256/k333/norm/conv/M262144": "triton",
    "bfloat16/256x512/k333/norm/conv/M32768": "triton",
    "bfloat16/512x512/k333/norm/conv/M32768": "triton",
    "bfloat16/512x512/k333/norm/conv/M8192": "triton",
    "bfloat16/512x512/k333/spatial/conv/M8192": "triton",
    "bfloat16/512x512/k333/spatial/conv/M32768": "triton",
    "bfloat16/512x256/k333/spatial/conv/M262144": "triton",
    "bfloat16/256x256/k333/spatial/conv/M262144": "triton",
    "bfloat16/256x128/k333/spatial/conv/M2097152": "triton",
    "bfloat16/128x128/k333/spatial/conv/M2097152": "triton",
}


def _load_table() -> None:
    path = os.environ.get("LAVIN_FAST_CAUSAL_CONV3D_TABLE")
    if path:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError(f"LAVIN_FAST_CAUSAL_CONV3D_TABLE={path!r} must hold a JSON object of key -> backend name")
        MEASURED_CHOICES.update(table)


_load_table()


def shape_key(x: torch.Tensor, weight: torch.Tensor, has_norm: bool | str, fold: bool) -> str:
    """Key of the per-shape choice table: dtype, Cin, Cout, kernel, norm ("norm" for GroupNorm,
    "spatial" for SpatialNorm, "plain"), fold, and B*T*H*W rounded up to a power of two (the choice
    depends on size only coarsely)."""
    B, C, T, H, W = x.shape
    Cout, _, kt, kh, kw = weight.shape
    rows = B * T * H * W
    bucket = 1 << max(0, (rows - 1).bit_length())
    dt = str(x.dtype).removeprefix("torch.")
    kind = has_norm if isinstance(has_norm, str) else "norm" if has_norm else "plain"
    return f"{dt}/{C}x{Cout}/k{kt}{kh}{kw}/{kind}/{'fold' if fold else 'conv'}/M{bucket}"


def _table_choice(p: _Problem) -> str | None:
    """The measured table's backend for this shape (CUDA only), if it has one."""
    if not p.x.is_cuda:
        return None
    kind = "spatial" if isinstance(p.norm, SpatialNormSiLU) else "norm" if p.norm is not None else "plain"
    return MEASURED_CHOICES.get(shape_key(p.x, p.weight, kind, p.fold))


def _auto_refusals(p: _Problem, me: str) -> list[str]:
    """Why `auto` passes over backend `me` although it could run the input (none when asked for by
    name): the measured table names another backend that accepts; or, for triton, float32 input, whose
    kernel path multiplies in full-precision FMA, far from cuDNN's tensor-core float32 convolutions."""
    if selection_is_explicit():
        return []
    choice = _table_choice(p)
    if choice == me:
        return []
    if choice in _OWN_REFUSALS and not _OWN_REFUSALS[choice](p):
        return [f"auto: the per-shape table (MEASURED_CHOICES) picks {choice!r} for this shape"]
    if me == "triton" and p.x.dtype == torch.float32:
        return ["auto: float32 goes to the hybrid/torch path (the kernel's float32 dot is FMA, not tensor cores)"]
    return []


_OWN_REFUSALS = {"triton": _triton_refusals, "hybrid": _hybrid_refusals, "torch": lambda p: []}

_dispatch = OpDispatcher(
    "causal_conv3d",
    [
        Backend("triton", _triton_impl, lambda p: _triton_refusals(p) + _auto_refusals(p, "triton")),
        Backend("hybrid", _hybrid_impl, lambda p: _hybrid_refusals(p) + _auto_refusals(p, "hybrid")),
        Backend("torch", _torch_impl),
    ],
)


def choose_backend(p: _Problem) -> str:
    """The backend `auto` takes (the shared dispatcher's first accepting backend, in the order triton,
    hybrid, torch): CPU tensors -> torch; on CUDA the measured table's choice for this shape if that
    backend accepts, else 16-bit -> triton when it accepts (no padded copy, GEMM at the anchor), else hybrid
    for a norm, else torch; float32 -> hybrid for a norm, else torch."""
    return _dispatch.select("auto", p).name


def causal_conv3d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm: GroupNormSiLU | SpatialNormSiLU | None = None,
    cache: torch.Tensor | None = None,
    return_cache: bool = False,
    fold_single_frame: bool = True,
    residual: torch.Tensor | None = None,
    backend: str | None = "auto",
):
    """Causal 3D convolution (stride 1) of x [B, C, T, H, W] with weight [Cout, C, kt, kh, kw], k <= 3.

    Time is front-padded with kt-1 copies of the first frame (or with `cache` [B, C, kt-1, H, W],
    the previous chunk's last kt-1 frames of the effective input); H and W are zero-padded by
    kh//2, kw//2 after the norm. `norm`: GroupNorm + SiLU (GroupNormSiLU) or the decoder's
    SpatialNorm + SiLU (SpatialNormSiLU) applied once per element of x. Returns out
    [B, Cout, T, H, W] in x's dtype (channels-last-3d from the Triton backends), or (out, new_cache)
    with return_cache=True. fold_single_frame: T == 1 without a cache runs the exact time-summed 2D
    conv; False forces the general path. residual: [B, Cout, T, H, W] added in the epilogue (float32,
    before rounding), e.g. the ResnetBlock's skip. backend: "auto", "triton", "hybrid" or "torch".
    """
    _check(x, weight, bias, norm, cache, return_cache, fold_single_frame, residual)
    kt = weight.shape[2]
    if cache is not None and kt == 1:
        cache = None  # a zero-frame cache carries nothing
    fold = fold_single_frame and x.shape[2] == 1 and cache is None and kt > 1
    p = _Problem(x, weight, bias, norm, cache, return_cache, fold, residual)
    return _dispatch(p, backend=backend)


# ----------------------------------------------------------------------------- ahead-of-time specs


@register_aot
def _aot_specs() -> list[AotSpec]:
    from lavin_fast.ops.causal_conv3d_kernels import causal_conv3d_fwd_kernel
    from lavin_fast.ops.group_norm_silu_kernels import _gn_silu_kernel, _gn_stats_combine_kernel, _gn_stats_kernel

    specs = []
    ints = {k: "i32" for k in ("C", "H", "W", "Cout", "CoutP", "P", "T_SHIFT")}
    strides = {}
    for pre in ("sx", "sr", "so"):
        strides.update({f"{pre}b": "i64", f"{pre}c": "constexpr", f"{pre}t": "i32", f"{pre}h": "i32", f"{pre}w": "i32"})
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "res_ptr": "*bf16", "out_ptr": "*bf16",
           **ints, **strides}  # fmt: skip
    for name in ("KT", "KH", "KW", "HAS_BIAS", "HAS_RES", "NUM_CBLK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
                 "DOT_PRECISION"):  # fmt: skip
        sig[name] = "constexpr"
    # the norm is a separate pass (group_norm_silu below), so "norm" shapes run the same GEMM as "plain";
    # labels name the ST-VAE layer each shape serves and the (T, H, W) it runs at when the encoder reads the
    # 17x256x256 clip (levels: T17 256^2 C128, T9 128^2 C256, T5 64^2 C256, T5 32^2 C512) or, for the one-frame
    # fold, the 512 px image (latent level 64^2); the grid and trip count follow from that shape
    for cin, cout, k, residual, label, thw in (
        (128, 128, (3, 3, 3), False, "C128 3x3x3", (17, 256, 256)),
        (256, 256, (3, 3, 3), False, "C256 3x3x3", (9, 128, 128)),
        (512, 512, (3, 3, 3), False, "C512 3x3x3", (5, 32, 32)),
        (512, 512, (3, 3, 3), True, "C512 3x3x3 +residual", (5, 32, 32)),
        (256, 256, (3, 3, 3), True, "C256 3x3x3 +residual", (9, 128, 128)),
        (128, 256, (3, 3, 3), False, "C128->256 3x3x3", (9, 128, 128)),
        (512, 512, (1, 3, 3), False, "C512 fold 3x3", (1, 64, 64)),
        (256, 512, (1, 1, 1), False, "C256->512 1x1x1 shortcut", (5, 32, 32)),
        (3, 128, (3, 3, 3), False, "conv_in 3->128", (17, 256, 256)),
        (128, 3, (3, 3, 3), False, "conv_out 128->3", (17, 256, 256)),
    ):
        cfg = gpu_conv_config(cin, cout, residual)
        positions = thw[0] * thw[1] * thw[2]  # output positions of one sample (the grid's second axis: B=1)
        const = dict(
            sxc=1, src=1, soc=1, KT=k[0], KH=k[1], KW=k[2], HAS_BIAS=True, HAS_RES=residual,
            NUM_CBLK=-(-cin // cfg.block_k),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_PRECISION="tf32",
        )  # fmt: skip
        # Triton's launcher specialises integer arguments divisible by 16 at run time; with C a
        # multiple of 16 every stride of a channels-last tensor is
        aligned = tuple(
            a for a in ("C", "Cout", "CoutP", "sxb", "sxt", "sxh", "sxw", "srb", "srt", "srh", "srw",
                        "sob", "sot", "soh", "sow")
            if not (cin % 16 and a[:2] in ("C", "sx")) and not (cout % 16 and a[:2] in ("Co", "sr", "so"))
        )  # fmt: skip
        specs.append(AotSpec("causal_conv3d", causal_conv3d_fwd_kernel, sig, const,
                             f"{label} bf16 {cfg.block_m}x{cfg.block_n}x{cfg.block_k} at T{thw[0]}x{thw[1]}x{thw[2]}",
                             cfg.num_warps, cfg.num_stages, aligned=aligned, expect_hgmma=True,
                             programs=-(-positions // cfg.block_m) * -(-cout // cfg.block_n),
                             iters_per_program=k[0] * k[1] * k[2] * const["NUM_CBLK"],
                             useful_flops=2.0 * positions * cin * cout * k[0] * k[1] * k[2]))  # fmt: skip
    pos = {k: "i32" for k in ("C", "P", "W", "HW")}
    for c in (128, 512):
        sig = {"x_ptr": "*bf16", "part_ptr": "*fp32", **pos,
               "sxb": "i64", "sxc": "constexpr", "sxt": "i32", "sxh": "i32", "sxw": "i32",
               "TILES": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}  # fmt: skip
        bp, bc = max(16, 4096 // min(c, 128)), min(c, 128)
        specs.append(AotSpec("causal_conv3d", _gn_stats_kernel, sig, dict(sxc=1, TILES=16, BLOCK_P=bp, BLOCK_C=bc),
                             f"group_norm_stats C{c} bf16", 4, 1, aligned=("C", "sxb", "sxt", "sxh", "sxw")))  # fmt: skip
        sig = {"x_ptr": "*bf16", "y_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "gamma_ptr": "*bf16",
               "beta_ptr": "*bf16", "sp_scale_ptr": "*fp32", "sp_shift_ptr": "*fp32", "tidx_ptr": "*i32", "SY": "i32",
               "SX": "i32", "C": "i32", "G": "i32", "CG": "i32", "P": "i32", "W": "i32", "HW": "i32",
               "sxb": "i64", "sxc": "constexpr", "sxt": "i32", "sxh": "i32", "sxw": "i32",
               "syb": "i64", "syc": "constexpr", "syt": "i32", "syh": "i32", "syw": "i32",
               "ssb": "i64", "ssc": "constexpr", "sst": "i32", "ssh": "i32", "ssw": "i32",
               "SPATIAL": "constexpr", "BLOCK_P": "constexpr", "BLOCK_C": "constexpr"}  # fmt: skip
        bp = max(16, 4096 // min(c, 128))
        thw = (17, 256, 256) if c == 128 else (5, 32, 32)  # where the clip's encoder runs C128 / C512
        positions = thw[0] * thw[1] * thw[2]
        for spatial in (False, True):
            specs.append(AotSpec("causal_conv3d", _gn_silu_kernel, sig,
                                 dict(sxc=1, syc=1, ssc=1, SPATIAL=spatial, BLOCK_P=bp, BLOCK_C=bc),
                                 f"group_norm_silu C{c} bf16{' SpatialNorm' if spatial else ''} at T{thw[0]}x{thw[1]}x{thw[2]}",
                                 4, 1, aligned=("C", "sxb", "sxt", "sxh", "sxw", "syb", "syt", "syh", "syw", "ssb",
                                                "sst", "ssh", "ssw"),
                                 programs=-(-positions // bp) * -(-c // bc),
                                 useful_bytes=2.0 * positions * c * 2))  # read x, write y (bf16)  # fmt: skip
    sig = {"part_ptr": "*fp32", "first_ptr": "*fp32", "second_ptr": "*fp32", **{k: "i32" for k in
           ("C", "G", "CG", "S", "ROWS", "P")}, "eps": "fp32", "FINALIZE": "constexpr", "BLOCK_S": "constexpr",
           "BLOCK_CG": "constexpr"}  # fmt: skip
    specs.append(AotSpec("causal_conv3d", _gn_stats_combine_kernel, sig, dict(FINALIZE=True, BLOCK_S=1024, BLOCK_CG=4),
                         "group_norm_stats combine C128 G32", 4, 1, aligned=("C", "ROWS")))  # fmt: skip
    return specs
