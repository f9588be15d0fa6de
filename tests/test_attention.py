"""lavin_fast.ops.attention: Triton flash attention (interpreter on CPU) vs a float64 reference.

The interpreter is slow, so the forward/backward cases are a pairwise cover of the issue's grid
(L in {1, 17, 64, 200} x (Hq, Hkv) in {(2, 2), (4, 1), (8, 2)} x hd in {64, 72, 128} x RoPE on/off):
every pair of values of two axes appears in some case. Inputs are views of one fused QKV tensor
(strided, like the J-DiT's), and each case alternates the atomic and the deterministic dQ path.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from lavin_fast.ops import attention
from lavin_fast.ops.attention import TRITON_HEAD_DIMS, explain, reference_attention
from lavin_fast.ops.dispatch import BackendUnavailable
from lavin_fast.testing import assert_close_to_reference, poisoned_allocations, rms_floor, triton_test_device


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_blas():
    """The interpreter's tl.dot is numpy matmul; OpenBLAS's 2 threads spin against each other on a loaded
    2-core machine (about 1000x slower for 64x128 tiles), so run this module's BLAS on one thread."""
    import ctypes

    lib = get = None
    try:
        import numpy  # noqa: F401  (loads OpenBLAS)

        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line and ".so" in line}
        for path in paths:
            cand = ctypes.CDLL(path)
            for prefix in ("scipy_openblas_", "openblas_"):
                for suffix in ("64_", ""):
                    if hasattr(cand, f"{prefix}set_num_threads{suffix}"):
                        lib, name = cand, f"{prefix}%s_num_threads{suffix}"
                        break
                if lib:
                    break
        if lib:
            get, set_ = getattr(lib, name % "get"), getattr(lib, name % "set")
            before = get()
            set_(1)
    except OSError:  # a speed measure only: without it the tests are slower, not different
        lib = None
    yield
    if lib and get:
        set_(before)


GRIDS = {1: (1, 1, 1), 17: (1, 1, 17), 64: (2, 4, 8), 200: (2, 10, 10)}
HEADS = [(2, 2), (4, 1), (8, 2)]

# (L, (Hq, Hkv), hd, rope): each L meets every head pair and head dim; each axis meets both RoPE settings.
PAIRWISE = [
    (1, HEADS[0], 64, False), (1, HEADS[1], 72, True), (1, HEADS[2], 128, False),
    (17, HEADS[0], 72, True), (17, HEADS[1], 128, False), (17, HEADS[2], 64, True),
    (64, HEADS[0], 128, False), (64, HEADS[1], 64, True), (64, HEADS[2], 72, False),
    (200, HEADS[0], 128, True), (200, HEADS[1], 72, True), (200, HEADS[2], 64, False),
]


