"""Pixel metrics of the paper's evaluation (seed B.2) on batched torch tensors, any device.

Conventions (shared by every function here):
- Images are float tensors `[N, C, H, W]` in **[0, 1]** (C = 3 for RGB; C = 1 allowed where it makes sense).
  `lavin_fast.eval.tasks` converts the model's [-1, 1] / uint8 files to this range before calling.
- Depth maps are `[N, H, W]` (or `[N, 1, H, W]`) of any positive unit; `valid` masks are bool of the same shape.
- Normal maps are `[N, 3, H, W]` vectors (not necessarily unit length); `decode_normals` turns RGB renderings
  in [0, 1] into vectors with n = 2 * rgb - 1.
- Every function returns one value per image (`[N]`, float32 on the input's device) unless it says otherwise;
  reductions over a data set are done by the caller (`tasks.py`), so per-image numbers can be reported too.
Statistics that need precision (least-squares alignment, SSIM moments) are computed in float64 where it matters.
"""

from __future__ import annotations

import math

import torch

# The standard SSIM constants (Wang et al. 2004): an 11x11 Gaussian window of sigma 1.5.
SSIM_SIGMA = 1.5
SSIM_WIN = 11
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_images(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}")


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    _check_images("pred", pred)
    _check_images("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image over all channels and pixels (images in [0, 1]) -> [N]."""
    _check_pair(pred, target)
    return (pred.double() - target.double()).pow(2).flatten(1).mean(1).float()


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range^2 / MSE) -> [N] (inf where identical)."""
    _check_pair(pred, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    err = (pred.double() - target.double()).pow(2).flatten(1).mean(1)
    return (10.0 * torch.log10(data_range**2 / err)).float()


def gaussian_window_1d(
    size: int = SSIM_WIN, sigma: float = SSIM_SIGMA, dtype=torch.float64, device=None
) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (the separable factor of SSIM's window)."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _valid_filter(x: torch.Tensor, taps: list[float], dim: int) -> torch.Tensor:
    """Correlate `x` with 1-D `taps` along `dim`, keeping only positions where the whole window fits."""
    n = x.shape[dim] - len(taps) + 1
    out = x.narrow(dim, 0, n) * taps[0]
    for k in range(1, len(taps)):
        out.add_(x.narrow(dim, k, n), alpha=taps[k])
    return out


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = SSIM_WIN,
    sigma: float = SSIM_SIGMA,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> torch.Tensor:
    """Mean SSIM per image with a Gaussian window -> [N].

    Local means/variances/covariance use a separable `win_size` x `win_size` Gaussian (population statistics,
    i.e. no N/(N-1) correction); the SSIM map is averaged over the positions where the whole window fits
    ("valid" region), and over channels. This is the definition of Wang et al. and matches
    `skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=..., channel_axis=...)`, which crops the same border before averaging.
    """
    _check_pair(pred, target)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if win_size % 2 != 1 or win_size < 3:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    n, c, h, w = pred.shape
    if h < win_size or w < win_size:
        raise ValueError(f"images must be at least {win_size}x{win_size} for SSIM, got {h}x{w}")
    g = gaussian_window_1d(win_size, sigma, device=pred.device).tolist()
    x = pred.double()
    y = target.double()
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    # separable "valid" filtering as sums of shifted slices: exact, and much faster in float64 than a grouped
    # conv2d (which has no fast float64 CPU path); float64 because the moments below subtract close numbers
    filt = _valid_filter(_valid_filter(stack, g, -1), g, -2)
    mx, my, mxx, myy, mxy = filt.split(c, dim=1)
    vx = mxx - mx * mx
    vy = myy - my * my
    cxy = mxy - mx * my
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).float()


def _depth_like(name: str, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"{name} must be [N, H, W] or [N, 1, H, W], got shape {tuple(x.shape)}")
    return x


def affine_align(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image least-squares scale s and shift t minimising sum_valid (s * pred + t - target)^2.

    Shapes `[N, H, W]`; returns (s, t), each `[N]` float64. Solved in closed form from the 2x2 normal equations
    in float64. An image whose valid predictions are constant (or with fewer than 2 valid pixels) has no unique
    fit: it gets s = 0 and t = mean(target) (the best constant), and at least one valid pixel is required.
    """
    p = pred.double() * valid
    g = target.double() * valid
    m = valid.double()
    cnt = m.flatten(1).sum(1)
    if bool((cnt < 1).any()):
        bad = torch.nonzero(cnt < 1).flatten().tolist()
        raise ValueError(f"valid must select at least one pixel per image; images {bad} have none")
    sp = p.flatten(1).sum(1)
    sg = g.flatten(1).sum(1)
    spp = (p * p).flatten(1).sum(1)
    spg = (p * g).flatten(1).sum(1)
    det = cnt * spp - sp * sp
    # relative test: det is n^2 * var(pred); below this the fit is ill-posed
    degenerate = det <= 1e-12 * cnt * cnt * torch.clamp(spp / cnt, min=1e-300)
    safe = torch.where(degenerate, torch.ones_like(det), det)
    s = (cnt * spg - sp * sg) / safe
    t = (spp * sg - sp * spg) / safe
    s = torch.where(degenerate, torch.zeros_like(s), s)
    t = torch.where(degenerate, sg / cnt, t)
    return s, t


