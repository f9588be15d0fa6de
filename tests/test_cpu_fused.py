"""The CPU C++ kernels (csrc/cpu_fused.cpp through lavin_fast/ops/cpu_fused.py) against float64 autograd of
independent forms: the sandwich norms' references, SiLU * up, and a QK norm + RoPE written out here from the
architecture's formulas. Bounds: 2e-6 of the largest reference value (float32 rounding is ~1e-7 here; a 1%
systematic error is 5,000x the bound). Then the whole J-DiT with and without the kernels, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from lavin_fast.ops import _cpu, cpu_fused
from lavin_fast.ops.dispatch import BackendUnavailable, registered_ops, use_backend
from lavin_fast.ops.rope import rope_cos_sin, rope_split
from lavin_fast.ops.sandwich_norm import (
    gated_rms_norm_residual,
    reference_gated_rms_norm_residual,
    reference_rms_norm_modulate,
    rms_norm_modulate,
)

BOUND = 2e-6


def _record() -> dict:
    for path in _cpu.library_candidates():
        try:
            return json.loads((path.parent / "cpu_build.json").read_text())
        except (OSError, ValueError):
            continue
    return {}


needs_library = pytest.mark.skipif(
    _cpu.load_library()[0] is None, reason=f"CPU kernel library not built: {_cpu.load_library()[1]}"
)


def test_the_library_loads_wherever_the_build_says_it_was_built():
    rec = _record()
    if not rec:
        pytest.skip("no cpu_build.json: the package was installed without CMake")
    if rec["status"] == "built":
        lib, where = _cpu.load_library()
        assert lib is not None, where
        assert lib.lavin_fast_cpu_isa().decode() in ("avx512f", "avx2", "default")
    else:
        assert rec["detail"], rec


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check(fn32, fn64, inputs: list[torch.Tensor]) -> None:
    """fn32 on float32 copies against fn64 on float64 copies: the value and every input's gradient."""
    a = [t.float().clone().requires_grad_(True) for t in inputs]
    b = [t.double().clone().requires_grad_(True) for t in inputs]
    y, ref = fn32(*a), fn64(*b)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert _rel(y, ref) < BOUND
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y.backward(g.float())
    ref.backward(g)
    for i, (ta, tb) in enumerate(zip(a, b, strict=True)):
        assert _rel(ta.grad, tb.grad) < BOUND, f"gradient of input {i}"


SHAPES = [(3, 37, 64), (2, 5, 72), (1, 1, 8), (4, 50, 100)]  # D not a multiple of the vector width included


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_modulate_matches_the_reference_in_float64(shape, threads):
    B, L, D = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(B, L, D, generator=g) * 3
    scale = torch.randn(B, D, generator=g) * 0.5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(
            lambda x, s: rms_norm_modulate(x, s, 1e-6, backend="cpu"),
            lambda x, s: reference_rms_norm_modulate(x, s, 1e-6),
            [x, scale],
        )
    finally:
        torch.set_num_threads(before)


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_rms_norm_residual_matches_the_reference_in_float64(shape, threads):
    B, L, D = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    r, h = torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g) * 4
    gate = torch.randn(B, D, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(
            lambda r, h, gt: gated_rms_norm_residual(r, h, gt, 1e-6, backend="cpu"),
            lambda r, h, gt: reference_gated_rms_norm_residual(r, h, gt, 1e-6),
            [r, h, gate],
        )
    finally:
        torch.set_num_threads(before)


@needs_library
@pytest.mark.parametrize("shape", [(2, 9, 48), (1, 1, 2), (3, 17, 130)])
def test_swiglu_matches_silu_times_up_in_float64(shape):
    g = torch.Generator().manual_seed(shape[-1])
    gu = torch.randn(*shape, generator=g) * 4
    F = shape[-1] // 2

    def ref(t):
        return torch.nn.functional.silu(t[..., :F]) * t[..., F:]

    _check(cpu_fused.swiglu, ref, [gu])


@needs_library
def test_swiglu_holds_at_saturated_gates():
    """The kernel's own exp: |gate| up to 100 (sigmoid 0 or 1 in float32), relative error per element."""
    gates = torch.linspace(-100, 100, 20001)
    gu = torch.stack([gates, torch.full_like(gates, 1.5)], dim=-1)
    y = cpu_fused.swiglu(gu)[:, 0].double()
    ref = torch.nn.functional.silu(gates.double()) * 1.5
    big = ref.abs() > 1e-30
    assert ((y - ref).abs()[big] / ref.abs()[big]).max() < 1e-6
    assert y[~big].abs().max() < 1e-30


# ---------------------------------------------------------------------------------------------------------------
# QK norm + RoPE + head-major layout
# ---------------------------------------------------------------------------------------------------------------
def _rotate64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hd: int) -> torch.Tensor:
    """RoPE per chunk [u | v] of the head dim: u' = u cos - v sin, v' = v cos + u sin (the architecture's form)."""
    out = torch.empty_like(x)
    start = 0
    for d in rope_split(hd):
        h = d // 2
        u, v = slice(start, start + h), slice(start + h, start + d)
        out[..., u] = x[..., u] * cos[..., u] - x[..., v] * sin[..., u]
        out[..., v] = x[..., v] * cos[..., v] + x[..., u] * sin[..., v]
        start += d
    return out


