"""Reading and writing images and clips, for data, sampling, evaluation and the demo; every failure is a MediaError.

Pixels travel as float32 tensors in [-1, 1]: an image [3, H, W], a clip [3, T, H, W]. The writers also take
uint8 arrays ([H, W, 3] images, [T, H, W, 3] clips, RGB). Images go through PIL; clips through OpenCV (imported
when a clip is touched, so that image-only tools never load it) as MJPEG .avi, which OpenCV and DALI's CPU
video decoder both read.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import torch
from PIL import Image

from lavin_fast._optional import optional_import

MAX_IMAGE_PIXELS = 8192 * 8192
# The file suffixes every folder scan of the package treats as images / clips (one list: data sources, task
# folders and batch sampling agree on what a folder holds).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".avi", ".mp4", ".webm", ".mkv", ".mov")
"""Default limit on a decoded image's width x height (also per video frame), checked from the file's header before
anything is decoded: a 420 KB PNG can hold 12000 x 12000 pixels (432 MB as RGB, more while decoding). Pass
`max_pixels` (None: no limit) or set the loader's `max_image_pixels` to change it."""


class MediaError(OSError, ValueError):
    """A media file that does not exist, cannot be read or written, or holds no usable frames.

    An OSError (the file) and a ValueError (its contents), so callers that caught either still do."""


def _existing(path: str | os.PathLike, what: str) -> pathlib.Path:
    p = pathlib.Path(path)
    if not p.is_file():
        raise MediaError(f"{what} {str(p)!r} does not exist")
    return p


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"resolution: expected positive sizes, got {resolution}")
    return int(h), int(w)


def from_uint8(a: np.ndarray) -> torch.Tensor:
    """[..., H, W, 3] uint8 -> [3, ..., H, W] float32 in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a)).float().div_(127.5).sub_(1.0)
    return t.movedim(-1, 0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] (or [1, H, W]) in [-1, 1] -> [H, W, 3] uint8."""
    if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] not in (1, 3):
        got = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"image: expected a tensor [3, H, W] or [1, H, W] in [-1, 1], got {got}")
    a = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()
    return a.expand(3, -1, -1).permute(1, 2, 0).cpu().numpy()


def check_pixels(width: int, height: int, source: str, max_pixels: int | None = MAX_IMAGE_PIXELS) -> None:
    """Raise MediaError when width x height is over `max_pixels` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise MediaError(
            f"{source}: {width} x {height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
            "(max_image_pixels); it was not decoded"
        )


def open_image(
    source: str | os.PathLike | bytes, max_pixels: int | None = MAX_IMAGE_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode an image file (a path, or its bytes) to RGB after checking its size from the header; MediaError for a
    missing, unreadable or oversized file."""
    if isinstance(source, bytes):
        import io

        where, fp = name or "image bytes", io.BytesIO(source)
    else:
        p = _existing(source, "image")
        where, fp = f"image {str(p)!r}", p
    try:
        with Image.open(fp) as im:
            check_pixels(*im.size, where, max_pixels)  # header only: nothing decoded yet
            return im.convert("RGB")
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot read {where} ({type(exc).__name__}: {exc})") from None


