"""Frechet Inception Distance: an Inception-v3 feature network (2048-d pool features) and the Frechet distance.

The network is written here (no torchvision), with the torchvision `Inception3` module names so that a state
dict of that layout loads as is. Two variants:
- `fid=True` (default): the TensorFlow FID Inception used by the standard FID implementations (the
  `pt_inception-2015-12-05` weights): average pools in the A/C/E blocks exclude padding from the mean, and
  the last block (Mixed_7c) max-pools its pool branch. Use this with those weights for comparable numbers.
- `fid=False`: torchvision's ImageNet Inception-v3 arithmetic (padding-inclusive averages throughout).

Input convention: images `[N, 3, H, W]` in [0, 1]; `InceptionV3Features` resizes to 299x299 (bilinear,
no antialias, as the reference FID code does) unless `resize=False`, and maps to [-1, 1]. The smallest input
the network accepts without resizing is 75x75.

`frechet_distance(mu1, sigma1, mu2, sigma2)` is computed in float64 with eigen-decompositions:
tr(sqrt(S1 S2)) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))), which is exact for PSD covariances (no complex parts,
no iteration) and works for singular ones (fewer images than feature dimensions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lavin_fast.eval.weights import read_state_dict
from lavin_fast.models.checkpoints import check_state_dict

FID_DIM = 2048
MIN_SIZE = 75


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, inference statistics) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor, fid: bool) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int, fid: bool):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x, self.fid))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, fid: bool):
        super().__init__()
        self.fid = fid
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg3(x, self.fid))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, pool: str):
        super().__init__()
        self.pool = pool  # "avg" (padding-inclusive), "avg_fid" (padding-exclusive) or "max"
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            p = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            p = _avg3(x, self.pool == "avg_fid")
        return torch.cat([b1, b3, bd, self.branch_pool(p)], 1)


class InceptionV3Features(nn.Module):
    """Inception-v3 up to the global average pool: `[N, 3, H, W]` in [0, 1] -> `[N, 2048]` features."""

    def __init__(self, fid: bool = True, resize: bool = True):
        super().__init__()
        self.fid = fid
        self.resize = resize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, fid)
        self.Mixed_5c = InceptionA(256, 64, fid)
        self.Mixed_5d = InceptionA(288, 64, fid)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, fid)
        self.Mixed_6c = InceptionC(768, 160, fid)
        self.Mixed_6d = InceptionC(768, 160, fid)
        self.Mixed_6e = InceptionC(768, 192, fid)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg_fid" if fid else "avg")
        self.Mixed_7c = InceptionE(2048, "max" if fid else "avg")
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"x must be float [N, 3, H, W] in [0, 1], got {tuple(x.shape)} {x.dtype}")
        if self.resize:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        elif min(x.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"x must be at least {MIN_SIZE}x{MIN_SIZE} without resizing, got {tuple(x.shape[-2:])}")
        x = x.to(self.Conv2d_1a_3x3.conv.weight.dtype) * 2.0 - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items() if not k.endswith("num_batches_tracked")}


def load_inception(
    path: str | Path | None, device: str | torch.device = "cpu", fid: bool = True, resize: bool = True
) -> InceptionV3Features:
    """Build the FID feature network with the weights in `path` (a torchvision-layout Inception-v3 state dict).

    The classifier (`fc.*`), auxiliary head (`AuxLogits.*`) and `num_batches_tracked` counters are ignored;
    every other tensor must be present with its shape. Raises a ValueError naming `--fid-weights` when no path
    is given: the weights are not bundled and never downloaded."""
    if path is None:
        raise ValueError(
            "FID needs pretrained Inception-v3 weights: pass --fid-weights PATH (a state-dict file in torchvision's "
            "Inception3 layout, e.g. the FID Inception 'pt_inception-2015-12-05' weights; docs/eval.md). "
            "Nothing is downloaded."
        )
    path = Path(path)
    sd = read_state_dict(path, "--fid-weights")
    sd = {
        k: v
        for k, v in sd.items()
        if not (k.startswith("fc.") or k.startswith("AuxLogits.") or k.endswith("num_batches_tracked"))
    }
    model = InceptionV3Features(fid=fid, resize=resize)
    check_state_dict(model.expected_shapes(), sd, source=f"--fid-weights {path}")
    model.load_state_dict(sd, strict=False)
    return model.to(device)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, N-1 normalisation as in the reference FID code) of `[N, D]` features."""
    f = _as_features("features", features)
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)) for Gaussians N(mu1, S1), N(mu2, S2), in float64."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"expected mu1, mu2 [D] and sigma1, sigma2 [D, D]; got {mu1.shape}, {mu2.shape}, {s1.shape}, {s2.shape}"
        )
    # symmetrise against round-off so that eigh sees exactly symmetric matrices
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _as_features(name: str, f: np.ndarray | torch.Tensor) -> np.ndarray:
    f = f.detach().cpu().double().numpy() if isinstance(f, torch.Tensor) else np.asarray(f, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"{name} must be [N >= 2, D] features, got shape {f.shape}")
    return f


def fid_from_features(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """FID between two sets of `[N, D]` features (float64).

    With centred, scaled features A = (a - mean) / sqrt(Na - 1) (so S1 = A^T A) and B likewise,
    tr(sqrt(S1 S2)) equals the sum of the singular values of A B^T (its squared singular values are the
    eigenvalues of A S2 A^T, the non-zero eigenvalues of S1 S2). When Na * Nb <= D^2 (e.g. 1,000 images of
    2048-d features) that [Na, Nb] SVD is cheaper than eigen-decompositions of D x D covariances; otherwise
    `frechet_distance` of the two covariances is used. Both are exact."""
    fa, fb = _as_features("a", a), _as_features("b", b)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"a and b must have the same feature size, got {fa.shape} and {fb.shape}")
    d = fa.shape[1]
    if fa.shape[0] * fb.shape[0] > d * d:
        return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca = (fa - mu_a) / np.sqrt(fa.shape[0] - 1)
    cb = (fb - mu_b) / np.sqrt(fb.shape[0] - 1)
    nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * nuclear)
