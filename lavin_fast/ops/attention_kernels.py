"""Launchers, launch configurations and torch.library ops of the Triton flash attention (forward and backward) for the J-DiT's joint attention, with the 3D RoPE
either already applied to q/k (the default path) or applied inside the kernels (opt-in).

Design (docs/attention.md has the reasoning and the static estimates):
- Layout [B, L, H, hd] with arbitrary batch/token/head strides (last dim contiguous).
- Head dim in two column tiles: a main tile of D0 = 64 (hd 64, 72) or 128 (hd 128) columns, and
  for hd 72 a 16-wide tail tile (columns 64..79, zero past 72). Every matmul is done per tile, so
  hd 72 costs 80 columns of tensor-core work instead of 128 (or flash-attn's 96).
- Default path (pre-rotated q/k): `attn_fwd_tma_kernel` and `attn_bwd_dkdv_tma_kernel` load through
  TMA descriptors made in the kernel, one per (batch, head) over [L, hd]: columns >= hd and rows >= L
  read as zeros. The forward skips the accumulator rescale unless a row max grows by more than
  RESCALE_SLACK; the dK/dV kernel also computes dQ (5 matmuls) by TMA bulk reductions, each query
  block's one iteration late (carry_dq). At hd 72 the 16-wide tail tiles carry more than the head's
  last 8 columns: a column of ones in v's (the forward's row sums), and lse / delta beside q's and dO's
  tails with matching constants beside k's and v's (the backward loads neither): `v_tail`,
  `stat_tails`.
- Forward: FA2 online softmax in base 2 (the softmax scale times log2(e) folded into one FMA before
  exp2); the row logsumexp (base 2, of the scaled logits) is saved for the backward.
- In-kernel RoPE (`attn_fwd_kernel`, `attn_bwd_dkdv_kernel`, `attn_bwd_dq_kernel`, pointer loads): a
  tile of q or k is rotated right after loading, in float32, by loading it a second time at the
  rotate-half partner columns; gradients go back through the rotation (R^T) in a small epilogue.
- Backward: delta = rowsum(dO * O); one program per (kv block, kv head) walks the query blocks of
  every query head of its group, so dK and dV for a kv head are summed in registers; dQ fused
  (default) or, with deterministic=True, by a separate dQ kernel with a fixed summation order.
- Launch configurations: on a GPU, the first call of a shape bucket times each kernel's candidate list
  (at most 4, the static sm_90 report's pick first) and keeps the fastest, cached on disk per GPU name
  and versions (lavin_fast.ops.tuning); LAVIN_FAST_ATTENTION_TUNE=0 launches the static pick untimed.
- The torch.library ops are triton_ops on a GPU (torch.compile sees the kernels), custom ops under the
  interpreter.
- Strides are passed in units of 8 elements (see `_al`) so that hd-72 rows are provably 16-byte aligned.

The kernels live in attention_fwd_kernels.py and attention_bwd_kernels.py (their shared device helpers in
attention_device.py); this module re-exports them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from lavin_fast.ops._triton import interpreter_active, next_power_of_2, use_tma_scratch
from lavin_fast.ops.attention_bwd_kernels import (
    attn_bwd_dkdv_kernel,
    attn_bwd_dkdv_tma_kernel,
    attn_bwd_dq_kernel,
    attn_bwd_pre_kernel,
    rope_grad_epilogue_kernel,
)
from lavin_fast.ops.attention_device import TAIL, head_dim_tiles
from lavin_fast.ops.attention_fwd_kernels import attn_fwd_kernel, attn_fwd_tma_kernel, attn_v_tail_kernel
from lavin_fast.ops.rope import rope_inv_freq, rope_split
from lavin_fast.ops.tuning import FirstCallTuner, tuning_setting

__all__ = [
    "TAIL", "TileConfig", "attn_bwd_dkdv_kernel", "attn_bwd_dkdv_tma_kernel", "attn_bwd_dq_kernel",
    "attn_bwd_pre_kernel", "attn_fwd_kernel", "attn_fwd_tma_kernel", "attn_v_tail_kernel", "backward",
    "default_configs", "flash_attention", "flash_attention_bwd", "flash_attention_fwd", "forward", "head_dim_tiles",
    "kv_tails", "make_v_tail", "rope_grad_epilogue_kernel", "v_tail",
]

LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------
# Configurations and launchers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration of an attention kernel."""

    block_m: int
    """query rows per tile (per program in the forward and dQ kernels; per step in dK/dV)."""
    block_n: int
    """key rows per tile (per step in the forward and dQ kernels; per program in dK/dV)."""
    num_warps: int
    """warps per program: a multiple of 4 so that Hopper's warpgroup MMA (wgmma) is used."""
    num_stages: int
    """software-pipelining depth of the loads in the inner loop."""
    ws: bool = False
    """warp-specialised main loop (the TMA forward only: a producer warp issues the loads)."""
    lazy: bool = True
    """the TMA forward's lazy rescale (RESCALE_SLACK); False: FA2's rescale on every key block, no branch."""
    carry_dq: bool = False
    """the TMA dK/dV kernel with fused dQ: each query block's dQ reduced one iteration later (CARRY_DQ)."""

    def __str__(self) -> str:  # the tuner's label (log lines, cache file)
        tags = (" ws" if self.ws else "") + ("" if self.lazy else " eager") + (" carry-dq" if self.carry_dq else "")
        return f"M{self.block_m} N{self.block_n} w{self.num_warps} s{self.num_stages}{tags}"