def load_image(
    path: str | os.PathLike, resolution: int | tuple[int, int] | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> torch.Tensor:
    """An RGB image file -> [3, H, W] float32 in [-1, 1]; with `resolution` (an int or (H, W)) the whole image is
    resized to it (bicubic, antialiased: the published preprocessing). Images over `max_pixels` are refused."""
    size = None if resolution is None else _size(resolution)
    img = open_image(path, max_pixels)
    if size is not None:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    return from_uint8(np.array(img, dtype=np.uint8))


def save_image(image: torch.Tensor | np.ndarray, path: str | os.PathLike) -> pathlib.Path:
    """A [3, H, W] / [1, H, W] tensor in [-1, 1] or an [H, W, 3] uint8 array -> an 8-bit image file (format by
    the extension); the folder is created."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected a uint8 array [H, W, 3], got {image.dtype} {image.shape}")
        a = image
    else:
        a = to_uint8(image)
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        Image.fromarray(np.ascontiguousarray(a)).save(p)
    except Exception as exc:
        raise MediaError(f"image {str(p)!r} cannot be written ({type(exc).__name__}: {exc})") from None
    return p


def read_image_array(path: str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file as stored (any bit depth; H x W or H x W x C, RGB order, alpha dropped), or a .npy array:
    what metrics read (16-bit depth maps, masks). Images over `max_pixels` (from the header) are refused."""
    cv2 = optional_import("cv2")

    p = _existing(path, "image")
    if p.suffix.lower() == ".npy":
        return np.load(p, allow_pickle=False)
    try:
        with Image.open(p) as im:
            size = im.size
    except Exception:  # a format PIL cannot identify: OpenCV decides below (its own limit is 2**30 pixels)
        size = None
    if size is not None:
        check_pixels(*size, f"image {str(p)!r}", max_pixels)
    arr = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise MediaError(f"cannot read image file {p}")
    if arr.ndim == 3:
        arr = arr[..., :3][..., ::-1] if arr.shape[2] >= 3 else arr[..., :1]
    return np.ascontiguousarray(arr)


def clip_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, from its header."""
    cv2 = optional_import("cv2")

    p = _existing(path, "video")
    cap = cv2.VideoCapture(str(p))
    try:
        if not cap.isOpened():
            raise MediaError(f"video {str(p)!r}: cannot open the video")
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if n <= 0 or w <= 0 or h <= 0:
            raise MediaError(f"video {str(p)!r}: no frames (count {n}, size {w}x{h})")
        return n, h, w
    finally:
        cap.release()


def read_clip_frames(
    path: str | os.PathLike, start: int = 0, count: int | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Frames [start, start + count) of a video file (all from `start` when count is None) as [T, H, W, 3]
    uint8 RGB. Frames over `max_pixels` (from the header) are refused."""
    cv2 = optional_import("cv2")

    p = _existing(path, "video")
    cap = cv2.VideoCapture(str(p))
    try:
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        check_pixels(w, h, f"video {str(p)!r}", max_pixels)
        if start:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        frames = []
        while count is None or len(frames) < count:
            ok, frame = cap.read()
            if not ok:
                if count is not None:
                    raise MediaError(f"video {str(p)!r}: could not read frame {start + len(frames)}")
                break
            frames.append(frame[..., ::-1])
    finally:
        cap.release()
    if not frames:
        raise MediaError(f"video {str(p)!r} has no readable frames (codec not supported by OpenCV?)")
    return np.stack(frames)


def read_clip(path: str | os.PathLike) -> torch.Tensor:
    """A whole video file as [3, T, H, W] float32 in [-1, 1]."""
    return from_uint8(read_clip_frames(path))


def write_clip(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: int = 8) -> pathlib.Path:
    """A clip ([3, T, H, W] tensor in [-1, 1], or [T, H, W, 3] uint8 RGB) -> an MJPEG .avi; the folder is
    created."""
    cv2 = optional_import("cv2")

    if isinstance(frames, torch.Tensor):
        if frames.ndim != 4 or frames.shape[0] != 3:
            raise ValueError(f"frames: expected a tensor [3, T, H, W] in [-1, 1], got {tuple(frames.shape)}")
        rgb = [to_uint8(frames[:, i]) for i in range(frames.shape[1])]
    else:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
            raise ValueError(f"frames: expected a uint8 array [T, H, W, 3], got {frames.dtype} {frames.shape}")
        rgb = list(frames)
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    h, w = rgb[0].shape[:2]
    writer = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise MediaError(f"cannot open an MJPEG writer for {str(p)!r}")
    try:
        for f in rgb:
            writer.write(np.ascontiguousarray(f[..., ::-1]))
    finally:
        writer.release()
    return p
