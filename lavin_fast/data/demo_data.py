"""The embedded demo dataset: no download, ever.

- Images: real photographs that ship inside scikit-image's package data directory (the files
  `skimage.data` reads without fetching anything): astronaut, chelsea (a cat), coffee, rocket,
  motorcycle_left, hubble_deep_field, retina, ... Only files present on disk are used. `write_demo_images`
  writes them at one size as PNG files, the demo's training photographs apart from the one it holds out.
  Without scikit-image (the core install: it comes with `[demo]`), `demo_image_paths` gives computed images
  instead (smooth colour fields with shapes and texture, written once as PNG under the cache folder), and says so
  in one log line, so that `lavin-fast train tiny-cpu` needs nothing beyond the core.
- Clips: short videos of moving, bouncing coloured shapes over a gradient, generated from a seed,
  either in memory (`demo_clips`, drawn with numpy) or written as MJPEG .avi files (`write_demo_clips`, OpenCV's
  writer), which both DALI's CPU video decoder and OpenCV read.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
from PIL import Image

from lavin_fast._optional import optional_import
from lavin_fast.media import load_image, open_image, save_image, write_clip

_log = logging.getLogger(__name__)

# colour photographs (RGB) present in scikit-image's data directory without a download
DEMO_IMAGE_FILES: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "color.png",
    "logo.png",
)


EXTRA_IMAGE_FILES: tuple[str, ...] = ("grace_hopper.jpg",)
"""colour photographs in matplotlib's sample data (`matplotlib.get_data_path()`/sample_data, no download):
grace_hopper.jpg, a U.S. Navy portrait in the public domain; training photographs when matplotlib is installed"""
GREY_IMAGE_FILES: tuple[str, ...] = (
    "camera.png",
    "coins.png",
    "moon.png",
    "text.png",
    "clock_motion.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "cell.png",
    "microaneurysms.png",
)
"""greyscale photographs in scikit-image's data directory (CC0 / public domain, per `skimage.data`): with
`grey=True` they join the training set as grey RGB images, on which both colour tasks are the identity"""

DEMO_HELD_OUT = "chelsea.png"
"""the photograph the demo never trains on: its first held-out query"""
DEMO_HELD_OUT_PHOTOS: tuple[str, ...] = (DEMO_HELD_OUT, "coffee.png", "rocket.jpg")
"""the photographs the demo never trains on (no crop of them, no VAE fit on them): its held-out queries"""


def skimage_data_dir() -> pathlib.Path:
    skimage = optional_import("skimage")

    return pathlib.Path(skimage.__file__).resolve().parent / "data"


COMPUTED_IMAGES = 10
"""how many computed images stand in for the photographs without scikit-image"""


def extra_image_paths(grey: bool = False) -> list[pathlib.Path]:
    """The bundled photographs beyond DEMO_IMAGE_FILES that exist here: EXTRA_IMAGE_FILES from matplotlib's sample
    data (when matplotlib is installed), and with `grey` scikit-image's GREY_IMAGE_FILES."""
    paths = []
    try:
        matplotlib = optional_import("matplotlib")
        root = pathlib.Path(matplotlib.get_data_path()) / "sample_data"
        paths += [root / name for name in EXTRA_IMAGE_FILES if (root / name).is_file()]
    except ImportError:
        pass
    if grey:
        try:
            root = skimage_data_dir()
            paths += [root / name for name in GREY_IMAGE_FILES if (root / name).is_file()]
        except ImportError:
            pass
    return paths


def demo_image_paths() -> list[pathlib.Path]:
    """Paths of the demo photographs that exist in this scikit-image installation (at least 4); without
    scikit-image, the computed stand-ins (`computed_demo_images`)."""
    try:
        root = skimage_data_dir()
    except ImportError as exc:
        paths = computed_demo_images()
        if not _said_computed:
            _said_computed.append(True)
            _log.info("demo data: %d computed images stand in for the photographs (%s)", len(paths), exc)
        return paths
    paths = [root / name for name in DEMO_IMAGE_FILES if (root / name).is_file()]
    if len(paths) < 4:
        raise FileNotFoundError(
            f"demo data: expected at least 4 of {DEMO_IMAGE_FILES} in scikit-image's data directory {root}, "
            f"found {len(paths)}; reinstall scikit-image (>= 0.22)"
        )
    return paths