def _qkv_reference(tc, tx, weights, heads, segments, eps):
    """float64: per stream RMSNorm of q (over all q heads) and of k, times the weights; per segment the cond
    tokens then the x tokens, rotated by the segment's tables, head-major."""
    H, Hkv, hd = heads

    def normed(t, qw, kw):
        q, k, v = t.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = q * torch.rsqrt(q.square().mean(-1, keepdim=True) + eps) * qw
        k = k * torch.rsqrt(k.square().mean(-1, keepdim=True) + eps) * kw
        return torch.cat([q, k], -1).unflatten(-1, (H + Hkv, hd)), v.unflatten(-1, (Hkv, hd))

    qkc, vc = normed(tc, weights[0], weights[1])
    qkx, vx = normed(tx, weights[2], weights[3])
    outs = []
    for s in segments:
        cs, xs = slice(s["c_start"], s["c_start"] + s["c_len"]), slice(s["x_start"], s["x_start"] + s["x_len"])
        qk = torch.cat([qkc[:, cs], qkx[:, xs]], dim=1).transpose(1, 2)
        v = torch.cat([vc[:, cs], vx[:, xs]], dim=1).transpose(1, 2)
        outs.append((_rotate64(qk, s["cos"].double(), s["sin"].double(), hd), v))
    return outs


