"""Euler sampling of the flow ODE with classifier-free guidance (the paper's Algorithm 2).

The ODE runs from t = 0 (noise) to t = 1 (data) over a grid of n points (n - 1 Euler updates):
    z_{i+1} = z_i + (t_{i+1} - t_i) * v(z_i, t_i).
Guidance (published): v = v_u + s * (v_c - v_u), v_u with the null context (a zero latent frame, then the
query's latent frame). The J-DiT's `guided(x, t, cond, scale=s)` computes both passes in one batched call
(the two contexts packed along the tokens); `guided_velocity_reference` is the plain two-call definition it is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lavin_fast.flow.loss import null_context
from lavin_fast.flow.timesteps import check_grid, time_grid
from lavin_fast.seeding import keyed_generator

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_velocity_reference(
    model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: float
) -> torch.Tensor:
    """v_u + scale * (v_c - v_u) by two separate calls (the published sampler's way); scale 1: v_c only."""
    v_c = model(x, t, cond).float()
    if scale == 1.0:
        return v_c
    v_u = model(x, t, null_context(cond)).float()
    return v_u + scale * (v_c - v_u)


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided velocity: the model's one-call `guided` (J-DiT) when it has one, else the two-call definition."""
    if scale == 1.0:
        return model(x, t, cond).float()
    fwd = getattr(model, "guided", None)
    if fwd is not None:
        return fwd(x, t, cond, scale=scale).float()
    return guided_velocity_reference(model, x, t, cond, scale)


def euler_sample(
    velocity: VelocityFn,
    noise: torch.Tensor,
    grid: torch.Tensor,
    *,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t) from grid[0] = 0 to grid[-1] = 1, starting at `noise`; float32 result.

    The time passed to `velocity` is a [B] float32 tensor on noise's device. callback(i, z) after update i.
    state_dtype: the dtype z is kept in between updates (float32; the published sampler keeps bfloat16).
    """
    g = check_grid(grid)
    z = noise.to(state_dtype)
    times = g.to(torch.float32)
    b = z.shape[0]
    for i in range(g.numel() - 1):
        t = times[i].to(z.device).expand(b)
        v = velocity(z, t)
        z = (z.float() + float(g[i + 1] - g[i]) * v.float()).to(state_dtype)
        if callback is not None:
            callback(i, z)
    return z.float()


def initial_noise(
    shape: tuple[int, ...],
    seed: int,
    device: torch.device | str,
    first_index: int = 0,
    indices: list[int] | None = None,
) -> torch.Tensor:
    """Standard normal noise, each sample from its own generator keyed by (seed, sample index): the result for
    one query does not depend on the batch it is in. indices: the samples' keys (default first_index + i), so
    that a resumed or sharded run draws the same noise for a query as a full run."""
    keys = list(range(first_index, first_index + shape[0])) if indices is None else list(indices)
    if len(keys) != shape[0]:
        raise ValueError(f"indices: expected {shape[0]} keys (one per sample), got {len(keys)}")
    return torch.stack(
        [torch.randn(shape[1:], generator=keyed_generator(device, seed, k, 2), device=device) for k in keys]
    )


@torch.no_grad()
def sample_latents(
    model,
    cond: torch.Tensor,
    target_shape: tuple[int, ...],
    *,
    num_points: int = 20,
    grid: str | torch.Tensor = "published",
    guidance: float = 1.5,
    seed: int = 0,
    first_index: int = 0,
    indices: list[int] | None = None,
    dtype: torch.dtype | None = None,
    state_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Target latents [B, C, Tx, h, w] (float32) for context latents `cond` [B, C, Tc, h, w].

    grid: "uniform", "published" (20/30/40 points) or an explicit tensor of times. dtype: autocast dtype
    (e.g. torch.bfloat16 on GPU); None runs in the model's own precision. indices: per-sample noise keys
    (default first_index + i). state_dtype: dtype of the integration state (published: bfloat16).
    """
    if not math.isfinite(guidance):
        raise ValueError(f"guidance: expected a finite scale, got {guidance}")
    if cond.dim() != 5:
        raise ValueError(f"cond: expected [B, C, Tc, h, w], got shape {tuple(cond.shape)}")
    if len(target_shape) != 5 or target_shape[0] != cond.shape[0]:
        raise ValueError(f"target_shape: expected [B={cond.shape[0]}, C, Tx, h, w], got {tuple(target_shape)}")
    times = grid if isinstance(grid, torch.Tensor) else time_grid(num_points, grid)
    noise = initial_noise(tuple(target_shape), seed, cond.device, first_index, indices)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = z.to(cond.dtype)
        if dtype is None:
            return guided_velocity(model, z, t, cond, guidance)
        with torch.autocast(device_type=cond.device.type, dtype=dtype):
            return guided_velocity(model, z, t, cond, guidance)

    return euler_sample(velocity, noise, times, state_dtype=state_dtype)
