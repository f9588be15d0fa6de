"""In-context prediction end to end (the paper's Algorithm 2): encode the example pairs and the query with the
ST-VAE (each item on its own; the posterior sampled, as published), Euler-integrate the flow with guidance,
decode the target latents."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lavin_fast.flow.sampler import sample_latents
from lavin_fast.models.vae_latents import denormalize_latents, encode_clip, encode_frames
from lavin_fast.seeding import keyed_generator


@dataclass
class SamplerOptions:
    """How to integrate.

    num_points: time-grid points (n points: n - 1 model evaluations); grid: "published" (20/30/40) or "uniform".
    guidance: classifier-free guidance scale (1: no unconditional pass). seed: noise and posterior seed.
    batch: queries per model call. dtype: autocast dtype (torch.bfloat16 on GPU) or None (the model's own).
    state_dtype: dtype of the integration state between Euler updates (the published sampler: bfloat16).
    """

    num_points: int = 20
    grid: str = "published"
    guidance: float = 1.5
    seed: int = 0
    batch: int = 4
    dtype: torch.dtype | None = None
    state_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance: expected a finite scale, got {self.guidance}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch: expected a positive number of queries per call, got {self.batch!r}")
        if self.num_points < 2:
            raise ValueError(f"num_points: expected >= 2 grid points, got {self.num_points}")


def _encode_item(vae, item: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[3, T, H, W] -> normalised latents [C, t, h, w]; T = 1 images on their own, clips as clips."""
    x = item[None].to(vae.device)
    return (encode_frames(vae, x, [gen]) if item.shape[1] == 1 else encode_clip(vae, x, [gen]))[0]


@torch.no_grad()
def predict(
    dit,
    vae,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    queries: list[torch.Tensor],
    opts: SamplerOptions,
    *,
    indices: list[int] | None = None,
    on_batch: Callable[[list[int], torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Targets for each query [Q, 3, T_target, H, W] (float32 in [-1, 1]).

    pairs: example (input [3, T_in, H, W], target [3, T_out, H, W]) in [-1, 1]; queries: [3, T_in, H, W].
    The example targets' frame count sets the predicted frame count. indices: each query's key for its noise and
    posterior draws (default 0..Q-1), so a query gets the same result in any batch, shard or resumed run.
    on_batch(positions, predictions): called per batch instead of keeping the results (then None is returned),
    so that batch runs write as they go.
    """
    keys = list(range(len(queries))) if indices is None else list(indices)
    if len(keys) != len(queries):
        raise ValueError(f"indices: expected {len(queries)} keys (one per query), got {len(keys)}")
    if not pairs:
        raise ValueError("pairs: expected at least one example (input, target) pair")
    size = tuple(pairs[0][0].shape[-2:])
    for i, (a, b) in enumerate(pairs):
        if tuple(a.shape[-2:]) != size or tuple(b.shape[-2:]) != size:
            raise ValueError(f"pairs[{i}]: frames of {tuple(a.shape[-2:])} / {tuple(b.shape[-2:])}, expected {size}")
    for i, q in enumerate(queries):
        if tuple(q.shape[-2:]) != size:
            raise ValueError(
                f"query {i} is {q.shape[-1]}x{q.shape[-2]} (WxH) but the example pairs are {size[1]}x{size[0]}; "
                "resize it, or give a size to resize everything to (--size)"
            )
    dev = vae.device
    # the context's latents, shared by every query: sampled once from the posterior
    ctx_lat = []
    for i, (a, b) in enumerate(pairs):
        ctx_lat.append(_encode_item(vae, a, keyed_generator(dev, opts.seed, i, 6)))
        ctx_lat.append(_encode_item(vae, b, keyed_generator(dev, opts.seed, i, 7)))
    out_frames = pairs[0][1].shape[1]
    t_lat = ctx_lat[1].shape[1]
    results = []
    for start in range(0, len(queries), opts.batch):
        chunk = queries[start : start + opts.batch]
        chunk_keys = keys[start : start + opts.batch]
        q_lat = [
            _encode_item(vae, q, keyed_generator(dev, opts.seed, k, 8)) for k, q in zip(chunk_keys, chunk, strict=True)
        ]
        cond = torch.stack([torch.cat(ctx_lat + [q], dim=1) for q in q_lat]).to(dit.device)
        shape = (len(chunk), cond.shape[1], t_lat, cond.shape[3], cond.shape[4])
        z = sample_latents(
            dit,
            cond.to(opts.state_dtype),  # the published sampler's context latents are bf16 too
            shape,
            num_points=opts.num_points,
            grid=opts.grid,
            guidance=opts.guidance,
            seed=opts.seed,
            indices=chunk_keys,
            dtype=opts.dtype,
            state_dtype=opts.state_dtype,
        )
        pix = vae.decode(denormalize_latents(vae, z.to(dev, vae.dtype))).float().clamp(-1, 1)
        pix = pix[:, :, :out_frames].cpu()
        if on_batch is not None:
            on_batch(list(range(start, start + len(chunk))), pix)
        else:
            results.append(pix)
    return None if on_batch is not None else torch.cat(results)
