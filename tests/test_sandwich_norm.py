"""Sandwich norm (rms_norm_modulate, gated_rms_norm_residual): Triton kernels in the interpreter vs a
float64 reference, forward and backward for every input; validation; dispatch; bf16 on the GPU
(Triton and CUDA C++) in gpu-marked tests."""

from __future__ import annotations

import pytest
import torch

from lavin_fast.ops import sandwich_norm as sn
from lavin_fast.ops.dispatch import BackendUnavailable
from lavin_fast.testing import assert_close_to_reference, poisoned_allocations, triton_test_device

# D = 72 = 64 + 8 and 108 = 64 + 44 (of a 64 tail) are D = 2304 = 2048 + 256 and 3456 scaled down:
# a power-of-two head tile plus a tail tile; 37 an odd tail; 64 and 512 no tail (masked to nothing).
SHAPES = [(1, 1, 1), (2, 13, 37), (3, 5, 64), (2, 7, 72), (1, 6, 108), (1, 9, 512)]
REFS = {"modulate": sn.reference_rms_norm_modulate, "gated": sn.reference_gated_rms_norm_residual}
OPS = {"modulate": sn.rms_norm_modulate, "gated": sn.gated_rms_norm_residual}


def _inputs(kind: str, shape, dtype, device) -> list[torch.Tensor]:
    B, L, D = shape
    x = torch.randn(B, L, D, dtype=torch.float64) * 2 + 0.3
    vec = torch.randn(B, D, dtype=torch.float64) * (2.0 if kind == "gated" else 0.5)  # gates reach tanh saturation
    args = [x, vec] if kind == "modulate" else [torch.randn(B, L, D, dtype=torch.float64), x, vec]
    return [a.to(dtype=dtype, device=device) for a in args]


