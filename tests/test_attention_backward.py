"""lavin_fast.ops.attention, the default (pre-rotated, TMA) backward's issue-26 structure: the dQ products
reduced one iteration late (carry_dq), lse and delta through the tail products (stat_tails, the delta
kernel's tail tiles), the deterministic and float16 cases the pairwise cover of test_attention.py does not
reach, and the full wgmma waits per iteration in the sm_90 machine code. Interpreter on CPU, against float64.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_attention import _check_against_reference, _qkv, _single_threaded_blas  # noqa: F401  (autouse fixture)

from lavin_fast.testing import triton_test_device


@pytest.mark.parametrize("L,heads,hd", [(1, (2, 2), 64), (200, (4, 1), 72), (17, (8, 2), 64), (64, (4, 2), 72)])
def test_carried_dq_backward_matches_float64_reference(monkeypatch, L, heads, hd):
    """The fused-dQ backward with each query block's dQ reduced one iteration late (carry_dq: the hd-64 static
    pick, an hd-72 candidate) in the interpreter: L = 1 (one block: zeros then the block's dQ into block 0), L
    not a multiple of the block, a block-multiple L, GQA groups 1 / 4 / 4 / 2."""
    from lavin_fast.ops import attention_kernels as K

    monkeypatch.setattr(K, "INTERPRETER_CONFIG", K.TileConfig(64, 64, 4, 1, carry_dq=True))
    q, k, v = _qkv(1, L, *heads, hd, torch.float32, triton_test_device())
    _check_against_reference(q, k, v, None, deterministic=False)


@pytest.mark.parametrize(
    "L,heads,hd,dtype,deterministic",
    [
        (200, (4, 1), 72, torch.float32, True),
        (17, (8, 2), 72, torch.float16, False),
        (64, (2, 2), 72, torch.float16, True),
        (200, (4, 1), 64, torch.float32, True),
        (17, (2, 2), 64, torch.float16, False),
    ],
)
def test_tma_backward_deterministic_and_float16_match_float64_reference(L, heads, hd, dtype, deterministic):
    """The default (pre-rotated, TMA) backward at hd 72 and 64 where the pairwise cover does not reach it: the
    deterministic dK/dV kernel (lse and delta through its tail products too) and float16 inputs (the tail tiles'
    lse / delta parts in float16)."""
    q, k, v = _qkv(1, L, *heads, hd, dtype, triton_test_device(), seed=L)
    lowp = torch.float16 if dtype == torch.float16 else torch.float32
    _check_against_reference(q, k, v, None, deterministic=deterministic, lowp=lowp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stat_tails_carry_lse_and_delta_to_float32_precision(dtype):
    """lse and delta reach the hd-72 backward's tail products as three parts in the input dtype (stat_tails): their
    float32 sums must be lse / (c qk_scale) and delta to float32 precision (one bf16 part alone is off by up to
    2^-9), with the ones (k: c, a power of two; v: 1) and the head's tail columns where the kernel reads them."""
    from lavin_fast.ops import attention_kernels as K

    g = torch.Generator().manual_seed(4)
    B, L, HQ, HKV, hd, qk_scale = 2, 5, 4, 2, 72, 72**-0.5 * 1.4426950408889634
    q, do = (torch.randn(B, L, HQ, hd, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(B, L, HKV, hd, generator=g).to(dtype) for _ in range(2))
    lse = torch.randn(B, HQ, L, generator=g, dtype=torch.float64) * 30
    delta = torch.randn(B, HQ, L, generator=g, dtype=torch.float64) * 3
    qdt, kvt = K.stat_tails(q, k, v, do, lse.float(), delta.float(), qk_scale)
    c = kvt[0, 0, 0, 8].double().item()
    assert c == 2.0 ** round(math.log2(1 / qk_scale)) and (kvt[..., 8:11] == c).all() and (kvt[..., 24:27] == 1).all()
    got_lse = (qdt[..., 8:11].double().sum(-1) * (-c * qk_scale)).transpose(1, 2)
    got_delta = -qdt[..., 24:27].double().sum(-1).transpose(1, 2)
    assert (got_lse - lse).abs().max() <= 2**-20 * lse.abs().max()
    assert (got_delta - delta).abs().max() <= 2**-20 * delta.abs().max()
    assert torch.equal(qdt[..., :8], q[..., 64:]) and torch.equal(qdt[..., 16:24], do[..., 64:])
    assert torch.equal(kvt[..., :8], k[..., 64:]) and torch.equal(kvt[..., 16:24], v[..., 64:])
    assert not qdt[..., 11:16].any() and not qdt[..., 27:].any() and not kvt[..., 11:16].any()


@pytest.mark.parametrize("hd", [64, 72])
def test_delta_kernel_writes_the_tail_tiles_stat_tails_specifies(hd):
    """The backward's delta kernel writes q's and dO's tail tiles with lse and delta beside them (hd 72): equal to
    the torch specification `stat_tails` (the head's columns past 64 exactly, none at hd 64, the lse / delta parts to rounding),
    rows past a block multiple included (L = 70), and delta itself against float64."""
    from lavin_fast.ops import attention_kernels as K

    dev = triton_test_device()
    g = torch.Generator().manual_seed(9)
    B, L, HQ, qk_scale = 2, 70, 3, hd**-0.5 * 1.4426950408889634
    q, do, out = (torch.randn(B, L, HQ, hd, generator=g).to(dev, torch.float16) for _ in range(3))
    k = v = q[:, :, :1]  # (the k / v tail tiles: test_tail_kernels_write_what_v_tail_and_kv_tails_specify)
    lse = (torch.randn(B, HQ, L, generator=g) * 20).to(dev)
    delta, qdt, _ = K.delta_and_tails(out, do, q, k, v, lse, qk_scale, True)
    ref_delta = (out.double() * do.double()).sum(-1).transpose(1, 2)
    torch.testing.assert_close(delta.double(), ref_delta, rtol=1e-5, atol=1e-5)
    ref, _ = K.stat_tails(q, q[:, :, :1], q[:, :, :1], do, lse, ref_delta.float(), qk_scale)
    assert torch.equal(qdt[..., :8], ref[..., :8]) and torch.equal(qdt[..., 16:24], ref[..., 16:24])
    assert not qdt[..., 11:16].any() and not qdt[..., 27:].any()
    for cols, stat in ((slice(8, 11), -lse / (K.stat_c(qk_scale) * qk_scale)), (slice(24, 27), -ref_delta)):
        got = qdt[..., cols].double().sum(-1).transpose(1, 2)
        assert (got - stat.double()).abs().max() <= 1e-5 * stat.abs().max(), cols


@pytest.mark.parametrize("hd,dtype,heads", [(72, torch.float16, (4, 2)), (72, torch.float32, (3, 3)),
                                           (64, torch.float16, (4, 1))])  # fmt: skip
def test_tail_kernels_write_what_v_tail_and_kv_tails_specify(hd, dtype, heads):
    """The k / v tail tiles of the TMA kernels, no longer built by torch ops on every call: the forward's VT by
    one small kernel (make_v_tail, was 3 launches of `v_tail`), the backward's KVT by the delta kernel from the
    first query head of each group (was 5 launches of `kv_tails`). Bit-equal to the torch functions, on k and v
    as strided views of a fused projection, over rows past a block multiple (L = 70), GQA groups 2 / 1 / 4, with
    the constant c of a non-default scale; k's and v's columns past the head (an Inf pad here) are never read."""
    from lavin_fast.ops import attention_kernels as K

    dev = triton_test_device()
    g = torch.Generator().manual_seed(5)
    (B, L), (HQ, HKV) = (2, 70), heads
    fused = torch.randn(B, L, HQ + 2 * HKV, hd + 8, generator=g).to(dev, dtype)
    fused[..., hd:] = float("inf")  # what a tail load past the head would pick up
    q, k, v = fused[:, :, :HQ, :hd], fused[:, :, HQ : HQ + HKV, :hd], fused[:, :, HQ + HKV :, :hd]
    qk_scale = 0.3 * 1.4426950408889634
    lse = torch.randn(B, HQ, L, generator=g).to(dev)
    _, _, kvt = K.delta_and_tails(q, q, q, k, v, lse, qk_scale, True)
    checks = [(kvt, K.kv_tails(k, v, qk_scale))]
    if hd == 72:  # (the forward has a tail tile only at hd 72)
        checks.append((K.make_v_tail(v), K.v_tail(v)))
    for got, ref in checks:
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got, ref), (got != ref).nonzero()[:5]


def test_backward_full_waits_for_sm90():
    """The fused-dQ dK/dV kernels compiled for sm_90 (no GPU needed; a subprocess, as this one runs the
    interpreter): the carried-dQ loop has 4 full wgmma waits per iteration at hd 64 and 72 (5 and 6 with the dQ
    products reduced in their own iteration), per the static report's SASS reading: the logits' and dP^T's
    main and tail products (the tails bring lse and delta) and nothing else."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WAITS_SCRIPT], capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"64 carried": 4, "64": 5, "72 carried": 4, "72": 6}, got


_WAITS_SCRIPT = """
import dataclasses, importlib, json
from lavin_fast.perf.aot import compile_spec
A = importlib.import_module("lavin_fast.ops.attention")
got = {}
for spec in A._aot_specs():
    if getattr(spec.kernel, "fn", spec.kernel).__name__ != "attn_bwd_dkdv_tma_kernel" or spec.constexprs["HD"] == 128:
        continue
    if not spec.constexprs["FUSE_DQ"]:
        continue
    specs = [spec, dataclasses.replace(spec, constexprs={**spec.constexprs, "CARRY_DQ": not spec.constexprs["CARRY_DQ"]})]
    for sp in specs:
        r = compile_spec(sp)
        assert r.error is None, r.error_detail
        key = str(sp.constexprs["HD"]) + (" carried" if sp.constexprs["CARRY_DQ"] else "")
        got[key] = r.full_waits_per_iter
print(json.dumps(got))
"""