def _segments(hd, hw, parts, t_offsets):
    """parts: per segment (c_start_frame, c_frames, x_start_frame, x_frames)."""
    out = []
    for (c0, nc, x0, nx), off in zip(parts, t_offsets, strict=True):
        cos, sin = rope_cos_sin((nc + nx, 2, hw // 2), hd, off, "cpu")
        out.append({"c_start": c0 * hw, "c_len": nc * hw, "x_start": x0 * hw, "x_len": nx * hw, "cos": cos, "sin": sin})
    return out


QKV_CASES = {
    # heads (H, Hkv, hd), cond frames, x frames, segments (c0, nc, x0, nx), RoPE time offsets
    "demo-like, one segment": ((2, 1, 32), 5, 1, [(0, 5, 0, 1)], [0]),
    "GQA, equal RoPE chunks": ((4, 2, 24), 3, 2, [(0, 3, 0, 2)], [3]),
    "guided packing, two segments": ((2, 2, 16), 5, 2, [(0, 3, 0, 1), (3, 2, 1, 1)], [0, 0]),
    "tokens left out (zero gradient)": ((2, 1, 16), 4, 2, [(1, 2, 1, 1)], [0]),
}


@needs_library
@pytest.mark.parametrize("case", list(QKV_CASES))
def test_qkv_prep_matches_norm_rope_and_layout_in_float64(case):
    heads, nc, nx, parts, offs = QKV_CASES[case]
    H, Hkv, hd = heads
    hw, B, W = 6, 2, (H + 2 * Hkv) * hd
    g = torch.Generator().manual_seed(len(case))
    tc, tx = torch.randn(B, nc * hw, W, generator=g) * 2, torch.randn(B, nx * hw, W, generator=g)
    weights = [1 + 0.3 * torch.randn(n, generator=g) for n in (H * hd, Hkv * hd, H * hd, Hkv * hd)]
    segs = _segments(hd, hw, parts, offs)
    a = [t.clone().requires_grad_(True) for t in (tc, tx, *weights)]
    b = [t.double().clone().requires_grad_(True) for t in (tc, tx, *weights)]
    got = cpu_fused.qkv_prep(a[0], a[1], tuple(a[2:]), heads, segs, 1e-6)
    assert got is not None
    ref = _qkv_reference(b[0], b[1], b[2:], heads, segs, 1e-6)
    loss32 = loss64 = 0
    for i, ((qk, v), (rqk, rv)) in enumerate(zip(got, ref, strict=True)):
        assert qk.shape == rqk.shape and v.shape == rv.shape
        assert _rel(qk, rqk) < BOUND and _rel(v, rv) < BOUND, f"segment {i}"
        wq = torch.randn(rqk.shape, dtype=torch.float64, generator=g)
        wv = torch.randn(rv.shape, dtype=torch.float64, generator=g)
        loss32 = loss32 + (qk * wq.float()).sum() + (v * wv.float()).sum()
        loss64 = loss64 + (rqk * wq).sum() + (rv * wv).sum()
    loss32.backward()
    loss64.backward()
    for name, ta, tb in zip(["tc", "tx", "qw_c", "kw_c", "qw_x", "kw_x"], a, b, strict=True):
        assert _rel(ta.grad, tb.grad) < BOUND, name


@needs_library
def test_qkv_prep_declines_overlapping_segments_and_other_dtypes():
    heads = (2, 1, 16)
    W = 4 * 16
    tc, tx = torch.randn(1, 12, W), torch.randn(1, 6, W)
    weights = (torch.ones(32), torch.ones(16), torch.ones(32), torch.ones(16))
    overlapping = _segments(16, 6, [(0, 2, 0, 1), (1, 1, 0, 1)], [0, 0])
    assert cpu_fused.qkv_prep(tc, tx, weights, heads, overlapping, 1e-6) is None
    fine = _segments(16, 6, [(0, 2, 0, 1)], [0])
    assert cpu_fused.qkv_prep(tc.double(), tx.double(), weights, heads, fine, 1e-6) is None
    assert cpu_fused.qkv_prep(tc, tx, weights, heads, fine, 1e-6) is not None


# ---------------------------------------------------------------------------------------------------------------
# The model, and the switches
# ---------------------------------------------------------------------------------------------------------------
def _demo_like_model():
    from lavin_fast.models import build_dit

    torch.manual_seed(0)
    m = build_dit("tiny", hidden_size=64, depth=2, num_heads=2, patch_size=2, in_channels=4)
    with torch.no_grad():  # adaLN-zero starts every block as the identity: perturb so that every op matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@needs_library
def test_the_jdit_trains_and_guides_the_same_with_and_without_the_kernels(monkeypatch):
    calls = []
    real = cpu_fused._threads
    monkeypatch.setattr(cpu_fused, "_threads", lambda: calls.append(1) or real())
    m = _demo_like_model()
    g = torch.Generator().manual_seed(3)
    x, cond, t = torch.randn(2, 4, 1, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g), torch.rand(2)

    def step():
        m.zero_grad(set_to_none=True)
        out = m(x, t, cond)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        with torch.no_grad():
            guided = m.guided(x, t, cond, scale=2.0)
        return out.detach(), grads, guided

    out_k, grads_k, guided_k = step()
    assert len(calls) > 20  # the kernels ran: norms, SwiGLU and the QKV chain, forward and backward
    calls.clear()
    with use_backend("torch"):
        out_t, grads_t, guided_t = step()
    assert not calls
    assert _rel(out_k, out_t.double()) < BOUND and _rel(guided_k, guided_t.double()) < BOUND
    assert grads_k.keys() == grads_t.keys()
    for n in grads_t:
        assert _rel(grads_k[n], grads_t[n].double()) < 1e-5, n


def test_switched_off_or_not_float32_the_torch_forms_run(monkeypatch):
    x, s = torch.randn(2, 3, 8, dtype=torch.float16), torch.randn(2, 8, dtype=torch.float16)
    disp = registered_ops()["rms_norm_modulate"]
    assert disp.select("auto", x, s, 1e-6).name == "torch"
    if _cpu.load_library()[0] is not None:
        with pytest.raises(BackendUnavailable, match="float32"):
            rms_norm_modulate(x, s, backend="cpu")
    monkeypatch.setenv("LAVIN_FAST_CPU_KERNELS", "0")
    assert any("LAVIN_FAST_CPU_KERNELS=0" in r for r in disp.explain(x.float(), s.float(), 1e-6)["cpu"])
    assert disp.select("auto", x.float(), s.float(), 1e-6).name == "torch"
    assert cpu_fused.swiglu(torch.randn(3, 4)) is None


@needs_library
def test_the_per_op_benchmark_runs_and_reports_every_op(capsys):
    from bench import cpu_fused as bench_fused

    assert bench_fused.main(["--rounds", "1", "--inner", "1", "--shapes", "demo", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ops = {r["op"] for r in report["rows"]}
    assert len(ops) == 4 and any(op.startswith("qkv_prep") for op in ops)
    for r in report["rows"]:
        assert r["ms"]["cpu"] > 0 and r["ms"]["torch"] > 0 and r["torch_over_cpu"] > 0


@needs_library
def test_a_second_derivative_through_a_kernel_is_an_error_not_a_silent_zero():
    x = torch.randn(2, 3, 8, requires_grad=True)
    s = torch.randn(2, 8, requires_grad=True)
    y = rms_norm_modulate(x, s, backend="cpu")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice|double"):
        gx.sum().backward()


@needs_library
def test_called_directly_the_norm_bindings_refuse_what_the_kernel_cannot_take():
    """No raw pointer for a tensor of the wrong shape or dtype: a ValueError naming why, before any work."""
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"rms_norm_modulate.*scale \[B, D\]"):
        cpu_fused.rms_norm_modulate(x, torch.randn(2, 9))
    with pytest.raises(ValueError, match="float32"):
        cpu_fused.gated_rms_norm_residual(x, x.double(), torch.randn(2, 8))
    with pytest.raises(ValueError, match="residual, h"):
        cpu_fused.gated_rms_norm_residual(x[:, :2], x, torch.randn(2, 8))