def _run(fn, args, dout, **kw):
    """Output and the gradient of every input for upstream gradient dout."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    y = fn(*leaves, **kw)
    grads = torch.autograd.grad(y, leaves, dout.to(device=y.device, dtype=y.dtype))
    return y.detach(), [g.detach() for g in grads]


def _check(kind: str, shape, dtype, backend: str, device: str) -> None:
    args = _inputs(kind, shape, dtype, device)
    dout = torch.randn(shape, dtype=torch.float64)
    ref64, g64 = _run(REFS[kind], [a.double().cpu() for a in args], dout)
    ref_lp, g_lp = _run(REFS[kind], [a.cpu() for a in args], dout)
    with poisoned_allocations():
        out, grads = _run(OPS[kind], args, dout.to(device), backend=backend)
    assert out.dtype == dtype and out.device.type == device
    assert_close_to_reference(out.cpu(), ref64, ref_lp, name=f"{kind} out")
    names = ["x", "scale"] if kind == "modulate" else ["residual", "h", "gate"]
    for name, g, r64, rlp in zip(names, grads, g64, g_lp, strict=True):
        assert g.dtype == dtype
        assert_close_to_reference(g.cpu(), r64, rlp, name=f"{kind} d{name}")


# ----------------------------------------------------------------------------------------------
# Triton kernels in the interpreter (CPU, float32 and float16).
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["modulate", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference(kind, dtype, shape):
    _check(kind, shape, dtype, "triton", triton_test_device())


@pytest.mark.parametrize("kind", ["modulate", "gated"])
def test_triton_strided_rows(kind):
    """Rows of a wider tensor (row stride != D) and an expanded (stride-0) upstream gradient."""
    dev = triton_test_device()
    B, L, D = 2, 6, 40
    wide = torch.randn(B, L, 2 * D, device=dev)
    x = wide[..., :D]
    vec = torch.randn(B, D, device=dev)
    args = [x, vec] if kind == "modulate" else [wide[..., D:], x, vec]
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out = OPS[kind](*[a for a in args], backend="triton")
    ref = REFS[kind](*[a.double() for a in args])
    assert_close_to_reference(out, ref, REFS[kind](*args), name="strided out")
    y = OPS[kind](*leaves, backend="triton")
    y.sum().backward()  # upstream gradient with all strides 0
    leaves64 = [a.detach().double().requires_grad_() for a in args]
    REFS[kind](*leaves64).sum().backward()
    for a, a64 in zip(leaves, leaves64, strict=True):
        assert_close_to_reference(a.grad, a64.grad, factor=1.0, atol=1e-5, name="strided grad")


def test_triton_backward_is_deterministic():
    dev = triton_test_device()
    args = _inputs("gated", (2, 11, 24), torch.float32, dev)
    dout = torch.randn(2, 11, 24)
    first = _run(sn.gated_rms_norm_residual, args, dout, backend="triton")[1]
    second = _run(sn.gated_rms_norm_residual, args, dout, backend="triton")[1]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_triton_op_registration():
    """Fake (meta) and autograd registrations agree with the kernels (torch.library.opcheck)."""
    dev = triton_test_device()
    x, s = _inputs("modulate", (1, 3, 16), torch.float32, dev)
    fwd_modulate, fwd_gated = sn._OPS["triton"]
    torch.library.opcheck(fwd_modulate, (x.requires_grad_(), s.requires_grad_(), 1e-6), test_utils=["test_faketensor"])
    r, h, g = _inputs("gated", (1, 3, 16), torch.float32, dev)
    torch.library.opcheck(fwd_gated, (r, h, g, 1e-6), test_utils=["test_faketensor"])


@pytest.mark.parametrize(
    "B,L,per_sm", [(1, 1, 4), (2, 5000, 16), (2, 8192, 4), (4, 8192, 8), (2, 20480, 4), (1, 10**7, 32)]
)
def test_rows_per_program(B, L, per_sm):
    rows = sn.rows_per_program(B, L, per_sm, n_sm=132)
    G = -(-L // rows)
    assert 1 <= rows <= L and (G - 1) * rows < L  # every program has at least one row
    resident = 132 * per_sm
    assert B * G <= max(resident, B)  # one wave at most: the backward's partial rows do not grow with L
    assert B * G >= min(B * L, resident) // 2  # and at least half a wave when there are enough rows


@pytest.mark.parametrize("D", [512, 1024, 2304])
def test_rows_per_program_bounds_partials_at_16k_tokens(D):
    """Triton backward at 16k tokens, bf16: programs of >= 4 warps (narrow rows several at once), ~4 per
    SM, so the float32 partial rows, written once and read back once, are < 5% of the minimum bytes."""
    B, L = 2, 8192
    _, _, warps = sn.tile_config(D, 2)
    at_once = sn.bwd_rows_at_once(warps)
    assert warps * at_once >= sn.BWD_MIN_WARPS
    G = -(-L // sn.rows_per_program(B, L, sn.default_resident(warps * at_once, backward=True), n_sm=132))
    partial_bytes = 2 * B * G * D * 4
    assert partial_bytes < 0.05 * 3 * B * L * D * 2


@pytest.mark.parametrize("D", [1, 2, 3, 37, 64, 72, 108, 512, 1000, 2304, 3456, 16384])
def test_row_tiles_cover_the_row(D):
    head, tail = sn.row_tiles(D)
    assert head & (head - 1) == 0 and tail & (tail - 1) == 0  # powers of two (Triton blocks)
    assert head <= D <= head + tail and (tail == 1 or D - head > tail // 2)  # no wasted power of two
    if D == 2304:
        assert (head, tail) == (2048, 256)  # exact: no masked column


@pytest.mark.parametrize("D,itemsize,vectors", [(2304, 2, 2), (3456, 2, 2), (2304, 4, 2), (1024, 2, 2)])
def test_tile_config_vectors_per_thread(D, itemsize, vectors):
    """Every thread holds `vectors` 16-byte vectors of the head tile (plus the tail's elements)."""
    head, _, warps = sn.tile_config(D, itemsize)
    assert head * itemsize // (32 * warps * 16) == vectors


# ----------------------------------------------------------------------------------------------
# Reference, dispatch and validation.
# ----------------------------------------------------------------------------------------------
def test_reference_values():
    x = torch.tensor([[[3.0, 4.0]]])
    s = torch.tensor([[1.0, -1.0]])
    rms = (12.5 + 1e-6) ** 0.5
    expect = torch.tensor([[[3.0 / rms * 2.0, 0.0]]])
    torch.testing.assert_close(sn.rms_norm_modulate(x, s, backend="torch"), expect)
    out = sn.gated_rms_norm_residual(torch.ones(1, 1, 2), x, torch.tensor([[0.5, 0.0]]), backend="torch")
    torch.testing.assert_close(out, torch.tensor([[[1.0 + torch.tanh(torch.tensor(0.5)).item() * 3.0 / rms, 1.0]]]))


def _cpu_or_torch() -> str:
    """auto's pick for float32 CPU tensors: the C++ CPU kernels where their library loads, else the torch forms."""
    from lavin_fast.ops import _cpu

    return "cpu" if _cpu.library() is not None else "torch"


def test_auto_on_cpu_is_the_cpu_kernels_or_torch_and_cuda_refuses():
    x, s = torch.randn(2, 3, 8), torch.randn(2, 8)
    assert sn._modulate_dispatch.select("auto", x, s, 1e-6).name == _cpu_or_torch()
    assert sn._modulate_dispatch.select("auto", x.half(), s.half(), 1e-6).name == "torch"
    with pytest.raises(BackendUnavailable, match="cuda"):
        sn.rms_norm_modulate(x, s, backend="cuda")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        sn.rms_norm_modulate(x, s, backend="nope")


def test_auto_never_picks_the_never_run_cuda_library(monkeypatch):
    """`auto` is Triton then torch; the CUDA C++ library (never run on a GPU) only by name. With every backend
    made to accept the input, auto takes triton, never cuda; cuda by name is still reachable."""
    x, s = torch.randn(2, 3, 8), torch.randn(2, 8)
    r, g = torch.randn(2, 3, 8), torch.randn(2, 8)
    for d in (sn._modulate_dispatch, sn._gated_dispatch):
        assert list(d.backends)[0] == "triton" and list(d.backends)[-1] == "torch"
    monkeypatch.setattr(sn, "triton_refusals", lambda *t: [])
    monkeypatch.setattr(sn, "_cuda_library_refusals", lambda *t: [])
    assert sn._modulate_dispatch.select("auto", x, s, 1e-6).name == "triton"
    assert sn._gated_dispatch.select("auto", r, x, g, 1e-6).name == "triton"
    assert sn._modulate_dispatch.select("cuda", x, s, 1e-6).name == "cuda"
    # with Triton refusing, auto falls to the CPU kernels or torch (not cuda), and says why cuda declined
    monkeypatch.setattr(sn, "triton_refusals", lambda *t: ["no triton here"])
    assert sn._modulate_dispatch.select("auto", x, s, 1e-6).name == _cpu_or_torch()
    assert sn._gated_dispatch.select("auto", r, x, g, 1e-6).name == _cpu_or_torch()
    assert sn._modulate_dispatch.explain(x, s, 1e-6)["cuda"] == [sn.CUDA_BY_NAME_ONLY]


def test_bf16_reference_path_autograd():
    x, s = _inputs("modulate", (2, 4, 16), torch.bfloat16, "cpu")
    out, (dx, ds) = _run(sn.rms_norm_modulate, [x, s], torch.randn(2, 4, 16))
    assert out.dtype == dx.dtype == ds.dtype == torch.bfloat16 and ds.shape == (2, 16)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 8), torch.randn(2, 8)), r"x must be \[B, L, D\]"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 7)), r"scale must be \[B, D\] = \(2, 8\)"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(1, 8)), r"scale must be \[B, D\]"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 8, dtype=torch.float16)), "scale dtype torch.float16 differs"),
        (lambda: (torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 8)), "bfloat16, float16 or float32"),
        (lambda: (torch.randn(2, 3, 8).int(), torch.randn(2, 8)), "bfloat16, float16 or float32"),
        (lambda: (torch.randn(1, 1, sn.MAX_D + 1), torch.randn(1, sn.MAX_D + 1)), f"D={sn.MAX_D + 1}"),
        (lambda: (torch.randn(2, 8, 3).transpose(1, 2), torch.randn(2, 8)), "rows must be contiguous"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(8, 2).t()), "scale must be contiguous"),
        (lambda: (torch.randn(2, 3, 8), [0.0] * 8), "scale must be a torch.Tensor"),
    ],
)
def test_modulate_bad_input(make, match):
    x, s = make()
    with pytest.raises(ValueError, match=match):
        sn.rms_norm_modulate(x, s)


