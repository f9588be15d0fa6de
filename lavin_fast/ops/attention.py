"""Joint (non-causal) grouped-query attention with the J-DiT's 3D RoPE fused in.

Layout is flash-attn's: q [B, L, Hq, hd], k and v [B, L, Hkv, hd], any strides with a
contiguous last dim; Hq a multiple of Hkv (query head h uses kv head h // (Hq // Hkv)).
With `rope_grid=(T, H, W)` the 3D RoPE of lavin_fast.ops.rope is applied to q and k first.

Backends (lavin_fast.ops.dispatch): "triton" (flash-attention forward and backward, the RoPE
optionally inside the kernel: launchers and ops in lavin_fast/ops/attention_kernels.py, kernels in
attention_fwd_kernels.py / attention_bwd_kernels.py) and "torch" (RoPE by apply_rope,
then torch's scaled_dot_product_attention). `auto` picks Triton for CUDA tensors it supports
and never for CPU tensors (the interpreter is for tests: ask for it with backend="triton").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lavin_fast.ops._checks import check_int, check_positive_float
from lavin_fast.ops.aot import AotSpec, register_aot
from lavin_fast.ops.dispatch import Backend, OpDispatcher
from lavin_fast.ops.rope import apply_rope, check_grid, rope_split

TRITON_HEAD_DIMS = (64, 72, 128)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Reference (the numerical specification; also the float64 yardstick of the tests)
# --------------------------------------------------------------------------------------------


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    rope_grid: tuple[int, int, int] | None = None,
    rope_t_offset: int = 0,
) -> torch.Tensor:
    """Plain PyTorch attention in the inputs' dtype (softmax in at least float32); [B, L, Hq, hd].

    GQA by repeating each kv head over its Hq // Hkv consecutive query heads.
    """
    hd = q.shape[-1]
    scale = hd**-0.5 if softmax_scale is None else softmax_scale
    if rope_grid is not None:
        q = apply_rope(q, rope_grid, rope_t_offset)
        k = apply_rope(k, rope_grid, rope_t_offset)
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    p = torch.softmax(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1).to(q.dtype)
    return torch.einsum("bhlm,bmhd->blhd", p, v)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _torch_attention(q, k, v, softmax_scale, rope_grid, rope_t_offset, deterministic):
    """RoPE by separate kernels, then torch SDPA on [B, H, L, hd] views (no copies)."""
    if rope_grid is not None:
        q = apply_rope(q, rope_grid, rope_t_offset)
        k = apply_rope(k, rope_grid, rope_t_offset)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    try:
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=softmax_scale, enable_gqa=gqa)
    except TypeError:  # torch < 2.5 has no enable_gqa
        rep = q.shape[2] // k.shape[2]
        kt, vt = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(qt, kt, vt, scale=softmax_scale)
    return out.transpose(1, 2)


def _torch_refusals(*args, **kwargs) -> list[str]:
    return []


def _triton_attention(q, k, v, softmax_scale, rope_grid, rope_t_offset, deterministic):
    from lavin_fast.ops import attention_kernels as K

    return K.flash_attention(q, k, v, softmax_scale, rope_grid, rope_t_offset, deterministic)


def _triton_refusals(q, k, v, softmax_scale, rope_grid, rope_t_offset, deterministic) -> list[str]:
    from lavin_fast.ops._triton import interpreter_active, triton_refusals

    reasons = triton_refusals(q, k, v)
    hd = q.shape[-1]
    if hd not in TRITON_HEAD_DIMS:
        reasons.append(f"head_dim {hd} is not one of the Triton kernel's head dims {TRITON_HEAD_DIMS}")
    span = max(x.shape[1] * x.stride(1) for x in (q, k, v))
    if span >= 2**31:
        reasons.append(f"token offsets up to {span} elements overflow the kernel's int32 row offsets")
    if q.device.type == "cuda":
        if q.dtype not in (torch.float16, torch.bfloat16):
            reasons.append(f"dtype {q.dtype} on CUDA; the Triton kernel takes float16 or bfloat16")
    elif interpreter_active() and q.dtype not in (torch.float32, torch.float16):
        reasons.append(f"dtype {q.dtype} under the interpreter; it takes float32 or float16 (bf16 tl.dot is wrong there)")
    return reasons


_DISPATCH = OpDispatcher(
    "attention",
    [
        Backend("triton", _triton_attention, _triton_refusals),
        Backend("torch", _torch_attention, _torch_refusals),
    ],
)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------


def _validate(q, k, v, softmax_scale, rope_grid, rope_t_offset) -> tuple[int, int, int] | None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, L, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype is {t.dtype} but q.dtype is {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; they must be on one device")
    B, L, Hq, hd = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, L, Hkv, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Lk, Hkv, hdk = k.shape
    if Bk != B:
        raise ValueError(f"k/v batch size {Bk} != q batch size {B}")
    if Lk != L:
        raise ValueError(f"k/v sequence length {Lk} != q sequence length {L} (joint attention: they must match)")
    if hdk != hd:
        raise ValueError(f"k/v head_dim {hdk} != q head_dim {hd}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if hd < 2 or hd % 2 or hd > MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim {hd} is not supported: expected an even size <= {MAX_HEAD_DIM} "
            f"(the Triton kernel takes {TRITON_HEAD_DIMS})"
        )
    if L < 1 or B < 1:
        raise ValueError(f"q must have at least one batch element and one token, got shape {tuple(q.shape)}")
    if softmax_scale is not None:
        check_positive_float("softmax_scale", softmax_scale)
    check_int("rope_t_offset", rope_t_offset)
    if rope_grid is None:
        return None
    grid = check_grid(rope_grid, L, "rope_grid")
    try:
        split = rope_split(hd)
    except ValueError as exc:
        raise ValueError(f"rope_grid given but head_dim {hd} has no 3D RoPE split: {exc}") from None
    if min(split) < 2:
        raise ValueError(f"rope_grid given but head_dim {hd} is too small for a 3D RoPE split {split}")
    return grid


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    rope_grid: tuple[int, int, int] | None = None,
    rope_t_offset: int = 0,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Non-causal grouped-query attention, optionally with the 3D RoPE on q and k; [B, L, Hq, hd].

    q: [B, L, Hq, hd]; k, v: [B, L, Hkv, hd] with Hq % Hkv == 0 (flash-attn's layout).
    softmax_scale: defaults to hd ** -0.5.
    rope_grid: (T, H, W) with T*H*W == L: apply the J-DiT's 3D RoPE to q and k (tokens ordered
        frame, row, col); rope_t_offset shifts the frame index.
    backend: "auto", "triton" or "torch" (see lavin_fast.ops.dispatch).
    deterministic: make the backward bit-reproducible (Triton: no atomics in dq).
    Differentiable in q, k and v with every backend.
    """
    grid = _validate(q, k, v, softmax_scale, rope_grid, rope_t_offset)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    args = (q, k, v, scale, grid, int(rope_t_offset), bool(deterministic))
    return _DISPATCH(*args, backend=backend)