def _qkv(B, L, Hq, Hkv, hd, dtype, device, seed=0):
    """q, k, v as strided views of one [B, L, (Hq + 2 Hkv) * hd] tensor (a fused QKV projection)."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, (Hq + 2 * Hkv) * hd, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = qkv.split([Hq * hd, Hkv * hd, Hkv * hd], dim=-1)
    return q.unflatten(-1, (Hq, hd)), k.unflatten(-1, (Hkv, hd)), v.unflatten(-1, (Hkv, hd))


def _reference_with_grads(q, k, v, do, dtype, grid, t_offset=0):
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = reference_attention(q, k, v, rope_grid=grid, rope_t_offset=t_offset)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(dtype)))


def _check_against_reference(q, k, v, grid, *, deterministic, t_offset=0, lowp=torch.float32, factor=2.0):
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(q.device, q.dtype)
    ref64 = _reference_with_grads(q, k, v, do, torch.float64, grid, t_offset)
    reflo = _reference_with_grads(q, k, v, do, lowp, grid, t_offset)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    with poisoned_allocations():
        out = attention(q, k, v, rope_grid=grid, rope_t_offset=t_offset, backend="triton", deterministic=deterministic)
        grads = torch.autograd.grad(out, (q, k, v), do)
    # floor: 8 ulps at the largest RMS of the four outputs (dq and dk vanish when L == 1, up to rounding: 4.5 ulps
    # measured); 16 ulps of the max, as before, was 12.5% of the largest output in bfloat16 and a 3% scale error passed
    atol = rms_floor(q.dtype, *ref64, ulps=8)
    for name, a, r64, rlo in zip(("out", "dq", "dk", "dv"), (out, *grads), ref64, reflo, strict=True):
        assert_close_to_reference(a, r64, rlo, factor=factor, atol=atol, name=name)


def test_cases_cover_every_pair_of_axis_values():
    import itertools

    axes = [sorted(GRIDS), HEADS, list(TRITON_HEAD_DIMS), [False, True]]
    for i, j in itertools.combinations(range(4), 2):
        seen = {(c[i], c[j]) for c in PAIRWISE}
        missing = set(itertools.product(axes[i], axes[j])) - seen
        assert not missing, (i, j, missing)


@pytest.mark.parametrize("L,heads,hd,rope", PAIRWISE)
def test_forward_backward_match_float64_reference(L, heads, hd, rope):
    Hq, Hkv = heads
    q, k, v = _qkv(1, L, Hq, Hkv, hd, torch.float32, triton_test_device())
    deterministic = heads == (4, 1)  # the separate dQ kernel at every L, with and without RoPE; atomics elsewhere
    _check_against_reference(q, k, v, GRIDS[L] if rope else None, deterministic=deterministic)


@pytest.mark.parametrize("variant", ["ws", "eager", "lazy"])
@pytest.mark.parametrize("L,heads,hd", [(1, (2, 2), 64), (200, (4, 1), 72), (17, (4, 2), 128)])
def test_warp_specialised_eager_and_lazy_forwards_match_float64_reference(monkeypatch, L, heads, hd, variant):
    """Each loop of the TMA forward in the interpreter, whichever the static pick is: the warp-specialised
    candidate (every key block masked in one loop, FA2 update on every block), the eager-rescale one (the peeled
    last block, FA2 update on every block) and the lazy one (the running max moved only past RESCALE_SLACK): L = 1,
    L not a multiple of any block, GQA groups 1 / 4 / 2, every head dim. The pairwise cover runs the pick's loop."""
    from lavin_fast.ops import attention_kernels as K

    cfg = K.TileConfig(64, 64, 4, 1, ws=variant == "ws", lazy=variant == "lazy")
    monkeypatch.setattr(K, "INTERPRETER_CONFIG", cfg)
    if variant != "ws":  # the interpreter follows the pick's rescale
        monkeypatch.setitem(K.FWD_CONFIGS, (hd, False), [cfg])
    ran = []
    real_run = K._run
    monkeypatch.setattr(K, "_run", lambda kernel, c, *a, **kw: (ran.append(c), real_run(kernel, c, *a, **kw))[1])
    q, k, v = _qkv(1, L, *heads, hd, torch.float32, triton_test_device(), seed=L)
    _check_against_reference(q, k, v, None, deterministic=False)
    assert ran[0] == cfg  # the forward ran the loop under test


# (L, (Hq, Hkv), hd): each L meets every GQA group (1, 2, 4) and every head dim, each group every head dim
FOUR_WARP_COVER = [(1, (2, 2), 64), (1, (4, 2), 72), (1, (4, 1), 128), (17, (2, 2), 72), (17, (4, 2), 128),
                   (17, (4, 1), 64), (200, (2, 2), 128), (200, (4, 2), 64), (200, (4, 1), 72)]  # fmt: skip


@pytest.mark.parametrize("L,heads,hd", FOUR_WARP_COVER)
def test_64_row_four_warp_forward_candidate_matches_float64_reference(monkeypatch, L, heads, hd):
    """Each head dim's 64-row, 4-warp forward candidate (the static pick at hd 72 since session 5) run in the
    interpreter in exactly its configuration (tiles, rescale, warps, stages) over the pairwise cover: L = 1, L not
    a multiple of any block (17, 200), GQA groups 1 / 2 / 4, every head dim; forward and backward against float64."""
    from lavin_fast.ops import attention_kernels as K

    cfg = next(c for c in K.FWD_CONFIGS[(hd, False)] if c.block_m == 64 and c.num_warps == 4 and not c.ws)
    monkeypatch.setattr(K, "INTERPRETER_CONFIG", cfg)
    monkeypatch.setitem(K.FWD_CONFIGS, (hd, False), [cfg])
    ran = []
    real_run = K._run
    monkeypatch.setattr(K, "_run", lambda kernel, c, *a, **kw: (ran.append(c), real_run(kernel, c, *a, **kw))[1])
    q, k, v = _qkv(1, L, *heads, hd, torch.float32, triton_test_device(), seed=L + hd)
    _check_against_reference(q, k, v, None, deterministic=False)
    assert ran[0] == cfg  # the forward ran the candidate's configuration