def aligned_depth_errors(
    pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    space: str = "depth",
    min_depth: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """AbsRel and MSE after per-image affine least-squares alignment (the affine-invariant NYUv2 protocol).

    pred: relative depth `[N, H, W]` (any affine transform of the truth); target: ground-truth depth;
    valid: optional bool mask, intersected with `target > 0` (pixels without ground truth).
    space: "depth" aligns pred to target directly; "disparity" treats pred as affine in inverse depth
    (MiDaS-style: aligned to 1/target, then inverted, clamped at `min_depth`, and compared in depth).
    Returns {"abs_rel": [N], "mse": [N], "scale": [N], "shift": [N]}: AbsRel = mean(|aligned - gt| / gt) and
    MSE = mean((aligned - gt)^2) over valid pixels, in the target's unit.
    """
    pred = _depth_like("pred", pred)
    target = _depth_like("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if space not in ("depth", "disparity"):
        raise ValueError(f"space must be 'depth' or 'disparity', got {space!r}")
    mask = target > 0
    if valid is not None:
        valid = _depth_like("valid", valid)
        if valid.shape != target.shape:
            raise ValueError(f"valid must have the target's shape {tuple(target.shape)}, got {tuple(valid.shape)}")
        mask = mask & valid.bool()
    gt = target.double()
    if space == "depth":
        s, t = affine_align(pred, gt, mask)
        aligned = s.view(-1, 1, 1) * pred.double() + t.view(-1, 1, 1)
    else:
        inv = torch.where(mask, 1.0 / gt.clamp(min=1e-12), torch.zeros_like(gt))
        s, t = affine_align(pred, inv, mask)
        disp = s.view(-1, 1, 1) * pred.double() + t.view(-1, 1, 1)
        aligned = 1.0 / disp.clamp(min=1.0 / 1e12)
        aligned = aligned.clamp(min=min_depth)
    m = mask.double()
    cnt = m.flatten(1).sum(1)
    safe_gt = torch.where(mask, gt, torch.ones_like(gt))
    abs_rel = ((aligned - gt).abs() / safe_gt * m).flatten(1).sum(1) / cnt
    sq = ((aligned - gt) ** 2 * m).flatten(1).sum(1) / cnt
    return {"abs_rel": abs_rel.float(), "mse": sq.float(), "scale": s.float(), "shift": t.float()}


def decode_normals(rgb: torch.Tensor) -> torch.Tensor:
    """RGB rendering in [0, 1] `[N, 3, H, W]` -> normal vectors n = 2 * rgb - 1 (not renormalised)."""
    _check_images("rgb", rgb)
    if rgb.shape[1] != 3:
        raise ValueError(f"rgb must have 3 channels, got shape {tuple(rgb.shape)}")
    return rgb * 2.0 - 1.0


def angular_error(
    pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel angle in degrees between normal vectors `[N, 3, H, W]` (both renormalised to unit length).

    Returns (angles `[N, H, W]` float64, valid `[N, H, W]` bool). A pixel is valid when the target vector has
    length within [0.5, 1.5] (a decoded unit normal; gray (0, 0, 0) and black (-1, -1, -1) renderings are
    "no ground truth") and the prediction is non-zero, intersected with `valid` if given.
    """
    _check_pair(pred, target)
    if pred.shape[1] != 3:
        raise ValueError(f"normals must have 3 channels, got shape {tuple(pred.shape)}")
    p = pred.double()
    g = target.double()
    pn = p.norm(dim=1)
    gn = g.norm(dim=1)
    mask = (gn >= 0.5) & (gn <= 1.5) & (pn > eps)
    if valid is not None:
        valid = _depth_like("valid", valid)
        if valid.shape != mask.shape:
            raise ValueError(f"valid must be [N, H, W] = {tuple(mask.shape)}, got {tuple(valid.shape)}")
        mask = mask & valid.bool()
    cos = (p * g).sum(1) / (pn.clamp(min=eps) * gn.clamp(min=eps))
    ang = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
    return ang, mask


def mean_angular_error(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean angle in degrees over each image's valid pixels -> [N] (NaN for an image with none)."""
    ang, mask = angular_error(pred, target, valid)
    m = mask.double()
    return ((ang * m).flatten(1).sum(1) / m.flatten(1).sum(1)).float()


def rgb_to_mask(rgb: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binary mask from a predicted (or ground-truth) RGB map in [0, 1]: mean over channels > threshold.

    `[N, C, H, W]` -> bool `[N, H, W]`. The renderings are white foreground on black background, so the
    channel mean is the foreground's brightness and 0.5 is the midpoint between the two colours.
    """
    _check_images("rgb", rgb)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    return rgb.mean(1) > threshold


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Foreground IoU of binary masks `[N, H, W]` (bool).

    Returns (iou [N] float32, intersection [N] int64, union [N] int64). When both masks are empty the
    prediction is perfect and the IoU is 1.
    """
    for name, m in (("pred", pred), ("target", target)):
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.dtype != torch.bool:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            dtype = m.dtype if isinstance(m, torch.Tensor) else None
            raise ValueError(f"{name} must be a bool tensor [N, H, W], got {shape} {dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    inter = (pred & target).flatten(1).sum(1)
    union = (pred | target).flatten(1).sum(1)
    iou = torch.where(
        union > 0, inter.double() / union.clamp(min=1).double(), torch.ones_like(union, dtype=torch.float64)
    )
    return iou.float(), inter, union


def miou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of the foreground IoU of binary masks (bool `[N, H, W]`)."""
    iou, _, _ = mask_iou(pred, target)
    return float(iou.double().mean())


def psnr_from_mse(err: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a mean squared error (inf for zero error)."""
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)