def write_demo_images(
    out_dir: str | os.PathLike, size: int, held_out: str = DEMO_HELD_OUT
) -> tuple[list[pathlib.Path], pathlib.Path]:
    """Every demo photograph resized whole (bicubic) to `size` x `size` as PNG: the training ones in
    `out_dir`/train (a folder the in-context loader reads), the `held_out` one in `out_dir`/held_out.
    Returns (training paths, held-out path)."""
    train, kept, _ = write_demo_set(out_dir, size, held_out=(held_out,), crops=0)
    return train, kept[0]


def augmented_crop(image: Image.Image, size: int, rng: np.random.Generator, min_scale: float = 0.3) -> Image.Image:
    """One random square crop of `image` (side a uniform fraction in [min_scale, 1] of its shorter side, at a
    uniform position), flipped left-right half the time, colour-jittered (brightness and contrast x[0.75, 1.25],
    saturation x[0.6, 1.4], a per-channel gain x[0.9, 1.1]) and resized (bicubic) to `size` x `size`."""
    w, h = image.size
    side = max(int(round(rng.uniform(min_scale, 1.0) * min(w, h))), 8)
    x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = image.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a = np.asarray(crop, dtype=np.float32) / 255.0
    a = a * rng.uniform(0.75, 1.25)  # brightness
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.75, 1.25) + mean  # contrast
    grey = a @ np.float32([0.299, 0.587, 0.114])
    a = (a - grey[..., None]) * rng.uniform(0.6, 1.4) + grey[..., None]  # saturation
    a = a * rng.uniform(0.9, 1.1, 3).astype(np.float32)  # colour balance
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))


def write_demo_set(
    out_dir: str | os.PathLike,
    size: int,
    held_out: tuple[str, ...] = DEMO_HELD_OUT_PHOTOS,
    crops: int = 0,
    seed: int = 0,
    extra: bool = False,
    grey: bool = False,
    min_scale: float = 0.3,
) -> tuple[list[pathlib.Path], list[pathlib.Path], list[pathlib.Path]]:
    """The demo photographs at `size` x `size` (whole, bicubic) as PNG: the training ones in `out_dir`/train,
    the `held_out` ones in `out_dir`/held_out, plus `crops` augmented crops (`augmented_crop`) of every
    training photograph in `out_dir`/train (never of a held-out one), drawn from `seed`.
    With `extra`, the other bundled photographs (`extra_image_paths(grey)`) are training photographs too.
    Returns (whole training photographs, held-out photographs, crop files); the loader reads all of train/."""
    paths = demo_image_paths()
    if extra:
        paths += [p for p in extra_image_paths(grey) if p.name not in {q.name for q in paths}]
    names = {p.name for p in paths}
    missing = [h for h in held_out if h not in names]
    if missing:
        raise ValueError(f"held_out: {missing} not among the demo photographs {sorted(names)}")
    if crops < 0:
        raise ValueError(f"crops: expected >= 0, got {crops}")
    if len(paths) - len(held_out) < 3:
        raise ValueError(f"held_out: {len(held_out)} held out leaves fewer than 3 of {len(paths)} to train on")
    out = pathlib.Path(out_dir)
    rng = np.random.default_rng(seed)
    train, kept, crop_paths = [], [], []
    for p in paths:
        dest = out / ("held_out" if p.name in held_out else "train") / (p.stem + ".png")
        save_image(load_image(p, size), dest)
        (kept if p.name in held_out else train).append(dest)
        if p.name in held_out:
            continue
        rgb = open_image(p)
        for k in range(crops):
            crop_path = out / "train" / f"{p.stem}_crop{k:03d}.png"
            augmented_crop(rgb, size, rng, min_scale).save(crop_path)
            crop_paths.append(crop_path)
    return train, kept, crop_paths


_said_computed: list[bool] = []


