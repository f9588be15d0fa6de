"""The 3D RoPE reference against the paper's formulation: scores depend on position differences only."""

import pytest
import torch

from lavin_fast.ops.rope import apply_rope, rope_cos_sin, rope_split


@pytest.mark.parametrize("hd, split", [(72, (24, 24, 24)), (64, (16, 24, 24)), (128, (32, 48, 48)), (96, (32, 32, 32))])
def test_split(hd, split):
    assert rope_split(hd) == split
    assert sum(split) == hd and all(s % 2 == 0 for s in split)


def test_split_rejects_odd():
    with pytest.raises(ValueError, match="even"):
        rope_split(63)


@pytest.mark.parametrize("hd", [64, 72])
def test_score_depends_only_on_position_difference(hd):
    """q.k after RoPE at positions p and p' equals the same q.k at p + s and p' + s, per axis."""
    torch.manual_seed(0)
    grid = (4, 5, 6)
    L = 4 * 5 * 6
    q1 = torch.randn(hd, dtype=torch.float64)
    k1 = torch.randn(hd, dtype=torch.float64)
    x = torch.zeros(1, L, 2, hd, dtype=torch.float64)
    x[0, :, 0] = q1
    x[0, :, 1] = k1
    r = apply_rope(x, grid)[0]  # [L, 2, hd]

    def idx(t, y, w):
        return (t * 5 + y) * 6 + w

    def score(p, pk):
        return (r[idx(*p), 0] * r[idx(*pk), 1]).sum()

    base = score((1, 2, 3), (0, 1, 1))
    for shift in [(1, 0, 0), (0, 2, 0), (0, 0, 2), (2, 1, 1)]:
        p = tuple(a + s for a, s in zip((1, 2, 3), shift, strict=True))
        pk = tuple(a + s for a, s in zip((0, 1, 1), shift, strict=True))
        # angles are float32 by the spec, hence the float32-level tolerance
        torch.testing.assert_close(score(p, pk), base, rtol=1e-5, atol=1e-5)
    # ... and it does change with the difference along each axis (each chunk is used)
    for other in [(2, 2, 3), (1, 3, 3), (1, 2, 4)]:
        assert abs(score(other, (0, 1, 1)) - base) > 1e-3


def test_rope_preserves_norm_and_is_identity_at_origin():
    x = torch.randn(2, 6, 3, 72, dtype=torch.float64)
    r = apply_rope(x, (1, 2, 3))
    torch.testing.assert_close(r.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(r[:, 0], x[:, 0])  # position (0, 0, 0)


def test_t_offset_shifts_frames():
    cos0, sin0 = rope_cos_sin((3, 2, 2), 64, t_offset=2)
    cos1, sin1 = rope_cos_sin((5, 2, 2), 64)
    torch.testing.assert_close(cos0, cos1[8:])
    torch.testing.assert_close(sin0, sin1[8:])
