"""Reading and writing images and clips, for data, sampling, evaluation and the demo; every failure is a MediaError.

One decode path: every image, array and clip read of the package goes through `open_image`, `read_image_array`
or `read_clip_frames` here, and each of them
- checks the pixel limit from the file's header before decoding, whatever the decoder (PIL's header, the .npy
  header, the video stream's frame size);
- refuses a format it cannot bound that way (OpenCV alone would decode a Radiance HDR named .png with no limit);
- hands OpenCV a buffer (images) or a name it can take (clips: a link with an ASCII name when the real one is not
  valid UTF-8, which made OpenCV crash the process);
- reads clips frame-bounded: the frames asked for, never the whole clip unless asked.

Pixels travel as float32 tensors in [-1, 1]: an image [3, H, W], a clip [3, T, H, W]. The writers also take
uint8 arrays ([H, W, 3] images, [T, H, W, 3] clips, RGB). Images go through PIL; clips through OpenCV (imported
when a clip is touched, so that image-only tools never load it) as MJPEG .avi, which OpenCV and DALI's CPU
video decoder both read.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from lavin_fast._optional import optional_import

MAX_CLIP_FRAMES = 4096
"""Default limit on the frames one read decodes (read_clip_frames with count=None)."""

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


def _output(path: str | os.PathLike, what: str) -> pathlib.Path:
    """An output file's path, its folder created; MediaError naming the problem when it cannot be a file."""
    p = pathlib.Path(path)
    if len(os.fsencode(p.name)) > 255:
        raise MediaError(f"{what} {str(p)!r}: the file name is longer than 255 bytes")
    if p.is_dir():
        raise MediaError(f"{what} {str(p)!r} is a folder: give a file name")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise MediaError(f"{what} {str(p)!r}: a part of its folder is a file, not a folder") from None
    except OSError as exc:
        raise MediaError(f"{what} {str(p)!r}: cannot create its folder ({exc.strerror or exc})") from None
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


