"""Reading and writing single images as tensors in [-1, 1] (for tools that make or inspect
benchmark sets, e.g. `lavin-fast eval --make-set`, and for tests)."""

from __future__ import annotations

import os

import numpy as np
import torch


def load_image(path: str | os.PathLike, resolution: int | tuple[int, int] | None = None) -> torch.Tensor:
    """RGB image -> [3, H, W] float32 in [-1, 1]; with `resolution` the whole image is resized to it
    (bicubic, antialiased: the published preprocessing). Raises OSError naming an unreadable file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except Exception as exc:
        raise OSError(f"load_image: cannot read {path}: {type(exc).__name__}: {exc}") from None
    if resolution is not None:
        h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
        if h < 1 or w < 1:
            raise ValueError(f"resolution: expected positive sizes, got {resolution}")
        img = img.resize((int(w), int(h)), Image.BICUBIC)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def save_image(image: torch.Tensor, path: str | os.PathLike) -> None:
    """[3, H, W] (or [1, H, W]) in [-1, 1] -> an 8-bit PNG/JPEG (by the file extension)."""
    from PIL import Image

    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image: expected a tensor [3, H, W] or [1, H, W] in [-1, 1], got {got}")
    a = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    a = a.expand(3, -1, -1).permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(a)).save(path)
