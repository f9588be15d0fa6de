"""Calibration anchors for the static sm_90 performance model (perf/sass_model.py).

Two kernels of the most common structure, whose H100/H200 speed is published, written here so that
they are compiled in the same `lavin-fast kernels --report` run as the library's kernels:
- a plain Triton GEMM (C = A @ B, bf16 in, fp32 accumulate) at tile 128x256x64, the cuBLAS-class
  tile of Hopper;
- an FA2-style attention forward (one program per BLOCK_M query rows, a loop over key blocks with
  an online softmax in base 2), non-causal, head dims 64 and 128.
They are not used by the library; each has a plain PyTorch reference and interpreter tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lavin_fast.ops.aot import ANCHOR_OP, AotSpec, register_aot

GEMM_TILE = (128, 256, 64)  # BLOCK_M, BLOCK_N, BLOCK_K
GEMM_SHAPE = (8192, 8192, 8192)  # M, N, K the published GEMM figures stand for
ATTN_SHAPE = (4, 16, 16384)  # batch, heads, sequence (the FlashAttention-3 paper's 16k point)
# published figures the model is calibrated on: label prefix -> (GPU, TFLOP/s, where from)
PUBLISHED_TFLOPS = {
    "GEMM bf16 128x256x64": ("H200", 790.0, "this project's H200 dense bf16 GEMM measurement (H100: 600-750)"),
    "FA2-style attention fwd hd64": ("H100", 400.0, "FlashAttention-3 paper, Triton baseline, non-causal 16k"),
    "FA2-style attention fwd hd128": ("H100", 400.0, "FlashAttention-3 paper, Triton baseline, non-causal 16k"),
}
ATTN_CONFIGS = {64: (128, 64, 4, 3), 128: (128, 128, 8, 2)}  # hd -> BLOCK_M, BLOCK_N, warps, stages


@triton.jit
def anchor_gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):  # fmt: skip
    """C[M, N] = A[M, K] @ B[K, N], row-major, fp32 accumulation; programs grouped by GROUP_M rows
    of tiles so that neighbouring programs share B tiles in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def anchor_attention_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, L, qk_scale,
                                HD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """O = softmax(Q K^T * scale) V for one (batch*head, BLOCK_M query rows) per program; q, k, v, o
    contiguous [batch*heads, L, HD]; L a multiple of BLOCK_N. qk_scale = scale * log2(e)."""
    start_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64) * L * HD
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HD)
    q = tl.load(q_ptr + head + offs_m[:, None] * HD + offs_d[None, :], mask=offs_m[:, None] < L, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HD), tl.float32)
    kt_ptrs = k_ptr + head + offs_n[None, :] * HD + offs_d[:, None]
    v_ptrs = v_ptr + head + offs_n[:, None] * HD + offs_d[None, :]
    for _ in range(0, L, BLOCK_N):
        kt = tl.load(kt_ptrs)
        s = tl.dot(q, kt) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        kt_ptrs += BLOCK_N * HD
        v_ptrs += BLOCK_N * HD
    acc = acc / l_i[:, None]
    tl.store(o_ptr + head + offs_m[:, None] * HD + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=offs_m[:, None] < L)  # fmt: skip


def anchor_gemm(a: torch.Tensor, b: torch.Tensor, block=(32, 32, 16), group_m: int = 4) -> torch.Tensor:
    """a [M, K] @ b [K, N] with the anchor kernel (contiguous inputs); block (BLOCK_M, BLOCK_N, BLOCK_K)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"anchor_gemm: a [M, K] and b [K, N] expected, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    bm, bn, bk = block
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    anchor_gemm_kernel[grid](a, b, c, m, n, k, a.stride(0), b.stride(0), c.stride(0), BLOCK_M=bm, BLOCK_N=bn,
                             BLOCK_K=bk, GROUP_M=group_m)  # fmt: skip
    return c


def anchor_gemm_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() @ b.float()).to(a.dtype)


def anchor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int = 16, block_n: int = 16):
    """softmax(q k^T / sqrt(hd)) v with the anchor kernel; q, k, v [batch, heads, L, hd], L % block_n == 0."""
    if not (q.shape == k.shape == v.shape) or q.dim() != 4:
        raise ValueError(f"anchor_attention: q, k, v of one shape [B, H, L, hd] expected, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    b, h, seq, hd = q.shape
    if seq % block_n:
        raise ValueError(f"anchor_attention: L={seq} must be a multiple of block_n={block_n}")
    q, k, v = (t.contiguous() for t in (q, k, v))
    o = torch.empty_like(q)
    grid = (triton.cdiv(seq, block_m), b * h)
    anchor_attention_fwd_kernel[grid](q, k, v, o, seq, hd**-0.5 * math.log2(math.e), HD=hd, BLOCK_M=block_m,
                                      BLOCK_N=block_n)  # fmt: skip
    return o


def anchor_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (s.softmax(-1) @ v.float()).to(q.dtype)


def published(label: str) -> tuple[str, float, str] | None:
    """The published (GPU, TFLOP/s, source) of an anchor's label, None for other labels."""
    return next((v for k, v in PUBLISHED_TFLOPS.items() if label.startswith(k)), None)


@register_aot
def _aot_specs() -> list[AotSpec]:
    bm, bn, bk = GEMM_TILE
    m, n, k = GEMM_SHAPE
    specs = [
        AotSpec(
            op=ANCHOR_OP,
            kernel=anchor_gemm_kernel,
            signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                       "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32", "BLOCK_M": "constexpr",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "GROUP_M": "constexpr"},
            constexprs={"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            label=f"GEMM bf16 {bm}x{bn}x{bk} at {m}x{n}x{k}",
            num_warps=8,
            num_stages=3,
            aligned=("M", "N", "K", "stride_am", "stride_bk", "stride_cm"),
            expect_hgmma=True,
            programs=(m // bm) * (n // bn),
            iters_per_program=k // bk,
            useful_flops=2.0 * m * n * k,
        )
    ]  # fmt: skip
    batch, heads, seq = ATTN_SHAPE
    for hd, (block_m, block_n, warps, stages) in ATTN_CONFIGS.items():
        specs.append(
            AotSpec(
                op=ANCHOR_OP,
                kernel=anchor_attention_fwd_kernel,
                signature={"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "L": "i32",
                           "qk_scale": "fp32", "HD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"},
                constexprs={"HD": hd, "BLOCK_M": block_m, "BLOCK_N": block_n},
                label=f"FA2-style attention fwd hd{hd} M{block_m} N{block_n} at L{seq // 1024}k non-causal",
                num_warps=warps,
                num_stages=stages,
                aligned=("L",),
                expect_hgmma=True,
                programs=batch * heads * (seq // block_m),
                iters_per_program=seq // block_n,
                useful_flops=4.0 * batch * heads * seq * seq * hd,
            )
        )  # fmt: skip
    return specs
