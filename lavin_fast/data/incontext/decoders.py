"""Decoding requests (frames or clip windows with a crop and a flip) and the torch decoder: PIL decode, crop and
bicubic antialiased resize, OpenCV for clips. The DALI decoder with the same interface is data/pipelines.py's
DaliDecoder. A file that cannot be read raises Unreadable naming it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from lavin_fast.data.incontext.config import LoaderConfig
from lavin_fast.data.incontext.sources import _MEM, _Clip, _Source
from lavin_fast.media import open_image, read_clip_frames


@dataclass
class _FrameReq:
    ref: str
    window: tuple[float, float, float, float]
    flip: bool


@dataclass
class _ClipReq:
    clip: _Clip
    start: int
    count: int
    window: tuple[float, float, float, float]
    flip: bool


class Unreadable(Exception):
    """Some referenced files could not be read; `bad` maps each to the reason."""

    def __init__(self, bad: dict[str, str]):
        super().__init__(f"{len(bad)} unreadable files")
        self.bad = bad


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise OSError("empty file")
    return data


class TorchDecoder:
    """PIL decode + crop + bicubic antialiased resize (PIL's `resize(box=...)`), OpenCV for clips."""

    def __init__(self, cfg: LoaderConfig, src: _Source):
        self.cfg, self.size = cfg, cfg.size()
        self.memory_images, self.memory_clips = src.memory_images, src.memory_clips

    def _resize(self, img, window, flip) -> torch.Tensor:
        y0, x0, y1, x1 = window
        w, h = img.size
        out = img.resize((self.size[1], self.size[0]), Image.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h))
        a = np.array(out, dtype=np.uint8)
        if flip:
            a = np.ascontiguousarray(a[:, ::-1])
        return torch.from_numpy(a).permute(2, 0, 1)

    def _open(self, ref: str):
        if ref.startswith(_MEM):
            return self.memory_images[ref]
        return open_image(_read_bytes(ref), self.cfg.max_image_pixels, name=ref)

    def frames(self, reqs: list[_FrameReq]) -> torch.Tensor:
        out, bad = [], {}
        for r in reqs:
            if r.ref in bad:
                continue
            try:
                img = self._open(r.ref)
                out.append(self._resize(img, r.window, r.flip))
            except Exception as exc:  # any decoder error means an unusable file
                bad[r.ref] = f"{type(exc).__name__}: {exc}"
        if bad:
            raise Unreadable(bad)
        x = torch.stack(out) if out else torch.empty(0, 3, *self.size, dtype=torch.uint8)
        return x.float().div_(127.5).sub_(1.0)

    def _clip_frames(self, req: _ClipReq) -> list[np.ndarray]:
        if req.clip.ref.startswith(_MEM):
            arr = self.memory_clips[req.clip.ref]
            return list(arr[req.start : req.start + req.count])
        return list(read_clip_frames(req.clip.ref, req.start, req.count, max_pixels=self.cfg.max_image_pixels))

    def clips(self, reqs: list[_ClipReq]) -> torch.Tensor:
        out, bad = [], {}
        for r in reqs:
            try:
                frames = self._clip_frames(r)
                out.append(
                    torch.stack(
                        [self._resize(Image.fromarray(np.ascontiguousarray(f)), r.window, r.flip) for f in frames], 1
                    )
                )
            except Exception as exc:
                bad[r.clip.ref] = f"{type(exc).__name__}: {exc}"
        if bad:
            raise Unreadable(bad)
        return torch.stack(out).float().div_(127.5).sub_(1.0)
