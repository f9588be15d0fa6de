"""Builds the training latent source named by the config: the demo data through the frozen VAE, or the cache."""

from __future__ import annotations

from typing import Any

import torch

from lavin_fast.train.config import ConfigError, TrainConfig
from lavin_fast.train.distributed import DistContext
from lavin_fast.train.sources import LatentSource, VAEEncodedSource


def build_vae_from_config(cfg: TrainConfig, device: torch.device):
    """The frozen ST-VAE of a config: the given checkpoint, or build_vae(**vae_overrides) (+ vae_weights)."""
    from lavin_fast.flow.io import load_vae_file
    from lavin_fast.models.vae import build_vae

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


def build_source(cfg: TrainConfig, ctx: DistContext) -> LatentSource:
    if cfg.data == "latent-cache":
        if not cfg.latent_cache:
            raise ConfigError(
                "config field 'latent_cache': data = latent-cache needs the cache folder (--latent_cache DIR)"
            )
        from lavin_fast.data.latent_cache import LatentCacheLoader

        loader = LatentCacheLoader(
            cfg.latent_cache,
            n_pairs=cfg.num_pairs,
            batch_size=cfg.micro_batch_size,
            tasks=cfg.tasks,
            seed=cfg.seed,
            shard_id=ctx.rank,
            num_shards=ctx.world,
        )
        return CachedLatentSource(loader, ctx.device)
    from lavin_fast.data.incontext import build_incontext_loader

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
