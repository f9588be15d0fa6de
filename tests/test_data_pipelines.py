"""DALI pipelines on the CPU backend: decode vs PIL, crop/resize/flip, clips, bad samples."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from lavin_fast.data.demo_data import demo_image_paths, moving_shapes_clip  # noqa: E402
from lavin_fast.data.pipelines import (  # noqa: E402
    DaliClipDecoder,
    DaliDecodeError,
    DaliFrameDecoder,
    ImagePipelineConfig,
    build_image_iterator,
)
from lavin_fast.media import write_clip  # noqa: E402

H, W = 48, 64


def _jpeg(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    a = np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.float64) + rng.normal(0, 20, (H, W, 3))
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _to_pm1(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float() / 127.5 - 1


@pytest.fixture(scope="module")
def frame_decoder():
    return DaliFrameDecoder((H, W), max_batch=4, device="cpu")


def test_jpeg_decode_matches_pil(frame_decoder):
    data = _jpeg()
    out = frame_decoder([data], np.array([[0, 0, 1, 1]]), [False])
    assert out.shape == (1, 3, H, W) and out.dtype == torch.float32
    ref = _to_pm1(np.array(_pil(data)))
    # same size: the resize is the identity, so this compares the JPEG decoders
    assert (out[0] - ref).abs().max() * 127.5 <= 2.0


def test_crop_resize_flip_match_pil(frame_decoder):
    data = _jpeg(1)
    win = (0.1, 0.2, 0.8, 0.9)
    out = frame_decoder([data, data], np.array([win, win]), [False, True])
    assert out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out[1], out[0].flip(-1))
    y0, x0, y1, x1 = win
    ref = _pil(data).resize((W, H), Image.BICUBIC, box=(x0 * W, y0 * H, x1 * W, y1 * H))
    diff = (out[0] - _to_pm1(np.array(ref))).abs() * 127.5
    assert diff.mean() < 1.0 and diff.max() <= 4.0


def test_bad_sample_is_located_and_pipeline_survives(frame_decoder):
    good, bad = _jpeg(), _jpeg()[:200]
    with pytest.raises(DaliDecodeError) as info:
        frame_decoder([good, bad, good], np.array([[0, 0, 1, 1]] * 3), [False] * 3)
    assert info.value.bad == [1]
    assert frame_decoder([good], np.array([[0, 0, 1, 1]]), [False]).shape == (1, 3, H, W)


def test_clip_decoder_mjpeg(tmp_path):
    clip = moving_shapes_clip(frames=12, height=48, width=64, seed=1)
    path = write_clip(clip, tmp_path / "c.avi", fps=10)
    raw = np.fromfile(path, dtype=np.uint8)
    dec = DaliClipDecoder((32, 32), frames=5, max_batch=2, device="cpu")
    out = dec([raw, raw], [0, 6], np.array([[0, 0, 1, 1], [0, 0, 1, 1]]), [False, False])
    assert out.shape == (2, 3, 5, 32, 32)
    assert out.min() >= -1 and out.max() <= 1
    # the second request starts at frame 6
    ref = Image.fromarray(clip[6]).resize((32, 32), Image.BICUBIC)
    assert (out[1, :, 0] - _to_pm1(np.array(ref))).abs().mean() * 127.5 < 8  # MJPEG is lossy
    assert (out[0, :, 0] - out[0, :, 4]).abs().mean() > 0.01  # the shapes move

    # VP9 (WebM) decodes on the CPU too, in the same pipeline; MPEG-4 Part 2 is refused
    import cv2

    vp9 = tmp_path / "c.webm"
    writer = cv2.VideoWriter(str(vp9), cv2.VideoWriter_fourcc(*"VP90"), 10, (64, 48))
    if writer.isOpened():
        for f in clip:
            writer.write(np.ascontiguousarray(f[..., ::-1]))
        writer.release()
        both = dec([np.fromfile(vp9, dtype=np.uint8), raw], [6, 6], np.array([[0, 0, 1, 1]] * 2), [False, False])
        assert (both[0] - both[1]).abs().mean() * 127.5 < 8  # the same frames, two lossy codecs
    else:
        writer.release()


def test_image_iterator_shapes_and_sharding():
    files = [str(p) for p in demo_image_paths()]
    cfg = ImagePipelineConfig(resolution=32, batch_size=2, shard_id=1, num_shards=2, seed=1)
    it = build_image_iterator(files, cfg)
    batches = [b[0]["images"] for b in it]
    n = len(files)
    shard_size = n // 2  # DALIGenericIterator counts an epoch as n // num_shards samples per shard
    assert len(batches) == shard_size // 2
    for x in batches:
        assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(ValueError, match="shard_id"):
        build_image_iterator(files, ImagePipelineConfig(shard_id=2, num_shards=2))


@pytest.mark.gpu
def test_mixed_gpu_decoding_matches_cpu(frame_decoder):
    gpu = DaliFrameDecoder((H, W), max_batch=4, device="gpu")
    data = [_jpeg(0), _jpeg(1)]
    rois = np.array([[0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]])
    out = gpu(data, rois, [False, True])
    assert out.is_cuda and out.shape == (2, 3, H, W)
    ref = frame_decoder(data, rois, [False, True])
    # nvJPEG and libjpeg-turbo may differ by a few levels (IDCT, chroma upsampling)
    assert (out.cpu() - ref).abs().mean() * 127.5 < 2.0
