"""Property-based tests (hypothesis) of the public ops: their validation names the bad argument, and their torch
backend agrees with the float64 reference on random small shapes. Derandomized and bounded, so CI is stable."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lavin_fast.ops import (  # noqa: E402
    attention,
    gated_rms_norm_residual,
    qk_norm_rope,
    rms_norm_modulate,
    use_backend,
)
from lavin_fast.ops.attention import reference_attention  # noqa: E402
from lavin_fast.ops.qk_norm_rope import reference_rms_norm_rope  # noqa: E402
from lavin_fast.ops.sandwich_norm import (  # noqa: E402
    reference_gated_rms_norm_residual,
    reference_rms_norm_modulate,
)
from lavin_fast.testing import assert_close_to_reference  # noqa: E402

FUZZ = settings(
    derandomize=True, max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# values that are not a positive finite number, including the ones Python would happily coerce
not_positive = st.one_of(
    st.floats(max_value=0.0, allow_nan=False),
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(True),
    st.text(max_size=4),
    st.none(),
)
not_int = st.one_of(
    st.floats(allow_nan=True).filter(lambda f: not (math.isfinite(f) and f.is_integer())),
    st.just(True),
    st.text(max_size=3),
)


def _grid_shape(draw, max_l: int = 24) -> tuple[tuple[int, int, int], int]:
    t = draw(st.integers(1, 3))
    h = draw(st.integers(1, 3))
    w = draw(st.integers(1, max_l // (t * h)))
    return (t, h, w), t * h * w


@st.composite
def attention_case(draw):
    grid, L = _grid_shape(draw)
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    hd = draw(st.sampled_from([8, 12, 16, 24]))
    b = draw(st.integers(1, 2))
    use_rope = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return b, L, hkv * group, hkv, hd, (grid if use_rope else None), seed


@FUZZ
@given(attention_case())
def test_attention_torch_backend_matches_float64(case):
    b, L, hq, hkv, hd, grid, seed = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, L, h, hd, generator=g) for h in (hq, hkv, hkv))
    out = attention(q, k, v, rope_grid=grid, backend="torch")
    ref64 = reference_attention(q.double(), k.double(), v.double(), rope_grid=grid)
    ref32 = reference_attention(q, k, v, rope_grid=grid)
    assert_close_to_reference(out, ref64, ref32, factor=4.0, name=f"attention {case}")


@FUZZ
@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 3), st.sampled_from([8, 12, 16]), st.integers(0, 99))
def test_qk_norm_rope_torch_backend_matches_float64(b, L, hkv, hd, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, L, 2 * hkv, hd, generator=g), torch.randn(b, L, hkv, hd, generator=g)
    wq, wk = torch.rand(2 * hkv * hd, generator=g) + 0.5, torch.rand(hkv * hd, generator=g) + 0.5
    grid = (1, 1, L)
    qo, ko = qk_norm_rope(q, k, wq, wk, grid, backend="torch")
    for out, x, w in ((qo, q, wq), (ko, k, wk)):
        ref64 = reference_rms_norm_rope(x.double(), w.double(), grid)
        assert_close_to_reference(out, ref64, reference_rms_norm_rope(x, w, grid), name="qk_norm_rope")


@FUZZ
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 70), st.integers(0, 99))
def test_sandwich_norm_torch_backend_matches_float64(b, L, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, h = torch.randn(b, L, d, generator=g), torch.randn(b, L, d, generator=g)
    scale, gate = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    out = rms_norm_modulate(x, scale, backend="torch")
    assert_close_to_reference(
        out, reference_rms_norm_modulate(x.double(), scale.double()), reference_rms_norm_modulate(x, scale)
    )
    out = gated_rms_norm_residual(x, h, gate, backend="torch")
    assert_close_to_reference(
        out,
        reference_gated_rms_norm_residual(x.double(), h.double(), gate.double()),
        reference_gated_rms_norm_residual(x, h, gate),
    )


# ------------------------------------------------------------------ validation names the argument
_Q, _K = torch.randn(1, 8, 4, 8), torch.randn(1, 8, 2, 8)
_WQ, _WK = torch.ones(32), torch.ones(16)


@FUZZ
@given(not_positive)
def test_qk_norm_rope_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        qk_norm_rope(_Q, _K, _WQ, _WK, eps=eps)


@FUZZ
@given(not_int, st.integers(0, 2))
def test_rope_grid_entries_must_be_ints(bad, where):
    grid = [2, 2, 2]
    grid[where] = bad
    with pytest.raises(ValueError, match=rf"rope_grid\[{where}\]"):
        qk_norm_rope(_Q, _K, _WQ, _WK, tuple(grid))
    with pytest.raises(ValueError, match="rope_grid"):
        attention(_Q, _K, _K, rope_grid=tuple(grid), backend="torch")


@FUZZ
@given(not_int)
def test_rope_t_offset_must_be_an_int(bad):
    with pytest.raises(ValueError, match="rope_t_offset"):
        qk_norm_rope(_Q, _K, _WQ, _WK, (2, 2, 2), rope_t_offset=bad)
    with pytest.raises(ValueError, match="rope_t_offset"):
        attention(_Q, _K, _K, rope_grid=(2, 2, 2), rope_t_offset=bad, backend="torch")


@FUZZ
@given(not_positive.filter(lambda v: v is not None))
def test_attention_rejects_bad_softmax_scale(scale):
    with pytest.raises(ValueError, match="softmax_scale"):
        attention(_Q, _K, _K, softmax_scale=scale, backend="torch")


@FUZZ
@given(not_positive)
def test_sandwich_norm_rejects_bad_eps(eps):
    x, s = torch.randn(1, 3, 8), torch.randn(1, 8)
    with pytest.raises(ValueError, match="eps"):
        rms_norm_modulate(x, s, eps)
    with pytest.raises(ValueError, match="eps"):
        gated_rms_norm_residual(x, x, s, eps)


def test_empty_heads_are_refused():
    with pytest.raises(ValueError, match="empty dimension"):
        qk_norm_rope(_Q, torch.randn(1, 8, 0, 8), _WQ, torch.ones(0))


def test_use_backend_reaches_the_ops():
    with use_backend("no-such-backend", op=None):
        with pytest.raises(Exception, match="unknown backend 'no-such-backend'"):
            rms_norm_modulate(torch.randn(1, 2, 8), torch.randn(1, 8))