def test_four_warp_cover_is_pairwise():
    import itertools

    axes = [[1, 17, 200], [1, 2, 4], list(TRITON_HEAD_DIMS)]
    cases = [(L, hq // hkv, hd) for L, (hq, hkv), hd in FOUR_WARP_COVER]
    for i, j in itertools.combinations(range(3), 2):
        assert {(c[i], c[j]) for c in cases} == set(itertools.product(axes[i], axes[j])), (i, j)


def test_interpreter_runs_the_static_picks_rescale(monkeypatch):
    """The pairwise cover checks the default: under the interpreter the TMA forward runs the static pick's
    rescale (eager at every head dim since the 64-row loop became hd 128's pick too) in the fixed interpreter tiles."""
    from lavin_fast.ops import attention_kernels as K

    ran = []
    monkeypatch.setattr(K, "_run", lambda kernel, c, *a, **kw: ran.append((kernel.fn.__name__, c)))
    for hd in TRITON_HEAD_DIMS:
        ran.clear()
        q, k, v = _qkv(1, 17, 2, 2, hd, torch.float32, triton_test_device())
        K.forward(q, k, v, hd**-0.5, None, 0)
        ((name, cfg),) = ran
        assert name == "attn_fwd_tma_kernel" and cfg.lazy == K.FWD_CONFIGS[(hd, False)][0].lazy
        assert (cfg.block_m, cfg.block_n) == (K.INTERPRETER_CONFIG.block_m, K.INTERPRETER_CONFIG.block_n)
    assert not any(K.FWD_CONFIGS[(hd, False)][0].lazy for hd in TRITON_HEAD_DIMS)


def test_head_dim_72_tail_never_reads_past_the_head():
    """Each head is followed by 8 Inf columns (a padded layout): the 16-wide tail tile of hd 72 must read
    columns 72..79 as zeros, not the memory after the head (Inf times a zero q column is NaN)."""
    dev = triton_test_device()
    g = torch.Generator().manual_seed(7)
    padded = [torch.randn(1, 70, h, 80, generator=g).to(dev) for h in (4, 2, 2)]
    for x in padded:
        x[..., 72:] = float("inf")
    q, k, v = (x[..., :72] for x in padded)
    _check_against_reference(q, k, v, None, deterministic=False)


def test_autotune_setting_is_checked(monkeypatch):
    from lavin_fast.ops.attention_kernels import autotune_enabled

    monkeypatch.delenv("LAVIN_FAST_ATTENTION_TUNE", raising=False)
    assert autotune_enabled()  # the default: a measured choice on a GPU's first call of each shape bucket
    monkeypatch.setenv("LAVIN_FAST_ATTENTION_TUNE", "0")
    assert not autotune_enabled()  # the static report's pick, untimed
    monkeypatch.setenv("LAVIN_FAST_ATTENTION_TUNE", "yes")
    with pytest.raises(ValueError, match="LAVIN_FAST_ATTENTION_TUNE"):
        autotune_enabled()


def test_warp_specialised_forward_is_a_candidate_only_when_enabled(monkeypatch):
    from lavin_fast.ops import attention_kernels as K

    for hd in TRITON_HEAD_DIMS:
        monkeypatch.delenv("LAVIN_FAST_ATTENTION_WS", raising=False)
        assert K.forward_candidates(hd)[0] == K.FWD_CONFIGS[(hd, False)][0]
        assert not any(c.ws for c in K.forward_candidates(hd))
        monkeypatch.setenv("LAVIN_FAST_ATTENTION_WS", "1")
        assert K.forward_candidates(hd) == K.FWD_CONFIGS[(hd, False)] and K.forward_candidates(hd)[-1].ws
    monkeypatch.setenv("LAVIN_FAST_ATTENTION_WS", "on")
    with pytest.raises(ValueError, match="LAVIN_FAST_ATTENTION_WS"):
        K.forward_candidates(72)


def test_candidate_lists_fit_the_tuners_cap():
    from lavin_fast.ops import attention_kernels as K
    from lavin_fast.ops.tuning import MAX_CANDIDATES

    for table in (K.FWD_CONFIGS, K.DKDV_CONFIGS, K.DKDV_TMA_CONFIGS, K.DQ_CONFIGS):
        for key, cfgs in table.items():
            assert 1 <= len(cfgs) <= MAX_CANDIDATES and len(set(map(str, cfgs))) == len(cfgs), key


def test_first_call_tuning_through_the_launchers_keeps_results_exact(monkeypatch, tmp_path):
    """The launchers' side of the tuner, run in the interpreter as if it were a GPU (a fake timer that prefers
    each list's last candidate): every candidate is launched on the real buffers, so the fused dQ's float32
    accumulator must start from zeros for each timed run and for the final launch (without that, dq comes
    out several times too large), and the choices land in the cache file."""
    from lavin_fast.ops import attention_kernels as K
    from lavin_fast.ops.tuning import FirstCallTuner

    launched = []
    real_run = K._run

    def recording_run(kernel, cfg, *a, **kw):
        launched.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, cfg))
        return real_run(kernel, cfg, *a, **kw)

    def timer(fn):  # the last candidate of each list is "fastest"
        fn()
        name, cfg = launched[-1]
        table = {"attn_fwd_tma_kernel": K.forward_candidates(64), "attn_bwd_dkdv_tma_kernel": K.DKDV_TMA_CONFIGS[(64, True)]}
        return 1.0 + 0.1 * (len(table[name]) - table[name].index(cfg))

    tuner = FirstCallTuner("attention", K.TUNE_ENV, timer=timer, device_name=lambda d: "fake gpu", directory=tmp_path,
                           devices=("cpu",))  # fmt: skip
    monkeypatch.setattr(K, "TUNER", tuner)
    monkeypatch.setattr(K, "_run", recording_run)
    monkeypatch.setattr(K, "interpreter_active", lambda: False)  # take the GPU branch of _launch
    monkeypatch.delenv("LAVIN_FAST_ATTENTION_TUNE", raising=False)
    monkeypatch.delenv("LAVIN_FAST_ATTENTION_WS", raising=False)
    q, k, v = _qkv(1, 17, 2, 1, 64, torch.float32, triton_test_device(), seed=11)
    _check_against_reference(q, k, v, None, deterministic=False)
    fwd, dkdv = K.forward_candidates(64), K.DKDV_TMA_CONFIGS[(64, True)]
    names = [n for n, _ in launched]
    assert names.count("attn_fwd_tma_kernel") == len(fwd) + 1 and names.count("attn_bwd_dkdv_tma_kernel") == len(dkdv) + 1
    assert [c for n, c in launched if n == "attn_fwd_tma_kernel"][-1] == fwd[-1]
    assert [c for n, c in launched if n == "attn_bwd_dkdv_tma_kernel"][-1] == dkdv[-1]
    (cache,) = tmp_path.glob("attention-fake-gpu.json")
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_ops_are_triton_ops_that_a_trace_sees_into():
    """Compiled for a GPU (no interpreter), the ops decompose under AOT autograd into the Triton kernels
    themselves (triton_kernel_wrapper_functional nodes), and torch's mutation analysis of each kernel, run
    for a fake sm_90 target, finds exactly the outputs it writes (the fused-dQ kernel's TMA reductions
    included). With opaque custom ops the graph holds no kernel. A subprocess: this one runs the interpreter."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["traceable"] is True
    # hd 72: v's tail tile (with the ones that sum P's rows) by one kernel before the forward
    assert got["fwd"] == [["attn_v_tail_kernel", ["T"]], ["attn_fwd_tma_kernel", ["LSE", "O"]]]
    assert got["bwd"] == [
        ["attn_v_tail_kernel", ["T"]],
        ["attn_fwd_tma_kernel", ["LSE", "O"]],
        # hd 72: q's and dO's tail tiles with lse and delta, k's and v's with the constants beside them
        ["attn_bwd_pre_kernel", ["DELTA", "KVT", "QDT"]],
        ["attn_bwd_dkdv_tma_kernel", ["DK", "DQACC", "DV"]],
        ["rope_grad_epilogue_kernel", ["X"]],
    ]
    assert got["deterministic"][-1] == ["attn_bwd_dq_kernel", ["DQ"]]


def test_warp_specialised_candidate_is_warp_specialised_for_sm90():
    """Each head dim's forward candidate marked ws compiles (sm_90, no GPU needed) to a kernel Triton did
    warp-specialise (a ttg.warp_specialize op in its TTGIR), unlike the 8-warp loops, which the pass leaves
    alone (bench/attention_ws_bisect.py). A subprocess: this one runs the interpreter."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _WS_SCRIPT], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # per head dim, in FWD_CONFIGS' order: three candidates without warp specialisation, then the ws candidate
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {str(hd): [False, False, False, True] for hd in TRITON_HEAD_DIMS}


