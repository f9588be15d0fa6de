"""Task builders for the tasks whose labels are computed from the image (the paper's Table 2, the
OpenCV / Albumentations rows): each maps a clean image to an (input, target) pair.

Public API (also used by `lavin_fast.eval` to regenerate benchmark sets):

    COMPUTED_TASKS: dict[str, TaskBuilder]      # name -> builder
    build_pair(task, image, generator) -> (input, target)      # image [3, H, W] in [-1, 1]
    build_pairs(task, images, generator) -> (inputs, targets)  # images [B, 3, H, W] in [-1, 1]

Two implementations of each degradation, chosen by `impl`:
- "library": the libraries the paper names (`tasks_cv.py`: cv2.Canny, cv2.cvtColor, Albumentations'
  GlassBlur, MotionBlur and RandomRain functions) on the image rounded to uint8, per image, on the CPU;
- "torch": plain PyTorch ports of the same algorithms on whatever device the images are on (the GPU
  path), tested against the library ones with stated tolerances (tests/test_data_tasks.py, docs/data.md);
- "auto" (default): the library on CPU images when OpenCV and Albumentations are installed (the `data`
  extra), torch on CUDA images (and on the CPU, with one warning, when the libraries are missing).
Every random parameter is drawn from `generator`, a CPU `torch.Generator`, before any work and the
same way for both implementations, so one seed gives the same degradation on CPU and GPU (up to the
tolerances). Outputs are float32 in [-1, 1], same shape and device as the input; targets that are the
clean image are its exact copy.

Tasks and conventions (sizes quoted at 512 px scale linearly with the image's shorter side, as if the
library had degraded a 512 px image that was then resized):
- edge_detection: input = image, target = Canny edges (OpenCV: grayscale to uint8, 3x3 Sobel, L1
  magnitude, thresholds 100 / 200), white (1) on black (-1), three equal channels.
- colorization: input = grayscale (BT.601 luma, OpenCV's weights) in three equal channels, target = image.
- grayscale: the reverse of colorization: input = image, target = its grayscale in three equal channels.
- inpainting: input = image with a 128x128 box (at 512 px) filled with black (-1), target = image
  (the paper's "Crop (OpenCV)"; a box fill is the same in any library, so both paths use torch).
- deraining: input = Albumentations' RandomRain (2.0 defaults: H // 3 drops of length H // 8, slant
  -10..10 px and a 7x7 box blur of the streaks at 512 px, colour 200, brightness x0.7), target = image.
- de_motion_blur: input = Albumentations' MotionBlur kernel (size 9..25 px at 512, angle 0..360 deg,
  direction -1..1, shifted), cv2.filter2D, target = image.
- de_glass_blur: input = Albumentations' GlassBlur ("fast": Gaussian sigma 0.7 (at least 0.5), 2 rounds
  of pixel swaps by up to 4 px (at least 1) at 512, Gaussian), target = image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lavin_fast.data import tasks_cv
from lavin_fast.media import from_uint8, to_uint8

Tensor = torch.Tensor
TaskBuilder = Callable[..., tuple[Tensor, Tensor]]
"""builder(images [B, 3, H, W], generator, impl="auto") -> (inputs, targets)"""
IMPLEMENTATIONS = ("auto", "library", "torch")
logger = logging.getLogger(__name__)
_warned_missing = False

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
    return _channel_sum(images, _LUMA)


def _channel_sum(x: Tensor, weights) -> Tensor:
    """sum_c weights[c] * x[:, c] as [B, 1, H, W], with Python-number weights: no weight tensor to copy to the
    device (on CUDA a small pageable copy is a host sync)."""
    out = x[:, 0:1] * float(weights[0])
    for c in range(1, len(weights)):
        out = out + x[:, c : c + 1] * float(weights[c])
    return out


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


# ---------------------------------------------------------------------------------------------
# Canny


def canny(images: Tensor, low: float = 100.0, high: float = 200.0) -> Tensor:
    """Canny edge map of [B, 3, H, W] images in [-1, 1] -> bool [B, 1, H, W].

    OpenCV's algorithm on its uint8 grayscale: 3x3 Sobel, L1 gradient magnitude, non-maximum
    suppression along the gradient direction quantised to 0/45/90/135 degrees, then hysteresis:
    pixels above `high` are edges, pixels above `low` become edges when 8-connected to an edge.
    """
    _check_images(images)
    if not 0 <= low <= high:
        raise ValueError(f"canny: expected 0 <= low <= high, got low={low}, high={high}")
    # the uint8 grayscale OpenCV sees: the image rounded to uint8, then cvtColor's fixed-point BT.601 luma
    # (weights 4899, 9617, 1868 / 2^14, rounded; exact in float32: sums stay below 2^24)
    rgb = ((images.float().clamp(-1, 1) + 1) * 127.5).round()
    gray = torch.floor((_channel_sum(rgb, (4899.0, 9617.0, 1868.0)) + 8192) / 16384)
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
    return _hysteresis(strong, weak, gray.shape[-1] * gray.shape[-2])


def _hysteresis(strong: Tensor, weak: Tensor, max_rounds: int, steps: int = 4) -> Tensor:
    """Grow `strong` through 8-connected `weak` pixels to the fixed point, `steps` dilations per round. On the CPU
    a round ends with the convergence check. On CUDA the host never waits for the GPU to drain: each round's
    "changed" flag is copied to pinned memory without blocking, and the host reads the flag of the round before
    the one it just enqueued (the wait is on an event of the calling thread's stream only, which keeps one round
    queued on the GPU). Rounds past the fixed point change nothing, so the result is the same either way."""
    edges = strong
    if not strong.is_cuda:
        for _ in range(max_rounds):
            grown = edges
            for _ in range(steps):
                grown = _dilate3x3(grown) & weak
            if torch.equal(grown, edges):
                break
            edges = grown
        return edges
    pending = None  # (pinned flag, event) of the previous round
    for _ in range(max_rounds):
        grown = edges
        for _ in range(steps):
            grown = _dilate3x3(grown) & weak
        flag = torch.empty((), dtype=torch.bool, pin_memory=True)
        flag.copy_((grown != edges).any(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        edges = grown
        if pending is not None:
            pending[1].synchronize()
            if not bool(pending[0]):  # the previous round changed nothing: edges were already the fixed point
                break
        pending = (flag, event)
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


def edge_detection(images: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    _check_images(images)
    if _use_library(images, impl):
        edges = _host_to(
            torch.from_numpy(np.stack([tasks_cv.canny(to_uint8(x)) for x in images]))[:, None], images.device
        )
    else:
        edges = canny(images)
    target = (edges.to(images.dtype) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return images.clone(), target


def colorization(images: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    _check_images(images)
    if _use_library(images, impl):
        return _per_image(images, tasks_cv.grayscale, [()] * len(images)), images.clone()
    return grayscale(images).expand(-1, 3, -1, -1).contiguous(), images.clone()


def grayscale_task(images: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    inp, target = colorization(images, generator, impl)
    return target, inp


def inpainting_box(height: int, width: int, generator: torch.Generator, box: int = 128) -> tuple[int, int, int, int]:
    """(top, left, box_h, box_w) of the masked box: `box` px at 512 px, scaled with the image."""
    bh = max(1, min(height, round(box * height / 512)))
    bw = max(1, min(width, round(box * width / 512)))
    top = int(torch.randint(0, height - bh + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - bw + 1, (1,), generator=generator))
    return top, left, bh, bw


def inpainting(
    images: Tensor, generator: torch.Generator, impl: str = "auto", fill: float = -1.0
) -> tuple[Tensor, Tensor]:
    _check_images(images)
    _use_library(images, impl)  # checks `impl`; a box fill is the same in either
    b, _, h, w = images.shape
    inp = images.clone()
    for i in range(b):
        top, left, bh, bw = inpainting_box(h, w, generator)
        inp[i, :, top : top + bh, left : left + bw] = fill
    return inp, images.clone()


# ---------------------------------------------------------------------------------------------
# implementation choice and the uint8 round trip of the library path


def _use_library(images: Tensor, impl: str) -> bool:
    global _warned_missing
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl: expected one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "torch":
        return False
    if tasks_cv.available():
        return impl == "library" or images.device.type == "cpu"
    if impl == "library":
        raise ImportError("impl='library' needs OpenCV and Albumentations: pip install 'lavin-fast[data]'")
    if images.device.type == "cpu" and not _warned_missing:
        _warned_missing = True
        logger.warning(
            "OpenCV / Albumentations not installed: the computed tasks use their torch versions on the CPU "
            "(pip install 'lavin-fast[data]' for the libraries the paper used)"
        )
    return False


def _per_image(images: Tensor, fn, params: list) -> Tensor:
    """fn(uint8 [H, W, 3], *params[i]) per image (the library path), back to float in [-1, 1] on the images' device."""
    out = [from_uint8(fn(to_uint8(images[i]), *params[i])) for i in range(len(images))]
    return _host_to(torch.stack(out), images.device)


