"""The published ST-VAE structure, re-implemented plainly: the baseline of the VAE benchmarks and a cross-check.

Deliberately written the way the published code runs it: NCDHW tensors, the causal time padding and the
spatial padding built as padded copies with F.pad, separate nn.GroupNorm and SiLU modules, nearest
interpolation through F.interpolate, no one-frame fold, no fusion. Its state-dict names are the
published ones (the "st-vae" tensors of the checkpoint manifest), so the same weights load into it and
into lavin_fast.models.vae.STVAE. Numerics follow docs/numerics.md (ST-VAE).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainCausalConv3d(nn.Module):
    """Front-pads time by repeating the first frame kt-1 times and H/W with zeros, then a Conv3d."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(cin, cout, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        if k > 1:
            first = x[:, :, :1].repeat(1, 1, k - 1, 1, 1)
            x = torch.cat([first, x], dim=2)
            x = F.pad(x, (k // 2, k // 2, k // 2, k // 2, 0, 0))
        return self.conv(x)


class PlainSpatialNorm(nn.Module):
    """GroupNorm(f) * conv_y(zq') + conv_b(zq'); zq' is zq resized (nearest) to f's (T, H, W)."""

    def __init__(self, channels: int, zq_channels: int, groups: int, eps: float) -> None:
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, channels, eps=eps)
        self.conv_y = PlainCausalConv3d(zq_channels, channels, 1)
        self.conv_b = PlainCausalConv3d(zq_channels, channels, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        if f.shape[2] > 1 and f.shape[2] % 2 == 1:
            z_first = F.interpolate(zq[:, :, :1], size=f[:, :, :1].shape[-3:])
            z_rest = F.interpolate(zq[:, :, 1:], size=f[:, :, 1:].shape[-3:])
            zq = torch.cat([z_first, z_rest], dim=2)
        else:
            zq = F.interpolate(zq, size=f.shape[-3:])
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class PlainResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, eps: float, zq_channels: int | None = None) -> None:
        super().__init__()
        if zq_channels is None:
            self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
            self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        else:
            self.norm1 = PlainSpatialNorm(cin, zq_channels, groups, eps)
            self.norm2 = PlainSpatialNorm(cout, zq_channels, groups, eps)
        self.spatial = zq_channels is not None
        self.act = nn.SiLU()
        self.conv1 = PlainCausalConv3d(cin, cout)
        self.conv2 = PlainCausalConv3d(cout, cout)
        if cin != cout:
            self.conv_shortcut = nn.Conv3d(cin, cout, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x, zq) if self.spatial else self.norm1(x)
        h = self.conv1(self.act(h))
        h = self.norm2(h, zq) if self.spatial else self.norm2(h)
        h = self.conv2(self.act(h))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        return x + h


class PlainDownsample(nn.Module):
    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.compress_time:
            x = x.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, t)
            if t % 2 == 1:
                first, rest = x[..., :1], x[..., 1:]
                if rest.shape[-1] > 0:
                    rest = F.avg_pool1d(rest, kernel_size=2, stride=2)
                x = torch.cat([first, rest], dim=-1)
            else:
                x = F.avg_pool1d(x, kernel_size=2, stride=2)
            t = x.shape[-1]
            x = x.reshape(b, h, w, c, t).permute(0, 3, 4, 1, 2)
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.conv(F.pad(x, (0, 1, 0, 1)))
        return x.reshape(b, t, c, x.shape[-2], x.shape[-1]).permute(0, 2, 1, 3, 4)


