"""What sampling reads and shows: task folders of example pairs, square resizing, grids of results (the file
I/O itself is lavin_fast.media)."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F

from lavin_fast.media import IMAGE_SUFFIXES, to_uint8


class TaskFolderError(ValueError):
    """A task folder without usable NAME_input / NAME_target pairs."""


def resize(img: torch.Tensor, size: int) -> torch.Tensor:
    """Square resize [3, H, W] -> [3, size, size], bicubic with antialiasing (docs/numerics.md), clamped."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    out = F.interpolate(img[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(-1, 1)


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
