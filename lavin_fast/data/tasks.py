"""Task builders for the tasks whose labels are computed from the image (the paper's Table 2, the
OpenCV / Albumentations rows): each maps a clean image to an (input, target) pair.

Public API (also used by `lavin_fast.eval` to regenerate benchmark sets):

    COMPUTED_TASKS: dict[str, TaskBuilder]      # name -> builder
    build_pair(task, image, generator) -> (input, target)      # image [3, H, W] in [-1, 1]
    build_pairs(task, images, generator) -> (inputs, targets)  # images [B, 3, H, W] in [-1, 1]

Every builder is plain PyTorch: it runs on whatever device the images are on (CUDA on a GPU), and
all random parameters are drawn from `generator`, a CPU `torch.Generator`, before any work, so the
same seed gives the same pair on CPU and GPU (up to floating-point rounding of the convolutions).
Outputs are float32 in [-1, 1], same shape and device as the input.

Tasks and conventions (sizes quoted at 512 px scale linearly with the image's shorter side):
- edge_detection: input = image, target = Canny edges (OpenCV's algorithm: 3x3 Sobel on the
  grayscale in 0..255, L1 magnitude, non-maximum suppression, hysteresis thresholds 100 / 200),
  white (1) on black (-1), three equal channels.
- colorization: input = grayscale (ITU-R 601 luma, OpenCV's weights) in three equal channels,
  target = image.
- grayscale: the reverse of colorization: input = image, target = its grayscale in three equal channels.
- inpainting: input = image with a 128x128 box (at 512 px) filled with black (-1), target = image.
- deraining: input = image with synthetic rain (slanted bright streaks, a light blur and a
  darkening, after Albumentations' RandomRain), target = image.
- de_motion_blur: input = image convolved with a linear motion kernel (random angle, length
  9..25 px at 512), target = image.
- de_glass_blur: input = glass blur (Gaussian blur sigma 0.7, a local shuffle by random offsets of
  up to 4 px at 512 for 2 iterations, Gaussian blur; after Albumentations' GlassBlur, with
  continuous offsets sampled bilinearly instead of integer swaps), target = image.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
TaskBuilder = Callable[[Tensor, torch.Generator], tuple[Tensor, Tensor]]

# ITU-R BT.601 luma weights, as OpenCV's cvtColor(RGB2GRAY)
_LUMA = (0.299, 0.587, 0.114)


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected shape [B, 3, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor in [-1, 1], got dtype {images.dtype}")
    if min(images.shape[-2:]) < 8:
        raise ValueError(f"{name}: expected H, W >= 8, got {tuple(images.shape[-2:])}")


def _scale(images: Tensor) -> float:
    """Size factor relative to the 512 px the published settings refer to."""
    return min(images.shape[-2:]) / 512.0


def grayscale(images: Tensor) -> Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma (same range as the input)."""
    w = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def _gaussian_taps(sigma: float) -> list[float]:
    radius = max(1, int(math.ceil(3 * sigma)))
    k = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-radius, radius + 1)]
    total = sum(k)
    return [v / total for v in k]


