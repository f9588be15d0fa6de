"""Pixels to the J-DiT's latents through the frozen ST-VAE: still images each as a one-frame clip (the published
way), clips as clips, the posterior sampled with per-sample generators (or its mode), then normalised
(z - shift) * scale. Used by training (train/sources.py) and sampling (flow/pipeline.py).
"""

from __future__ import annotations

import torch

from lavin_fast.seeding import keyed_generator


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
