"""Computed task builders: shapes, ranges, determinism and one property per task."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lavin_fast.data import tasks
from lavin_fast.media import to_uint8


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
    inp, tgt = tasks.build_pair("colorization", photo, torch.Generator(), impl="torch")
    assert torch.equal(inp[0], inp[1]) and torch.equal(inp[1], inp[2])
    assert torch.equal(tgt, photo)
    expect = 0.299 * photo[0] + 0.587 * photo[1] + 0.114 * photo[2]
    torch.testing.assert_close(inp[0], expect)


def test_cpu_path_is_opencv_and_albumentations(photo):
    """On CPU images the default path calls the libraries: its outputs are theirs, to the bit."""
    import cv2
    from albumentations.augmentations.blur import functional as fblur
    from albumentations.augmentations.pixel import functional as fpixel

    u8 = to_uint8(photo)
    inp, _ = tasks.build_pair("colorization", photo, torch.Generator())
    assert np.array_equal(to_uint8(inp)[..., 0], cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY))
    _, edges = tasks.build_pair("edge_detection", photo, torch.Generator())
    assert np.array_equal((edges[0] > 0).numpy(), cv2.Canny(cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY), 100, 200) > 0)
    h, w = photo.shape[-2:]
    (sigma, delta, iters, dxy), *_ = tasks.glass_params(1, h, w, torch.Generator().manual_seed(4))
    inp, _ = tasks.build_pair("de_glass_blur", photo, torch.Generator().manual_seed(4))
    assert np.array_equal(to_uint8(inp), fblur.glass_blur(u8, sigma, delta, iters, dxy, "fast"))
    (slant, length, blur, drops), *_ = tasks.rain_params(1, h, w, torch.Generator().manual_seed(4))
    inp, _ = tasks.build_pair("deraining", photo, torch.Generator().manual_seed(4))
    ref = fpixel.add_rain(u8, slant, length, 1, (200, 200, 200), blur, 0.7, drops)
    assert np.array_equal(to_uint8(inp), ref)
    (size, angle, direction, shift), *_ = tasks.motion_params(1, h, w, torch.Generator().manual_seed(4))
    inp, _ = tasks.build_pair("de_motion_blur", photo, torch.Generator().manual_seed(4))
    ref = fpixel.convolve(u8, kernel=tasks.motion_kernel(size, angle, direction, shift))
    assert np.array_equal(to_uint8(inp), ref)


# The torch versions (the GPU path) against the libraries, same drawn parameters. Tolerance in levels of
# 255: the library path works on uint8 and rounds (the input, each intermediate image, the output), the
# torch path does not; each rounding moves a value by at most 0.5 level (scaled by what follows it):
# colorization and motion blur 2 roundings (input, output) -> 1.0; rain 0.7 x (input + blurred streaks)
# + output -> 1.2; glass blur input, first blur, output, plus OpenCV's fixed-point 8-bit Gaussian -> 2.0.
# Canny: the edge maps are equal on these photos; a pixel whose gradient sits on a threshold may flip
# when OpenCV's fixed-point luma rounds differently, so up to 0.5% of pixels may differ.
TOLERANCE_LEVELS = {"colorization": 1.0, "de_motion_blur": 1.0, "deraining": 1.2, "de_glass_blur": 2.0}


@pytest.mark.parametrize("size", [32, 96, 200])
@pytest.mark.parametrize("task", sorted(set(TOLERANCE_LEVELS) | {"edge_detection", "inpainting"}))
def test_torch_versions_match_the_libraries(task, size, photo):
    x = F.interpolate(photo[None], size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)
    x = torch.cat([x, x.flip(-1), torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1])
    lib_in, lib_tgt = tasks.build_pairs(task, x, torch.Generator().manual_seed(9), impl="library")
    ref_in, ref_tgt = tasks.build_pairs(task, x, torch.Generator().manual_seed(9), impl="torch")
    if task == "edge_detection":
        assert torch.equal(lib_in, ref_in)
        assert (lib_tgt != ref_tgt).float().mean() <= 0.005
        return
    assert torch.equal(lib_tgt, x) and torch.equal(ref_tgt, x)
    if task == "inpainting":
        assert torch.equal(lib_in, ref_in)
        return
    levels = float((lib_in - ref_in).abs().max()) * 127.5
    assert levels <= TOLERANCE_LEVELS[task] + 1e-3, f"{task} at {size} px: {levels:.3f} levels apart"


def test_glass_swaps_follow_numpys_assignment_order():
    """GlassBlur's swap is a numpy tuple assignment with repeated targets (the last wins): the torch port
    must give the same image, exactly."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (20, 24, 3)).astype(np.float32)
    d, iters = 3, 2
    dxy = rng.integers(-d, d, ((20 - 2 * d) * (24 - 2 * d), iters, 2))
    ref = img.copy()
    hs, ws = np.arange(20 - d, d, -1), np.arange(24 - d, d, -1)
    h, w = np.tile(hs, ws.shape[0]), np.repeat(ws, hs.shape[0])
    for i in range(iters):
        dy, dx = dxy[:, i, 0], dxy[:, i, 1]
        ref[h, w], ref[h + dy, w + dx] = ref[h + dy, w + dx], ref[h, w]
    ours = tasks.glass_swaps(torch.from_numpy(img).permute(2, 0, 1).contiguous(), d, torch.from_numpy(dxy))
    assert torch.equal(ours.permute(1, 2, 0), torch.from_numpy(ref))


