"""Depth and surface normals as images: the one encoding that training targets, the sampler's predictions and
the evaluator's decoding share (docs/sampling.md, "Depth and normals as images").

Images here are the model's pixels: float [3, H, W] in [-1, 1] (8-bit files map 0..255 to -1..1).
- Depth: grey, R = G = B = 2 * (d - d_min) / (d_max - d_min) - 1 over the valid pixels (near is dark, far is
  bright). Relative depth only: evaluation aligns scale and shift by least squares, so the normalisation
  does not matter. Decoding is the channel mean mapped to [0, 1]. A colour-mapped rendering does not decode
  this way; `image_to_depth` refuses an image whose channels differ (mean spread over `MAX_GREY_SPREAD`).
- Normals: unit vectors (x, y, z) stored as the pixel values themselves, image = n (8-bit: (n + 1) * 127.5);
  decoding renormalises.
"""

from __future__ import annotations

import torch

# mean |channel - channel mean| above which a "depth" image is a colour rendering, not grey (in [-1, 1] units;
# 8-bit rounding and a model's small colour noise stay well below it)
MAX_GREY_SPREAD = 0.05


def _check(name: str, x: torch.Tensor, channels: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != channels:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a tensor [{channels}, H, W], got {got}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: holds NaN or Inf values")


def depth_to_image(depth: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Depth [1, H, W] (any positive scale) -> grey image [3, H, W] in [-1, 1], min-max over `valid` pixels
    (default: depth > 0); invalid pixels are black."""
    _check("depth", depth, 1)
    d = depth.float()
    ok = (d > 0) if valid is None else valid.to(torch.bool).reshape(d.shape)
    if not bool(ok.any()):
        raise ValueError("depth: no valid pixel (depth > 0)")
    lo, hi = d[ok].min(), d[ok].max()
    unit = torch.where(ok, (d - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(d))
    return (unit * 2 - 1).expand(3, -1, -1).contiguous()


def grey_spread(img: torch.Tensor) -> float:
    """Mean absolute deviation of the channels from their mean ([-1, 1] units): 0 for a grey image."""
    return float((img.float() - img.float().mean(0, keepdim=True)).abs().mean())


def image_to_depth(img: torch.Tensor, source: str = "image", require_grey: bool = True) -> torch.Tensor:
    """Grey image [3, H, W] in [-1, 1] -> relative depth [1, H, W] in [0, 1] (the channel mean).

    Raises ValueError naming `source` for a colour image (e.g. a colour-mapped depth rendering) unless
    require_grey is False (the sampler's own prediction: decoded as is)."""
    _check(source, img, 3)
    spread = grey_spread(img) if require_grey else 0.0
    if spread > MAX_GREY_SPREAD:
        raise ValueError(
            f"{source}: not a grey depth image (channels differ by {spread:.3f} on average, at most "
            f"{MAX_GREY_SPREAD} allowed); depth is encoded as grey R = G = B, not a colour map (docs/sampling.md)"
        )
    return (img.float().mean(0, keepdim=True) + 1) / 2


def normals_to_image(normals: torch.Tensor) -> torch.Tensor:
    """Normal vectors [3, H, W] -> image [3, H, W] in [-1, 1] (the unit vectors themselves)."""
    _check("normals", normals, 3)
    n = normals.float()
    return (n / n.norm(dim=0, keepdim=True).clamp_min(1e-12)).clamp(-1, 1)


def image_to_normals(img: torch.Tensor) -> torch.Tensor:
    """Image [3, H, W] in [-1, 1] -> unit normal vectors [3, H, W] (zero where the pixel is (0, 0, 0))."""
    _check("image", img, 3)
    n = img.float()
    return n / n.norm(dim=0, keepdim=True).clamp_min(1e-12)
