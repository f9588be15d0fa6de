"""The shared kernel-test helpers must themselves catch wrong kernels."""

import pytest
import torch

from lavin_fast.testing import assert_close_to_reference, poisoned_allocations


def test_poison_makes_unwritten_elements_fail():
    with poisoned_allocations():
        out = torch.empty(8)
        out[:7] = 1.0  # a "kernel" that forgets the last element
        also = torch.empty_like(out)
    assert torch.isnan(out[7]) and torch.isnan(also).all()
    with pytest.raises(AssertionError, match="not finite"):
        assert_close_to_reference(out, torch.ones(8, dtype=torch.float64))
    assert not torch.isnan(torch.empty(4).fill_(0)).any()  # restored afterwards


def test_tolerance_is_relative_to_reference_error_in_dtype():
    x = torch.randn(1000, dtype=torch.float64)
    ref64 = x.exp()
    ref16 = x.half().exp()
    assert_close_to_reference(x.half().float().exp().half(), ref64, ref16)  # as good as torch in fp16
    wrong = ref16.clone()
    wrong[3] += 0.1  # an error far beyond fp16 rounding
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close_to_reference(wrong, ref64, ref16)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape"):
        assert_close_to_reference(torch.zeros(3), torch.zeros(4, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# Planted bugs: the GPU bound (k x error of the same-dtype reference + a floor at the outputs' RMS)
# must catch a 1-3% systematic error. The old floor, 16 ulps of the largest output, did not.
# ------------------------------------------------------------------------------------------------

from lavin_fast.ops.attention import reference_attention  # noqa: E402
from lavin_fast.testing import max_abs_err, rms_floor, triton_test_device  # noqa: E402


def _attention_case(B, L, Hq, Hkv, hd, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, (Hq + 2 * Hkv) * hd, generator=g, dtype=torch.float64)
    q, k, v = qkv.split([Hq * hd, Hkv * hd, Hkv * hd], dim=-1)
    do = torch.randn(B, L, Hq, hd, generator=g, dtype=torch.float64)
    cast = (lambda t: t.to(device=device, dtype=dtype))  # fmt: skip
    return cast(q.unflatten(-1, (Hq, hd))), cast(k.unflatten(-1, (Hkv, hd))), cast(v.unflatten(-1, (Hkv, hd))), cast(do)


def _with_grads(fn, q, k, v, do, dtype):
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, do.to(out.dtype)))


def _scale_off(fn, factor):
    return lambda q, k, v: fn(q, k, v, softmax_scale=factor * q.shape[-1] ** -0.5)


