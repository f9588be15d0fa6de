"""causal_conv3d, group_norm_stats and group_norm_silu against their float64 references.

The Triton kernels run in the interpreter on CPU (float32 / float16, tiny shapes: it is slow);
bfloat16 and the exactness of chunking at real sizes are in the gpu-marked tests.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from lavin_fast.ops.causal_conv3d import (
    _Problem,
    causal_conv3d,
    choose_backend,
    reference_causal_conv3d,
    shape_key,
)
from lavin_fast.ops.dispatch import BackendUnavailable
from lavin_fast.ops.group_norm_silu import (
    GroupNormSiLU,
    GroupNormStatsState,
    SpatialNormSiLU,
    group_norm_silu,
    group_norm_stats,
    reference_group_norm_silu,
    reference_group_norm_stats,
)
from lavin_fast.testing import assert_close_to_reference, poisoned_allocations, triton_test_device

CL = torch.channels_last_3d


def make_case(B=1, C=20, T=5, H=3, W=5, Cout=12, k=(3, 3, 3), dtype=torch.float32, norm=False, cache=False,
              G=4, bias=True, device=None):  # fmt: skip
    """Inputs in `dtype` plus their float64 twins (the same values)."""
    device = device or triton_test_device()
    x = torch.randn(B, C, T, H, W, device=device).mul(1.5).add(0.3).to(dtype).contiguous(memory_format=CL)
    w = (torch.randn(Cout, C, *k, device=device) / (C * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    b = torch.randn(Cout, device=device).to(dtype) if bias else None
    nrm = nrm64 = None
    if norm:
        mean, rstd = reference_group_norm_stats(x, G)
        nrm = GroupNormSiLU(mean.float(), rstd.float(), torch.randn(C, device=device).to(dtype),
                            torch.randn(C, device=device).to(dtype), G)  # fmt: skip
        nrm64 = GroupNormSiLU(nrm.mean.double(), nrm.rstd.double(), nrm.weight.double(), nrm.bias.double(), G)
    c = c64 = None
    if cache:
        c = torch.randn(B, C, k[0] - 1, H, W, device=device).to(dtype).contiguous(memory_format=CL)
        c64 = c.double()
    return dict(x=x, w=w, b=b, norm=nrm, cache=c), dict(
        x=x.double(), w=w.double(), b=None if b is None else b.double(), norm=nrm64, cache=c64
    )


def run(args, backend, **kw):
    return causal_conv3d(args["x"], args["w"], args["b"], norm=args["norm"], cache=args["cache"], backend=backend,
                         **kw)  # fmt: skip


def ref(args, **kw):
    return reference_causal_conv3d(args["x"], args["w"], args["b"], norm=args["norm"], cache=args["cache"], **kw)


def check(args, args64, backend, factor=2.0, **kw):
    """Run `backend`, compare output (and new cache) with the float64 and in-dtype references."""
    with poisoned_allocations():
        got = run(args, backend, return_cache=True, **kw)
    want = ref(args64, return_cache=True, **kw)
    lowp = ref(args, return_cache=True, **kw)
    assert_close_to_reference(got[0], want[0], lowp[0], factor=factor, name=f"{backend} output")
    assert got[0].dtype == args["x"].dtype
    assert_close_to_reference(got[1], want[1], lowp[1], name=f"{backend} new cache")
    return got


# (dtype, norm, cache, T, kernel, B): covers with/without the fused norm, with/without a cache,
# T in {1, 2, 3, 5}, odd H and W (3 x 5), C = 20 (not a multiple of BLOCK_K = 16), 3x3x3/1x1x1/1x3x3
TRITON_CASES = [
    (torch.float32, False, False, 3, (3, 3, 3), 2),
    (torch.float16, True, False, 5, (3, 3, 3), 1),
    (torch.float32, True, True, 2, (3, 3, 3), 1),
    (torch.float16, False, True, 1, (3, 3, 3), 1),
    (torch.float32, True, False, 1, (3, 3, 3), 1),
    (torch.float16, True, True, 5, (1, 1, 1), 1),
    (torch.float32, False, False, 2, (1, 3, 3), 1),
    (torch.float16, True, False, 2, (2, 3, 1), 1),
]


@pytest.mark.parametrize("dtype,norm,cache,T,k,B", TRITON_CASES)
def test_triton_matches_float64_reference(dtype, norm, cache, T, k, B):
    args, args64 = make_case(B=B, T=T, k=k, dtype=dtype, norm=norm, cache=cache)
    check(args, args64, "triton")


def test_triton_reads_any_layout():
    # NCDHW x and cache (not channels-last) and a transposed-storage weight: correct, only slower
    args, args64 = make_case(T=2, C=12, Cout=8, dtype=torch.float16, norm=True, cache=True, G=3)
    args["x"] = args["x"].contiguous()
    args["cache"] = args["cache"].contiguous()
    args["w"] = args["w"].transpose(0, 1).contiguous().transpose(0, 1)
    check(args, args64, "triton")


def test_triton_single_frame_unfolded_matches_reference():
    args, args64 = make_case(T=1, dtype=torch.float16, norm=True, Cout=7, bias=False)
    check(args, args64, "triton", fold_single_frame=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm,cache,T", [(False, False, 5), (True, False, 1), (True, True, 2), (True, False, 5)])
def test_torch_backend_matches_float64_reference(dtype, norm, cache, T):
    args, args64 = make_case(T=T, dtype=dtype, norm=norm, cache=cache, device="cpu")
    # float32 on CPU: the backend's convs are oneDNN's direct convolution, which sums K in sequence (measured
    # 2-4x the error of the im2col GEMM that F.conv3d, and so the in-dtype reference, uses at these tiny shapes)
    check(args, args64, "torch", factor=4.0 if dtype == torch.float32 else 2.0)


@pytest.mark.parametrize("dtype,cache,T,k", [(torch.float16, True, 5, (3, 3, 3)), (torch.float32, False, 1, (3, 3, 3)),
                                             (torch.float32, False, 3, (1, 1, 1))])  # fmt: skip
def test_hybrid_matches_float64_reference(dtype, cache, T, k):
    args, args64 = make_case(T=T, k=k, dtype=dtype, norm=True, cache=cache)
    check(args, args64, "hybrid")


@pytest.mark.parametrize(
    "backend,dtype,norm",
    # the interpreter's float32 tl.dot is numpy's BLAS sgemm, whose rounding depends on a row's
    # position in the tile; its float16 matmul is exact per element, as the GPU's MMA is
    [("triton", torch.float16, True), ("triton", torch.float16, False), ("torch", torch.float32, True),
     ("torch", torch.float16, False), ("hybrid", torch.float32, True)],
)  # fmt: skip
def test_chunked_with_cache_equals_whole_clip_exactly(backend, dtype, norm):
    args, _ = make_case(T=6, C=12, H=3, W=5, Cout=8, dtype=dtype, norm=norm)
    x, w, b, nrm = args["x"], args["w"], args["b"], args["norm"]
    whole = causal_conv3d(x, w, b, norm=nrm, backend=backend)
    outs, cache = [], None
    for t0, t1 in ((0, 1), (1, 2), (2, 5), (5, 6)):  # chunks shorter and longer than kt - 1
        o, cache = causal_conv3d(x[:, :, t0:t1], w, b, norm=nrm, cache=cache, return_cache=True,
                                 fold_single_frame=False, backend=backend)  # fmt: skip
        assert cache.shape == (1, 12, 2, 3, 5)
        outs.append(o)
    chunked = torch.cat(outs, dim=2)
    assert torch.equal(chunked, whole), f"max diff {(chunked.float() - whole.float()).abs().max().item()}"


@pytest.mark.parametrize("backend,T", [("triton", 2), ("triton", 1), ("hybrid", 2), ("torch", 2)])
def test_residual_added_in_the_epilogue(backend, T):
    args, args64 = make_case(T=T, C=12, Cout=8, dtype=torch.float16, norm=True, G=3,
                             device="cpu" if backend == "torch" else None)  # fmt: skip
    res = torch.randn(1, 8, T, 3, 5, device=args["x"].device).to(torch.float16).contiguous(memory_format=CL)
    with poisoned_allocations():
        got = run(args, backend, residual=res)
    assert_close_to_reference(got, ref(args64, residual=res.double()), ref(args, residual=res), name="with residual")
    with pytest.raises(ValueError, match="residual must be"):
        run(args, backend, residual=res[:, :4])


def test_fold_equals_general_path():
    args, args64 = make_case(T=1, dtype=torch.float32, norm=True, device="cpu")
    folded = run(args, "torch")
    general = run(args, "torch", fold_single_frame=False)
    want = ref(args64)
    assert_close_to_reference(folded, want, general, factor=4.0, name="folded vs general")
    assert not torch.equal(folded, general) or folded.abs().max() == 0  # two different computations


def test_new_cache_is_the_effective_input():
    args, args64 = make_case(T=5, dtype=torch.float32, norm=True, device="cpu")
    _, new_cache = run(args, "torch", return_cache=True)
    act = reference_group_norm_silu(args64["x"], args64["norm"])
    torch.testing.assert_close(new_cache.double(), act[:, :, -2:], rtol=1e-5, atol=1e-6)
    # without a norm the cache is a copy of x's last frames, never a view of x
    args, _ = make_case(T=5, dtype=torch.float32, device="cpu")
    _, raw_cache = run(args, "torch", return_cache=True)
    assert torch.equal(raw_cache, args["x"][:, :, -2:])
    args["x"].zero_()
    assert raw_cache.abs().sum() > 0
    # a 1x1x1 conv has nothing to carry
    args, _ = make_case(T=2, k=(1, 1, 1), dtype=torch.float32, device="cpu")
    _, empty = run(args, "torch", return_cache=True)
    assert empty.shape == (1, 20, 0, 3, 5)


# ----------------------------------------------------------------------------- SpatialNorm form


def spatial_case(T=5, dtype=torch.float16, device=None, cache=False):
    """x [1, 12, T, 4, 6] with a SpatialNormSiLU on a 2 x 3 grid of 2 frames (sy = sx = 2)."""
    args, args64 = make_case(T=T, C=12, H=4, W=6, Cout=8, dtype=dtype, cache=cache, device=device)
    dev = args["x"].device
    scale = torch.rand(1, 12, 2, 2, 3, device=dev) + 0.5
    shift = torch.randn(1, 12, 2, 2, 3, device=dev)
    t_index = torch.tensor([0] + [1] * (T - 1), device=dev, dtype=torch.int32)  # frame 0 alone, as published
    args["norm"] = SpatialNormSiLU(scale, shift, t_index)
    args64["norm"] = SpatialNormSiLU(scale.double(), shift.double(), t_index)
    return args, args64


@pytest.mark.parametrize("backend,T,cache", [("triton", 5, False), ("triton", 2, True), ("triton", 1, False),
                                             ("hybrid", 3, True), ("torch", 3, False)])  # fmt: skip
def test_spatial_norm_fused_matches_float64_reference(backend, T, cache):
    args, args64 = spatial_case(T=T, cache=cache, device="cpu" if backend == "torch" else None)
    check(args, args64, backend)


def test_spatial_norm_chunked_equals_whole_clip_exactly():
    args, _ = spatial_case(T=6)
    x, w, b, nrm = args["x"], args["w"], args["b"], args["norm"]
    whole = causal_conv3d(x, w, b, norm=nrm, backend="triton")
    outs, cache = [], None
    for t0, t1 in ((0, 1), (1, 4), (4, 6)):
        o, cache = causal_conv3d(x[:, :, t0:t1], w, b, norm=nrm.frames(t0, t1), cache=cache, return_cache=True,
                                 fold_single_frame=False, backend="triton")  # fmt: skip
        outs.append(o)
    assert torch.equal(torch.cat(outs, dim=2), whole)


@pytest.mark.parametrize("spatial", [False, True])
@pytest.mark.parametrize("layout", ["channels_last_3d", "contiguous"])
def test_torch_chunked_equals_whole_clip_exactly_any_layout(layout, spatial):
    # the CPU path: B = 2 (the frame slices of the whole clip and of a chunk then have different strides),
    # float32, both layouts, both norm forms; frames are sized so that vectorised loops have a scalar tail
    args, _ = (
        spatial_case(T=6, dtype=torch.float32, device="cpu")
        if spatial
        else make_case(T=6, C=12, H=3, W=5, Cout=8, dtype=torch.float32, norm=True, device="cpu")
    )
    fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
    x = torch.cat([args["x"], args["x"].flip(2)]).contiguous(memory_format=fmt)
    w, b, nrm = args["w"], args["b"], args["norm"]
    if spatial:
        nrm = SpatialNormSiLU(nrm.scale.expand(2, -1, -1, -1, -1), nrm.shift.expand(2, -1, -1, -1, -1), nrm.t_index)
    else:
        nrm = GroupNormSiLU(nrm.mean.expand(2, -1).contiguous(), nrm.rstd.expand(2, -1).contiguous(), nrm.weight,
                            nrm.bias, nrm.num_groups)  # fmt: skip
    whole = causal_conv3d(x, w, b, norm=nrm, backend="torch")
    outs, cache = [], None
    for t0, t1 in ((0, 1), (1, 2), (2, 5), (5, 6)):
        o, cache = causal_conv3d(x[:, :, t0:t1], w, b, norm=nrm.frames(t0, t1), cache=cache, return_cache=True,
                                 fold_single_frame=False, backend="torch")  # fmt: skip
        outs.append(o)
    chunked = torch.cat(outs, dim=2)
    assert torch.equal(chunked, whole), f"max diff {(chunked - whole).abs().max().item()}"


def test_spatial_norm_bad_input():
    args, _ = spatial_case(T=3, device="cpu")
    n = args["norm"]
    for bad, match in (
        (SpatialNormSiLU(n.scale, n.shift, n.t_index + 1), r"t_index values must lie in \[0, 2\)"),
        (SpatialNormSiLU(n.scale, n.shift, n.t_index[:2]), "one entry per frame"),
        (SpatialNormSiLU(n.scale, n.shift, n.t_index.float()), "t_index must be an int32/int64"),
        (SpatialNormSiLU(torch.rand(1, 12, 2, 2, 4), torch.rand(1, 12, 2, 2, 4), n.t_index), "does not fit x"),
        (SpatialNormSiLU(n.scale, n.shift[:, :, :1], n.t_index), "shift shape"),
        (SpatialNormSiLU(n.scale.half(), n.shift, n.t_index), "float32"),
    ):
        with pytest.raises(ValueError, match=match):
            causal_conv3d(args["x"], args["w"], norm=bad)


# ----------------------------------------------------------------------------- GroupNorm pieces


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_group_norm_stats_matches_float64(dtype, backend, layout):
    dev = triton_test_device() if backend == "triton" else "cpu"
    x = (torch.randn(2, 12, 3, 5, 7, device=dev) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    with poisoned_allocations():
        mean, rstd = group_norm_stats(x, 4, backend=backend)
    m64, r64 = reference_group_norm_stats(x, 4)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (2, 4)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_group_norm_stats_no_cancellation_with_a_large_mean(backend):
    # var = E[x^2] - E[x]^2 in float32 would lose every digit here (mean 1000, std 0.01)
    dev = triton_test_device() if backend == "triton" else "cpu"
    x = (torch.randn(1, 8, 4, 5, 7, device=dev, dtype=torch.float64) * 0.01 + 1000).float()
    _, rstd = group_norm_stats(x, 2, eps=0.0, backend=backend)
    _, r64 = reference_group_norm_stats(x, 2, eps=0.0)
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_group_norm_stats_chunked_equals_whole(backend):
    dev = triton_test_device() if backend == "triton" else "cpu"
    x = (torch.randn(2, 8, 7, 3, 5, device=dev) + 5).contiguous(memory_format=CL)
    whole = group_norm_stats(x, 2, backend=backend)
    st = None
    for t0, t1 in ((0, 1), (1, 4), (4, 7)):
        st = group_norm_stats(x[:, :, t0:t1], 2, state=st, finalize=False, backend=backend)
    assert isinstance(st, GroupNormStatsState) and st.count == 4 * 7 * 3 * 5
    chunked = st.finalize()
    for a, b in zip(chunked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    m64, r64 = reference_group_norm_stats(x, 2)
    torch.testing.assert_close(chunked[1].double(), r64, rtol=1e-5, atol=1e-6)


def test_group_norm_silu_writes_strided_destination():
    dev = triton_test_device()
    x = torch.randn(1, 12, 3, 3, 5, device=dev, dtype=torch.float16).contiguous(memory_format=CL)
    mean, rstd = group_norm_stats(x, 3, backend="triton")
    norm = GroupNormSiLU(mean, rstd, torch.randn(12, device=dev), torch.randn(12, device=dev), 3)
    with poisoned_allocations():
        padded = torch.empty(1, 12, 5, 3, 5, device=dev, dtype=torch.float16, memory_format=CL)
    group_norm_silu(x, norm, out=padded[:, :, 2:], backend="triton")
    want = reference_group_norm_silu(x.double(), GroupNormSiLU(mean.double(), rstd.double(), norm.weight.double(),
                                                               norm.bias.double(), 3))  # fmt: skip
    lowp = reference_group_norm_silu(x, norm)
    assert_close_to_reference(padded[:, :, 2:], want, lowp)
    assert torch.isnan(padded[:, :, :2]).all()  # nothing written outside the destination view


def test_norm_record_from_input_matches_nn_group_norm():
    x = torch.randn(2, 8, 3, 4, 4)
    gn = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    norm = GroupNormSiLU.from_input(x, gn.weight.detach(), gn.bias.detach(), 4)
    want = torch.nn.functional.silu(gn(x)).detach()
    torch.testing.assert_close(group_norm_silu(x, norm, backend="torch"), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dispatch and bad input


def test_auto_choice_goes_through_the_shared_dispatcher(monkeypatch):
    cc = importlib.import_module("lavin_fast.ops.causal_conv3d")  # the module (the package exports the function)
    args, _ = make_case(T=2, norm=True, dtype=torch.float16, device="cpu")
    p = _Problem(args["x"], args["w"], args["b"], args["norm"], None, False, False)
    # the per-shape table's choice is an `auto` refusal of the others, in the dispatcher's own report
    monkeypatch.setattr(cc, "_table_choice", lambda p: "torch")
    assert any("MEASURED_CHOICES" in r for r in cc._dispatch.explain(p)["triton"])
    assert any("MEASURED_CHOICES" in r for r in cc._dispatch.explain(p)["hybrid"])
    assert cc._dispatch.explain(p)["torch"] == []
    # a table naming a backend that refuses (here: hybrid without a norm) does not stop the fallback order
    monkeypatch.setattr(cc, "_table_choice", lambda p: "hybrid")
    plain = _Problem(args["x"], args["w"], args["b"], None, None, False, False)
    assert not any("MEASURED_CHOICES" in r for r in cc._dispatch.explain(plain)["triton"])
    # float32 under auto passes over the kernel's FMA path
    monkeypatch.setattr(cc, "_table_choice", lambda p: None)
    args32, _ = make_case(T=2, norm=True, dtype=torch.float32, device="cpu")
    p32 = _Problem(args32["x"], args32["w"], args32["b"], args32["norm"], None, False, False)
    assert any("float32" in r for r in cc._dispatch.explain(p32)["triton"])
    assert choose_backend(p32) == "torch"


def test_choice_table_names_backends_and_shapes():
    cc = importlib.import_module("lavin_fast.ops.causal_conv3d")
    assert cc.MEASURED_CHOICES_SOURCE in ("estimated", "measured")
    assert cc.MEASURED_CHOICES, "the table is filled (estimated until the GPU suite measures it)"
    x = torch.empty(1, 128, 17, 256, 256, device="meta", dtype=torch.bfloat16)
    w = torch.empty(128, 128, 3, 3, 3, device="meta", dtype=torch.bfloat16)
    assert shape_key(x, w, True, False) in cc.MEASURED_CHOICES  # the ST-VAE's first encoder level, a clip
    for key, name in cc.MEASURED_CHOICES.items():
        assert name in cc._dispatch.backends, (key, name)
        assert len(key.split("/")) == 6 and key.split("/")[3] in ("norm", "spatial", "plain"), key


def test_auto_uses_torch_on_cpu_and_triton_refuses_autograd():
    args, _ = make_case(T=2, norm=True, device="cpu")
    p = _Problem(args["x"], args["w"], args["b"], args["norm"], None, False, False)
    assert choose_backend(p) == "torch"
    w = args["w"].clone().requires_grad_()
    out = causal_conv3d(args["x"], w, args["b"], norm=args["norm"])  # auto: torch, differentiable
    out.float().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    with pytest.raises(BackendUnavailable, match="forward-only"):
        causal_conv3d(args["x"], w, args["b"], backend="triton")
    with pytest.raises(BackendUnavailable, match="no norm"):
        causal_conv3d(args["x"], args["w"], backend="hybrid")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        causal_conv3d(args["x"], args["w"], backend="cudnn9")


def test_norm_kernels_refuse_autograd():
    x = torch.randn(1, 8, 2, 3, 3, requires_grad=True)
    with pytest.raises(BackendUnavailable, match="no backward"):
        group_norm_stats(x, 2, backend="triton")
    mean, rstd = group_norm_stats(x, 2)  # auto: the differentiable torch path
    mean.sum().backward()
    assert x.grad is not None
    norm = GroupNormSiLU(mean.detach(), rstd.detach(), torch.ones(8), torch.zeros(8), 2)
    with pytest.raises(BackendUnavailable, match="no backward"):
        group_norm_silu(x, norm, backend="triton")


def test_shape_key_names_the_shape():
    args, _ = make_case(B=2, T=5, C=20, Cout=12, dtype=torch.float16, device="cpu")
    assert shape_key(args["x"], args["w"], True, False) == "float16/20x12/k333/norm/conv/M256"
    assert shape_key(args["x"][:, :, :1], args["w"], "spatial", True) == "float16/20x12/k333/spatial/fold/M32"


def _bad(**over):
    args, _ = make_case(T=2, norm=True, device="cpu")
    args.update(over)
    kw = {k: args.pop(k) for k in list(args) if k not in ("x", "w", "b", "norm", "cache")}
    return lambda: run(args, "torch", **kw)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(w=torch.randn(12, 20, 4, 3, 3)), "kernel size"),
        (dict(w=torch.randn(12, 20, 3, 3, 5)), "kernel size"),
        (dict(w=torch.randn(12, 20, 3, 2, 3)), "must be odd"),
        (dict(w=torch.randn(12, 19, 3, 3, 3)), "Cin=19"),
        (dict(w=torch.randn(12, 20, 3, 3, 3).double()), "weight dtype"),
        (dict(x=torch.randn(1, 20, 2, 3, 5).double(), w=torch.randn(12, 20, 3, 3, 3).double()), "not supported"),
        (dict(x=torch.randint(0, 3, (1, 20, 2, 3, 5))), "not supported"),
        (dict(x=torch.randn(1, 20, 3, 5)), "5 dims"),
        (dict(b=torch.randn(13)), "bias"),
        (dict(cache=torch.randn(1, 20, 1, 3, 5)), r"cache must be \[B, Cin, kt-1, H, W\]"),
        (dict(cache=torch.randn(1, 20, 2, 3, 4)), "cache must be"),
        (dict(cache=torch.randn(1, 20, 2, 3, 5).half()), "cache must have"),
        (dict(return_cache=1), "return_cache"),
        (dict(fold_single_frame=None), "fold_single_frame"),
    ],
)
def test_bad_input_raises_clear_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)()


def test_bad_norm_raises():
    args, _ = make_case(T=2, C=20, norm=True, device="cpu")
    n = args["norm"]
    for bad, match in (
        (GroupNormSiLU(n.mean, n.rstd, n.weight, n.bias, 3), "not divisible by norm.num_groups=3"),
        (GroupNormSiLU(n.mean[:, :2], n.rstd, n.weight, n.bias, 4), r"norm.mean must be a float32 tensor of shape"),
        (GroupNormSiLU(n.mean, n.rstd.double(), n.weight, n.bias, 4), "norm.rstd"),
        (GroupNormSiLU(n.mean, n.rstd, n.weight[:5], n.bias, 4), "norm.weight"),
        ("groupnorm", "GroupNormSiLU"),
    ):
        with pytest.raises(ValueError, match=match):
            causal_conv3d(args["x"], args["w"], norm=bad)
    with pytest.raises(ValueError, match="not divisible by num_groups=3"):
        group_norm_stats(args["x"], 3)
    with pytest.raises(ValueError, match="num_groups"):
        group_norm_stats(args["x"], 0)
    st = group_norm_stats(args["x"], 4, finalize=False)
    with pytest.raises(ValueError, match="same batch and num_groups"):
        group_norm_stats(args["x"], 2, state=st)
    with pytest.raises(ValueError, match="count 0"):
        GroupNormStatsState(0, None, None).finalize()


# ----------------------------------------------------------------------------- GPU (bf16, real sizes)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "hybrid"])
@pytest.mark.parametrize("T,cache", [(5, False), (1, False), (3, True)])
def test_gpu_bf16_matches_reference(backend, T, cache):
    args, args64 = make_case(B=2, C=128, Cout=256, T=T, H=17, W=23, dtype=torch.bfloat16, norm=True, cache=cache,
                             G=32, device="cuda")  # fmt: skip
    check(args, args64, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "hybrid", "torch"])
def test_gpu_bf16_residual_and_auto(backend):
    args, args64 = make_case(C=256, Cout=256, T=3, H=16, W=24, dtype=torch.bfloat16, norm=True, G=32, device="cuda")
    res = torch.randn(1, 256, 3, 16, 24, device="cuda").to(torch.bfloat16).contiguous(memory_format=CL)
    got = run(args, backend, residual=res)
    assert_close_to_reference(got, ref(args64, residual=res.double()), ref(args, residual=res), name="residual")
    p = _Problem(args["x"], args["w"], args["b"], args["norm"], None, False, False)
    from lavin_fast.ops.causal_conv3d import MEASURED_CHOICES

    # the measured table if it knows the shape, else the rule: triton for 16-bit inputs
    assert choose_backend(p) == MEASURED_CHOICES.get(shape_key(args["x"], args["w"], True, False), "triton")


@pytest.mark.gpu
def test_gpu_group_norm_stats_bf16_large():
    x = (torch.randn(2, 128, 17, 64, 64, device="cuda") * 3 + 1).to(torch.bfloat16).contiguous(memory_format=CL)
    mean, rstd = group_norm_stats(x, 32)
    m64, r64 = reference_group_norm_stats(x, 32)
    torch.testing.assert_close(mean.double(), m64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), r64, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton"])  # cuDNN may pick another algorithm for another T
def test_gpu_chunked_equals_whole_clip(backend):
    args, _ = make_case(C=128, Cout=128, T=9, H=32, W=32, dtype=torch.bfloat16, norm=True, G=32, device="cuda")
    x, w, b, nrm = args["x"], args["w"], args["b"], args["norm"]
    whole = causal_conv3d(x, w, b, norm=nrm, backend=backend)
    outs, cache = [], None
    for t0, t1 in ((0, 1), (1, 5), (5, 9)):
        o, cache = causal_conv3d(x[:, :, t0:t1], w, b, norm=nrm, cache=cache, return_cache=True,
                                 fold_single_frame=False, backend=backend)  # fmt: skip
        outs.append(o)
    assert torch.equal(torch.cat(outs, dim=2), whole)


def test_triton_op_schema_fake_tensor_and_weight_cache():
    import sys

    backends = sys.modules["lavin_fast.ops.causal_conv3d_backends"]
    dev = triton_test_device()
    x = torch.randn(1, 16, 2, 2, 3, device=dev)
    w = torch.randn(8, 16, 1, 1, 1, device=dev)
    args = (x, w, None, None, False, 0)  # bias, residual, fold, front frames
    res = torch.library.opcheck(backends._triton_op, args, test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}, res
    first = causal_conv3d(x, w, backend="triton")
    w.mul_(2)  # an in-place update must invalidate the packed-weight cache
    second = causal_conv3d(x, w, backend="triton")
    torch.testing.assert_close(second, 2 * first, rtol=1e-5, atol=1e-5)
    # the folded weights of the torch backend likewise
    x1, w3 = torch.randn(1, 4, 1, 3, 3), torch.randn(2, 4, 3, 3, 3)
    first = causal_conv3d(x1, w3, backend="torch")
    w3.mul_(-1)
    torch.testing.assert_close(causal_conv3d(x1, w3, backend="torch"), -first)