_WS_SCRIPT = """
import importlib, json
from lavin_fast.perf.aot import triton_compile
A = importlib.import_module("lavin_fast.ops.attention")
got = {}
for spec in A._aot_specs():
    if getattr(spec.kernel, "fn", spec.kernel).__name__ != "attn_fwd_tma_kernel":
        continue
    c = triton_compile(spec)
    got.setdefault(str(spec.constexprs["HD"]), []).append("ttg.warp_specialize" in c.asm["ttgir"])
print(json.dumps(got))
"""


_TRACE_SCRIPT = """
import json, logging, torch, triton
logging.disable(logging.WARNING)
from triton.backends.compiler import GPUTarget

class FakeDriver:  # what torch's kernel analysis asks of the driver: the target to make TTIR for
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_active_torch_device(self): return torch.device("cpu")

triton.runtime.driver.set_active(FakeDriver())
from torch._functorch.aot_autograd import aot_function
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from lavin_fast.ops import attention_kernels as K

def kernels(fn, *args):
    graphs = []
    def grab(gm, inputs):
        graphs.append(gm)
        return gm
    with mode:
        aot_function(fn, fw_compiler=grab)(*args)
    return [[kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__, sorted(n.kwargs["tensors_to_clone"])]
            for g in graphs for n in g.graph.nodes if "triton_kernel_wrapper" in str(n.target)]

def bwd(q, k, v, det=False):
    out, lse = K.flash_attention_fwd(q, k, v, 0.1, 0, 0, 0, 0, det)
    return K.flash_attention_bwd(out, q, k, v, out, lse, 0.1, 0, 0, 0, 0, det)

mode = FakeTensorMode()
with mode:
    q = torch.empty(1, 100, 4, 72, dtype=torch.bfloat16)
    k = torch.empty(1, 100, 2, 72, dtype=torch.bfloat16)
print(json.dumps({
    "traceable": K.TRACEABLE_OPS,
    "fwd": kernels(lambda q, k, v: K.flash_attention_fwd(q, k, v, 0.1, 0, 0, 0, 0, False)[0], q, k, k),
    "bwd": kernels(bwd, q, k, k),
    "deterministic": kernels(lambda q, k, v: bwd(q, k, v, True), q, k, k),
}))
"""


