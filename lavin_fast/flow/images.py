"""Image and video I/O for sampling: task folders, resizing, PNG grids, MJPEG clips."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from lavin_fast._optional import optional_import

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class TaskFolderError(ValueError):
    """A task folder without usable NAME_input / NAME_target pairs."""


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """RGB image [3, H, W] float32 in [-1, 1]."""
    from PIL import Image

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image {str(p)!r} does not exist")
    try:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except Exception as exc:
        raise ValueError(f"image {str(p)!r} cannot be read ({type(exc).__name__}: {exc})") from None
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize [3, H, W] -> [3, size, size], bicubic with antialiasing (docs/numerics.md), clamped."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    out = F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(-1, 1)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8."""
    return ((img.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(img: np.ndarray, path: str | os.PathLike) -> pathlib.Path:
    from PIL import Image

    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(p)
    return p


def grid(rows: list[list[torch.Tensor]], pad: int = 2) -> np.ndarray:
    """A uint8 image of rows of [3, H, W] tiles (rows may differ in length; short rows are padded white)."""
    h, w = rows[0][0].shape[-2:]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = to_uint8(tile)
    return out


def find_pairs(folder: str | os.PathLike) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
    """(NAME, NAME_input, NAME_target) of a task folder, sorted by NAME; errors say what is wrong."""
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise TaskFolderError(
            f"task folder {str(root)!r} does not exist (a folder of NAME_input.png / NAME_target.png)"
        )
    files = {p.stem: p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    inputs = {s[: -len("_input")]: p for s, p in files.items() if s.endswith("_input")}
    targets = {s[: -len("_target")]: p for s, p in files.items() if s.endswith("_target")}
    names = sorted(set(inputs) & set(targets))
    if not names:
        seen = sorted(p.name for p in root.iterdir())[:10]
        raise TaskFolderError(
            f"task folder {str(root)!r} has no example pairs: expected files NAME_input.png and NAME_target.png with "
            f"the same NAME (found {seen}{' ...' if len(seen) == 10 else ''})"
        )
    return [(n, inputs[n], targets[n]) for n in names]


def read_clip(path: str | os.PathLike) -> torch.Tensor:
    """A video file as [3, T, H, W] float32 in [-1, 1] (OpenCV)."""
    cv2 = optional_import("cv2")

    p = pathlib.Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video {str(p)!r} does not exist")
    cap = cv2.VideoCapture(str(p))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame[..., ::-1].copy())
    cap.release()
    if not frames:
        raise ValueError(f"video {str(p)!r} has no readable frames (codec not supported by OpenCV?)")
    arr = torch.from_numpy(np.stack(frames)).float()  # [T, H, W, 3]
    return arr.permute(3, 0, 1, 2) / 127.5 - 1.0


def write_clip(frames: torch.Tensor, path: str | os.PathLike, fps: int = 8) -> pathlib.Path:
    """[3, T, H, W] in [-1, 1] -> MJPEG .avi."""
    cv2 = optional_import("cv2")

    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _, t, h, w = frames.shape
    writer = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"cannot open an MJPEG writer for {str(p)!r}")
    for i in range(t):
        writer.write(np.ascontiguousarray(to_uint8(frames[:, i])[..., ::-1]))
    writer.release()
    return p