def _wrong_gqa(fn):
    """Query head h reads kv head h % Hkv instead of h // (Hq // Hkv)."""
    return lambda q, k, v: fn(q, *(x.repeat(1, 1, q.shape[2] // k.shape[2], 1) for x in (k, v)))


def _reference_dropping(tail):
    """The keys of the last (partial) block never reach the softmax."""
    return lambda q, k, v: reference_attention(q, k[:, :-tail], v[:, :-tail])


def _judge(outs, ref64, reflo, ulps=8):
    """The attention tests' rule (tests/test_attention.py): 2 x the same-dtype reference's error + 8 ulps at the
    largest RMS of the four outputs. Returns the names of the outputs that fail it."""
    atol = rms_floor(outs[0].dtype, *ref64, ulps=ulps)
    failed = []
    for name, a, r64, rlo in zip(("out", "dq", "dk", "dv"), outs, ref64, reflo, strict=True):
        try:
            assert_close_to_reference(a, r64, rlo, factor=2.0, atol=atol, name=name)
        except AssertionError:
            failed.append(name)
    return failed


def _old_judge(outs, ref64, reflo):
    """The rule before issue 35: 2 x reference error + 16 ulps of the largest |output|."""
    atol = 16 * torch.finfo(outs[0].dtype).eps * max(r.abs().max().item() for r in ref64)
    return [
        name
        for name, a, r64, rlo in zip(("out", "dq", "dk", "dv"), outs, ref64, reflo, strict=True)
        if max_abs_err(a, r64) > 2.0 * max_abs_err(rlo, r64) + atol
    ]


@pytest.fixture(scope="module")
def bf16_gpu_shape():
    """A quarter of the 3.4B attention (hd 72, GQA 4:1, L 1000: no multiple of any block) in bfloat16 on CPU.
    A bf16 GPU kernel accumulates in float32 and rounds its outputs: the "kernel" here is the (possibly
    bugged) float32 computation rounded to bfloat16; the yardstick is the bf16 reference, as on the GPU."""
    q, k, v, do = _attention_case(1, 1000, 8, 2, 72)
    ref64 = _with_grads(reference_attention, q, k, v, do, torch.float64)
    ref16 = _with_grads(reference_attention, q, k, v, do, torch.bfloat16)

    def kernel(fn):
        return [x.to(torch.bfloat16) for x in _with_grads(fn, q, k, v, do, torch.float32)]

    return kernel, ref64, ref16


def test_bf16_bound_passes_a_correct_kernel(bf16_gpu_shape):
    kernel, ref64, ref16 = bf16_gpu_shape
    assert _judge(kernel(reference_attention), ref64, ref16) == []
    assert _judge(ref16, ref64, ref16) == []  # the bf16 reference itself passes: no tighter than PyTorch in bf16


@pytest.mark.parametrize(
    "bug,old_caught",
    [
        ("softmax scale 3% too large", False),
        ("softmax scale 2% too large", False),
        ("wrong GQA head mapping", True),
        ("tail block of 40 keys dropped", True),
        ("tail block of 8 keys dropped", True),
    ],
)
def test_bf16_bound_catches_planted_bugs_at_the_gpu_shape(bf16_gpu_shape, bug, old_caught):
    kernel, ref64, ref16 = bf16_gpu_shape
    fn = {
        "softmax scale 3% too large": _scale_off(reference_attention, 1.03),
        "softmax scale 2% too large": _scale_off(reference_attention, 1.02),
        "wrong GQA head mapping": _wrong_gqa(reference_attention),
        "tail block of 40 keys dropped": _reference_dropping(40),
        "tail block of 8 keys dropped": _reference_dropping(8),
    }[bug]
    outs = kernel(fn)
    assert _judge(outs, ref64, ref16), f"{bug}: passed the bound"
    # the record of the weakness: the old floor let the scale errors through on all four outputs
    assert bool(_old_judge(outs, ref64, ref16)) == old_caught


def _triton_dropping_tail(keep):
    """The real Triton kernel attending to the first `keep` keys only, for every query (keep >= L / 2): rows
    [0, keep) from one call and rows [keep, L) from a second call over the last `keep` queries."""
    from lavin_fast.ops import attention

    def fn(q, k, v):
        L = q.shape[1]
        head = attention(q[:, :keep], k[:, :keep], v[:, :keep], backend="triton")
        tail = attention(q[:, L - keep :], k[:, :keep], v[:, :keep], backend="triton")
        return torch.cat([head, tail[:, 2 * keep - L :]], dim=1)

    return fn


@pytest.mark.parametrize("bug", [None, "scale 3%", "GQA mapping", "tail block"])
def test_interpreter_kernel_with_planted_bugs_fails_the_bound(bug):
    """The Triton kernel itself (interpreter, float16: its bf16 tl.dot is wrong there) with each bug planted
    around it: a correct call passes, each bugged one fails."""
    from lavin_fast.ops import attention

    def triton(q, k, v, **kw):
        return attention(q, k, v, backend="triton", **kw)

    dev = triton_test_device()
    q, k, v, do = _attention_case(1, 200, 4, 2, 72, torch.float16, dev)  # GQA 2:1 (a wrong map needs Hkv > 1)
    fn = {
        None: triton,
        "scale 3%": _scale_off(triton, 1.03),
        "GQA mapping": _wrong_gqa(triton),
        "tail block": _triton_dropping_tail(192),  # 200 = 3 x 64 + 8: the 8 keys of the masked tail block
    }[bug]
    outs = _with_grads(fn, q, k, v, do, torch.float16)
    ref64 = _with_grads(reference_attention, q.cpu(), k.cpu(), v.cpu(), do.cpu(), torch.float64)
    ref16 = _with_grads(reference_attention, q, k, v, do, torch.float16)
    failed = _judge([o.cpu() for o in outs], ref64, [r.cpu() for r in ref16])
    assert failed == [] if bug is None else failed, (bug, failed)
