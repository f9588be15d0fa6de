"""Flow-matching time: training-time sampling (logit-normal) and the sampling grids.

Convention (docs/numerics.md): t = 0 is pure noise, t = 1 is data; x_t = t * x_data + (1 - t) * noise.
A sampling grid is an increasing sequence of time points from 0 to 1; n points give n - 1 Euler updates.
"""

from __future__ import annotations

import torch

# The published sampler's three grids, keyed by their number of points ("steps" in the published code).
PUBLISHED_GRIDS: dict[int, tuple[float, ...]] = {
    20: (
        0.0000, 0.0056, 0.0111, 0.0167, 0.0222, 0.0278, 0.0333, 0.0389, 0.0444, 0.0500, 0.0524,
        0.0730, 0.1148, 0.1777, 0.2618, 0.3671, 0.4936, 0.6412, 0.8100, 1.0000,
    ),
    30: (
        0.0000, 0.0036, 0.0071, 0.0107, 0.0143, 0.0179, 0.0214, 0.0250, 0.0286, 0.0321, 0.0357,
        0.0393, 0.0429, 0.0464, 0.0500, 0.0511, 0.0600, 0.0779, 0.1049, 0.1410, 0.1862, 0.2403,
        0.3036, 0.3759, 0.4573, 0.5477, 0.6472, 0.7557, 0.8733, 1.0000,
    ),
    40: (
        0.0000, 0.0026, 0.0053, 0.0079, 0.0105, 0.0132, 0.0158, 0.0184, 0.0211, 0.0237, 0.0263,
        0.0289, 0.0316, 0.0342, 0.0368, 0.0395, 0.0421, 0.0447, 0.0474, 0.0500, 0.0506, 0.0555,
        0.0655, 0.0804, 0.1004, 0.1253, 0.1553, 0.1902, 0.2302, 0.2752, 0.3251, 0.3801, 0.4401,
        0.5051, 0.5750, 0.6500, 0.7300, 0.8150, 0.9050, 1.0000,
    ),
}  # fmt: skip

GRID_KINDS = ("uniform", "published")


def sample_logit_normal(
    n: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """n times t = sigmoid(mean + std * N(0, 1)) in (0, 1), float32 (the paper's LogitNormal(0, 1))."""
    if n < 0:
        raise ValueError(f"n: expected a non-negative count, got {n}")
    if not std > 0:
        raise ValueError(f"std: expected > 0, got {std}")
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(mean + std * z)


def uniform_grid(num_points: int) -> torch.Tensor:
    """num_points equally spaced times from 0 to 1 (float64), i.e. num_points - 1 Euler updates."""
    if num_points < 2:
        raise ValueError(f"num_points: expected >= 2 (a grid needs both ends 0 and 1), got {num_points}")
    return torch.linspace(0.0, 1.0, num_points, dtype=torch.float64)


def published_grid(num_points: int) -> torch.Tensor:
    """One of the published sampler's grids exactly (float64): 20, 30 or 40 points."""
    if num_points not in PUBLISHED_GRIDS:
        raise ValueError(
            f"num_points: the published sampler has grids of {sorted(PUBLISHED_GRIDS)} points only, got {num_points}; "
            "use grid='uniform' for any other count"
        )
    return torch.tensor(PUBLISHED_GRIDS[num_points], dtype=torch.float64)


def time_grid(num_points: int, kind: str = "uniform") -> torch.Tensor:
    """The sampling grid of `kind` ("uniform" or "published") with num_points points, float64, 0 -> 1."""
    if kind == "uniform":
        return uniform_grid(num_points)
    if kind == "published":
        return published_grid(num_points)
    raise ValueError(f"kind: expected one of {GRID_KINDS}, got {kind!r}")


def check_grid(grid: torch.Tensor) -> torch.Tensor:
    """Validate a user-given grid: 1-D, >= 2 points, strictly increasing, from 0 to 1. Returns it as float64."""
    g = torch.as_tensor(grid, dtype=torch.float64).flatten()
    if g.numel() < 2:
        raise ValueError(f"grid: expected at least 2 points, got {g.numel()}")
    if not bool((g[1:] > g[:-1]).all()):
        raise ValueError(f"grid: expected strictly increasing times, got {g.tolist()}")
    if abs(g[0].item()) > 1e-12 or abs(g[-1].item() - 1.0) > 1e-12:
        raise ValueError(
            f"grid: expected to start at 0 (noise) and end at 1 (data), got {g[0].item()} .. {g[-1].item()}"
        )
    return g