# Hopper (sm_90) search spaces; the first entry of each is the expected winner, which the AOT
# report compiles (lavin-fast kernels --report --op attention: no spills, HGMMA present). In-kernel
# RoPE keeps a rotated tile and its cos/sin live in registers, so those variants take narrower
# key tiles. wgmma needs >= 64 rows per warpgroup in the instruction's M dim.
_C = TileConfig
FWD_CONFIGS: dict[tuple[int, bool], list[TileConfig]] = {  # (hd, rope)
    # pre-rotated q/k (attn_fwd_tma_kernel), the static pick first: at hd 64 and 128, 128 x 64 tiles, 8 warps (a
    # warpgroup per 64 rows), two CTAs per SM: four warpgroups per SM, so one's softmax overlaps another's wgmma
    # (at hd 72 the 64-row, 4-warp loop below comes first since session 5 part 2).
    # At hd 64 and 72 FA2's rescale on every key block (eager: no block-uniform test, one CTA-wide barrier less per
    # iteration; the corrected model 411 against 392 for the lazy rescale at hd 72, 407 / 366 at hd 64); at hd 128
    # the lazy rescale (the eager loop needs 138 registers there: one CTA per SM, 312 against 424).
    # Then the other rescale; then 64-row tiles, 4 warps (one warpgroup), 2 stages: four CTAs per SM (three at
    # hd 128 with 64 x 32); they read k and v from L2 twice per FLOP as often as the 128-row tiles, which the model
    # charges since session 5 (sass_model's L2 term; docs/attention.md, Two CTAs per SM).
    # The warp-specialised loop (4 warps, FA2 update on every block, no peeled block) is each list's last
    # candidate: the static model does not rate warp-specialised code, so the first GPU call measures it
    # (with LAVIN_FAST_ATTENTION_WS=1 until a GPU run has shown it runs: forward_candidates)
    (64, False): [_C(128, 64, 8, 3, lazy=False), _C(128, 64, 8, 3), _C(64, 64, 4, 2, lazy=False),
                  _C(128, 64, 4, 2, ws=True, lazy=False)],  # fmt: skip
    # hd 72 (the 3.4B model), since session 5's L2 term: the 64-row, 4-warp loop first (452 [401-525] against 399
    # [335-503] for the 128-row one, which stays the tuner's second candidate; its k/v traffic, about 7.9 TB/s of
    # L2 -> SM at that rate, is inside the 9.7 TB/s measured on GH100: docs/attention.md)
    (72, False): [_C(64, 64, 4, 2, lazy=False), _C(128, 64, 8, 3, lazy=False), _C(128, 64, 8, 3),
                  _C(128, 64, 4, 2, ws=True, lazy=False)],  # fmt: skip
    # hd 128, by the same model: the 64 x 32, 4-warp loop first (492 [436-571] against 333 [280-420] for the lazy
    # 128-row loop, which stays the tuner's second candidate)
    (128, False): [_C(64, 32, 4, 2, lazy=False), _C(128, 64, 8, 2), _C(128, 64, 8, 2, lazy=False),
                   _C(128, 64, 4, 2, ws=True, lazy=False)],  # fmt: skip
    (64, True): [_C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(128, 64, 8, 4), _C(64, 64, 4, 3)],
    (72, True): [_C(128, 64, 8, 3), _C(128, 64, 8, 4), _C(128, 32, 8, 3), _C(64, 64, 4, 3)],
    (128, True): [_C(128, 64, 8, 3), _C(128, 64, 8, 2), _C(128, 32, 8, 3), _C(64, 64, 4, 3)],
}
# in-kernel RoPE (attn_bwd_dkdv_kernel, pointer loads), (hd, rope, fused atomic dQ)
DKDV_CONFIGS: dict[tuple[int, bool, bool], list[TileConfig]] = {
    (64, True, True): [_C(32, 128, 8, 2), _C(64, 128, 8, 2), _C(64, 64, 4, 2)],
    (64, True, False): [_C(64, 128, 8, 2), _C(32, 128, 8, 2), _C(64, 64, 4, 2)],
    (72, True, False): [_C(32, 128, 8, 1), _C(16, 128, 8, 2), _C(32, 128, 8, 2)],
    (128, True, False): [_C(16, 128, 8, 2), _C(32, 128, 8, 2), _C(16, 64, 4, 2)],
}
# pre-rotated q/k (attn_bwd_dkdv_tma_kernel), (hd, fused dQ): at hd 64 and 72 one warpgroup per 64 keys
# and 64 queries, two CTAs per SM (no spills; registers <= 255 x 128 threads and shared memory allow 2), loads
# double-buffered (issued an iteration ahead; single-buffered stays a candidate). Full wgmma waits: Triton 3.6
# waits on a dot whose result feeds another dot as its accumulator (main + tail tile of S^T and of dP^T at hd 72:
# 2 + 2) and on a dot whose result anything else reads in the same iteration (each dQ product before its TMA
# reduction). carry_dq (each query block's dQ products reduced one iteration later, after the next logits'
# wait, which covers them) removes the dQ waits: the static pick at hd 64 (2 full waits, not 3; 242 registers)
# and hd 72 (4, not 6; 248 registers, no spills since lse and delta come in through the tail products,
# `stat_tails`: with them loaded, the carried products spilled 440 B); docs/attention.md.
# hd 128: 8 warps, one CTA per SM
DKDV_TMA_CONFIGS: dict[tuple[int, bool], list[TileConfig]] = {
    (64, True): [_C(64, 64, 4, 2, carry_dq=True), _C(64, 64, 4, 2), _C(64, 64, 4, 1), _C(64, 128, 8, 2)],
    (64, False): [_C(64, 64, 4, 2), _C(64, 64, 4, 1), _C(64, 128, 8, 2)],
    (72, True): [_C(64, 64, 4, 2, carry_dq=True), _C(64, 64, 4, 2), _C(64, 64, 4, 1), _C(64, 128, 8, 2)],
    (72, False): [_C(64, 64, 4, 2), _C(64, 64, 4, 1), _C(64, 128, 8, 2)],
    (128, True): [_C(32, 128, 8, 2), _C(64, 128, 8, 1), _C(64, 64, 4, 1)],
    (128, False): [_C(32, 128, 8, 2), _C(64, 128, 8, 1), _C(64, 64, 4, 1)],
}
# pre-rotated (the deterministic path): 4 warps and 64 query rows per program at hd 72 and 128, 2-3 CTAs per SM (the
# corrected static model: 455 against 233 for 128 x 64 with 8 warps at hd 72, 482 against 284 at hd 128, where the
# 8-warp builds fit one CTA per SM; 64-row tiles read k and v twice as often per FLOP from L2, which the model does
# not charge: the first GPU call measures the 128-row build, second in each list, against them); with in-kernel RoPE
# at hd 72 likewise 64 x 32 (174 against 132)
DQ_CONFIGS: dict[tuple[int, bool], list[TileConfig]] = {  # (hd, rope)
    (64, True): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 128, 8, 2)],
    (64, False): [_C(128, 64, 8, 2), _C(64, 64, 4, 2), _C(128, 128, 8, 2)],
    (72, True): [_C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(128, 64, 8, 2)],
    (72, False): [_C(64, 64, 4, 2), _C(128, 64, 8, 2), _C(128, 32, 8, 2)],
    (128, True): [_C(128, 32, 8, 2), _C(64, 32, 4, 2), _C(64, 64, 4, 2)],
    (128, False): [_C(64, 32, 4, 2), _C(128, 32, 8, 2), _C(64, 64, 4, 2)],
}
# dQ by float32 atomics from the dK/dV kernel (5 matmuls instead of 7, not bit-reproducible) only
# where that kernel compiles without spills on sm_90; elsewhere a separate dQ kernel recomputes.
FUSED_DQ_HEAD_DIMS = (64,)
# head dims whose dK/dV kernel takes k already rotated (one elementwise pass) instead of rotating its
# k tile itself: at hd 128 the rotated tile held in registers as a wgmma operand, next to the two
# 128 x 128 float32 accumulators, spills on sm_90 in every configuration tried
ROTATE_K_FIRST_HEAD_DIMS = (128,)