@pytest.mark.parametrize("eps", [0.0, -1e-6, "1e-6", True])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive"):
        sn.rms_norm_modulate(torch.randn(1, 2, 4), torch.randn(1, 4), eps)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 8)), "residual shape"),
        (lambda: (torch.randn(2, 3, 8).half(), torch.randn(2, 3, 8), torch.randn(2, 8)), "residual dtype"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(3, 8)), r"gate must be \[B, D\]"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 8).half()), "gate dtype"),
        (lambda: (torch.randn(2, 8, 3).transpose(1, 2), torch.randn(2, 3, 8), torch.randn(2, 8)), "residual rows"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 3), torch.randn(2, 8)), r"h must be \[B, L, D\]"),
    ],
)
def test_gated_bad_input(make, match):
    r, h, g = make()
    with pytest.raises(ValueError, match=match):
        sn.gated_rms_norm_residual(r, h, g)


# ----------------------------------------------------------------------------------------------
# GPU: Triton and CUDA C++ kernels in bfloat16 (and the other dtypes) against the reference.
# ----------------------------------------------------------------------------------------------
GPU_SHAPES = [(2, 300, 512), (1, 257, 1024), (2, 129, 2304), (3, 17, 40), (1, 5, 37)]


# every shape in bf16 (the training dtype); the other dtypes once each (keeps Triton compiles few)
GPU_CASES = [(torch.bfloat16, s) for s in GPU_SHAPES] + [(torch.float16, (3, 17, 40)), (torch.float32, (1, 257, 1024))]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("kind", ["modulate", "gated"])
@pytest.mark.parametrize(
    "dtype,shape",
    GPU_CASES,
    ids=lambda c: str(c).replace("torch.", "") if not isinstance(c, tuple) else "x".join(map(str, c)),
)
def test_gpu_matches_reference(backend, kind, dtype, shape):
    if backend == "cuda":
        from lavin_fast.ops import _cuda

        usable, why = _cuda.status()
        if not usable:
            pytest.fail(f"CUDA C++ kernels unusable on a GPU machine: {why}")
    _check(kind, shape, dtype, backend, "cuda")


@pytest.mark.gpu
def test_gpu_cuda_misaligned_rows_use_scalar_path():
    """A row view starting at an odd element offset cannot use 16-byte loads: still correct."""
    wide = torch.randn(2, 9, 1 + 512, device="cuda", dtype=torch.bfloat16)
    x = wide[..., 1:]
    s = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
    out = sn.rms_norm_modulate(x, s, backend="cuda")
    ref = sn.reference_rms_norm_modulate(x.double(), s.double())
    assert_close_to_reference(out, ref, sn.reference_rms_norm_modulate(x, s), name="misaligned")
