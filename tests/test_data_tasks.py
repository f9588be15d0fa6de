"""Computed task builders: shapes, ranges, determinism and one property per task."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lavin_fast.data import tasks


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    return F.interpolate(img[None], size=(96, 96), mode="bicubic", antialias=True).clamp(-1, 1)[0]


def _high_freq(x: torch.Tensor) -> float:
    """Share of the spectrum's energy above a quarter of the sampling frequency."""
    f = torch.fft.rfft2(x.double()).abs() ** 2
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h).abs()[:, None]
    fx = torch.fft.rfftfreq(w)[None]
    return float(f[..., (fy > 0.25) | (fx > 0.25)].sum() / f.sum())


@pytest.mark.parametrize("task", sorted(tasks.COMPUTED_TASKS))
def test_builder_shapes_range_and_determinism(task, photo):
    inp, tgt = tasks.build_pair(task, photo, torch.Generator().manual_seed(3))
    assert inp.shape == tgt.shape == photo.shape
    assert inp.dtype == tgt.dtype == torch.float32
    assert inp.min() >= -1 and inp.max() <= 1 and tgt.min() >= -1 and tgt.max() <= 1
    assert not torch.equal(inp, tgt)
    inp2, tgt2 = tasks.build_pair(task, photo, torch.Generator().manual_seed(3))
    assert torch.equal(inp, inp2) and torch.equal(tgt, tgt2)


def test_edges_are_binary_and_match_opencv(photo):
    import cv2

    inp, tgt = tasks.build_pair("edge_detection", photo, torch.Generator())
    assert torch.equal(inp, photo)
    assert set(tgt.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(tgt[0], tgt[1]) and torch.equal(tgt[1], tgt[2])
    u8 = ((photo.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    ref = cv2.Canny(cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY), 100, 200) > 0
    ours = (tgt[0] > 0).numpy()
    iou = (ref & ours).sum() / max(1, (ref | ours).sum())
    assert iou > 0.9, f"IoU with cv2.Canny {iou:.3f}"


def test_colorization_input_is_gray(photo):
    inp, tgt = tasks.build_pair("colorization", photo, torch.Generator())
    assert torch.equal(inp[0], inp[1]) and torch.equal(inp[1], inp[2])
    assert torch.equal(tgt, photo)
    expect = 0.299 * photo[0] + 0.587 * photo[1] + 0.114 * photo[2]
    torch.testing.assert_close(inp[0], expect)


@pytest.mark.parametrize("size", [64, 512])
def test_inpainting_mask_covers_the_box(size):
    img = torch.rand(3, size, size) * 1.8 - 0.9  # never exactly -1 outside the box
    gen = torch.Generator().manual_seed(7)
    top, left, bh, bw = tasks.inpainting_box(size, size, torch.Generator().manual_seed(7))
    assert bh == bw == round(128 * size / 512)
    inp, tgt = tasks.build_pair("inpainting", img, gen)
    masked = inp == -1
    box = torch.zeros_like(masked)
    box[:, top : top + bh, left : left + bw] = True
    assert torch.equal(masked, box)
    assert torch.equal(inp[~box], img[~box]) and torch.equal(tgt, img)


@pytest.mark.parametrize("task", ["de_motion_blur", "de_glass_blur"])
def test_blur_lowers_high_frequencies(task, photo):
    inp, tgt = tasks.build_pair(task, photo, torch.Generator().manual_seed(1))
    assert _high_freq(inp) < 0.8 * _high_freq(tgt)


def test_rain_adds_bright_streaks():
    img = torch.full((3, 96, 96), -0.6)  # a dark scene
    mask = tasks.rain_mask(1, 96, 96, torch.Generator().manual_seed(2), "cpu", torch.float32)[0, 0] > 0
    inp, tgt = tasks.build_pair("deraining", img, torch.Generator().manual_seed(2))
    assert 0.02 < mask.float().mean() < 0.5
    # streak pixels brighter than the scene, the rest darker (brightness coefficient)
    assert inp[:, mask].mean() > img[:, mask].mean() + 0.3
    assert inp[:, ~mask].mean() < img[:, ~mask].mean() + 0.1
    # streaks are slanted lines: most streak pixels have a streak neighbour above or below
    m = mask.numpy()
    vertical_neighbour = (m[1:] & m[:-1]).sum() / m.sum()
    assert vertical_neighbour > 0.5


def test_motion_kernel_is_a_normalised_line():
    k = tasks.motion_kernel(9, 0.0, "cpu", torch.float64)
    assert abs(float(k.sum()) - 1) < 1e-12
    assert float(k[4].sum()) > 0.99  # horizontal line through the centre row
    k90 = tasks.motion_kernel(9, 90.0, "cpu", torch.float64)
    assert float(k90[:, 4].sum()) > 0.99


def test_batched_equals_per_image_layout(photo):
    imgs = torch.stack([photo, photo.flip(-1)])
    inp, tgt = tasks.build_pairs("colorization", imgs, torch.Generator())
    assert inp.shape == (2, 3, 96, 96)
    torch.testing.assert_close(inp[1], tasks.build_pair("colorization", photo.flip(-1), torch.Generator())[0])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown computed task"):
        tasks.build_pair("depth_estimation", torch.zeros(3, 16, 16), torch.Generator())
    with pytest.raises(ValueError, match=r"image: expected a tensor of shape \[3, H, W\]"):
        tasks.build_pair("inpainting", torch.zeros(16, 16), torch.Generator())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tasks.build_pairs("inpainting", torch.zeros(2, 1, 16, 16), torch.Generator())
    with pytest.raises(ValueError, match="floating-point"):
        tasks.build_pairs("inpainting", torch.zeros(2, 3, 16, 16, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        tasks.build_pairs("inpainting", torch.zeros(1, 3, 16, 16), np.random.default_rng())


def test_load_save_image_roundtrip(tmp_path, photo):
    from lavin_fast.media import load_image, save_image

    save_image(photo, tmp_path / "x.png")
    back = load_image(tmp_path / "x.png")
    assert back.shape == photo.shape and (back - photo).abs().max() <= 1 / 127.5 + 1e-6
    small = load_image(tmp_path / "x.png", resolution=(32, 48))
    assert small.shape == (3, 32, 48) and small.min() >= -1 and small.max() <= 1
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(OSError, match="cannot read"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"image: expected a tensor \[3, H, W\]"):
        save_image(torch.zeros(2, 4, 4), tmp_path / "y.png")


@pytest.mark.gpu
@pytest.mark.parametrize("task", sorted(tasks.COMPUTED_TASKS))
def test_builders_on_cuda_match_cpu(task, photo):
    imgs = torch.stack([photo, photo.flip(-1)])
    cpu_in, cpu_tgt = tasks.build_pairs(task, imgs, torch.Generator().manual_seed(5))
    gpu_in, gpu_tgt = tasks.build_pairs(task, imgs.cuda(), torch.Generator().manual_seed(5))
    assert gpu_in.is_cuda and gpu_tgt.is_cuda
    if task == "edge_detection":  # thresholds on rounded values: allow a few flipped pixels
        assert (gpu_tgt.cpu() != cpu_tgt).float().mean() < 0.01
    else:
        torch.testing.assert_close(gpu_in.cpu(), cpu_in, atol=2e-3, rtol=0)
        torch.testing.assert_close(gpu_tgt.cpu(), cpu_tgt, atol=2e-3, rtol=0)
