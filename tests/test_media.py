"""lavin_fast.media: the one reader/writer of images and clips, and its one error type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lavin_fast.data.demo_data import moving_shapes_clip
from lavin_fast.media import (
    MediaError,
    clip_info,
    load_image,
    read_clip,
    read_clip_frames,
    read_image_array,
    save_image,
    to_uint8,
    write_clip,
)


def test_image_round_trip_tensor_and_uint8(tmp_path):
    x = torch.rand(3, 12, 20, generator=torch.Generator().manual_seed(0)) * 2 - 1
    p = save_image(x, tmp_path / "sub" / "a.png")  # the folder is created
    back = load_image(p)
    assert back.shape == (3, 12, 20) and back.dtype == torch.float32
    assert (back - x).abs().max() <= 1 / 127.5  # 8-bit rounding only
    assert np.array_equal(to_uint8(back), to_uint8(x))
    save_image(to_uint8(x), tmp_path / "b.png")  # a uint8 array writes the same file content
    assert torch.equal(load_image(tmp_path / "b.png"), back)
    assert load_image(p, resolution=(6, 10)).shape == (3, 6, 10)
    assert read_image_array(p).shape == (12, 20, 3)


def test_clip_round_trip_and_windows(tmp_path):
    frames = moving_shapes_clip(frames=9, height=32, width=48, seed=2)
    p = write_clip(frames, tmp_path / "c.avi", fps=10)
    assert clip_info(p) == (9, 32, 48)
    whole = read_clip_frames(p)
    assert whole.shape == (9, 32, 48, 3) and whole.dtype == np.uint8
    assert np.abs(whole.astype(int) - frames.astype(int)).mean() < 12  # MJPEG is lossy
    assert np.array_equal(read_clip_frames(p, start=3, count=4), whole[3:7])
    clip = read_clip(p)
    assert clip.shape == (3, 9, 32, 48) and -1 <= clip.min() and clip.max() <= 1
    q = write_clip(clip, tmp_path / "d.avi")  # a [3, T, H, W] tensor in [-1, 1] writes too
    assert clip_info(q) == (9, 32, 48)


def test_one_error_type(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.avi").write_bytes(b"not a video")
    for call in (
        lambda: load_image(tmp_path / "missing.png"),
        lambda: load_image(tmp_path / "bad.png"),
        lambda: read_image_array(tmp_path / "bad.png"),
        lambda: clip_info(tmp_path / "bad.avi"),
        lambda: read_clip(tmp_path / "missing.avi"),
    ):
        with pytest.raises(MediaError):
            call()
    frames = moving_shapes_clip(frames=5, height=32, width=32, seed=0)
    p = write_clip(frames, tmp_path / "short.avi", fps=10)
    with pytest.raises(MediaError, match="could not read frame 5"):
        read_clip_frames(p, start=2, count=4)
    # MediaError is both an OSError and a ValueError: callers that caught either still do
    assert issubclass(MediaError, OSError) and issubclass(MediaError, ValueError)
    with pytest.raises(ValueError, match=r"uint8 array \[H, W, 3\]"):
        save_image(np.zeros((4, 4), np.uint8), tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        write_clip(torch.zeros(4, 2, 8, 8), tmp_path / "x.avi")
