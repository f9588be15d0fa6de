"""Flow-matching training objective (the seed's Algorithm 1, ARCHITECTURE.md's time direction).

    t ~ LogitNormal(0, 1),  x_t = t * x_data + (1 - t) * noise,  target u = x_data - noise,
    loss = mean over samples of mean((v_theta(x_t, t, context) - u)^2),

with the context replaced by the null context (one zero latent frame, then the query's latent frame)
for a fraction `null_prob` of the samples.

Every random draw of a sample (t, whether its context is dropped, its noise) comes from a generator
seeded by (seed, step, the sample's index in the step's global batch). The draws therefore do not depend on
the number of processes, on the split into accumulation micro-batches, nor on where a run was resumed: a
2-process run sees the same noise as a 1-process run of the same global batch, and a resumed run the same as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lavin_fast.seeding import keyed_generator

VelocityModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def interpolate(x_data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t * x_data + (1 - t) * noise, t of shape [B] broadcast over the other dims."""
    tt = t.to(x_data.dtype).view(-1, *([1] * (x_data.dim() - 1)))
    return tt * x_data + (1 - tt) * noise


def velocity_target(x_data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the linear path from noise (t = 0) to data (t = 1)."""
    return x_data - noise


def null_context(cond: torch.Tensor) -> torch.Tensor:
    """The published null context: one all-zero latent frame, then the query's (last) frame: [B, C, 2, h, w]."""
    if cond.dim() != 5:
        raise ValueError(f"cond: expected [B, C, Tc, h, w], got shape {tuple(cond.shape)}")
    query = cond[:, :, -1:]
    return torch.cat([torch.zeros_like(query), query], dim=2)


@dataclass
class FlowDraws:
    """The random draws of a (local) batch.

    t: [B] float32 times in (0, 1).
    null: [B] bool, True where the context is replaced by the null context.
    noise: [B, C, T, h, w] float32 standard normal noise (on the model's device).
    any_null: whether any sample of the *global* batch uses the null context (same on every rank).
    all_null: whether every sample of the global batch uses the null context.
    """

    t: torch.Tensor
    null: torch.Tensor
    noise: torch.Tensor
    any_null: bool
    all_null: bool


def draw_flow_randomness(
    *,
    seed: int,
    step: int,
    indices: Sequence[int],
    group: Sequence[int],
    latent_shape: Sequence[int],
    null_prob: float,
    device: torch.device | str,
    t_mean: float = 0.0,
    t_std: float = 1.0,
) -> FlowDraws:
    """Draws for the samples with step-global indices `indices`; `group` holds the indices of every sample
    that goes through the model in the same call on all ranks (this micro-batch over all processes).

    A sample's draws depend only on (seed, step, its index), so they do not change with the number of processes
    or the split into accumulation micro-batches. The scalar draws (t, null) of the whole group are made on every
    rank (cheap) so that all ranks agree on whether a null-context pass happens; noise only for `indices`.
    """
    if not 0.0 <= null_prob <= 1.0:
        raise ValueError(f"null_prob: expected a probability in [0, 1], got {null_prob}")
    idx = list(indices)
    scalars = {}
    for g in dict.fromkeys(list(group) + idx):
        gen = keyed_generator("cpu", seed, step, g, 0)
        z = torch.randn((), generator=gen)
        u = torch.rand((), generator=gen)
        scalars[g] = (torch.sigmoid(t_mean + t_std * z), bool(u < null_prob))
    nulls = [scalars[g][1] for g in group]
    noise = torch.stack(
        [
            torch.randn(tuple(latent_shape), generator=keyed_generator(device, seed, step, g, 1), device=device)
            for g in idx
        ]
    )
    return FlowDraws(
        t=torch.stack([scalars[g][0] for g in idx]).to(device),
        null=torch.tensor([scalars[g][1] for g in idx], device=device),
        noise=noise,
        any_null=any(nulls),
        all_null=all(nulls),
    )


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample, float32, shape [B]."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def flow_matching_loss(
    model: VelocityModel,
    x_data: torch.Tensor,
    cond: torch.Tensor,
    draws: FlowDraws,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss of one local batch: (mean loss, per-sample losses detached).

    Conditional samples go through one call with their context, null-context samples through a second call
    (the two contexts differ in length). Every rank makes the same calls, so that FSDP's collectives match:
    a rank without samples of a kind still runs that call on one of its samples with weight 0.
    """
    if x_data.dim() != 5 or cond.dim() != 5:
        raise ValueError(
            f"x_data, cond: expected [B, C, T, h, w] latents, got {tuple(x_data.shape)} and {tuple(cond.shape)}"
        )
    if x_data.shape[0] != cond.shape[0] or x_data.shape[0] != draws.t.shape[0]:
        raise ValueError(
            f"batch sizes differ: x_data {x_data.shape[0]}, cond {cond.shape[0]}, draws {draws.t.shape[0]}"
        )
    b = x_data.shape[0]
    x_t = interpolate(x_data, draws.noise, draws.t)
    target = velocity_target(x_data, draws.noise)
    losses = torch.zeros(b, device=x_data.device, dtype=torch.float32)
    total = x_data.new_zeros((), dtype=torch.float32)
    groups = []
    if not draws.all_null:
        groups.append((~draws.null, cond))
    if draws.any_null:
        groups.append((draws.null, null_context(cond)))
    for mask, ctx in groups:
        idx = mask.nonzero().flatten()
        weight = 1.0
        if idx.numel() == 0:  # keep the collective call pattern of the other ranks; contributes nothing
            idx, weight = torch.zeros(1, dtype=torch.long, device=x_data.device), 0.0
        v = model(x_t[idx], draws.t[idx], ctx[idx])
        mse = per_sample_mse(v, target[idx])
        total = total + weight * mse.sum()
        if weight:
            losses[idx] = mse.detach()
    return total / b, losses
