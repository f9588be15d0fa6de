"""Where training latents come from. A source yields this rank's micro-batches of
(target latents [b, 16, Tx, h, w], context latents [b, 16, Tc, h, w]) and has a resumable state.

- `SyntheticLatentSource`: deterministic random latents keyed by the global sample index (tests, benchmarks).
- `VAEEncodedSource`: an in-context pixel loader (lavin_fast.data) encoded by the frozen ST-VAE: every context
  image on its own as a one-frame clip, the target as a clip, posterior *sampled* with a generator keyed by
  (seed, step, micro-batch, global index), then normalised (z - shift) * scale.
- `CachedLatentSource`: precomputed latents from the data package's latent cache.

`build_source(cfg, ctx)` builds the one a training config names.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

from lavin_fast.data.incontext.loader import build_incontext_loader
from lavin_fast.data.latent_cache import LatentCacheLoader
from lavin_fast.models.checkpoints import load_vae_file, weights_sha256
from lavin_fast.models.vae import build_vae
from lavin_fast.models.vae_latents import encode_segments
from lavin_fast.seeding import keyed_generator
from lavin_fast.train.config import ConfigError, TrainConfig
from lavin_fast.train.distributed import DistContext

log = logging.getLogger(__name__)


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


def build_vae_from_config(cfg: TrainConfig, device: torch.device):
    """The frozen ST-VAE of a config: the given checkpoint, or build_vae(**vae_overrides) (+ vae_weights)."""
    if cfg.vae_checkpoint:
        return load_vae_file(cfg.vae_checkpoint, device=device)
    if cfg.vae_weights:
        return load_vae_file(cfg.vae_weights, device=device)
    return build_vae(device=device, **cfg.vae_overrides).eval()


class CachedLatentSource:
    """Batches from a LatentCacheLoader (already normalised latents), moved to the device."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.loader)
        return batch.target.to(self.device, torch.float32), batch.context.to(self.device, torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


def check_cache_vae(cfg: TrainConfig, index: dict) -> None:
    """Refuse a latent cache that another VAE wrote: the sha256 of the weights the config names (vae_checkpoint or
    vae_weights) must equal the cache's `encoder_sha256`. A config that names no VAE file is not checked."""
    path = cfg.vae_checkpoint or cfg.vae_weights
    if not path:
        return
    cached = index.get("encoder_sha256")
    if not cached:
        log.warning("latent cache %s records no VAE identity: cannot check it against %s", cfg.latent_cache, path)
        return
    mine = weights_sha256(build_vae_from_config(cfg, torch.device("cpu")))
    if mine != cached:
        raise ConfigError(
            f"config field 'latent_cache': {cfg.latent_cache} was written by another VAE ({index.get('encoder')}, "
            f"sha256 {cached[:16]}...) than this run's {path} (sha256 {mine[:16]}...); rebuild the cache with "
            "`lavin-fast data build-cache ... --vae` of this VAE, or point the config at the VAE that wrote it"
        )


def build_source(cfg: TrainConfig, ctx: DistContext) -> LatentSource:
    if cfg.data == "latent-cache":
        if not cfg.latent_cache:
            raise ConfigError(
                "config field 'latent_cache': data = latent-cache needs the cache folder (--latent_cache DIR)"
            )
        loader = LatentCacheLoader(
            cfg.latent_cache,
            n_pairs=cfg.num_pairs,
            batch_size=cfg.micro_batch_size,
            tasks=cfg.tasks,
            seed=cfg.seed,
            shard_id=ctx.rank,
            num_shards=ctx.world,
        )
        check_cache_vae(cfg, loader.index)
        return CachedLatentSource(loader, ctx.device)
    loader = build_incontext_loader(
        "demo",
        resolution=cfg.image_size,
        n_pairs=cfg.num_pairs,
        batch_size=cfg.micro_batch_size,
        tasks=cfg.tasks,
        seed=cfg.seed,
        shard_id=ctx.rank,
        num_shards=ctx.world,
        num_workers=cfg.num_workers,
    )
    vae = build_vae_from_config(cfg, ctx.device)
    return VAEEncodedSource(
        loader, vae, seed=cfg.seed, rank=ctx.rank, world=ctx.world, micro_batch=cfg.micro_batch_size, device=ctx.device
    )