def _host_to(t: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device`: to CUDA through pinned memory without blocking the host (a pageable copy waits
    for the stream), enqueued on the current stream."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------
# deraining: Albumentations' RandomRain


def rain_params(b: int, h: int, w: int, generator: torch.Generator) -> list[tuple]:
    """Per image (slant, drop_length, blur_value, drops [n, 2] int32 (x, y)): RandomRain's "default" rain
    (H // 3 drops of length H // 8 starting at x in [0, W), y in [0, H - length)), slant -10..10 px and a
    7 px box blur at 512 px, scaled."""
    s = min(h, w) / 512.0
    length = max(1, h // 8)
    blur = max(1, round(7 * s))
    out = []
    for _ in range(b):
        slant = float(torch.empty(()).uniform_(-10.0, 10.0, generator=generator)) * s
        xs = torch.randint(0, w, (h // 3,), generator=generator)
        ys = torch.randint(0, h - length, (h // 3,), generator=generator)
        out.append((slant, length, blur, torch.stack([xs, ys], 1).to(torch.int32).numpy()))
    return out


def line4_points(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the pixels of 4-connected lines from `starts` to `ends` ([n, 2] int (x, y)), by OpenCV's
    LineIterator (connectivity 4, left to right), vectorised over the lines."""
    p1, p2 = starts.astype(np.int64), ends.astype(np.int64)
    swap = (p2[:, 0] - p1[:, 0]) < 0
    p1, p2 = np.where(swap[:, None], p2, p1), np.where(swap[:, None], p1, p2)
    dx, dy = p2[:, 0] - p1[:, 0], p2[:, 1] - p1[:, 1]
    step_y = np.where(dy < 0, -1, 1)
    dy = np.abs(dy)
    vert = dy > dx
    a, c = np.where(vert, dy, dx), np.where(vert, dx, dy)  # major and minor extent
    count = a + c + 1
    # a step moves along the major axis while err >= 0, else along the minor one
    major = np.stack([np.where(vert, 0, 1), np.where(vert, step_y, 0)], 1)
    minor = np.stack([np.where(vert, 1, 0), np.where(vert, 0, step_y)], 1)
    err = np.zeros(len(p1), np.int64)
    p = p1.copy()
    pts = []
    for i in range(int(count.max()) if len(count) else 0):
        live = i < count
        pts.append(p[live].copy())
        neg = err < 0
        err += -(c + c) + np.where(neg, 2 * a + 2 * c, 0)
        p += np.where(neg[:, None], minor, major)
    if not pts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    allp = np.concatenate(pts)
    return allp[:, 0], allp[:, 1]


def _clip_x(starts: np.ndarray, ends: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's clipLine for streaks whose rows are inside the image (RandomRain's are) and whose end may
    leave it sideways: the end moves to the border column, its row by the same truncating arithmetic."""
    s, e = starts.astype(np.int64), ends.astype(np.int64).copy()
    out = (e[:, 0] < 0) | (e[:, 0] > width - 1)
    a = np.where(e[:, 0] < 0, 0, width - 1)
    dx = np.where(out, e[:, 0] - s[:, 0], 1)
    step = ((a - e[:, 0]).astype(np.float64) * (e[:, 1] - s[:, 1]) / dx).astype(np.int64)  # C's cast truncates
    e[:, 1] = np.where(out, e[:, 1] + step, e[:, 1])
    e[:, 0] = np.where(out, a, e[:, 0])
    return s, e


def box_blur(x: Tensor, k: int) -> Tensor:
    """cv2.blur: the mean over a k x k window anchored at k // 2 (reflect-101 border)."""
    if k <= 1:
        return x
    lo, hi = k // 2, k - 1 - k // 2
    z = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    return F.avg_pool2d(z, k, stride=1)


def deraining(images: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    _check_images(images)
    b, _, h, w = images.shape
    params = rain_params(b, h, w, generator)
    if _use_library(images, impl):
        return _per_image(images, tasks_cv.rain, params), images.clone()
    layers = torch.zeros(b, 1, h, w)
    for i, (slant, length, _, drops) in enumerate(params):
        # RandomRain's streak: from the drop to drop + (slant, length), end point truncated to int
        ends = (drops + np.array([[slant, length]])).astype(np.int32)
        xs, ys = line4_points(*_clip_x(drops, ends, w))
        ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        layers[i, 0, torch.from_numpy(ys[ok]), torch.from_numpy(xs[ok])] = float(tasks_cv.DROP_COLOR[0])
    layers = box_blur(_host_to(layers, images.device), params[0][2])
    rainy = ((images.float() + 1) * 127.5 + layers).clamp(max=255) * tasks_cv.BRIGHTNESS
    return (rainy / 127.5 - 1).clamp(-1, 1), images.clone()


# ---------------------------------------------------------------------------------------------
# de_motion_blur: Albumentations' MotionBlur


def motion_params(b: int, h: int, w: int, generator: torch.Generator) -> list[tuple]:
    """Per image (kernel size, angle, direction, (shift x, shift y) uniforms in [-1, 1]): MotionBlur's
    angle 0..360, direction -1..1, allow_shifted; the kernel 9..25 px at 512 px (odd, at least 3)."""
    s = min(h, w) / 512.0
    out = []
    for _ in range(b):
        u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
        size = max(3, int(round((9 + 16 * u[0]) * s)) | 1)
        out.append((size, 360.0 * u[1], 2 * u[2] - 1, (2 * u[3] - 1, 2 * u[4] - 1)))
    return out


def motion_kernel(size: int, angle: float, direction: float, shift: tuple[float, float]) -> np.ndarray:
    """Albumentations' create_motion_kernel (allow_shifted, shifts given as uniforms in [-1, 1]) in numpy,
    normalised: a `size` x `size` float32 line of equal taps through the (shifted) centre."""
    direction = float(np.clip(direction, -1.0, 1.0))
    kernel = np.zeros((size, size), dtype=np.float32)
    center, half = size // 2, size // 2
    rad = np.deg2rad(angle)
    t0, t1 = float(-half), float(half)
    if direction < 0:
        t1 = half * (1 - abs(direction))
    elif direction > 0:
        t0 = -half * (1 - direction)
    t = np.linspace(t0, t1, size)
    x = center + np.cos(rad) * t + shift[0] * half / 2
    y = center + np.sin(rad) * t + shift[1] * half / 2
    x = np.clip(np.round(x), 0, size - 1).astype(int)
    y = np.clip(np.round(y), 0, size - 1).astype(int)
    kernel[y, x] = 1
    if not kernel.any():
        kernel[center, center] = 1
    return kernel / np.sum(kernel)


def de_motion_blur(images: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    _check_images(images)
    b, c, h, w = images.shape
    params = motion_params(b, h, w, generator)
    if _use_library(images, impl):
        return _per_image(images, tasks_cv.motion_blur, params), images.clone()
    # per image, shifted multiply-adds over the kernel's taps (a line: about `size` of them); cv2.filter2D
    # correlates (no flip) with a reflect-101 border
    out = torch.empty_like(images, dtype=torch.float32)
    for i, p in enumerate(params):
        k = motion_kernel(*p)
        r = k.shape[-1] // 2
        z = F.pad(images[i : i + 1].float(), (r, r, r, r), mode="reflect")
        acc = torch.zeros_like(out[i : i + 1])
        for dy, dx in zip(*np.nonzero(k), strict=True):
            acc.add_(z[..., dy : dy + h, dx : dx + w], alpha=float(k[dy, dx]))
        out[i : i + 1] = acc
    return out.clamp(-1, 1), images.clone()


# ---------------------------------------------------------------------------------------------
# de_glass_blur: Albumentations' GlassBlur


def glass_params(b: int, h: int, w: int, generator: torch.Generator, iterations: int = 2) -> list[tuple]:
    """Per image (sigma, max_delta, iterations, dxy [(H - 2d) (W - 2d), iterations, 2] int in [-d, d)):
    GlassBlur's defaults sigma 0.7 and max_delta 4 at 512 px, scaled (at least 0.5 and 1)."""
    s = min(h, w) / 512.0
    sigma, delta = max(0.5, 0.7 * s), max(1, round(4 * s))
    n = (h - 2 * delta) * (w - 2 * delta)
    return [
        (sigma, delta, iterations, torch.randint(-delta, delta, (n, iterations, 2), generator=generator).numpy())
        for _ in range(b)
    ]


def cv_gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """cv2.GaussianBlur(ksize=(0, 0), sigmaX=sigma) of an 8-bit image: kernel size round(6 sigma + 1) | 1,
    reflect-101 border."""
    r = (int(round(sigma * 6 + 1)) | 1) // 2
    k = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    taps = [v / sum(k) for v in k]
    return filter1d(filter1d(x, taps, -1), taps, -2)


def glass_swaps(x: Tensor, delta: int, dxy: Tensor) -> Tensor:
    """GlassBlur's "fast" swaps on [C, H, W], in place: per round, `x[h, w], x[h + dy, w + dx] =
    x[h + dy, w + dx], x[h, w]` over the positions h in (d, H - d], w in (d, W - d] (numpy's order, where
    the last of repeated targets wins: found with a scatter of the writer's rank, so it is deterministic
    on the GPU too)."""
    c, hgt, wid = x.shape
    dev = x.device
    hs = torch.arange(hgt - delta, delta, -1, device=dev)
    ws = torch.arange(wid - delta, delta, -1, device=dev)
    h, w = hs.repeat(len(ws)), ws.repeat_interleave(len(hs))
    flat = x.view(c, hgt * wid)
    src = h * wid + w
    rank = torch.arange(len(src), device=dev)
    dxy = _host_to(dxy, dev)
    for i in range(dxy.shape[1]):
        dst = (h + dxy[:, i, 0]) * wid + (w + dxy[:, i, 1])
        moved_in, moved_out = flat[:, dst].clone(), flat[:, src].clone()
        flat[:, src] = moved_in
        last = torch.full((hgt * wid,), -1, device=dev, dtype=torch.long).scatter_reduce(0, dst, rank, "amax")
        # no nonzero() (a host sync on the GPU): write every position, unchanged where nothing landed
        flat.copy_(torch.where(last >= 0, moved_out[:, last.clamp(min=0)], flat))
    return x


def de_glass_blur(images: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    _check_images(images)
    b, _, h, w = images.shape
    params = glass_params(b, h, w, generator)
    if _use_library(images, impl):
        return _per_image(images, tasks_cv.glass_blur, params), images.clone()
    out = torch.empty_like(images, dtype=torch.float32)
    for i, (sigma, delta, _, dxy) in enumerate(params):
        x = cv_gaussian_blur(images[i : i + 1].float(), sigma)[0].contiguous()
        out[i] = cv_gaussian_blur(glass_swaps(x, delta, torch.from_numpy(dxy))[None], sigma)[0]
    return out.clamp(-1, 1), images.clone()


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


def build_pairs(task: str, images: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(inputs, targets) for a batch [B, 3, H, W] in [-1, 1]; random parameters from `generator`;
    `impl`: "auto", "library" or "torch" (module docstring)."""
    fn = _builder(task)
    _check_images(images)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator: expected a CPU torch.Generator, got {generator!r}")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl: expected one of {IMPLEMENTATIONS}, got {impl!r}")
    return fn(images, generator, impl=impl)


def build_pair(task: str, image: Tensor, generator: torch.Generator, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(input, target) for one image [3, H, W] in [-1, 1]; random parameters from `generator`."""
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a tensor of shape [3, H, W], got {got}")
    inp, tgt = build_pairs(task, image.unsqueeze(0), generator, impl)
    return inp[0], tgt[0]