def test_glass_swaps_take_no_host_sync(monkeypatch):
    """The torch glass blur runs in the loader's look-ahead on the GPU: no nonzero() / item() / tolist() (each a
    host sync on CUDA) in its swaps. The numbers are those of numpy's assignment order (test above)."""

    def sync(*a, **k):
        raise AssertionError("a host-synchronising call in the glass swaps")

    x = torch.rand(3, 20, 24)
    d = 3
    dxy = torch.randint(-d, d, ((20 - 2 * d) * (24 - 2 * d), 2, 2), generator=torch.Generator().manual_seed(0))
    ref = tasks.glass_swaps(x.clone(), d, dxy)
    for name in ("nonzero", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    assert torch.equal(tasks.glass_swaps(x.clone(), d, dxy), ref)


def test_rain_streaks_are_opencvs_lines():
    """The torch path's streaks are the pixels cv2.polylines(LINE_4) draws, clipped streaks included."""
    import cv2

    rng = np.random.default_rng(1)
    for _ in range(200):
        start = np.array([rng.integers(0, 48), rng.integers(0, 40)])
        end = (start + np.array([rng.uniform(-12, 12), rng.integers(1, 8)])).astype(np.int32)
        ref = np.zeros((48, 48), np.uint8)
        cv2.polylines(ref, np.array([[start, end]], np.int32), False, 255, 1, lineType=cv2.LINE_4)
        xs, ys = tasks.line4_points(*tasks._clip_x(start[None], end[None], 48))
        ok = (xs >= 0) & (xs < 48)
        ours = np.zeros_like(ref)
        ours[ys[ok], xs[ok]] = 255
        assert np.array_equal(ours, ref), (start, end)


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


@pytest.mark.parametrize("impl", ["library", "torch"])
def test_motion_blur_lowers_high_frequencies(impl, photo):
    inp, tgt = tasks.build_pair("de_motion_blur", photo, torch.Generator().manual_seed(1), impl=impl)
    assert _high_freq(inp) < 0.8 * _high_freq(tgt)


def test_glass_blur_moves_pixels_locally(photo):
    """Glass blur = blur, swap each pixel with one at most max_delta away, blur: at 512 px (delta 4) the
    result is closer to the image averaged over the swap distance (9 x 9) than to the blur alone
    (measured 6.5 against 10.2 levels on the astronaut)."""
    x = F.interpolate(photo[None], size=(512, 512), mode="bicubic", antialias=True).clamp(-1, 1)
    inp, _ = tasks.build_pairs("de_glass_blur", x, torch.Generator().manual_seed(1), impl="library")
    blurred = tasks.cv_gaussian_blur(tasks.cv_gaussian_blur(x, 0.7), 0.7)
    wide = F.avg_pool2d(F.pad(blurred, (4, 4, 4, 4), mode="reflect"), 9, stride=1)
    assert (inp - wide).abs().mean() < 0.8 * (inp - blurred).abs().mean()
    assert (inp - x).abs().mean() * 127.5 > 3


@pytest.mark.parametrize("impl", ["library", "torch"])
def test_rain_adds_bright_streaks(impl):
    img = torch.full((3, 96, 96), -0.6)  # a dark scene
    inp, tgt = tasks.build_pair("deraining", img, torch.Generator().manual_seed(2), impl=impl)
    streak = inp[0] > -0.5  # the scene darkens (x 0.7), the streaks are bright
    assert 0.01 < streak.float().mean() < 0.3
    assert float(inp[0][~streak].mean()) == pytest.approx((0.4 * 127.5 * 0.7) / 127.5 - 1, abs=1 / 127.5)
    # streaks are steep lines: most streak pixels have a streak neighbour above or below
    m = streak.numpy()
    assert (m[1:] & m[:-1]).sum() / m.sum() > 0.5


class _Fixed:
    """A random.Random stand-in handing back given values (create_motion_kernel's shift draws)."""

    def __init__(self, values):
        self.values = list(values)

    def uniform(self, a, b):
        return self.values.pop(0)


def test_motion_kernel_is_albumentations():
    from albumentations.augmentations.blur import functional as fblur

    k = tasks.motion_kernel(9, 0.0, 0.0, (0.0, 0.0))
    assert abs(float(k.sum()) - 1) < 1e-6 and float(k[4].sum()) > 0.99  # horizontal line through the centre
    assert float(tasks.motion_kernel(9, 90.0, 0.0, (0.0, 0.0))[:, 4].sum()) > 0.99
    for size, angle, direction, shift in tasks.motion_params(20, 512, 512, torch.Generator().manual_seed(0)):
        ref = fblur.create_motion_kernel(size, angle, direction, allow_shifted=True, random_state=_Fixed(shift))
        assert np.array_equal(tasks.motion_kernel(size, angle, direction, shift), ref / ref.sum())


def test_implementation_choice(monkeypatch, photo):
    with pytest.raises(ValueError, match="impl: expected one of"):
        tasks.build_pair("deraining", photo, torch.Generator(), impl="cv")
    monkeypatch.setattr(tasks.tasks_cv, "available", lambda: False)
    monkeypatch.setattr(tasks, "_warned_missing", False)
    with pytest.raises(ImportError, match=r"lavin-fast\[data\]"):
        tasks.build_pair("deraining", photo, torch.Generator(), impl="library")
    # without the libraries the CPU path falls back to torch
    auto, _ = tasks.build_pair("de_glass_blur", photo, torch.Generator().manual_seed(1))
    ref, _ = tasks.build_pair("de_glass_blur", photo, torch.Generator().manual_seed(1), impl="torch")
    assert torch.equal(auto, ref)


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
    cpu_in, cpu_tgt = tasks.build_pairs(task, imgs, torch.Generator().manual_seed(5), impl="torch")
    gpu_in, gpu_tgt = tasks.build_pairs(task, imgs.cuda(), torch.Generator().manual_seed(5))  # auto: torch on CUDA
    assert gpu_in.is_cuda and gpu_tgt.is_cuda
    if task == "edge_detection":  # thresholds on rounded values: allow a few flipped pixels
        assert (gpu_tgt.cpu() != cpu_tgt).float().mean() < 0.01
    else:
        torch.testing.assert_close(gpu_in.cpu(), cpu_in, atol=2e-3, rtol=0)
        torch.testing.assert_close(gpu_tgt.cpu(), cpu_tgt, atol=2e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("task", sorted(set(tasks.COMPUTED_TASKS) - {"edge_detection"}))
def test_builders_on_cuda_take_no_host_sync(task, photo):
    """The degradations run in the loader's look-ahead thread on its own stream: none of them may synchronise the
    host (torch's sync debug mode raises on item(), nonzero(), pageable copies ...). edge_detection is left out:
    its hysteresis waits, one round behind, on an event of its own stream (data/tasks.py, _hysteresis)."""
    imgs = torch.stack([photo, photo.flip(-1)]).cuda()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda.set_sync_debug_mode("error")
        try:
            tasks.build_pairs(task, imgs, torch.Generator().manual_seed(5))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    side.synchronize()
