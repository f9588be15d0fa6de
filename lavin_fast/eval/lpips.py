"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

The network is written here (no torchvision): an AlexNet or VGG-16 feature stack, tapped after five ReLUs;
each tap is unit-normalised along channels, the squared difference of the two images' taps is weighted by a
non-negative 1x1 linear head, averaged over space, and the five layers are summed.

Weights are never downloaded: `load_lpips(path)` reads one state-dict file (see docs/eval.md for how to build
it from torchvision's ImageNet backbone and the LPIPS v0.1 linear heads). Accepted key layouts:
- torchvision backbone names `features.<i>.weight/bias` plus heads `lin<k>.model.1.weight` (the LPIPS file), or
- the `lpips.LPIPS` module's own state dict (`net.slice<j>.<i>.weight`, `lin<k>.model.1.weight`,
  `scaling_layer.shift/scale`).
The backbone (alex or vgg) is recognised from the tensor names.

Input convention: images `[N, 3, H, W]` in [0, 1] (converted to LPIPS's [-1, 1] internally).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lavin_fast.eval.weights import read_state_dict
from lavin_fast.models.checkpoints import check_state_dict

# Layer specs in torchvision's `features` indexing: ("conv", cin, cout, kernel, stride, pad) | ("relu",) |
# ("pool", kernel, stride). TAPS are the feature indices after which LPIPS reads a layer.
_ALEX = [
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
    ("conv", 192, 384, 3, 1, 1), ("relu",),
    ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
]  # fmt: skip
_ALEX_TAPS = (1, 4, 7, 9, 11)


def _vgg16_spec() -> list[tuple]:
    spec: list[tuple] = []
    cin = 3
    for i, (cout, reps) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if i:
            spec.append(("pool", 2, 2))
        for _ in range(reps):
            spec += [("conv", cin, cout, 3, 1, 1), ("relu",)]
            cin = cout
    return spec


_VGG = _vgg16_spec()
_VGG_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

NETS: dict[str, tuple[list[tuple], tuple[int, ...]]] = {"alex": (_ALEX, _ALEX_TAPS), "vgg": (_VGG, _VGG_TAPS)}

# LPIPS's input scaling (ImageNet statistics expressed for [-1, 1] inputs): fixed constants, not learned.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class _Features(nn.Module):
    def __init__(self, spec: list[tuple], taps: tuple[int, ...]):
        super().__init__()
        self.spec = spec
        self.taps = taps
        self.features = nn.ModuleDict()
        for i, layer in enumerate(spec):
            if layer[0] == "conv":
                _, cin, cout, k, s, p = layer
                self.features[str(i)] = nn.Conv2d(cin, cout, k, stride=s, padding=p)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.spec[: self.taps[-1] + 1]):
            if layer[0] == "conv":
                x = self.features[str(i)](x)
            elif layer[0] == "relu":
                x = F.relu(x)
            else:
                x = F.max_pool2d(x, layer[1], layer[2])
            if i in self.taps:
                out.append(x)
        return out

    def min_size(self) -> int:
        """Smallest square input for which every tapped layer still has at least one pixel."""
        for size in range(1, 1024):
            h = size
            for layer in self.spec[: self.taps[-1] + 1]:
                if layer[0] == "conv":
                    h = (h + 2 * layer[5] - layer[3]) // layer[4] + 1
                elif layer[0] == "pool":
                    h = (h - layer[1]) // layer[2] + 1
                if h < 1:
                    break
            else:
                return size
        raise AssertionError("unreachable: LPIPS backbones accept small inputs")

    def channels(self) -> list[int]:
        chans, c = [], 3
        for i, layer in enumerate(self.spec):
            if layer[0] == "conv":
                c = layer[2]
            if i in self.taps:
                chans.append(c)
        return chans


