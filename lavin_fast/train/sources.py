"""Where training latents come from. A source yields this rank's micro-batches of
(target latents [b, 16, Tx, h, w], context latents [b, 16, Tc, h, w]) and has a resumable state.

- `SyntheticLatentSource`: deterministic random latents keyed by the global sample index (tests, benchmarks).
- `VAEEncodedSource`: an in-context pixel loader (lavin_fast.data) encoded by the frozen ST-VAE: every context
  image on its own as a one-frame clip, the target as a clip, posterior *sampled* with a generator keyed by
  (seed, step, micro-batch, global index), then normalised (z - shift) * scale.
- `LatentCacheSource`: precomputed latents from the data package's latent cache.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from lavin_fast.flow.loss import keyed_generator


class LatentSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SyntheticLatentSource:
    """`num_samples` fixed random sequences, visited in order by global index; the target is a fixed function
    of the context (so a model can learn it). Rank r of `world` takes samples [r*b, (r+1)*b) of each global
    micro-batch of world*b."""

    def __init__(
        self,
        *,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        num_samples: int = 64,
        channels: int = 16,
        context_frames: int = 3,
        target_frames: int = 1,
        size: int = 4,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.b, self.rank, self.world = micro_batch, rank, world
        self.num_samples, self.seed, self.device = num_samples, seed, torch.device(device)
        self.shape = (channels, context_frames, size, size)
        self.target_frames = target_frames
        self.position = 0  # micro-batches consumed

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = keyed_generator("cpu", self.seed, index % self.num_samples, 3)
        cond = torch.randn(self.shape, generator=gen)
        target = (0.5 * cond[:, -1:] - 0.5 * cond[:, :1]).repeat(1, self.target_frames, 1, 1)
        return target, cond

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g0 = self.position * self.b * self.world + self.rank * self.b
        pairs = [self._sample(g0 + i) for i in range(self.b)]
        self.position += 1
        x = torch.stack([p[0] for p in pairs]).to(self.device)
        c = torch.stack([p[1] for p in pairs]).to(self.device)
        return x, c

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Encode [B, 3, T, H, W] pixel frames *each as its own one-frame clip* (the published way for still
    images) into normalised latents [B, C, T, h, w]; posterior sampled per sample (generators) or its mode."""
    b, _, t = frames.shape[:3]
    clips = frames.permute(0, 2, 1, 3, 4).reshape(b * t, frames.shape[1], 1, *frames.shape[3:])
    z = _encode(vae, clips, None if generators is None else [g for g in generators for _ in range(t)])
    return z.reshape(b, t, *z.shape[1:]).squeeze(3).permute(0, 2, 1, 3, 4).contiguous()


@torch.no_grad()
def encode_clip(vae, clip: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """Encode [B, 3, T, H, W] as clips (temporal compression 1 + 4k -> 1 + k) into normalised latents."""
    return _encode(vae, clip, generators)


def _encode(vae, x: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    post = vae.encode(x.to(device=_device_of(vae), dtype=_dtype_of(vae)))
    if generators is None:
        z = post.mode()
    else:
        mean, std = post.mean, post.std
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g, device=g.device) for g in generators])
        z = mean + std * eps.to(mean.device, mean.dtype)
    return normalize_latents(vae, z.float())


def normalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """The J-DiT's latent space: the ST-VAE's (z - shift) * scale."""
    return vae.normalize_latents(z)


def denormalize_latents(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.denormalize_latents(z)


def _device_of(module) -> torch.device:
    return next(module.parameters()).device


def _dtype_of(module) -> torch.dtype:
    return next(module.parameters()).dtype


def encode_segments(vae, pixels: torch.Tensor, segments: tuple[int, ...], generators) -> torch.Tensor:
    """Encode [B, 3, T, H, W] made of independent items of `segments` frames each (a still image: 1 frame,
    encoded on its own; a clip: 1 + 4k frames, encoded as a clip) and stack their latent frames on T."""
    if sum(segments) != pixels.shape[2]:
        raise ValueError(
            f"segments {segments} do not sum to the {pixels.shape[2]} frames of shape {tuple(pixels.shape)}"
        )
    if all(s == 1 for s in segments):
        return encode_frames(vae, pixels, generators)
    out, t0 = [], 0
    for i, s in enumerate(segments):
        item = pixels[:, :, t0 : t0 + s]
        gens = None if generators is None else [keyed_generator(g.device, g.initial_seed(), i) for g in generators]
        out.append(encode_frames(vae, item, gens) if s == 1 else encode_clip(vae, item, gens))
        t0 += s
    return torch.cat(out, dim=2)


class VAEEncodedSource:
    """Pixel batches from an in-context loader (InContextBatch: `context` [b, 3, Tc, H, W] and `target`
    [b, 3, Tx, H, W] in [-1, 1], with the frame count of each item) encoded by a frozen VAE. The loader yields
    this rank's samples and carries the data position in its state_dict()."""

    def __init__(self, loader, vae, *, seed: int, rank: int, world: int, micro_batch: int, device: torch.device):
        self.loader, self.vae = loader, vae.eval().requires_grad_(False)
        self.seed, self.rank, self.world, self.b, self.device = seed, rank, world, micro_batch, device
        self.position = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.loader)
        ctx, tgt = batch.context.to(self.device), batch.target.to(self.device)
        b = ctx.shape[0]
        g0 = self.position * self.b * self.world + self.rank * self.b
        gens_c = [keyed_generator(self.device, self.seed, g0 + i, 4) for i in range(b)]
        gens_t = [keyed_generator(self.device, self.seed, g0 + i, 5) for i in range(b)]
        self.position += 1
        cond = encode_segments(self.vae, ctx, tuple(batch.context_segments), gens_c)
        x = encode_segments(self.vae, tgt, tuple(batch.target_segments), gens_t)
        return x, cond

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.loader.load_state_dict(state["loader"])