def explain(q, k, v, *, softmax_scale=None, rope_grid=None, rope_t_offset=0, deterministic=False):
    """For each backend, why it would refuse these inputs (empty list: it accepts)."""
    grid = _validate(q, k, v, softmax_scale, rope_grid, rope_t_offset)
    scale = float(q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale)
    return _DISPATCH.explain(q, k, v, scale, grid, int(rope_t_offset), bool(deterministic))


# --------------------------------------------------------------------------------------------
# Ahead-of-time specs (lavin-fast kernels --report --op attention)
# --------------------------------------------------------------------------------------------

# A representative 3.4B-model shape: views of a fused QKV projection [B, L, (32 + 2*8) * hd];
# strides that are multiples of 16 are specialised as such by Triton's launcher at run time.
_AOT_L = 10240
# (Hq, Hkv) the report models at each head dim: the 3.4B model at hd 72, the 1.0B at hd 64
_AOT_HEADS = {64: (16, 16), 72: (32, 8), 128: (16, 4)}


def _at_shape(hd: int, kind: str, block_m: int = 64, block_n: int = 64) -> dict:
    """Grid, main-loop trip count and work of one launch at the modelled shape (B 1, L _AOT_L), for the
    static estimate. F = 4 L^2 hd Hq is the forward's useful FLOPs; each matrix kernel is credited with
    the products it computes at the real head dim (dQ kernel: S, dP, dQ = 1.5 F; dK/dV: 2 F, 2.5 F with
    the fused dQ), so that the backward's useful TFLOP/s is 2.5 F over the sum of its kernels' times."""
    hq, hkv = _AOT_HEADS[hd]
    L = _AOT_L
    f = 4.0 * L * L * hd * hq
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    # L2 -> SM bytes (sass_model.estimate's l2_bytes): the tiles each CTA-iteration loads by TMA, bf16, head dim
    # as tiled (64 + a 16-wide tail at hd 72); the fused dQ's fp32 reductions go back to L2
    width = 64 + 16 if hd == 72 else hd  # attention_device.head_dim_tiles: 64 + a 16-wide tail at hd 72
    if kind == "fwd":  # a k tile and a v tile per key block
        progs, iters = cdiv(L, block_m) * hq, cdiv(L, block_n)
        return {"programs": progs, "iters_per_program": iters, "useful_flops": f,
                "l2_bytes": float(progs * iters * block_n * width * 2 * 2)}  # fmt: skip
    if kind in ("dkdv", "dkdv+dq"):  # q and dO tiles, lse and delta rows; + the dQ tile reduced in fp32
        progs, iters = cdiv(L, block_n) * hkv, (hq // hkv) * cdiv(L, block_m)
        per_iter = block_m * width * 2 * 2 + block_m * 8 + (block_m * width * 4 if kind == "dkdv+dq" else 0)
        return {"programs": progs, "iters_per_program": iters,
                "useful_flops": (2.5 if kind == "dkdv+dq" else 2.0) * f, "l2_bytes": float(progs * iters * per_iter)}  # fmt: skip
    if kind == "dq":
        return {"programs": cdiv(L, block_m) * hq, "iters_per_program": cdiv(L, block_n), "useful_flops": 1.5 * f}
    # elementwise passes over [L, heads, hd]: bytes read + written per element
    # (delta with the hd-72 tail tiles: + q's tail columns and lse read, 64 B of tail tiles written per row and head,
    # and per row and kv head k's and v's 8 tail columns read, their 32-wide tile written, 96 B; the forward's v tail:
    # v's 8 tail columns read, a 16-wide tile written, 48 B per row and kv head)
    heads, per_elem = {"delta": (hq, 4), "delta+tails": (hq, 4 + 100 / hd + 96 * hkv / (hq * hd)),
                       "dq epilogue": (hq, 6), "v tail": (hkv, 48 / hd),
                       "dk epilogue": (hkv, 6), "rotate k": (hkv, 4)}[kind]  # fmt: skip
    return {"programs": cdiv(L, 64) * heads, "iters_per_program": 1, "useful_bytes": per_elem * L * heads * hd}


def _dq_spec(K, hd: int, rope: bool, base: dict, strides, ptr: str) -> AotSpec:
    c = K.DQ_CONFIGS[(hd, rope)][0]
    sig, al = strides("sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh", "sdb", "sdl", "sdh",
                      "sdqb", "sdql", "sdqh", "sab", "sal", "sah")
    return AotSpec(
        op="attention", kernel=K.attn_bwd_dq_kernel,
        signature={"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQ": ptr,
                   "DQACC": "*fp32", "INV_FREQ": "*fp32", **sig, "L": "i32", "HQ": "i32", "GROUP": "i32",
                   "GH": "i32", "GW": "i32", "T_OFF": "i32", "qk_scale": "fp32", "scale": "fp32",
                   **dict.fromkeys([*base, "ROPE", "BLOCK_M", "BLOCK_N"], "constexpr")},
        constexprs={**base, "ROPE": rope, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
        label=f"bwd dQ hd{hd} {'rope' if rope else 'pre-rotated'} M{c.block_m} N{c.block_n}",
        **_at_shape(hd, "dq", c.block_m, c.block_n),
        num_warps=c.num_warps, num_stages=c.num_stages, aligned=(*al, "L"), expect_hgmma=True,
    )


def _fwd_tma_spec(K, hd: int, base: dict, strides, ptr: str, f) -> AotSpec:
    """The default forward (pre-rotated q/k, TMA descriptors) in one of its candidate configurations `f`: the static
    pick (the first; its label names no options, the planner reads it), another candidate (not hot), or the
    warp-specialised one (4 warps, a TMA producer warp; the static model does not rate such code)."""
    pick = f == K.FWD_CONFIGS[(hd, False)][0]
    sig, al = strides("sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh", "svtb", "svtl", "svth", "sob",
                      "sol", "soh")
    consts = {"HD": hd, "D0": base["D0"], "HAS_TAIL": base["HAS_TAIL"], "BLOCK_M": f.block_m, "BLOCK_N": f.block_n,
              "WARP_SPECIALIZE": f.ws, "RESCALE_SLACK": K.RESCALE_SLACK if f.lazy else 0.0}
    if pick:
        tags = ""
    elif f.ws:
        tags = f" w{f.num_warps} warp-specialised (estimate not modelled) eager rescale"
    else:
        tags = f" w{f.num_warps} s{f.num_stages} {'lazy' if f.lazy else 'eager'} rescale (tuner candidate)"
    return AotSpec(
        op="attention", kernel=K.attn_fwd_tma_kernel,
        signature={"Q": ptr, "K": ptr, "V": ptr, "VT": ptr, "O": ptr, "LSE": "*fp32", **sig, "L": "i32", "HQ": "i32",
                   "GROUP": "i32", "qk_scale": "fp32", **dict.fromkeys(consts, "constexpr")},
        constexprs=consts,
        label=f"fwd hd{hd} pre-rotated TMA M{f.block_m} N{f.block_n}{tags}",
        **_at_shape(hd, "fwd", f.block_m, f.block_n),
        num_warps=f.num_warps, num_stages=f.num_stages, aligned=(*al, "L"), expect_hgmma=True, hot=pick,
    )


def _dkdv_tma_spec(K, hd: int, base: dict, strides, ptr: str, fuse_dq: bool, c=None) -> AotSpec:
    """The default dK/dV kernel (pre-rotated q/k, TMA descriptors); fuse_dq: dQ by TMA reductions. `c`: another
    candidate than the static pick (a row that is not hot: its spills do not fail --check)."""
    pick = K.DKDV_TMA_CONFIGS[(hd, fuse_dq)][0]
    c = c or pick
    sig, al = strides("sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh", "sdb", "sdl", "sdh",
                      "sdkb", "sdkl", "sdkh", "sdvb", "sdvl", "sdvh", "sab", "sal", "sah", "sqtb", "sqtl", "sqth",
                      "sktb", "sktl", "skth")
    consts = {"HD": hd, "D0": base["D0"], "HAS_TAIL": base["HAS_TAIL"], "BLOCK_M": c.block_m, "BLOCK_N": c.block_n,
              "FUSE_DQ": fuse_dq, "CARRY_DQ": c.carry_dq, "STATS": hd in K.STATS_HEAD_DIMS}
    return AotSpec(
        op="attention", kernel=K.attn_bwd_dkdv_tma_kernel,
        signature={"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr, "DV": ptr,
                   "DQACC": "*fp32", "QDT": ptr, "KVT": ptr, **sig, "L": "i32", "HQ": "i32", "HKV": "i32", "GROUP": "i32",
                   "qk_scale": "fp32", "scale": "fp32", **dict.fromkeys(consts, "constexpr")},
        constexprs=consts,
        label=f"bwd dK/dV hd{hd} pre-rotated TMA {'+fused dQ' if fuse_dq else 'only (deterministic)'}"
              f" M{c.block_m} N{c.block_n}{'' if c is pick else ' (tuner candidate)'}"
              f"{' dQ carried' if c.carry_dq and c is not pick else ''}",  # (the pick's key stays: the planner reads it)
        **_at_shape(hd, "dkdv+dq" if fuse_dq else "dkdv", c.block_m, c.block_n),
        num_warps=c.num_warps, num_stages=c.num_stages, aligned=(*al, "L"), expect_hgmma=True, hot=c is pick,
    )


@register_aot
def _aot_specs() -> list[AotSpec]:
    from lavin_fast.ops import attention_kernels as K

    specs = []
    for hd in TRITON_HEAD_DIMS:
        d0, has_tail = K.head_dim_tiles(hd)
        dt, dy, _ = rope_split(hd)
        base = {"HD": hd, "D0": d0, "HAS_TAIL": has_tail, "C0": dt, "C1": dt + dy}
        # head strides (== hd) are multiples of 16 except at hd 72; row/batch strides and L are
        head_al = (hd // 8) % 16 == 0  # strides are passed in units of 8 elements

        def strides(*names, head_al=head_al):
            return {n: "i32" for n in names}, tuple(n for n in names if head_al or not n.endswith("h"))

        ptr = "*bf16"
        for f in K.FWD_CONFIGS[(hd, False)]:  # every candidate of the default forward (the static pick first)
            specs.append(_fwd_tma_spec(K, hd, base, strides, ptr, f))
        for rope in (True,):
            f = K.FWD_CONFIGS[(hd, rope)][0]
            sig, al = strides("sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh", "sob", "sol", "soh")
            specs.append(AotSpec(
                op="attention", kernel=K.attn_fwd_kernel,
                signature={"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", "INV_FREQ": "*fp32", **sig,
                           "L": "i32", "HQ": "i32", "GROUP": "i32", "GH": "i32", "GW": "i32", "T_OFF": "i32",
                           "qk_scale": "fp32", **dict.fromkeys([*base, "ROPE", "BLOCK_M", "BLOCK_N"], "constexpr")},
                constexprs={**base, "ROPE": rope, "BLOCK_M": f.block_m, "BLOCK_N": f.block_n},
                label=f"fwd hd{hd} {'rope' if rope else 'pre-rotated'} M{f.block_m} N{f.block_n}",
                **_at_shape(hd, "fwd", f.block_m, f.block_n),
                num_warps=f.num_warps, num_stages=f.num_stages, aligned=(*al, "L"), expect_hgmma=True,
            ))
        for fuse in (True, False):
            specs.append(_dkdv_tma_spec(K, hd, base, strides, ptr, fuse))
        for c in K.DKDV_TMA_CONFIGS[(hd, True)][1:]:  # the carried-dQ candidate beside the pick (its waits)
            if c.carry_dq:
                specs.append(_dkdv_tma_spec(K, hd, base, strides, ptr, True, c))
        for (dhd, rope, fuse), cfgs in K.DKDV_CONFIGS.items():
            if dhd != hd or not rope:  # the pointer-load dK/dV kernel serves only the in-kernel RoPE now
                continue
            c = cfgs[0]
            sig, al = strides("sqb", "sql", "sqh", "skb", "skl", "skh", "svb", "svl", "svh", "sdb", "sdl", "sdh",
                              "sdkb", "sdkl", "sdkh", "sdvb", "sdvl", "sdvh", "sab", "sal", "sah", "skab", "skal", "skah")
            specs.append(AotSpec(
                op="attention", kernel=K.attn_bwd_dkdv_kernel,
                signature={"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr,
                           "DV": ptr, "DKACC": "*fp32", "DQACC": "*fp32", "INV_FREQ": "*fp32", **sig,
                           "L": "i32", "HQ": "i32", "HKV": "i32", "GROUP": "i32", "GH": "i32", "GW": "i32",
                           "T_OFF": "i32", "qk_scale": "fp32", "scale": "fp32",
                           **dict.fromkeys([*base, "ROPE", "BLOCK_M", "BLOCK_N", "FUSE_DQ", "ROPE_K"], "constexpr")},
                constexprs={**base, "ROPE": rope, "BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "FUSE_DQ": fuse,
                            "ROPE_K": rope and hd not in K.ROTATE_K_FIRST_HEAD_DIMS},
                label=f"bwd dK/dV hd{hd} {'rope' if rope else 'pre-rotated'} {'+atomic dQ' if fuse else 'only'}"
                      f" M{c.block_m} N{c.block_n}",
                **_at_shape(hd, "dkdv+dq" if fuse else "dkdv", c.block_m, c.block_n),
                num_warps=c.num_warps, num_stages=c.num_stages, aligned=(*al, "L"), expect_hgmma=True,
            ))
        for rope in (True, False):
            specs.append(_dq_spec(K, hd, rope, base, strides, ptr))
        if hd in K.ROTATE_K_FIRST_HEAD_DIMS:  # the pass writing a rotated copy of k for the dK/dV kernel
            sig, al = strides("sab", "sal", "sah", "sxb", "sxl", "sxh")
            specs.append(AotSpec(
                op="attention", kernel=K.rope_grad_epilogue_kernel,
                signature={"ACC": ptr, "X": ptr, "INV_FREQ": "*fp32", **sig, "L": "i32", "H": "i32",
                           "GH": "i32", "GW": "i32", "T_OFF": "i32", "scale": "fp32",
                           **dict.fromkeys([*base, "ROPE", "BLOCK_M", "INVERSE"], "constexpr")},
                constexprs={**base, "ROPE": True, "BLOCK_M": K.ELEMENTWISE_BLOCK_M, "INVERSE": False},
                label=f"bwd rotate k hd{hd}", **_at_shape(hd, "rotate k"), num_warps=4, num_stages=1, aligned=(*al, "L"),
            ))
        if hd == 72:  # the elementwise kernels (no matmul)
            sig, al = strides("svb", "svl", "svh", "stb", "stl", "sth")
            specs.append(AotSpec(  # the forward's VT (make_v_tail)
                op="attention", kernel=K.attn_v_tail_kernel,
                signature={"V": ptr, "T": ptr, **sig, "L": "i32", "H": "i32",
                           **dict.fromkeys(["HD", "D0", "BLOCK_M"], "constexpr")},
                constexprs={"HD": hd, "D0": d0, "BLOCK_M": K.ELEMENTWISE_BLOCK_M},
                label=f"fwd v tail hd{hd}", **_at_shape(hd, "v tail"), num_warps=4, num_stages=1, aligned=(*al, "L"),
            ))  # fmt: skip
            sig, al = strides("sob", "sol", "soh", "sdb", "sdl", "sdh", "sqb", "sql", "sqh", "sqtb", "sqtl", "sqth",
                              "skb", "skl", "skh", "svb", "svl", "svh", "sktb", "sktl", "skth")
            specs.append(AotSpec(
                op="attention", kernel=K.attn_bwd_pre_kernel,
                signature={"O": ptr, "DO": ptr, "DELTA": "*fp32", "Q": ptr, "LSE": "*fp32", "QDT": ptr, "K": ptr,
                           "V": ptr, "KVT": ptr, **sig, "L": "i32", "HQ": "i32", "GROUP": "i32", "lse_mul": "fp32",
                           "c": "fp32", **dict.fromkeys(["HD", "D0", "HAS_TAIL", "BLOCK_M", "WRITE_TAILS"], "constexpr")},
                constexprs={"HD": hd, "D0": d0, "HAS_TAIL": has_tail, "BLOCK_M": K.ELEMENTWISE_BLOCK_M,
                            "WRITE_TAILS": has_tail},
                label=f"bwd delta hd{hd}",  # (with the tail tiles at hd 72: WRITE_TAILS, q / dO's and k / v's)
                **_at_shape(hd, "delta+tails" if has_tail else "delta"), num_warps=4, num_stages=1, aligned=(*al, "L"),
            ))  # fmt: skip
            sig, al = strides("sab", "sal", "sah", "sxb", "sxl", "sxh")
            specs.append(AotSpec(
                op="attention", kernel=K.rope_grad_epilogue_kernel,
                signature={"ACC": "*fp32", "X": ptr, "INV_FREQ": "*fp32", **sig, "L": "i32", "H": "i32",
                           "GH": "i32", "GW": "i32", "T_OFF": "i32", "scale": "fp32",
                           **dict.fromkeys([*base, "ROPE", "BLOCK_M", "INVERSE"], "constexpr")},
                constexprs={**base, "ROPE": True, "BLOCK_M": K.ELEMENTWISE_BLOCK_M, "INVERSE": True},
                label=f"bwd RoPE^T epilogue hd{hd}", **_at_shape(hd, "dq epilogue"), num_warps=4, num_stages=1, aligned=(*al, "L"),
            ))
    return specs