class LPIPS(nn.Module):
    """LPIPS distance. `forward(x, y)` with images `[N, 3, H, W]` in [0, 1] -> distances `[N]`."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {sorted(NETS)}, got {net!r}")
        self.net_name = net
        spec, taps = NETS[net]
        self.net = _Features(spec, taps)
        self._min_size = self.net.min_size()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.net.channels())
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name, t in (("x", x), ("y", y)):
            if t.dim() != 4 or t.shape[1] != 3 or not t.is_floating_point():
                raise ValueError(f"{name} must be float [N, 3, H, W] in [0, 1], got {tuple(t.shape)} {t.dtype}")
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < self._min_size:
            raise ValueError(
                f"LPIPS-{self.net_name} needs images of at least {self._min_size}x{self._min_size}, "
                f"got {tuple(x.shape[-2:])}"
            )
        dtype = self.shift.dtype
        both = torch.cat([x, y]).to(dtype) * 2.0 - 1.0
        both = (both - self.shift) / self.scale
        n = x.shape[0]
        total = torch.zeros(n, dtype=dtype, device=x.device)
        for feat, lin in zip(self.net(both), self.lins, strict=True):
            # unit-normalise along channels (LPIPS's eps sits outside the square root)
            feat = feat / (feat.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            diff = (feat[:n] - feat[n:]).pow(2)
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total

    # --- weights -------------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """The file layout `load_lpips` expects (torchvision backbone names + LPIPS head names)."""
        out = {}
        for key, conv in self.net.features.items():
            out[f"features.{key}.weight"] = tuple(conv.weight.shape)
            out[f"features.{key}.bias"] = tuple(conv.bias.shape)
        for k, lin in enumerate(self.lins):
            out[f"lin{k}.model.1.weight"] = tuple(lin.weight.shape)
        return out

    def load_file_state_dict(self, sd: Mapping[str, torch.Tensor], source: str = "LPIPS weights") -> None:
        """Load a state dict in the file layout (after `normalize_lpips_keys`); strict on names and shapes."""
        check_state_dict(self.expected_shapes(), sd, source)
        with torch.no_grad():
            for key, conv in self.net.features.items():
                conv.weight.copy_(sd[f"features.{key}.weight"])
                conv.bias.copy_(sd[f"features.{key}.bias"])
            for k, lin in enumerate(self.lins):
                lin.weight.copy_(sd[f"lin{k}.model.1.weight"])


def normalize_lpips_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an `lpips.LPIPS` module state dict (`net.slice<j>.<i>.*`, `lins.<k>.*`) onto the file layout
    (`features.<i>.*`, `lin<k>.*`) and drop the fixed scaling-layer buffers. A dict already in the file layout passes through unchanged."""
    out = {}
    for k, v in sd.items():
        if k.startswith("scaling_layer."):
            continue
        parts = k.split(".")
        if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):
            k = "features." + ".".join(parts[2:])
        elif parts[0] == "lins" and len(parts) > 1:
            # lpips.LPIPS registers its heads twice (lin<k> and lins.<k>); the copies are the same tensors
            k = f"lin{parts[1]}." + ".".join(parts[2:])
        out[k] = v
    return out


def detect_net(sd: Mapping[str, torch.Tensor]) -> str:
    """'alex' or 'vgg' from the backbone's tensor names (AlexNet's first conv is 11x11, VGG has 13 convs)."""
    w = sd.get("features.0.weight")
    if w is not None and tuple(w.shape[-2:]) == (11, 11):
        return "alex"
    if "features.28.weight" in sd:
        return "vgg"
    raise ValueError(
        "LPIPS weights: cannot tell the backbone from the tensor names (expected torchvision-style "
        "'features.0.weight' of an AlexNet (11x11) or VGG-16 ('features.28.weight'); see docs/eval.md)"
    )


def load_lpips(path: str | Path | None, device: str | torch.device = "cpu") -> LPIPS:
    """Build LPIPS with the weights in `path` (a state-dict file: .pth/.pt or .safetensors).

    Raises a ValueError naming `--lpips-weights` when no path is given: the weights are not bundled and never
    downloaded."""
    if path is None:
        raise ValueError(
            "LPIPS needs pretrained weights: pass --lpips-weights PATH (a state-dict file with the AlexNet or "
            "VGG-16 backbone and the LPIPS linear heads; docs/eval.md shows how to build it). Nothing is downloaded."
        )
    path = Path(path)
    sd = normalize_lpips_keys(read_state_dict(path, "--lpips-weights"))
    model = LPIPS(detect_net(sd))
    model.load_file_state_dict(sd, source=f"--lpips-weights {path}")
    return model.to(device)