def computed_image(size: int = 256, seed: int = 0) -> np.ndarray:
    """One [size, size, 3] uint8 RGB image from `seed`: a smooth colour field (low-frequency waves), a few flat
    discs and boxes with hard edges, and fine texture; content for the computed tasks (colour, edges, blur)."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    img = np.zeros((size, size, 3), np.float32)
    for c in range(3):
        for _ in range(3):
            fx, fy = rng.uniform(0.5, 3.0, 2)
            img[..., c] += np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi)) / 3
    img = 0.5 + 0.35 * img + rng.uniform(-0.15, 0.15, 3)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.2)
        inside = (
            (np.abs(xx - cx) < r) & (np.abs(yy - cy) < r)
            if rng.integers(0, 2)
            else (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        )
        img[inside] = rng.uniform(0.05, 0.95, 3)
    img += rng.normal(0.0, 0.03, img.shape) * np.sin(40 * np.pi * xx * rng.uniform(0.5, 1.5))[..., None]
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def computed_demo_images(out_dir: str | os.PathLike | None = None, n: int = COMPUTED_IMAGES) -> list[pathlib.Path]:
    """`n` computed images as PNG files under `out_dir` (default: <cache>/demo_computed); existing files are
    reused."""
    from PIL import Image

    out = pathlib.Path(out_dir) if out_dir is not None else default_cache_dir() / "demo_computed"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = out / f"computed_{i}.png"
        if not p.is_file() or p.stat().st_size == 0:
            tmp = p.with_suffix(f".tmp{os.getpid()}.png")
            Image.fromarray(computed_image(seed=i)).save(tmp)
            os.replace(tmp, p)  # another process may write the same file: never a half-written one
        paths.append(p)
    return paths


def default_cache_dir() -> pathlib.Path:
    """$LAVIN_FAST_CACHE, else ~/.cache/lavin_fast."""
    env = os.environ.get("LAVIN_FAST_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "lavin_fast"


def moving_shapes_clip(
    frames: int = 24, height: int = 96, width: int = 128, seed: int = 0, n_shapes: int = 3
) -> np.ndarray:
    """One clip [T, H, W, 3] uint8 RGB: `n_shapes` discs and squares moving with constant velocity,
    bouncing off the borders, over a smooth colour gradient (discs anti-aliased over one pixel)."""
    if frames < 1 or height < 16 or width < 16:
        raise ValueError(f"moving_shapes_clip: expected frames >= 1 and H, W >= 16, got {frames}, {height}, {width}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(20, 120, 3), rng.uniform(60, 200, 3)
    a = (xx / width * 0.7 + yy / height * 0.3)[..., None]
    background = (c0 * (1 - a) + c1 * a).astype(np.uint8)
    shapes = []
    for _ in range(n_shapes):
        r = rng.uniform(0.08, 0.16) * min(height, width)
        pos = rng.uniform([r, r], [width - r, height - r])
        vel = rng.uniform(-1, 1, 2) * min(height, width) * 0.05 + 0.5
        color = tuple(int(c) for c in rng.integers(80, 256, 3))
        shapes.append((r, pos, vel, color, bool(rng.integers(0, 2))))
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        img = background.astype(np.float32)
        for r, pos, vel, color, square in shapes:
            p = pos + vel * t
            # reflect the trajectory off the borders
            for d, lim in ((0, width), (1, height)):
                span = lim - 2 * r
                q = (p[d] - r) % (2 * span)
                p[d] = r + (q if q <= span else 2 * span - q)
            cx, cy, ri = int(round(p[0])), int(round(p[1])), int(round(r))
            if square:
                cover = ((np.abs(xx - cx) <= ri) & (np.abs(yy - cy) <= ri)).astype(np.float32)
            else:  # the fraction of each pixel inside the disc, linear over one pixel at the rim
                cover = np.clip(ri + 0.5 - np.hypot(xx - cx, yy - cy), 0.0, 1.0)
            img += cover[..., None] * (np.asarray(color, np.float32) - img)
        out[t] = np.round(img).astype(np.uint8)
    return out


def demo_clips(n: int = 4, frames: int = 24, height: int = 96, width: int = 128, seed: int = 0) -> list[np.ndarray]:
    """`n` generated clips, in memory."""
    return [moving_shapes_clip(frames, height, width, seed=seed * 1000 + i) for i in range(n)]


def write_demo_clips(
    out_dir: str | os.PathLike | None = None,
    n: int = 4,
    frames: int = 24,
    height: int = 96,
    width: int = 128,
    seed: int = 0,
) -> list[pathlib.Path]:
    """The demo clips as MJPEG files under `out_dir` (default: <cache>/demo_clips); existing files
    with the same parameters are reused."""
    out = pathlib.Path(out_dir) if out_dir is not None else default_cache_dir() / "demo_clips"
    paths = []
    for i, clip in enumerate(demo_clips(n, frames, height, width, seed)):
        p = out / f"shapes_s{seed}_{i}_{frames}x{height}x{width}.avi"
        if not p.is_file() or p.stat().st_size == 0:
            write_clip(clip, p, fps=10)
        paths.append(p)
    return paths
