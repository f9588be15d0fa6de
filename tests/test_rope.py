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


# ------------------------------------------------------------------------------------------------
# The published definition pinned as literal values. Source: DerrickWang005/LaVin-DiT at commit
# f3728580115a4efbcd38d2279f1dbd868297b05e, lib/model/blocks.py:
#   lines 201-204  RotaryEmbedding3D(dim=[self.head_dim // 3] * 3, base=10000): equal thirds [t | h | w]
#   lines 21-29    inv_freqs_* = 1.0 / (base ** (torch.arange(0, d, 2)[: (d // 2)].float() / d))
#   lines 45-57    coords from meshgrid(arange(T), arange(H), arange(W), indexing="ij"), angle = coord * inv_freq
#   lines 74-81    rotate_half: x1, x2 = x.chunk(2); cat(-x2, x1); cos and sin repeated as cat([cos, cos])
#   lines 99-107   each of q's three chunks rotated with its own axis's angles, then concatenated
# The invariants above hold for any base and pairing; these literals do not.
# ------------------------------------------------------------------------------------------------

# 1 / 10000 ** (2i / 24) = 10 ** (-i / 3), i = 0..11: the 12 frequencies of a 24-wide chunk (hd 72)
PUBLISHED_INV_FREQ_24 = [
    1.0, 0.4641588833612779, 0.2154434690031884, 0.1, 0.046415888336127795, 0.021544346900318832,
    0.01, 0.004641588833612777, 0.0021544346900318843, 0.001, 0.00046415888336127773, 0.00021544346900318845,
]  # fmt: skip


def test_head_dim_72_split_and_frequencies_are_the_published_ones():
    from lavin_fast.ops.rope import rope_inv_freq

    assert rope_split(72) == (24, 24, 24)  # blocks.py:201-204, [head_dim // 3] * 3
    inv = rope_inv_freq(72)
    assert inv.dtype == torch.float32  # blocks.py:22 (.float())
    want = torch.tensor(PUBLISHED_INV_FREQ_24 * 2, dtype=torch.float32)  # u and v halves share a frequency
    for chunk in inv.split(24):
        torch.testing.assert_close(chunk, want, rtol=5e-7, atol=0)  # float32 pow: a few ulps


# A unit vector in column `col` of a 72-wide head at position (t, y, x): the published rotation moves it to
# cos(angle) in `col` and +-sin(angle) in its rotate-half partner col +- 12 (same chunk), zero elsewhere.
# (col, position, partner, cos, sin): angle = coordinate of the chunk's axis x frequency of the column.
PINNED_ROTATIONS = [
    (0, (1, 0, 0), 12, 0.5403023058681398, 0.8414709848078965),  # t chunk, freq 1, t = 1
    (25, (0, 2, 0), 37, 0.5991816474840641, 0.8006131108833296),  # y chunk, freq 10^(-1/3), y = 2
    (50, (0, 0, 3), 62, 0.7982992213658409, 0.6022610340763316),  # x chunk, freq 10^(-2/3), x = 3
    (37, (0, 2, 0), 25, 0.5991816474840641, -0.8006131108833296),  # a v-half column: partner 25, -sin
]


@pytest.mark.parametrize("col,pos,partner,cos,sin", PINNED_ROTATIONS)
def test_rotation_of_a_unit_vector_is_the_published_one(col, pos, partner, cos, sin):
    grid = (2, 3, 4)
    n = (pos[0] * 3 + pos[1]) * 4 + pos[2]  # tokens ordered (frame, row, col): blocks.py:45-50, "ij"
    x = torch.zeros(1, 24, 1, 72, dtype=torch.float64)
    x[0, n, 0, col] = 1.0
    r = apply_rope(x, grid)[0, n, 0]
    want = torch.zeros(72, dtype=torch.float64)
    want[col], want[partner] = cos, sin
    # angles are float32 (blocks.py:45-57), hence 1e-6
    torch.testing.assert_close(r, want, rtol=0, atol=1e-6)


def published_rope(x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """RotaryEmbedding3D.forward of blocks.py (lines 14-107) transcribed for float64 x [B, L, H, hd], hd % 3 == 0
    (no cache, no random time offset: that one applies to T == 1 in training only)."""
    T, H, W = grid
    d = x.shape[-1] // 3
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    parts = []
    for c, chunk in zip(coords, x.split([d, d, d], dim=-1), strict=True):
        f = c.reshape(-1, 1) * inv[None, :]
        cos = torch.cat([f.cos(), f.cos()], -1).to(x.dtype)[None, :, None, :]
        sin = torch.cat([f.sin(), f.sin()], -1).to(x.dtype)[None, :, None, :]
        x1, x2 = chunk.chunk(2, dim=-1)
        parts.append(chunk * cos + torch.cat((-x2, x1), dim=-1) * sin)
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("hd,grid", [(72, (3, 4, 5)), (96, (2, 3, 7)), (24, (4, 1, 3))])
def test_apply_rope_equals_the_published_transcription(hd, grid):
    x = torch.randn(2, grid[0] * grid[1] * grid[2], 3, hd, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, grid), published_rope(x, grid), rtol=0, atol=1e-12)


def test_cached_tables_never_serve_another_grid_dtype_or_offset():
    """apply_rope reuses its cos/sin tables in eager mode: interleaved calls that differ in grid, head dim, dtype
    and time offset must each still equal the published transcription (a stale table fails by far more than 1e-6)."""
    g = torch.Generator().manual_seed(0)
    calls = [
        ((3, 4, 5), 72, torch.float64, 0),
        ((3, 5, 4), 72, torch.float64, 0),
        ((3, 4, 5), 72, torch.float32, 0),
        ((3, 4, 5), 96, torch.float64, 0),
        ((3, 4, 5), 72, torch.float64, 2),
        ((3, 4, 5), 72, torch.float64, 0),
    ]
    for grid, hd, dtype, t_off in calls * 2:
        x = torch.randn(1, grid[0] * grid[1] * grid[2], 2, hd, generator=g, dtype=torch.float64)
        shifted = (grid[0] + t_off, grid[1], grid[2])
        want = published_rope(torch.cat([x.new_zeros(1, t_off * grid[1] * grid[2], 2, hd), x], 1), shifted)
        want = want[:, t_off * grid[1] * grid[2] :]
        got = apply_rope(x.to(dtype), grid, t_off)
        assert got.dtype == dtype
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol)
