"""The ST-VAE of LaVin-DiT: a KL autoencoder with causal 3D convolutions (docs/numerics.md).

Spatial factor 8, temporal factor 4 with the first frame kept (T = 1 + 4k frames <-> 1 + k latent frames),
16 latent channels, 215,583,907 parameters at the published size. Module names equal the published
state-dict names, so `load_published_vae` loads the published file strictly, without a name map.

    vae = build_vae()                                  # or load_published_vae("vae.pt")
    post = vae.encode(x)                               # x [B, 3, T, H, W] or images [B, 3, H, W], in [-1, 1]
    z = vae.normalize_latents(post.sample())           # what the J-DiT sees
    x_hat = vae.decode(vae.denormalize_latents(z))

Fast paths and memory (details in docs/vae.md):
- One-frame clips (every still image) take the exact 2D forms of every layer (`fast=True`, the default).
- `chunk=N` processes a long clip N latent frames at a time with causal-conv caches ("cache" mode: peak
  memory set by N, not by the clip) or as the published independent chunks overlapping by one frame
  ("overlap" mode). `tile_size=P` processes frames larger than P pixels in P-pixel tiles with linear blending.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from lavin_fast.models.vae_blocks import Decoder, Encoder, RunContext, Stream

LATENT_SHIFT = 0.032470703125
LATENT_SCALE = 1.08936170213
PUBLISHED_PARAMETERS = 215_583_907
CHUNK_MODES = ("cache", "cache_local", "overlap")


@dataclass(frozen=True)
class VAEConfig:
    """ST-VAE hyper-parameters (names of the published constructor)."""

    block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
    """Channels of the encoder levels (the decoder runs them reversed); one Downsample/Upsample between levels."""
    layers_per_block: int = 3
    """ResnetBlocks per encoder level; decoder levels have one more."""
    latent_channels: int = 16
    """Channels of the latent (the encoder emits twice as many: mean and log-variance)."""
    norm_num_groups: int = 32
    """GroupNorm groups everywhere; every level's channel count must be divisible by it."""
    temporal_compression_ratio: int = 4
    """Time factor (a power of two); the first log2 of it levels compress/expand time."""
    norm_eps: float = 1e-6
    """GroupNorm epsilon."""

    def __post_init__(self) -> None:
        ch = tuple(int(c) for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", ch)
        if not ch or min(ch) < 1:
            raise ValueError(f"block_out_channels must be a non-empty tuple of positive ints, got {ch}")
        bad = [c for c in ch if c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every block_out_channels {ch}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError(
                f"layers_per_block ({self.layers_per_block}) and latent_channels ({self.latent_channels}) must be >= 1"
            )
        r = self.temporal_compression_ratio
        if r < 1 or r & (r - 1) or r.bit_length() - 1 > len(ch) - 1:
            raise ValueError(
                f"temporal_compression_ratio must be a power of two <= 2**{len(ch) - 1} (one time level per "
                f"Downsample), got {r}"
            )

    @property
    def time_levels(self) -> int:
        return self.temporal_compression_ratio.bit_length() - 1

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


class DiagonalGaussian:
    """The encoder's posterior: mean and log-variance (clamped to [-30, 20]) per latent element."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


def _check_options(chunk: int | None, chunk_mode: str, tile_size: int | None, tile_overlap: float, factor: int):
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be None or a positive int (latent frames per chunk), got {chunk!r}")
    if chunk_mode not in CHUNK_MODES:
        raise ValueError(f"chunk_mode must be one of {CHUNK_MODES}, got {chunk_mode!r}")
    if tile_size is not None:
        if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < factor or tile_size % factor:
            raise ValueError(f"tile_size must be None or a positive multiple of {factor} pixels, got {tile_size!r}")
        if not 0.0 <= tile_overlap < 1.0:
            raise ValueError(f"tile_overlap must be in [0, 1), got {tile_overlap!r}")
        lat = tile_size // factor
        stride_lat = int(lat * (1 - tile_overlap))
        if stride_lat < 1 or int(tile_size * (1 - tile_overlap)) != stride_lat * factor:
            raise ValueError(
                f"tile_size={tile_size} with tile_overlap={tile_overlap} does not give a tile stride that is a "
                f"whole number of latent pixels (use a multiple of {factor} / (1 - overlap), e.g. 32, 64, 512)"
            )


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> None:
    """Linear cross-fade of a's trailing and b's leading `extent` rows along dim, written into b."""
    n = min(a.shape[dim], b.shape[dim], extent)
    if n <= 0:
        return
    shape = [1] * b.dim()
    shape[dim] = n
    w = (torch.arange(n, device=b.device, dtype=torch.float64) / n).to(b.dtype).view(shape)
    head = b.narrow(dim, 0, n)
    head.copy_(a.narrow(dim, a.shape[dim] - n, n) * (1 - w) + head * w)


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile_in: int, tile_out: int, overlap: float
) -> torch.Tensor:
    """The published spatial tiling: tiles of tile_in, stride tile_in * (1 - overlap), outputs cross-faded
    over tile_out * overlap rows/columns (vertical first, then horizontal) and cropped to the stride."""
    H, W = x.shape[-2:]
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    limit = tile_out - blend
    rows = [[fn(x[..., i : i + tile_in, j : j + tile_in]) for j in range(0, W, stride)] for i in range(0, H, stride)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, tile.dim() - 2)
            if j > 0:
                _blend(row[j - 1], tile, blend, tile.dim() - 1)
        out_rows.append(torch.cat([t[..., :limit, :limit] for t in row], dim=-1))
    return torch.cat(out_rows, dim=-2)


class STVAE(nn.Module):
    """The ST-VAE: `encoder` and `decoder` with the published parameter names."""

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VAEConfig()
        args = (
            config.block_out_channels,
            config.layers_per_block,
            config.latent_channels,
            config.norm_num_groups,
            config.norm_eps,
            config.time_levels,
        )
        self.encoder = Encoder(*args)
        self.decoder = Decoder(*args)
        self.channels_last: bool | None = None
        """Run in channels_last_3d memory format. None: on CUDA devices (measured faster there), and on CPU
        for clips (T > 1: the causal convs' per-frame oneDNN calls then read each sample's frame windows as
        dense views; measured ~1.4-2x faster on the clip benchmark than contiguous), not for CPU images."""

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.conv.weight.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def normalize_latents(z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the J-DiT's latent: (z - shift) * scale."""
        return (z - LATENT_SHIFT) * LATENT_SCALE

    @staticmethod
    def denormalize_latents(z: torch.Tensor) -> torch.Tensor:
        """The J-DiT's latent -> VAE latent: z / scale + shift."""
        return z / LATENT_SCALE + LATENT_SHIFT

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=self.device, dtype=self.dtype)
        cl = self.channels_last if self.channels_last is not None else (x.device.type == "cuda" or x.shape[2] > 1)
        return x.contiguous(memory_format=torch.channels_last_3d if cl else torch.contiguous_format)

    # ------------------------------------------------------------------ encode
    def encode(
        self,
        x: torch.Tensor,
        *,
        fast: bool = True,
        chunk: int | None = None,
        chunk_mode: str = "cache",
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> DiagonalGaussian:
        """Posterior of x [B, 3, T, H, W] (T = 1 + 4k) or of images [B, 3, H, W] (latents then [B, C, h, w]).

        fast: one-frame clips take the exact 2D forms of every layer (False forces the general 3D path).
        chunk: latent frames per time chunk (None: the whole clip at once). chunk_mode "cache" streams the
            chunks through causal-conv caches, each GroupNorm using the statistics of all frames so far;
            "cache_local" the same with each chunk's own statistics; "overlap" encodes chunks overlapping by
            one frame on their own (the published behaviour). Chunked results differ from whole-clip results
            through the GroupNorm statistics only (measured in docs/vae.md).
        tile_size: frames larger than this many pixels are encoded in tiles (published: 512) blended linearly
            over tile_overlap of a tile.
        """
        cfg = self.config
        sf, tf = cfg.spatial_factor, cfg.temporal_compression_ratio
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
        image = x.dim() == 4
        if x.dim() not in (4, 5):
            raise ValueError(f"x must be [B, 3, T, H, W] or images [B, 3, H, W], got shape {tuple(x.shape)}")
        if image:
            x = x[:, :, None]
        B, C, T, H, W = x.shape
        if C != 3:
            raise ValueError(f"x must have 3 (RGB) channels on dim 1, got {C} (shape {tuple(x.shape)})")
        if T < 1 or (T - 1) % tf:
            raise ValueError(f"x has T={T} frames; expected 1 + {tf}k (1, 5, 9, 17, ...)")
        if H % sf or W % sf or H == 0 or W == 0:
            raise ValueError(f"x's height and width must be positive multiples of {sf}, got H={H}, W={W}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"x must be a floating tensor in [-1, 1], got dtype {x.dtype}")
        _check_options(chunk, chunk_mode, tile_size, tile_overlap, sf)
        if x.numel():
            lo, hi = torch.stack(torch.aminmax(x)).tolist()  # one device sync for the range check
            if lo < -1.5 or hi > 1.5:
                warnings.warn(
                    f"encode: x spans [{lo:.3g}, {hi:.3g}]; the ST-VAE expects pixels in [-1, 1]",
                    stacklevel=2,
                )
        x = self._layout(x)

        def one_tile(xt: torch.Tensor) -> torch.Tensor:
            return self._encode_frames(xt, fast, chunk, chunk_mode)

        if tile_size is not None and (H > tile_size or W > tile_size):
            moments = _tiled(one_tile, x, tile_size, tile_size // sf, tile_overlap)
        else:
            moments = one_tile(x)
        mean, logvar = moments.chunk(2, dim=1)
        if image:
            mean, logvar = mean[:, :, 0], logvar[:, :, 0]
        return DiagonalGaussian(mean, logvar)

    def _encode_frames(self, x: torch.Tensor, fast: bool, chunk: int | None, mode: str) -> torch.Tensor:
        tf = self.config.temporal_compression_ratio
        T = x.shape[2]
        if chunk is None or T <= 1 + tf * chunk:
            return self.encoder(x, RunContext(fast=fast))
        step = tf * chunk
        if mode == "overlap":
            outs = []
            for i, s in enumerate(range(0, T - 1, step)):
                m = self.encoder(x[:, :, s : s + step + 1], RunContext(fast=fast))
                outs.append(m if i == 0 else m[:, :, 1:])
            return torch.cat(outs, dim=2)
        stream = Stream(running_stats=mode == "cache")
        outs = []
        for s, e in [(0, 1 + step)] + [(a, min(a + step, T)) for a in range(1 + step, T, step)]:
            outs.append(self.encoder(x[:, :, s:e], RunContext(fast=fast, stream=stream)))
            stream.first = False
        return torch.cat(outs, dim=2)

    # ------------------------------------------------------------------ decode
    def decode(
        self,
        z: torch.Tensor,
        *,
        fast: bool = True,
        chunk: int | None = None,
        chunk_mode: str = "cache",
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
    ) -> torch.Tensor:
        """Pixels [B, 3, 1 + 4(t - 1), 8h, 8w] of VAE latents [B, C, t, h, w] (images [B, 3, 8h, 8w] of [B, C, h, w]).

        The latents are the VAE's own (apply `denormalize_latents` to the J-DiT's). Options as in `encode`;
        chunk counts latent frames and tile_size pixels.
        """
        cfg = self.config
        sf = cfg.spatial_factor
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() not in (4, 5):
            raise ValueError(f"z must be latents [B, C, t, h, w] or image latents [B, C, h, w], got {tuple(z.shape)}")
        image = z.dim() == 4
        if image:
            z = z[:, :, None]
        if z.shape[1] != cfg.latent_channels:
            raise ValueError(f"z must have {cfg.latent_channels} latent channels on dim 1, got {z.shape[1]}")
        if min(z.shape[2:]) < 1:
            raise ValueError(f"z must have at least one latent frame and pixel, got shape {tuple(z.shape)}")
        if not z.dtype.is_floating_point:
            raise ValueError(f"z must be a floating tensor, got dtype {z.dtype}")
        _check_options(chunk, chunk_mode, tile_size, tile_overlap, sf)
        z = self._layout(z)
        h, w = z.shape[-2:]

        def one_tile(zt: torch.Tensor) -> torch.Tensor:
            return self._decode_frames(zt, fast, chunk, chunk_mode)

        if tile_size is not None and (h * sf > tile_size or w * sf > tile_size):
            out = _tiled(one_tile, z, tile_size // sf, tile_size, tile_overlap)
        else:
            out = one_tile(z)
        return out[:, :, 0] if image else out

    def _decode_frames(self, z: torch.Tensor, fast: bool, chunk: int | None, mode: str) -> torch.Tensor:
        tf = self.config.temporal_compression_ratio
        t = z.shape[2]
        if chunk is None or t <= 1 + chunk:
            return self.decoder(z, RunContext(fast=fast))
        B, _, _, h, w = z.shape
        sf = self.config.spatial_factor
        out = None
        if mode == "overlap":
            spans = [(s, min(s + chunk + 1, t), i > 0) for i, s in enumerate(range(0, t - 1, chunk))]
            stream = None
        else:
            spans = [(0, 1 + chunk, False)] + [(a, min(a + chunk, t), False) for a in range(1 + chunk, t, chunk)]
            stream = Stream(running_stats=mode == "cache")
        o = 0
        for s, e, drop_first in spans:
            x = self.decoder(z[:, :, s:e], RunContext(fast=fast, stream=stream))
            if drop_first:
                x = x[:, :, 1:]
            if out is None:  # the clip is written chunk by chunk: no list of pieces and no concatenation
                T = 1 + tf * (t - 1)
                out = torch.empty((B, x.shape[1], T, h * sf, w * sf), dtype=x.dtype, device=x.device)
            out[:, :, o : o + x.shape[2]] = x
            o += x.shape[2]
            if stream is not None:
                stream.first = False
            del x
        return out

    def forward(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        """Reconstruction of x (through the posterior mode, or a sample)."""
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample else post.mode())


_CONFIG_NAMES = {f.name for f in fields(VAEConfig)}


def build_vae(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **overrides) -> STVAE:
    """The ST-VAE; overrides use the published constructor's names (block_out_channels, layers_per_block,
    latent_channels, norm_num_groups, temporal_compression_ratio, norm_eps). device="meta" builds without
    allocating (e.g. to count parameters)."""
    unknown = sorted(set(overrides) - _CONFIG_NAMES)
    if unknown:
        raise ValueError(f"build_vae: unknown option(s) {unknown}; expected some of {sorted(_CONFIG_NAMES)}")
    config = VAEConfig(**{**asdict(VAEConfig()), **overrides})
    if device is None:
        vae = STVAE(config)
    else:
        with torch.device(device):
            vae = STVAE(config)
    if dtype is not None:
        vae.to(dtype)
    return vae.eval()


def latent_frames(frames: int, temporal_compression_ratio: int = 4) -> int:
    """Latent frames of a clip of `frames` = 1 + r k frames."""
    if frames < 1 or (frames - 1) % temporal_compression_ratio:
        raise ValueError(f"frames must be 1 + {temporal_compression_ratio}k, got {frames}")
    return 1 + (frames - 1) // temporal_compression_ratio


__all__ = [
    "STVAE",
    "VAEConfig",
    "DiagonalGaussian",
    "build_vae",
    "latent_frames",
    "LATENT_SHIFT",
    "LATENT_SCALE",
    "PUBLISHED_PARAMETERS",
]