def test_batch_time_offset_and_float16():
    q, k, v = _qkv(2, 24, 4, 2, 72, torch.float16, triton_test_device(), seed=3)
    _check_against_reference(q, k, v, (2, 3, 4), deterministic=False, t_offset=5, lowp=torch.float16, factor=2.0)


def test_torch_backend_matches_reference_in_float64():
    q, k, v = _qkv(2, 30, 8, 2, 72, torch.float64, "cpu")
    q, k, v = (x.requires_grad_() for x in (q.detach(), k.detach(), v.detach()))
    out = attention(q, k, v, rope_grid=(2, 3, 5), backend="torch")
    ref = reference_attention(q, k, v, rope_grid=(2, 3, 5))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_rope_makes_scores_depend_on_relative_position_only():
    """Shifting every frame index (rope_t_offset) leaves attention unchanged: RoPE is relative."""
    q, k, v = _qkv(1, 16, 2, 2, 64, torch.float64, "cpu", seed=5)
    a = reference_attention(q, k, v, rope_grid=(4, 2, 2))
    b = reference_attention(q, k, v, rope_grid=(4, 2, 2), rope_t_offset=7)
    c = reference_attention(q, k, v)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # angles are float32 (as published)
    assert (a - c).abs().max() > 1e-3  # and the RoPE does act