class PlainUpsample(nn.Module):
    def __init__(self, channels: int, compress_time: bool) -> None:
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compress_time and x.shape[2] > 1:
            first = F.interpolate(x[:, :, 0], scale_factor=2.0, mode="nearest")[:, :, None]
            rest = F.interpolate(x[:, :, 1:], scale_factor=2.0, mode="nearest")
            x = torch.cat([first, rest], dim=2)
        else:
            b, c, t, h, w = x.shape
            x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = x.reshape(b, t, c, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)
        b, c, t, h, w = x.shape
        x = self.conv(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        return x.reshape(b, t, c, h, w).permute(0, 2, 1, 3, 4)


class _Level(nn.Module):
    pass


class PlainEncoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], layers: int, latent: int, groups: int, eps: float, tlevels: int):
        super().__init__()
        self.conv_in = PlainCausalConv3d(3, channels[0])
        self.down_blocks = nn.ModuleList()
        cin = channels[0]
        for i, cout in enumerate(channels):
            level = _Level()
            level.resnets = nn.ModuleList(
                [PlainResnetBlock(cin if j == 0 else cout, cout, groups, eps) for j in range(layers)]
            )
            if i < len(channels) - 1:
                level.downsamplers = nn.ModuleList([PlainDownsample(cout, compress_time=i < tlevels)])
            self.down_blocks.append(level)
            cin = cout
        self.mid_block = _Level()
        self.mid_block.resnets = nn.ModuleList([PlainResnetBlock(cin, cin, groups, eps) for _ in range(2)])
        self.norm_out = nn.GroupNorm(groups, cin, eps=eps)
        self.act = nn.SiLU()
        self.conv_out = PlainCausalConv3d(cin, 2 * latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            for block in level.resnets:
                h = block(h)
            if hasattr(level, "downsamplers"):
                h = level.downsamplers[0](h)
        for block in self.mid_block.resnets:
            h = block(h)
        return self.conv_out(self.act(self.norm_out(h)))


class PlainDecoder(nn.Module):
    def __init__(self, channels: tuple[int, ...], layers: int, latent: int, groups: int, eps: float, tlevels: int):
        super().__init__()
        rev = list(reversed(channels))
        self.conv_in = PlainCausalConv3d(latent, rev[0])
        self.mid_block = _Level()
        self.mid_block.resnets = nn.ModuleList(
            [PlainResnetBlock(rev[0], rev[0], groups, eps, latent) for _ in range(2)]
        )
        self.up_blocks = nn.ModuleList()
        cin = rev[0]
        for i, cout in enumerate(rev):
            level = _Level()
            level.resnets = nn.ModuleList(
                [PlainResnetBlock(cin if j == 0 else cout, cout, groups, eps, latent) for j in range(layers + 1)]
            )
            if i < len(rev) - 1:
                level.upsamplers = nn.ModuleList([PlainUpsample(cout, compress_time=i < tlevels)])
            self.up_blocks.append(level)
            cin = cout
        self.norm_out = PlainSpatialNorm(cin, latent, groups, eps)
        self.act = nn.SiLU()
        self.conv_out = PlainCausalConv3d(cin, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid_block.resnets:
            h = block(h, z)
        for level in self.up_blocks:
            for block in level.resnets:
                h = block(h, z)
            if hasattr(level, "upsamplers"):
                h = level.upsamplers[0](h)
        return self.conv_out(self.act(self.norm_out(h, z)))


class PublishedVAE(nn.Module):
    """encode(x) -> (mean, logvar) for x [B, 3, T, H, W]; decode(z) -> [B, 3, T', H', W'] (no latent scaling)."""

    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (128, 256, 256, 512),
        layers_per_block: int = 3,
        latent_channels: int = 16,
        norm_num_groups: int = 32,
        temporal_compression_ratio: int = 4,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        tlevels = int(temporal_compression_ratio).bit_length() - 1
        args = (tuple(block_out_channels), layers_per_block, latent_channels, norm_num_groups, norm_eps, tlevels)
        self.encoder = PlainEncoder(*args)
        self.decoder = PlainDecoder(*args)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def randomize_vae_(model: torch.nn.Module) -> torch.nn.Module:
    """Benchmark weights: fan-in scaled convs, GroupNorm weights near 1, small biases (keeps the
    activations of a random ST-VAE in a realistic range; both benchmarks use it)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, (1.0 / p[0].numel()) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0, 0.1)
    return model