def filter1d(x: Tensor, taps: list[float], dim: int, mode: str = "reflect") -> Tensor:
    """Correlate [N, C, H, W] with `taps` (odd count, centred) along dim -1 (W) or -2 (H), padding
    with `mode`. Shifted multiply-adds: on the CPU about 10x faster than a one-channel conv2d
    with a 1-D kernel (measured), and plain elementwise kernels on the GPU."""
    r = len(taps) // 2
    pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
    z = F.pad(x, pad, mode=mode)
    n = x.shape[dim]
    out = z.narrow(dim, 0, n) * taps[0]
    for i in range(1, len(taps)):
        if taps[i] != 0.0:
            out.add_(z.narrow(dim, i, n), alpha=taps[i])
    return out


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur (radius ceil(3 sigma)) with reflect padding, per channel."""
    taps = _gaussian_taps(sigma)
    return filter1d(filter1d(images, taps, -1), taps, -2)


# ---------------------------------------------------------------------------------------------
# Canny


def canny(images: Tensor, low: float = 100.0, high: float = 200.0) -> Tensor:
    """Canny edge map of [B, 3, H, W] images in [-1, 1] -> bool [B, 1, H, W].

    OpenCV's algorithm on the 0..255 grayscale: 3x3 Sobel, L1 gradient magnitude, non-maximum
    suppression along the gradient direction quantised to 0/45/90/135 degrees, then hysteresis:
    pixels above `high` are edges, pixels above `low` become edges when 8-connected to an edge.
    """
    _check_images(images)
    if not 0 <= low <= high:
        raise ValueError(f"canny: expected 0 <= low <= high, got low={low}, high={high}")
    gray = (grayscale(images.float()) + 1) * 127.5
    # OpenCV rounds the grayscale to uint8 before Canny
    gray = gray.round().clamp(0, 255)
    # 3x3 Sobel = [-1, 0, 1] along one axis times [1, 2, 1] along the other (replicated border)
    gx = filter1d(filter1d(gray, [-1.0, 0.0, 1.0], -1, "replicate"), [1.0, 2.0, 1.0], -2, "replicate")
    gy = filter1d(filter1d(gray, [-1.0, 0.0, 1.0], -2, "replicate"), [1.0, 2.0, 1.0], -1, "replicate")
    mag = gx.abs() + gy.abs()

    # direction bins: 0 = horizontal gradient (compare left/right), 1 = 45 deg, 2 = vertical, 3 = 135 deg
    ax, ay = gx.abs(), gy.abs()
    tan22 = math.tan(math.radians(22.5))
    horiz = ay <= tan22 * ax
    vert = ax <= tan22 * ay
    same_sign = (gx * gy) > 0
    m = F.pad(mag, (1, 1, 1, 1))

    def sh(dy: int, dx: int) -> Tensor:
        h, w = mag.shape[-2:]
        return m[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    # image rows grow downwards: gx*gy > 0 means the gradient points along the main diagonal
    n1 = torch.where(horiz, sh(0, -1), torch.where(vert, sh(-1, 0), torch.where(same_sign, sh(-1, -1), sh(-1, 1))))
    n2 = torch.where(horiz, sh(0, 1), torch.where(vert, sh(1, 0), torch.where(same_sign, sh(1, 1), sh(1, -1))))
    # OpenCV: strictly greater than one neighbour, at least equal to the other
    keep = (mag > low) & (mag > n1) & (mag >= n2)
    strong = keep & (mag > high)
    weak = keep
    # hysteresis: grow the strong set through 8-connected weak pixels until nothing changes
    # (strong is a subset of weak, so dilate-and-mask keeps every edge found so far)
    edges = strong
    for _ in range(gray.shape[-1] * gray.shape[-2]):
        grown = edges
        for _ in range(4):  # a few steps between the (synchronising) convergence checks
            grown = _dilate3x3(grown) & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def _dilate3x3(mask: Tensor) -> Tensor:
    """8-neighbourhood dilation of a bool [N, 1, H, W] mask (separable ORs of shifted copies)."""
    h = mask.clone()
    h[..., 1:] |= mask[..., :-1]
    h[..., :-1] |= mask[..., 1:]
    v = h.clone()
    v[..., 1:, :] |= h[..., :-1, :]
    v[..., :-1, :] |= h[..., 1:, :]
    return v


def edge_detection(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _check_images(images)
    edges = canny(images)
    target = (edges.to(images.dtype) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return images.clone(), target


def colorization(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _check_images(images)
    return grayscale(images).expand(-1, 3, -1, -1).contiguous(), images.clone()


def grayscale_task(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    inp, target = colorization(images, generator)
    return target, inp


def inpainting_box(height: int, width: int, generator: torch.Generator, box: int = 128) -> tuple[int, int, int, int]:
    """(top, left, box_h, box_w) of the masked box: `box` px at 512 px, scaled with the image."""
    bh = max(1, min(height, round(box * height / 512)))
    bw = max(1, min(width, round(box * width / 512)))
    top = int(torch.randint(0, height - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - bw + 1, (1,), generator=generator))
    return top, left, bh, bw


def inpainting(images: Tensor, generator: torch.Generator, fill: float = -1.0) -> tuple[Tensor, Tensor]:
    _check_images(images)
    b, _, h, w = images.shape
    inp = images.clone()
    for i in range(b):
        top, left, bh, bw = inpainting_box(h, w, generator)
        inp[i, :, top : top + bh, left : left + bw] = fill
    return inp, images.clone()


def rain_mask(
    b: int, h: int, w: int, generator: torch.Generator, device, dtype, drops_per_pixel: float = 1 / 600
) -> Tensor:
    """[B, 1, H, W] in [0, 1]: slanted streaks (length 20 px, slant -10..10 px at 512 px), one slant
    per image as rain falls in one direction; H*W/600 drops at 512 px (Albumentations' default),
    scaled so that the streaks cover the same share of the image (about 3%) at any size."""
    s = min(h, w) / 512.0
    n = max(1, int(h * w * drops_per_pixel / s))
    length = max(3.0, 20.0 * s)
    mask = torch.zeros(b, h * w, device=device, dtype=dtype)
    steps = max(2, int(math.ceil(length)) * 2)
    t = torch.linspace(0, 1, steps)
    for i in range(b):
        slant = float(torch.empty(()).uniform_(-10.0, 10.0, generator=generator)) * s
        x0 = torch.rand(n, generator=generator) * w
        y0 = torch.rand(n, generator=generator) * h
        xs = (x0[:, None] + slant * t[None, :]).round().long().clamp(0, w - 1)
        ys = (y0[:, None] + length * t[None, :]).round().long().clamp(0, h - 1)
        idx = (ys * w + xs).flatten().to(device)
        mask[i].index_fill_(0, idx, 1.0)
    return mask.view(b, 1, h, w)


def deraining(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _check_images(images)
    b, _, h, w = images.shape
    mask = rain_mask(b, h, w, generator, images.device, images.dtype)
    # light blur of the streaks (soft drops) and of the scene (Albumentations blurs the rainy image)
    soft = gaussian_blur(mask, max(0.5, 0.8 * _scale(images))).clamp(0, 1)
    soft = torch.maximum(soft, mask * 0.8)
    scene = gaussian_blur(images, max(0.5, 1.0 * _scale(images)))
    darker = (scene + 1) * 0.7 - 1  # brightness coefficient 0.7
    drop = 200.0 / 127.5 - 1  # drop colour (200, 200, 200)
    rainy = darker * (1 - soft) + drop * soft
    return rainy.clamp(-1, 1), images.clone()


def motion_kernel(size: int, angle_deg: float, device, dtype) -> Tensor:
    """[size, size] normalised line kernel through the centre at `angle_deg`, anti-aliased by
    sampling the line densely and splatting bilinearly."""
    c = (size - 1) / 2
    t = torch.linspace(-c, c, size * 8, dtype=torch.float64)
    a = math.radians(angle_deg)
    xs, ys = c + t * math.cos(a), c + t * math.sin(a)
    k = torch.zeros(size, size, dtype=torch.float64)
    x0, y0 = xs.floor(), ys.floor()
    for dx in (0, 1):
        for dy in (0, 1):
            wx = (1 - (xs - x0)) if dx == 0 else (xs - x0)
            wy = (1 - (ys - y0)) if dy == 0 else (ys - y0)
            xi, yi = (x0 + dx).long(), (y0 + dy).long()
            ok = (xi >= 0) & (xi < size) & (yi >= 0) & (yi < size)
            k.index_put_((yi[ok], xi[ok]), (wx * wy)[ok], accumulate=True)
    return (k / k.sum()).to(device=device, dtype=dtype)


def de_motion_blur(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _check_images(images)
    b, c, h, w = images.shape
    s = _scale(images)
    kernels = []
    for _ in range(b):
        length = 9 + 16 * float(torch.rand((), generator=generator))
        size = max(3, int(round(length * s)) | 1)
        angle = float(torch.empty(()).uniform_(0.0, 180.0, generator=generator))
        kernels.append(motion_kernel(size, angle, images.device, images.dtype))
    # per image, shifted multiply-adds over the kernel's nonzero taps only (a line: ~2 size taps)
    out = torch.empty_like(images)
    for i, k in enumerate(kernels):
        r = k.shape[-1] // 2
        z = F.pad(images[i : i + 1], (r, r, r, r), mode="replicate")
        acc = torch.zeros_like(images[i : i + 1])
        kc = k.detach().to("cpu", torch.float64)
        for dy, dx in torch.nonzero(kc > 1e-12).tolist():
            acc.add_(z[..., dy : dy + h, dx : dx + w], alpha=float(kc[dy, dx]))
        out[i : i + 1] = acc
    return out.clamp(-1, 1), images.clone()


def glass_blur(
    images: Tensor, generator: torch.Generator, sigma: float = 0.7, max_delta: float = 4.0, iterations: int = 2
) -> Tensor:
    """Gaussian blur, `iterations` rounds of a local shuffle (each pixel takes the bilinearly
    sampled value at a random offset of up to `max_delta` px), Gaussian blur again. `sigma` and
    `max_delta` are at 512 px and scale with the image (at least 0.5 and 1 px), the offsets are
    continuous so that the effect stays proportional at low resolutions."""
    b, _, h, w = images.shape
    s = _scale(images)
    delta = max(1.0, max_delta * s)
    sig = max(0.5, sigma * s)
    x = gaussian_blur(images, sig)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for _ in range(iterations):
        off = (torch.rand(b, h, w, 2, generator=generator) * 2 - 1) * delta
        # grid_sample wants (x, y) normalised to [-1, 1] at pixel centres (align_corners=True)
        gx = ((xx + off[..., 0]).clamp(0, w - 1) / (w - 1)) * 2 - 1
        gy = ((yy + off[..., 1]).clamp(0, h - 1) / (h - 1)) * 2 - 1
        grid = torch.stack([gx, gy], dim=-1).to(device=images.device, dtype=x.dtype)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return gaussian_blur(x, sig)


def de_glass_blur(images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    _check_images(images)
    return glass_blur(images, generator).clamp(-1, 1), images.clone()


COMPUTED_TASKS: dict[str, TaskBuilder] = {
    "edge_detection": edge_detection,
    "colorization": colorization,
    "grayscale": grayscale_task,
    "inpainting": inpainting,
    "deraining": deraining,
    "de_motion_blur": de_motion_blur,
    "de_glass_blur": de_glass_blur,
}


def _builder(task: str) -> TaskBuilder:
    if task not in COMPUTED_TASKS:
        raise ValueError(f"task: unknown computed task {task!r}; expected one of {sorted(COMPUTED_TASKS)}")
    return COMPUTED_TASKS[task]


def build_pairs(task: str, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(inputs, targets) for a batch [B, 3, H, W] in [-1, 1]; random parameters from `generator`."""
    fn = _builder(task)
    _check_images(images)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU torch.Generator, got {generator!r}")
    return fn(images, generator)


def build_pair(task: str, image: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(input, target) for one image [3, H, W] in [-1, 1]; random parameters from `generator`."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a tensor of shape [3, H, W], got {got}")
    inp, tgt = build_pairs(task, image.unsqueeze(0), generator)
    return inp[0], tgt[0]