def test_auto_on_cpu_takes_torch_path(monkeypatch):
    from lavin_fast.ops import attention_kernels

    def boom(*a, **k):
        raise AssertionError("auto must not run the Triton interpreter")

    monkeypatch.setattr(attention_kernels, "flash_attention", boom)
    q, k, v = _qkv(1, 8, 2, 1, 64, torch.float32, "cpu")
    out = attention(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    reasons = explain(q, k, v)
    assert reasons["torch"] == [] and reasons["triton"]


def test_triton_on_cpu_without_interpreter_refuses(monkeypatch):
    import lavin_fast.ops._triton as tr

    monkeypatch.setattr(tr, "interpreter_active", lambda: False)
    q, k, v = _qkv(1, 8, 2, 1, 64, torch.float32, "cpu")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        attention(q, k, v, backend="triton")


def test_triton_refuses_other_head_dims_and_bfloat16_in_interpreter():
    q, k, v = _qkv(1, 8, 2, 1, 96, torch.float32, "cpu")
    with pytest.raises(BackendUnavailable, match="head_dim 96"):
        attention(q, k, v, backend="triton")
    out = attention(q, k, v, backend="torch")  # the torch backend takes any even head dim
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=1e-5, atol=1e-5)
    q, k, v = _qkv(1, 8, 2, 1, 64, torch.bfloat16, "cpu")
    with pytest.raises(BackendUnavailable, match="bfloat16"):
        attention(q, k, v, backend="triton")


