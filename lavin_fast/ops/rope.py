"""3D rotary position embedding (RoPE) of the J-DiT: the shared numerical specification.

Each token of the joint sequence has a position (t, y, x) on a grid (T, H, W); tokens are
ordered (frame, row, col), so token n sits at t = n // (H*W), y = (n // W) % H, x = n % W.
The head dim is split into three contiguous chunks [t | y | x]; inside a chunk of size d the
frequencies are base^(-2i/d), i < d/2, and the rotation uses the rotate-half layout:
chunk = [u, v] -> [u*cos - v*sin, v*cos + u*sin]. Angles are float32; cos and sin are cast to
the input's dtype before the product (as the published code does).

Head-dim split (`rope_split`):
- head dims divisible by 6 (the published code's only case, e.g. 72 -> 24/24/24): equal thirds;
- otherwise a quarter for time and 3/8 for each spatial axis, each rounded to an even size
  (64 -> 16/24/24, 128 -> 32/48/48). Rationale: LaVin-DiT sequences hold few frames (2N+2 = 10
  at the default N = 4) but 16-64 rows and columns, so the spatial axes get the finer spectrum.
"""

from __future__ import annotations

import torch

from lavin_fast.ops._checks import check_int

ROPE_BASE = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Sizes of the (t, y, x) chunks of the head dim; each is even and positive."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    if head_dim % 6 == 0:
        d = head_dim // 3
        return (d, d, d)
    spatial = 2 * ((3 * head_dim) // 16)
    temporal = head_dim - 2 * spatial
    if temporal <= 0 or temporal % 2:
        raise ValueError(f"head_dim {head_dim} has no even 3D RoPE split")
    return (temporal, spatial, spatial)


def check_grid(grid: tuple[int, int, int], seq_len: int, name: str = "rope_grid") -> tuple[int, int, int]:
    """Validate a (T, H, W) grid against a sequence length; returns it as ints."""
    if not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise ValueError(f"{name} must be a (T, H, W) triple, got {grid!r}")
    T, H, W = (check_int(f"{name}[{i}]", g, minimum=1) for i, g in enumerate(grid))  # 2.7 is an error, not 2
    if T * H * W != seq_len:
        raise ValueError(f"{name}={tuple(grid)} has {T * H * W} positions but the sequence has {seq_len} tokens")
    return T, H, W


def rope_inv_freq(head_dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Per-column inverse frequency [head_dim] float32 (u and v halves of a chunk share one)."""
    cols = []
    for d in rope_split(head_dim):
        f = 1.0 / (ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        cols += [f, f]
    return torch.cat(cols)


def rope_positions(grid: tuple[int, int, int], t_offset: int = 0, device=None) -> torch.Tensor:
    """Positions [L, 3] (t, y, x) as float32, tokens ordered (frame, row, col)."""
    T, H, W = grid
    t = torch.arange(T, device=device) + t_offset
    y = torch.arange(H, device=device)
    x = torch.arange(W, device=device)
    pos = torch.stack(torch.meshgrid(t, y, x, indexing="ij"), dim=-1).reshape(-1, 3)
    return pos.to(torch.float32)


def rope_cos_sin(
    grid: tuple[int, int, int], head_dim: int, t_offset: int = 0, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, head_dim] float32 for every token and head-dim column."""
    pos = rope_positions(grid, t_offset, device)  # [L, 3]
    axis = torch.cat([torch.full((d,), i, device=device) for i, d in enumerate(rope_split(head_dim))])
    angle = pos[:, axis] * rope_inv_freq(head_dim, device)[None, :]  # float32, as published
    return angle.cos(), angle.sin()


def rotate_half_chunks(x: torch.Tensor, split: tuple[int, int, int]) -> torch.Tensor:
    """Per chunk [u, v] -> [-v, u] along the last dim."""
    parts = []
    for c in torch.split(x, list(split), dim=-1):
        u, v = c.chunk(2, dim=-1)
        parts += [-v, u]
    return torch.cat(parts, dim=-1)


# Eager calls reuse the tables of the last few (grid, head_dim, t_offset, device, dtype): every block of a forward
# rotates q and k on the same grid, and rebuilding cos/sin each time cost the CPU path measurable time. The tables
# are private (never handed out), so nothing can modify a cached one; traced code builds them in the graph.
_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_TABLES_MAX = 16


def rope_tables(grid, head_dim, t_offset, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [L, head_dim] in dtype (cached in eager mode; never modify them)."""
    if torch.compiler.is_compiling():
        cos, sin = rope_cos_sin(grid, head_dim, t_offset, device)
        return cos.to(dtype), sin.to(dtype)
    key = (tuple(int(g) for g in grid), int(head_dim), int(t_offset), str(device), dtype)
    tables = _TABLES.get(key)
    if tables is None:
        cos, sin = rope_cos_sin(grid, head_dim, t_offset, device)
        if len(_TABLES) >= _TABLES_MAX:
            _TABLES.pop(next(iter(_TABLES)))
        tables = _TABLES[key] = (cos.to(dtype), sin.to(dtype))
    return tables


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, split: tuple[int, int, int]) -> torch.Tensor:
    """x * cos + rotate_half_chunks(x) * sin for x [..., hd] and tables cos, sin broadcastable to x.

    Written without the rotated copy: out = x * cos, then per chunk [u, v] the u half gets -v * sin and the v
    half u * sin, added in place on views of out (one addcmul_ per half; two in all when the chunks are equal,
    as at every head dim divisible by 6). The same products and sums as the formula above.
    """
    if len(set(split)) > 1 and _gemm_rotation_ok(x):
        # unequal chunks (a head dim not divisible by 6, e.g. the demo's 32 -> 8/12/12): six in-place additions on
        # narrow strided views cost more than one small GEMM by the signed permutation [-v, u] (exact: one
        # nonzero +-1 per column) and one addcmul; measured 2.2 -> 1.3 ms at [8, 4, 384, 32] on 1 CPU thread
        return torch.addcmul(x * cos, x @ _rotation_matrix(split, x.dtype, x.device), sin)
    out = x * cos
    if len(set(split)) == 1:  # equal chunks: [..., 3, 2, d/2] views cover every chunk at once
        d = split[0]
        xs, os_, ss = (t.unflatten(-1, (3, 2, d // 2)) for t in (x, out, sin))
        os_[..., 0, :].addcmul_(xs[..., 1, :], ss[..., 0, :], value=-1)
        os_[..., 1, :].addcmul_(xs[..., 0, :], ss[..., 1, :])
        return out
    start = 0
    for d in split:
        h = d // 2
        u, v = slice(start, start + h), slice(start + h, start + d)
        out[..., u].addcmul_(x[..., v], sin[..., u], value=-1)
        out[..., v].addcmul_(x[..., u], sin[..., v])
        start += d
    return out


_ROTATIONS: dict[tuple, torch.Tensor] = {}


def _gemm_rotation_ok(x: torch.Tensor) -> bool:
    """The permutation GEMM is exact only at full float32 matmul precision (no TF32 / bf16 passes): CPU only. It is an
    eager speed trick: traced code (Inductor fuses the in-place form) and any active dispatch mode (torch's FLOP
    counter would count it as model FLOPs) take the plain form."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return (
        not torch.compiler.is_compiling()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and torch.get_float32_matmul_precision() == "highest"
        and _get_current_dispatch_mode() is None
    )


def _rotation_matrix(split: tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """P [hd, hd] with (x @ P) = rotate_half_chunks(x): per chunk [u, v] -> [-v, u] (cached; never modify)."""
    key = (tuple(split), dtype, str(device))
    m = _ROTATIONS.get(key)
    if m is None:
        hd = sum(split)
        m = torch.zeros(hd, hd, dtype=dtype, device=device)
        start = 0
        for d in split:
            h = d // 2
            for i in range(h):
                m[start + h + i, start + i] = -1.0  # out u_i = -v_i
                m[start + i, start + h + i] = 1.0  # out v_i = u_i
            start += d
        m = _ROTATIONS[key] = m
    return m


def apply_rope(x: torch.Tensor, grid: tuple[int, int, int], t_offset: int = 0) -> torch.Tensor:
    """Reference 3D RoPE of x [B, L, H, hd] on `grid` (plain PyTorch, any device)."""
    if x.dim() != 4:
        raise ValueError(f"x must be [B, L, H, head_dim], got shape {tuple(x.shape)}")
    L, hd = x.shape[1], x.shape[-1]
    check_grid(grid, L)
    cos, sin = rope_tables(tuple(grid), hd, t_offset, x.device, x.dtype)
    return rope_rotate(x, cos[None, :, None, :], sin[None, :, None, :], rope_split(hd))