def open_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header alone; MediaError when it cannot be read."""
    p = _existing(path, "image")
    try:
        with Image.open(p) as im:
            return im.size
    except Exception as exc:
        raise MediaError(f"cannot read image {str(p)!r} ({type(exc).__name__}: {exc})") from None


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
    p = _output(path, "image")
    try:
        Image.fromarray(np.ascontiguousarray(a)).save(p)
    except Exception as exc:
        raise MediaError(f"image {str(p)!r} cannot be written ({type(exc).__name__}: {exc})") from None
    return p


def _npy_header(p: pathlib.Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file from its header; MediaError for a file that is not one or holds less data."""
    try:
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except Exception as exc:
        raise MediaError(f"cannot read array {str(p)!r} ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject:
        raise MediaError(f"array {str(p)!r} holds Python objects (a pickle), which are never loaded")
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if offset + need > p.stat().st_size:
        raise MediaError(
            f"array {str(p)!r}: its header declares {shape} {dtype} ({need:,} bytes) but the file holds "
            f"{p.stat().st_size - offset:,}: it is truncated or its header is forged"
        )
    return shape, dtype


def read_image_array(path: str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file as stored (any bit depth; H x W or H x W x C, RGB order, alpha dropped), or a .npy array:
    what metrics read (16-bit depth maps, masks). Images over `max_pixels` (from the header) are refused, and so are
    files whose size no header states (formats PIL cannot identify)."""
    cv2 = optional_import("cv2")

    p = _existing(path, "image")
    where = f"image {str(p)!r}"
    if p.suffix.lower() == ".npy":
        shape, _dtype = _npy_header(p)
        if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[2] <= 4):
            raise MediaError(f"array {str(p)!r}: expected H x W or H x W x C (C <= 4), got shape {shape}")
        check_pixels(shape[1], shape[0], f"array {str(p)!r}", max_pixels)
        try:
            return np.load(p, allow_pickle=False)
        except Exception as exc:
            raise MediaError(f"cannot read array {str(p)!r} ({type(exc).__name__}: {exc})") from None
    try:
        with Image.open(p) as im:
            size, fmt = im.size, im.format
    except Image.DecompressionBombError as exc:
        raise MediaError(f"{where}: {exc}; it was not decoded") from None
    except Exception:
        raise MediaError(
            f"{where}: not an image format whose size can be read before decoding (PNG, JPEG, TIFF, BMP, WebP, ...)"
            "; it was not decoded"
        ) from None
    check_pixels(*size, where, max_pixels)
    # a buffer, never the file name: OpenCV takes no undecodable str
    arr = cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise MediaError(f"cannot read {where} ({fmt} that OpenCV cannot decode)")
    if arr.shape[1] * arr.shape[0] != size[0] * size[1]:
        raise MediaError(f"{where}: decoded {arr.shape[1]} x {arr.shape[0]}, its header said {size[0]} x {size[1]}")
    if arr.ndim == 3:
        arr = arr[..., :3][..., ::-1] if arr.shape[2] >= 3 else arr[..., :1]
    return np.ascontiguousarray(arr)


@contextlib.contextmanager
def _cv2_name(p: pathlib.Path) -> Iterator[str]:
    """A name of `p` that OpenCV can take: the path itself when it is valid UTF-8, else a link to it with an ASCII
    name in a temporary folder (OpenCV crashes on a str it cannot encode)."""
    try:
        str(p).encode("utf-8")
        yield str(p)
        return
    except UnicodeEncodeError:
        pass
    with tempfile.TemporaryDirectory(prefix="lavin_fast_media_") as tmp:
        link = pathlib.Path(tmp) / ("clip" + "".join(c for c in p.suffix if c.isascii()))
        try:
            link.symlink_to(p.resolve())
        except OSError as exc:
            raise MediaError(
                f"video {str(p)!r}: its name is not valid UTF-8 and no link to it could be made ({exc})"
            ) from None
        yield str(link)


def clip_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """(frames, height, width) of a video file, from its header."""
    cv2 = optional_import("cv2")

    p = _existing(path, "video")
    with _cv2_name(p) as name:
        cap = cv2.VideoCapture(name)
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
    path: str | os.PathLike,
    start: int = 0,
    count: int | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    max_frames: int = MAX_CLIP_FRAMES,
) -> np.ndarray:
    """Frames [start, start + count) of a video file (all from `start` when count is None, at most `max_frames`)
    as [T, H, W, 3] uint8 RGB. Frames over `max_pixels` (from the stream's header) are refused, and so is a clip
    with more than `max_frames` frames to read."""
    cv2 = optional_import("cv2")

    p = _existing(path, "video")
    if start < 0 or (count is not None and count < 1):
        raise ValueError(f"video {str(p)!r}: frames from {start}, count {count}: expected start >= 0 and count >= 1")
    if count is not None and count > max_frames:
        raise MediaError(f"video {str(p)!r}: {count} frames asked for, over the limit of {max_frames}")
    with _cv2_name(p) as name:
        cap = cv2.VideoCapture(name)
    frames = []
    try:
        if not cap.isOpened():
            raise MediaError(f"video {str(p)!r}: cannot open the video")
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if w <= 0 or h <= 0:
            raise MediaError(f"video {str(p)!r}: its stream states no frame size ({w} x {h}); it was not decoded")
        check_pixels(w, h, f"video {str(p)!r}", max_pixels)
        if count is None:
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            if n - start > max_frames:
                raise MediaError(
                    f"video {str(p)!r}: {n - start} frames to read, over the limit of {max_frames}; read a range"
                )
        if start:
            cap.set(cv2.CAP_PROP_POS_FRAMES, start)
        limit = max_frames if count is None else count
        while len(frames) < limit:
            ok, frame = cap.read()
            if not ok:
                if count is not None:
                    raise MediaError(f"video {str(p)!r}: could not read frame {start + len(frames)}")
                break
            if frame.shape[0] * frame.shape[1] != w * h:
                raise MediaError(f"video {str(p)!r}: frame {start + len(frames)} is not {w} x {h}")
            frames.append(frame[..., ::-1])
    finally:
        cap.release()
    if not frames:
        raise MediaError(f"video {str(p)!r} has no readable frames (codec not supported by OpenCV?)")
    return np.stack(frames)


def read_clip(path: str | os.PathLike, start: int = 0, count: int | None = None) -> torch.Tensor:
    """Frames [start, start + count) of a video file (the whole clip when count is None, within MAX_CLIP_FRAMES)
    as [3, T, H, W] float32 in [-1, 1]."""
    return from_uint8(read_clip_frames(path, start, count))


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
    p = _output(path, "video")
    h, w = rgb[0].shape[:2]
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise MediaError(f"video {str(p)!r}: give an output name that is valid UTF-8") from None
    writer = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise MediaError(f"cannot open an MJPEG writer for {str(p)!r}")
    try:
        for f in rgb:
            writer.write(np.ascontiguousarray(f[..., ::-1]))
    finally:
        writer.release()
    return p