@pytest.mark.parametrize(
    "shapes,kwargs,match",
    [
        (((1, 8, 3, 64), (1, 8, 2, 64), (1, 8, 2, 64)), {}, "multiple of k/v heads"),
        (((1, 8, 2, 63), (1, 8, 2, 63), (1, 8, 2, 63)), {}, "head_dim 63"),
        (((1, 8, 2, 512), (1, 8, 2, 512), (1, 8, 2, 512)), {}, "head_dim 512"),
        (((1, 8, 2, 64), (1, 9, 2, 64), (1, 9, 2, 64)), {}, "sequence length 9"),
        (((1, 8, 2, 64), (2, 8, 2, 64), (2, 8, 2, 64)), {}, "batch size 2"),
        (((1, 8, 2, 64), (1, 8, 2, 64), (1, 8, 1, 64)), {}, "same shape"),
        (((1, 8, 2, 64), (1, 8, 2, 32), (1, 8, 2, 32)), {}, "head_dim 32 != q head_dim 64"),
        (((8, 2, 64), (1, 8, 2, 64), (1, 8, 2, 64)), {}, "q must be 4-D"),
        (((1, 8, 2, 64),) * 3, {"rope_grid": (2, 2, 3)}, "rope_grid"),
        (((1, 8, 2, 64),) * 3, {"rope_grid": (2, 4)}, "rope_grid"),
        (((1, 8, 2, 64),) * 3, {"softmax_scale": -1.0}, "softmax_scale"),
        (((1, 8, 2, 64),) * 3, {"rope_t_offset": 1.5}, "rope_t_offset"),
    ],
)
def test_bad_input_raises_value_error(shapes, kwargs, match):
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_dtype_and_device_mismatch_raise_value_error():
    q, k, v = _qkv(1, 8, 2, 1, 64, torch.float32, "cpu")
    with pytest.raises(ValueError, match="k.dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="v is on meta"):
        attention(q, k, torch.empty(v.shape, device="meta"))
    with pytest.raises(ValueError, match="integer|floating"):
        attention(q.long(), k.long(), v.long())


def test_fake_tensor_shapes_of_the_custom_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lavin_fast.ops.attention_kernels import flash_attention_bwd, flash_attention_fwd

    with FakeTensorMode():
        q = torch.empty(2, 40, 8, 72, dtype=torch.float16)
        k = torch.empty(2, 40, 2, 72, dtype=torch.float16)
        out, lse = flash_attention_fwd(q, k, k, 0.1, 2, 4, 5, 0, False)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (2, 8, 40) and lse.dtype == torch.float32
        dq, dk, dv = flash_attention_bwd(out, q, k, k, out, lse, 0.1, 2, 4, 5, 0, True)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape


def test_custom_ops_pass_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the torch.library ops."""
    from lavin_fast.ops.attention_kernels import flash_attention_bwd, flash_attention_fwd

    q, k, v = (x.detach().requires_grad_() for x in _qkv(1, 17, 2, 1, 64, torch.float32, triton_test_device()))
    torch.library.opcheck(flash_attention_fwd, (q, k, v, 0.125, 1, 1, 17, 0, True))
    out, lse = flash_attention_fwd(q.detach(), k.detach(), v.detach(), 0.125, 1, 1, 17, 0, True)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.125, 1, 1, 17, 0, True)
    torch.library.opcheck(flash_attention_bwd, args)


def test_aot_specs_name_every_kernel_argument():
    from lavin_fast.ops.attention import _aot_specs

    specs = _aot_specs()
    kernels = {s.kernel.fn.__name__ if hasattr(s.kernel, "fn") else s.kernel.__name__ for s in specs}
    assert {"attn_fwd_kernel", "attn_fwd_tma_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"} <= kernels
    for s in specs:
        assert set(s.signature) == set(s.kernel.arg_names), s.label
        assert {n for n, t in s.signature.items() if t == "constexpr"} == set(s.constexprs), s.label
        assert s.num_warps % 4 == 0 or not s.expect_hgmma, s.label
    assert {s.constexprs["HD"] for s in specs} == set(TRITON_HEAD_DIMS)


# ------------------------------------------------------------------------------------------------
# GPU (bench/gpu_suite.sh): bfloat16 / float16 at realistic sizes
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,Hq,Hkv,hd,grid,deterministic",
    [
        # the default path (pre-rotated q/k: TMA forward, TMA dK/dV with fused dQ) at every head dim,
        # and its deterministic variant (separate dQ kernel); L = 1000 is no multiple of any block
        (torch.bfloat16, 32, 8, 72, None, False),
        (torch.bfloat16, 16, 16, 64, None, False),
        (torch.bfloat16, 16, 4, 128, None, False),
        (torch.bfloat16, 32, 8, 72, None, True),
        (torch.bfloat16, 16, 16, 64, None, True),
        (torch.bfloat16, 16, 4, 128, None, True),
        # in-kernel RoPE (opt-in: rope_grid given to the op)
        (torch.bfloat16, 32, 8, 72, (2, 16, 32), False),
        (torch.bfloat16, 16, 16, 64, (1, 29, 37), False),
        (torch.bfloat16, 8, 2, 128, (3, 16, 21), False),
        (torch.float16, 8, 2, 128, (3, 16, 21), True),
    ],
)
def test_gpu_matches_float64_reference(dtype, Hq, Hkv, hd, grid, deterministic):
    L = 1000 if grid is None else grid[0] * grid[1] * grid[2]
    q, k, v = _qkv(2, L, Hq, Hkv, hd, dtype, "cuda")
    _check_against_reference(q, k, v, grid, deterministic=deterministic, lowp=dtype, factor=2.0)


@pytest.mark.gpu
def test_gpu_tail_never_reads_past_the_head():
    """The TMA descriptors' zero fill on the GPU: 8 Inf columns after each hd-72 head must not leak in."""
    padded = [torch.randn(1, 1000, h, 80, device="cuda", dtype=torch.bfloat16) for h in (32, 8, 8)]
    for x in padded:
        x[..., 72:] = float("inf")
    q, k, v = (x[..., :72] for x in padded)
    _check_against_reference(q, k, v, None, deterministic=False, lowp=torch.bfloat16, factor=2.0)


@pytest.mark.gpu
def test_gpu_deterministic_backward_is_bitwise_reproducible():
    q, k, v = _qkv(1, 2048, 32, 8, 72, torch.bfloat16, "cuda")
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    runs = []
    for _ in range(2):
        out = attention(q, k, v, rope_grid=(2, 32, 32), deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_auto_picks_triton_and_compiles():
    from lavin_fast.ops.attention import _DISPATCH

    q, k, v = _qkv(1, 256, 8, 2, 72, torch.bfloat16, "cuda")
    assert _DISPATCH.select("auto", q, k, v, 72**-0.5, (1, 16, 16), 0, False).name == "triton"
    fn = torch.compile(lambda a, b, c: attention(a, b, c, rope_grid=(1, 16, 16)), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), attention(q, k, v, rope_grid=(1, 16, 16)), rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_first_call_tuning_times_caches_and_stays_exact(monkeypatch, tmp_path):
    """The measured first-call choice on a real GPU: every default-path kernel is timed once per bucket, the
    choices are cached on disk, and the results (timing runs included) still match the float64 reference."""
    from lavin_fast.ops import attention_kernels as K
    from lavin_fast.ops.tuning import FirstCallTuner

    monkeypatch.delenv("LAVIN_FAST_ATTENTION_TUNE", raising=False)
    monkeypatch.setattr(K, "TUNER", FirstCallTuner("attention", K.TUNE_ENV, directory=tmp_path))
    q, k, v = _qkv(2, 1000, 32, 8, 72, torch.bfloat16, "cuda")
    _check_against_reference(q, k, v, None, deterministic=False, lowp=torch.bfloat16, factor=2.0)
    (cache,) = tmp_path.glob("attention-*.json")
    entries = json.loads(cache.read_text())["entries"]
    assert {key.split("|")[0] for key in entries} == {"attn_fwd_tma_kernel", "attn_bwd_dkdv_tma_kernel"}
    for e in entries.values():
        assert e["choice"] in e["ms"] and all(0 < ms < 1e3 for ms in e["ms"].values() if ms != float("inf"))


@pytest.mark.gpu
@pytest.mark.parametrize("hd,Hq,Hkv", [(72, 32, 8), (64, 16, 16), (128, 16, 4)])
def test_gpu_warp_specialised_forward_matches_float64_reference(monkeypatch, hd, Hq, Hkv):
    """The warp-specialised forward candidate alone (the first GPU check it needs before it joins the
    tuner's default candidates: LAVIN_FAST_ATTENTION_WS)."""
    from lavin_fast.ops import attention_kernels as K

    ws = next(c for c in K.FWD_CONFIGS[(hd, False)] if c.ws)
    monkeypatch.setitem(K.FWD_CONFIGS, (hd, False), [ws])
    monkeypatch.setenv("LAVIN_FAST_ATTENTION_WS", "1")
    q, k, v = _qkv(2, 1000, Hq, Hkv, hd, torch.bfloat16, "cuda")
    _check_against_reference(q, k, v, None, deterministic=False, lowp=torch.bfloat16, factor=2.0)


@pytest.mark.gpu
def test_gpu_default_path_compiles_fullgraph_with_backward():
    """The triton_ops under torch.compile (Inductor sees the kernels): same forward and dK/dV bits as eager
    (same kernels and configurations; the bucket was tuned by the eager call first), dQ to atomics' rounding."""
    q, k, v = (x.detach().requires_grad_() for x in _qkv(1, 1000, 32, 8, 72, torch.bfloat16, "cuda"))
    do = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    eager = attention(q, k, v)
    ge = torch.autograd.grad(eager, (q, k, v), do)
    fn = torch.compile(lambda a, b, c: attention(a, b, c), fullgraph=True)
    out = fn(q, k, v)
    gc = torch.autograd.grad(out, (q, k, v), do)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(gc[1:], ge[1:], rtol=0, atol=0)
    torch.testing.assert_close(gc[0], ge[0], rtol=2e-2, atol=2e-2 * ge[0].abs().max().item())