# head dims whose TMA dK/dV kernel takes lse and delta through its tail products (stat_tails) instead of loading
# them: hd 72 (in the spare columns of its tail tile) and hd 64 (a 16-wide tail tile for them alone, feeding only
# the logits and dP^T products: one more 64 x 64 x 16 wgmma each, and the chain waits they bring)
STATS_HEAD_DIMS = (64, 72)
ELEMENTWISE_BLOCK_M = 64
# log2 units by which a row's block max must exceed its running max before the forward rescales its
# accumulator: probabilities stay <= 2**8 (exact in float32), and the rescale is skipped on almost every
# key block after the first few
RESCALE_SLACK = 8.0
# the interpreter runs one fixed configuration (it is slow; L = 200 still spans 3 full blocks + 1 partial)
INTERPRETER_CONFIG = TileConfig(64, 64, 4, 1)

_INV_FREQ: dict[tuple, torch.Tensor] = {}
TUNE_ENV = "LAVIN_FAST_ATTENTION_TUNE"
# measured first-call choice among each kernel's candidates (lavin_fast.ops.tuning): on a GPU, the first call
# of a shape bucket times the list (at most 4) and caches the fastest on disk per GPU name and versions
TUNER = FirstCallTuner("attention", TUNE_ENV)
log = logging.getLogger(__name__)


def autotune_enabled() -> bool:
    """LAVIN_FAST_ATTENTION_TUNE=1 (the default) times each kernel's candidates on the first call of a shape
    bucket on a GPU (cached on disk); 0 launches the first candidate, the static sm_90 report's pick."""
    return tuning_setting(TUNE_ENV)


def warp_specialised_forward_enabled() -> bool:
    """LAVIN_FAST_ATTENTION_WS=1 adds the warp-specialised forward to the first-call tuner's candidates.
    Off by default until a GPU run has shown it runs: it has been compiled for sm_90 and checked in the
    interpreter only, and a kernel that hung would hang the first call's timing (its register reallocation
    between warp groups fits the launch allocation: tests/test_attention_forward.py)."""
    value = os.environ.get("LAVIN_FAST_ATTENTION_WS", "0")
    if value not in ("0", "1"):
        raise ValueError(f"LAVIN_FAST_ATTENTION_WS must be 0 or 1, got {value!r}")
    return value == "1"


def forward_candidates(hd: int) -> list[TileConfig]:
    """The default forward's candidates at this head dim (the warp-specialised one only when enabled)."""
    return [c for c in FWD_CONFIGS[(hd, False)] if not c.ws or warp_specialised_forward_enabled()]


def _pow2_bucket(n):
    """n rounded up to a power of two (a tuning bucket); symbolic sizes pass through (never tuned)."""
    return n if isinstance(n, torch.SymInt) else next_power_of_2(int(n))


def _run(kernel, cfg: TileConfig, grid_of, args: tuple, consts: dict, zero: tuple = ()) -> None:
    for t in zero:  # accumulators the kernel adds into (each timed run starts from zeros too)
        t.zero_()
    if "WARP_SPECIALIZE" in kernel.arg_names:
        consts = {**consts, "WARP_SPECIALIZE": cfg.ws, "RESCALE_SLACK": RESCALE_SLACK if cfg.lazy else 0.0}
    if "CARRY_DQ" in kernel.arg_names:
        consts = {**consts, "CARRY_DQ": cfg.carry_dq and consts["FUSE_DQ"]}
    # wrap_triton: torch.compile / make_fx record the launch (a plain launch on real tensors in eager mode)
    wrap_triton(kernel)[grid_of(cfg.block_m, cfg.block_n)](
        *args, **consts, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _launch(kernel, configs: list[TileConfig], grid_of, args: tuple, consts: dict, bucket: tuple, zero: tuple = ()):
    """Launch `kernel` with the fixed interpreter configuration, or on a GPU with the configuration TUNER
    chooses for this shape bucket (the first candidate, the static pick, with LAVIN_FAST_ATTENTION_TUNE=0)."""
    if interpreter_active():  # the static pick's loop (the TMA forward's rescale), in the fixed interpreter tiles
        cfg = INTERPRETER_CONFIG
        if "WARP_SPECIALIZE" in kernel.arg_names and cfg.lazy and not configs[0].lazy and not cfg.ws:
            cfg = dataclasses.replace(cfg, lazy=False)
        _run(kernel, cfg, grid_of, args, consts, zero)
        return
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    key = (*sorted((k, v) for k, v in consts.items()), *bucket)
    cfg = TUNER.choose(
        name, key, configs, lambda c: _run(kernel, c, grid_of, args, consts, zero), device=tensors[0].device,
        tensors=tensors,
    )
    _run(kernel, cfg, grid_of, args, consts, zero)


def _inv_freq(hd: int, like: torch.Tensor) -> torch.Tensor:
    """The RoPE inverse frequencies on like's device: cached, except while tracing (where `like` is fake and
    the tensor must be made inside the trace; a fake tensor must never reach the cache)."""
    if is_fake(like):
        return rope_inv_freq(hd, like.device).contiguous()
    key = (hd, str(like.device))
    t = _INV_FREQ.get(key)
    if t is None:
        t = rope_inv_freq(hd, like.device).contiguous()
        _INV_FREQ[key] = t
    return t


def _consts(hd: int, rope: bool) -> dict:
    d0, has_tail = head_dim_tiles(hd)
    dt, dy, _ = rope_split(hd)
    return {"HD": hd, "D0": d0, "HAS_TAIL": has_tail, "ROPE": rope, "C0": dt, "C1": dt + dy}


def _strides3(x: torch.Tensor) -> tuple[int, int, int]:
    """Batch, token and head strides in units of 8 elements (see `_al` in the kernels)."""
    st = x.stride()[:3]
    assert all(v % 8 == 0 for v in st), f"strides {x.stride()} must be multiples of 8 here"
    return st[0] // 8, st[1] // 8, st[2] // 8


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim is contiguous, its other strides multiples of 8 and its data 16-byte
    aligned (what the kernels' alignment hints assume; true of views of a fused QKV projection), else a copy."""
    ok = x.stride(-1) == 1 and all(st % 8 == 0 for st in x.stride()[:-1]) and _aligned16(x)
    return x if ok else x.contiguous()


def _aligned16(x: torch.Tensor) -> bool:
    if x.storage_offset() * x.element_size() % 16:
        return False
    try:
        return x.data_ptr() % 16 == 0
    except RuntimeError:  # a fake tensor (torch.compile / make_fx trace): allocations are 16-byte aligned
        return True


def _grid_args(grid: tuple[int, int, int] | None, t_offset: int) -> tuple[int, int, int]:
    if grid is None:
        return 1, 1, 0
    return grid[1], grid[2], t_offset


def default_configs(hd: int, rope: bool, deterministic: bool) -> dict[str, TileConfig]:
    """The launch configuration of each kernel the library runs for these settings without autotuning
    (what the GPU benchmark reports next to its timings)."""
    fuse = not deterministic and (not rope or hd in FUSED_DQ_HEAD_DIMS)
    out = {"fwd": FWD_CONFIGS[(hd, rope)][0]}
    out["dkdv+dq" if fuse else "dkdv"] = DKDV_TMA_CONFIGS[(hd, fuse)][0] if not rope else DKDV_CONFIGS[(hd, rope, fuse)][0]
    if not fuse:
        out["dq"] = DQ_CONFIGS[(hd, rope)][0]
    return out


def v_tail(v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, 16]: v's columns past the main tile (64..hd-1), a column of ones, zeros: the TMA forward's
    tail tile, whose product with P then also gives the softmax's row sums (attn_fwd_tma_kernel)."""
    d0, _ = head_dim_tiles(v.shape[-1])
    t = v.new_zeros((*v.shape[:-1], TAIL))
    t[..., : v.shape[-1] - d0] = v[..., d0:]
    t[..., v.shape[-1] - d0] = 1.0
    return t


def make_v_tail(v: torch.Tensor) -> torch.Tensor:
    """The TMA forward's VT, what `v_tail(v)` specifies, in one launch (attn_v_tail_kernel; the torch function took
    3). The backward's k / v tail tiles come from its delta kernel (delta_and_tails)."""
    B, L, H, hd = v.shape
    d0, _ = head_dim_tiles(hd)
    t = torch.empty((B, L, H, TAIL), dtype=v.dtype, device=v.device)
    wrap_triton(attn_v_tail_kernel)[(triton.cdiv(L, ELEMENTWISE_BLOCK_M), B * H)](
        v, t, *_strides3(v), *_strides3(t), L, H, HD=hd, D0=d0, BLOCK_M=ELEMENTWISE_BLOCK_M, num_warps=4,
    )
    return t


def _split3(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., 3]: three values in `dtype` whose float32 sum is x (float32) to float32 precision (bf16: 3 x 8 bits)."""
    hi = x.to(dtype)
    r = x - hi.float()
    mid = r.to(dtype)
    return torch.stack((hi, mid, (r - mid.float()).to(dtype)), -1)


def stat_c(qk_scale: float) -> float:
    """The power of two nearest 1 / qk_scale, within 2^-8..2^8 (finite in float16 for any softmax scale): the value
    of k's tail tile at columns 8..10 (exact in any dtype)."""
    return 2.0 ** min(max(round(math.log2(1.0 / qk_scale)), -8), 8)


def kv_tails(k: torch.Tensor, v: torch.Tensor, qk_scale: float) -> torch.Tensor:
    """KVT [B, L, Hkv, 32] of the TMA dK/dV kernel at a head dim with a tail tile: (k[..., 64:], 0, c, c, c, 0 |
    v[..., 64:], 0, 1, 1, 1, 0), the constants at columns 8..10 of each half (c = stat_c(qk_scale))."""
    d0, _ = head_dim_tiles(k.shape[-1])
    w = k.shape[-1] - d0
    kvt = k.new_zeros((*k.shape[:-1], 2 * TAIL))
    kvt[..., :w] = k[..., d0:]
    kvt[..., TAIL : TAIL + w] = v[..., d0:]
    kvt[..., 8:11] = stat_c(qk_scale)
    kvt[..., TAIL + 8 : TAIL + 11] = 1.0
    return kvt


def stat_tails(q, k, v, do, lse, delta, qk_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The TMA dK/dV kernel's tail tiles at a head dim with a tail (attn_bwd_dkdv_tma_kernel), in torch (the
    backward writes QDT in its delta kernel; this is the specification a test holds it to): QDT
    [B, L, Hq, 32] = (q[..., 64:], 0, -lse / (c qk_scale) in three parts, 0 | dO[..., 64:], 0, -delta in three
    parts, 0) and KVT = kv_tails(k, v, qk_scale), the parts at columns 8..10 of each half; c = stat_c(qk_scale).
    lse and delta are [B, Hq, L] float32."""
    hd = q.shape[-1]
    d0, _ = head_dim_tiles(hd)
    w = hd - d0
    c = stat_c(qk_scale)
    qdt = q.new_zeros((*q.shape[:-1], 2 * TAIL))
    qdt[..., :w] = q[..., d0:]
    qdt[..., TAIL : TAIL + w] = do[..., d0:]
    qdt[..., 8:11] = _split3((lse * (-1.0 / (c * qk_scale))).transpose(1, 2), q.dtype)
    qdt[..., TAIL + 8 : TAIL + 11] = _split3(-delta.transpose(1, 2), q.dtype)
    return qdt, kv_tails(k, v, qk_scale)


def delta_and_tails(out, do, q, k, v, lse, qk_scale: float, tails: bool) -> tuple[torch.Tensor, ...]:
    """delta = rowsum(dO * O) [B, Hq, L] float32 and, with `tails` (hd 64 and 72, the TMA dK/dV kernel), QDT and KVT
    as `stat_tails` specifies them, in one kernel (attn_bwd_pre_kernel; KVT used to take 5 torch launches of its
    own); without, q and k stand in for QDT and KVT."""
    B, L, HQ, hd = q.shape
    HKV = k.shape[2]
    d0, has_tail = head_dim_tiles(hd)
    delta = torch.empty((B, HQ, L), dtype=torch.float32, device=q.device)
    qdt = torch.empty((B, L, HQ, 2 * TAIL), dtype=q.dtype, device=q.device) if tails else q
    kvt = torch.empty((B, L, HKV, 2 * TAIL), dtype=k.dtype, device=k.device) if tails else k
    c = stat_c(qk_scale)
    wrap_triton(attn_bwd_pre_kernel)[(triton.cdiv(L, ELEMENTWISE_BLOCK_M), B * HQ)](
        out, do, delta, q, lse, qdt, k, v, kvt, *_strides3(out), *_strides3(do), *_strides3(q), *_strides3(qdt),
        *_strides3(k), *_strides3(v), *_strides3(kvt), L, HQ, HQ // HKV, -1.0 / (c * qk_scale), c,
        HD=hd, D0=d0, HAS_TAIL=has_tail, BLOCK_M=ELEMENTWISE_BLOCK_M, WRITE_TAILS=tails, num_warps=4,
    )  # fmt: skip
    return delta, qdt, kvt


def forward(q, k, v, scale: float, grid, t_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: (out [B, L, Hq, hd], lse [B, Hq, L] float32, base 2)."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    B, L, HQ, hd = q.shape
    HKV = k.shape[2]
    out = torch.empty((B, L, HQ, hd), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, HQ, L), dtype=torch.float32, device=q.device)
    rope = grid is not None
    grid_of = lambda bm, bn: (triton.cdiv(L, bm), B * HQ)  # noqa: E731
    strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out))
    bucket = (str(q.dtype), _pow2_bucket(L), _pow2_bucket(B * HQ), HQ // HKV)
    if not rope:  # the default path: TMA descriptors (q/k pre-rotated by qk_norm_rope, or no RoPE)
        use_tma_scratch()
        d0, has_tail = head_dim_tiles(hd)
        consts = {"HD": hd, "D0": d0, "HAS_TAIL": has_tail, "RESCALE_SLACK": RESCALE_SLACK}
        vt = make_v_tail(v) if has_tail else v
        strides = (*_strides3(q), *_strides3(k), *_strides3(v), *_strides3(vt), *_strides3(out))
        args = (q, k, v, vt, out, lse, *strides, L, HQ, HQ // HKV, scale * LOG2E)
        _launch(attn_fwd_tma_kernel, forward_candidates(hd), grid_of, args, consts, bucket)
        return out, lse
    gh, gw, toff = _grid_args(grid, t_offset)
    args = (q, k, v, out, lse, _inv_freq(hd, q), *strides, L, HQ, HQ // HKV, gh, gw, toff, scale * LOG2E)
    _launch(attn_fwd_kernel, FWD_CONFIGS[(hd, True)], grid_of, args, _consts(hd, True), bucket)
    return out, lse


def backward(do, q, k, v, out, lse, scale: float, grid, t_offset: int, deterministic: bool):
    """Launch the backward kernels: (dq, dk, dv) in the inputs' dtype and shapes (contiguous)."""
    do, q, k, v = (_last_dim_contiguous(x) for x in (do, q, k, v))
    B, L, HQ, hd = q.shape
    HKV = k.shape[2]
    group = HQ // HKV
    rope = grid is not None
    consts = _consts(hd, rope)
    gh, gw, toff = _grid_args(grid, t_offset)
    inv_freq = _inv_freq(hd, q)
    qk_scale = scale * LOG2E
    dev = q.device
    bucket = (str(q.dtype), _pow2_bucket(L), _pow2_bucket(B * HQ), group)

    # the TMA dK/dV kernel's q / dO tail tiles with lse and delta beside them, and k's / v's with their constants,
    # written by the delta kernel
    tails = not rope and hd in STATS_HEAD_DIMS
    delta, qdt, kvt = delta_and_tails(out, do, q, k, v, lse, qk_scale, tails)

    dq = torch.empty((B, L, HQ, hd), dtype=q.dtype, device=dev)
    dk = torch.empty((B, L, HKV, hd), dtype=k.dtype, device=dev)
    dv = torch.empty((B, L, HKV, hd), dtype=v.dtype, device=dev)
    # pre-rotated q/k: dQ fused into the dK/dV kernel (TMA reductions) at every head dim unless deterministic
    fuse_dq = not deterministic and (not rope or hd in FUSED_DQ_HEAD_DIMS)
    # float32 dq: atomically accumulated (fused), or written once in the rotated frame (deterministic + RoPE)
    if fuse_dq:
        dq_acc = torch.empty((B, L, HQ, hd), dtype=torch.float32, device=dev)  # zeroed by _launch
    elif rope:
        dq_acc = torch.empty((B, L, HQ, hd), dtype=torch.float32, device=dev)
    else:
        dq_acc = dq  # not read or written
    dk_acc = torch.empty((B, L, HKV, hd), dtype=torch.float32, device=dev) if rope else dk

    def rope_pass(src, dst, heads, inverse):
        wrap_triton(rope_grad_epilogue_kernel)[(triton.cdiv(L, ELEMENTWISE_BLOCK_M), B * heads)](
            src, dst, inv_freq, *_strides3(src), *_strides3(dst), L, heads, gh, gw, toff, scale if inverse else 1.0,
            **consts, BLOCK_M=ELEMENTWISE_BLOCK_M, INVERSE=inverse, num_warps=4,
        )

    grid_n = lambda bm, bn: (triton.cdiv(L, bn), B * HKV)  # noqa: E731
    if not rope:  # the default path (q/k pre-rotated by qk_norm_rope, or no RoPE): TMA descriptors
        use_tma_scratch()
        args = (
            q, k, v, do, lse, delta, dk, dv, dq_acc, qdt, kvt,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            *_strides3(dq_acc), *_strides3(qdt), *_strides3(kvt), L, HQ, HKV, group, qk_scale, scale,
        )
        tma_consts = {"HD": hd, "D0": consts["D0"], "HAS_TAIL": consts["HAS_TAIL"], "FUSE_DQ": fuse_dq, "STATS": tails}
        _launch(attn_bwd_dkdv_tma_kernel, DKDV_TMA_CONFIGS[(hd, fuse_dq)], grid_n, args, tma_consts, bucket,
                zero=(dq_acc,) if fuse_dq else ())
    else:
        rope_k = hd not in ROTATE_K_FIRST_HEAD_DIMS
        k_in = k
        if not rope_k:
            k_in = torch.empty((B, L, HKV, hd), dtype=k.dtype, device=dev)
            rope_pass(k, k_in, HKV, False)
        args = (
            q, k_in, v, do, lse, delta, dk, dv, dk_acc, dq_acc, inv_freq,
            *_strides3(q), *_strides3(k_in), *_strides3(v), *_strides3(do),
            *_strides3(dk), *_strides3(dv), *_strides3(dq_acc), *_strides3(dk_acc),
            L, HQ, HKV, group, gh, gw, toff, qk_scale, scale,
        )
        _launch(attn_bwd_dkdv_kernel, DKDV_CONFIGS[(hd, rope, fuse_dq)], grid_n, args,
                {**consts, "FUSE_DQ": fuse_dq, "ROPE_K": rope_k}, bucket, zero=(dq_acc,) if fuse_dq else ())

    if not fuse_dq:
        args = (
            q, k, v, do, lse, delta, dq, dq_acc, inv_freq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq), *_strides3(dq_acc),
            L, HQ, group, gh, gw, toff, qk_scale, scale,
        )
        _launch(attn_bwd_dq_kernel, DQ_CONFIGS[(hd, rope)], lambda bm, bn: (triton.cdiv(L, bm), B * HQ), args, consts,
                bucket)

    if fuse_dq or rope:
        rope_pass(dq_acc, dq, HQ, True)
    if rope:
        rope_pass(dk_acc, dk, HKV, True)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# torch.library ops (one op each for torch.compile / FSDP / checkpointing) and autograd
# ---------------------------------------------------------------------------------------------


def _grid_of(rope_t: int, rope_h: int, rope_w: int) -> tuple[int, int, int] | None:
    return None if rope_t == 0 else (rope_t, rope_h, rope_w)


# Compiled for a GPU, the ops are triton_ops: torch.compile and make_fx trace into them and record each
# kernel launch (wrap_triton), so Inductor sees the kernels and can schedule and fuse around them; the
# function itself is the fake kernel. The interpreter's kernels cannot be traced (wrap_triton passes them
# through), so under TRITON_INTERPRET=1 they are opaque custom ops with shape-only fake kernels.
TRACEABLE_OPS = not interpreter_active()


def _op(name: str):
    if TRACEABLE_OPS:
        return torch.library.triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


@_op("lavin_fast::flash_attention_fwd")
def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
    rope_t: int, rope_h: int, rope_w: int, rope_t_offset: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse); rope_t == 0 means no RoPE. `deterministic` is used by the backward."""
    return forward(q, k, v, scale, _grid_of(rope_t, rope_h, rope_w), rope_t_offset)


def _fwd_fake(q, k, v, scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic):
    B, L, HQ, hd = q.shape
    return q.new_empty((B, L, HQ, hd)), q.new_empty((B, HQ, L), dtype=torch.float32)


@_op("lavin_fast::flash_attention_bwd")
def flash_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, rope_t: int, rope_h: int, rope_w: int, rope_t_offset: int, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(do, q, k, v, out, lse, scale, _grid_of(rope_t, rope_h, rope_w), rope_t_offset, deterministic)


def _bwd_fake(do, q, k, v, out, lse, scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


if not TRACEABLE_OPS:  # a triton_op is its own fake kernel
    flash_attention_fwd.register_fake(_fwd_fake)
    flash_attention_bwd.register_fake(_bwd_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.params = (scale, rope_t, rope_h, rope_w, rope_t_offset, deterministic)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(dout, q, k, v, out, lse, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None


flash_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, scale: float, grid, t_offset: int, deterministic: bool) -> torch.Tensor:
    """Validated inputs in, attention out [B, L, Hq, hd] (differentiable)."""
    rt, rh, rw = grid if grid is not None else (0, 0, 0)
    out, _ = flash_attention_fwd(q, k, v, float(scale), rt, rh, rw, int(t_offset), bool(deterministic))
    return out
