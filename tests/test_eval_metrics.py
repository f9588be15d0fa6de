"""Pixel metrics of lavin_fast.eval against scikit-image, numpy least squares, and closed forms."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lavin_fast.eval import metrics as M


def _smooth_pair(n, c, h, w, noise=0.08):
    x = torch.rand(n, c, h, w, dtype=torch.float64)
    x = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)  # some structure, not white noise only
    y = (x + noise * torch.randn_like(x)).clamp(0, 1)
    return x, y


def _hwc(t):
    return t.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("shape", [(3, 3, 32, 29), (2, 1, 11, 40), (1, 3, 64, 64)])
def test_ssim_matches_skimage(shape):
    x, y = _smooth_pair(*shape)
    ours = M.ssim(x, y)
    assert ours.shape == (shape[0],)
    for i in range(shape[0]):
        ref = structural_similarity(
            _hwc(x[i]),
            _hwc(y[i]),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=2,
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-6)


def test_ssim_data_range_and_float32_input():
    x, y = _smooth_pair(2, 3, 24, 24)
    x255, y255 = x * 255, y * 255
    ours = M.ssim(x255.float(), y255.float(), data_range=255.0)
    for i in range(2):
        ref = structural_similarity(
            _hwc(x255[i]), _hwc(y255[i]), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
            data_range=255.0, channel_axis=2,
        )  # fmt: skip
        assert float(ours[i]) == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(M.ssim(x, x), torch.ones(2))


def test_psnr_and_mse_match_skimage_and_numpy():
    x, y = _smooth_pair(3, 3, 20, 17)
    ours = M.psnr(x, y)
    mse = M.mse(x, y)
    for i in range(3):
        assert float(ours[i]) == pytest.approx(
            peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=1.0), abs=1e-4
        )
        assert float(mse[i]) == pytest.approx(np.mean((x[i].numpy() - y[i].numpy()) ** 2), rel=1e-6)
    assert math.isinf(float(M.psnr(x, x)[0]))


def test_image_metrics_reject_bad_input():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same shape"):
        M.ssim(x, torch.rand(1, 3, 16, 15))
    with pytest.raises(ValueError, match="pred must be"):
        M.psnr(x[0], x[0])
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="floating-point"):
        M.mse(x.to(torch.uint8), x.to(torch.uint8))


def test_affine_alignment_recovers_scale_and_shift_exactly():
    pred = torch.rand(3, 12, 14, dtype=torch.float64) + 0.1
    scale = torch.tensor([2.5, 0.3, 7.0], dtype=torch.float64)
    shift = torch.tensor([0.7, 1.2, -0.5], dtype=torch.float64)
    gt = scale.view(-1, 1, 1) * pred + shift.view(-1, 1, 1)  # > 0.2 everywhere
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[:, :3] = False  # pixels outside the mask, or without ground truth (gt <= 0), do not count
    gt[0, 5, :] = 0.0
    pred[0, 5, :] = 50.0
    pred[1, :3] = 100.0  # garbage in the invalid region must not move the fit
    gt[2, :3] = -1.0
    out = M.aligned_depth_errors(pred, gt, valid)
    assert torch.allclose(out["scale"].double(), scale, rtol=1e-5)
    assert torch.allclose(out["shift"].double(), shift, rtol=1e-5, atol=1e-6)
    assert float(out["abs_rel"].abs().max()) < 1e-6
    assert float(out["mse"].abs().max()) < 1e-10


def test_affine_alignment_against_numpy_lstsq():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 9, 10, generator=g, dtype=torch.float64)
    gt = 3 * pred + 1 + 0.2 * torch.rand(2, 9, 10, generator=g, dtype=torch.float64)
    valid = torch.rand(2, 9, 10, generator=g) > 0.3
    out = M.aligned_depth_errors(pred, gt, valid)
    for i in range(2):
        p, t = pred[i][valid[i]].numpy(), gt[i][valid[i]].numpy()
        (s, b), *_ = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), t, rcond=None)
        a = s * p + b
        assert float(out["scale"][i]) == pytest.approx(s, rel=1e-6)
        assert float(out["shift"][i]) == pytest.approx(b, rel=1e-6)
        assert float(out["abs_rel"][i]) == pytest.approx(np.mean(np.abs(a - t) / t), rel=1e-5)
        assert float(out["mse"][i]) == pytest.approx(np.mean((a - t) ** 2), rel=1e-5)


def test_disparity_space_alignment_is_exact_for_affine_inverse_depth():
    depth = 0.5 + 4 * torch.rand(2, 8, 8, dtype=torch.float64)
    pred = (1.0 / depth - 0.1) / 3.0  # affine in inverse depth
    out = M.aligned_depth_errors(pred, depth, space="disparity")
    assert float(out["abs_rel"].max()) < 1e-9
    # aligning the same prediction in depth space is not exact
    assert float(M.aligned_depth_errors(pred, depth)["abs_rel"].min()) > 1e-3


def test_affine_alignment_degenerate_and_errors():
    pred = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    gt = torch.arange(1, 17, dtype=torch.float64).view(1, 4, 4)
    s, t = M.affine_align(pred, gt, torch.ones(1, 4, 4, dtype=torch.bool))
    assert float(s[0]) == 0.0 and float(t[0]) == pytest.approx(8.5)
    with pytest.raises(ValueError, match="at least one pixel"):
        M.aligned_depth_errors(pred, torch.zeros_like(gt))
    with pytest.raises(ValueError, match="space must be"):
        M.aligned_depth_errors(pred, gt, space="log")


def test_angular_error_of_known_vectors_through_rgb_encoding():
    vec = {
        "x": (1.0, 0.0, 0.0),
        "y": (0.0, 1.0, 0.0),
        "xy": (1 / math.sqrt(2), 1 / math.sqrt(2), 0.0),
        "z": (0.0, 0.0, 1.0),
        "-z": (0.0, 0.0, -1.0),
    }
    pairs = [("x", "y", 90.0), ("xy", "x", 45.0), ("z", "-z", 180.0), ("z", "z", 0.0)]
    pred = torch.zeros(1, 3, 1, len(pairs) + 1, dtype=torch.float64)
    gt = torch.zeros_like(pred)
    for j, (a, b, _) in enumerate(pairs):
        pred[0, :, 0, j] = (torch.tensor(vec[a], dtype=torch.float64) * 0.7 + 1) / 2  # not unit: renormalised
        gt[0, :, 0, j] = (torch.tensor(vec[b], dtype=torch.float64) + 1) / 2
    gt[0, :, 0, -1] = 0.5  # gray = zero vector = no ground truth
    pred[0, :, 0, -1] = 1.0
    ang, mask = M.angular_error(M.decode_normals(pred), M.decode_normals(gt))
    assert mask[0, 0].tolist() == [True] * len(pairs) + [False]
    for j, (_, _, want) in enumerate(pairs):
        assert float(ang[0, 0, j]) == pytest.approx(want, abs=1e-6)
    mean = M.mean_angular_error(M.decode_normals(pred), M.decode_normals(gt))
    assert float(mean[0]) == pytest.approx(sum(p[2] for p in pairs) / len(pairs), abs=1e-4)
    only_first = torch.zeros(1, 1, len(pairs) + 1, dtype=torch.bool)
    only_first[0, 0, 0] = True
    assert float(M.mean_angular_error(M.decode_normals(pred), M.decode_normals(gt), only_first)[0]) == pytest.approx(90)


def test_mask_iou_of_known_masks_and_threshold_rule():
    pred = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt = torch.zeros_like(pred)
    pred[0, 0:4, 0:4] = True  # 16 pixels
    gt[0, 2:6, 0:4] = True  # overlap 8, union 24
    pred[1, 0:2, 0:2] = True  # disjoint: IoU 0
    gt[1, 5:7, 5:7] = True
    # image 2: both empty -> 1
    iou, inter, union = M.mask_iou(pred, gt)
    assert iou.tolist() == pytest.approx([1 / 3, 0.0, 1.0])
    assert inter.tolist() == [8, 0, 0] and union.tolist() == [24, 8, 0]
    assert M.miou(pred, gt) == pytest.approx((1 / 3 + 0 + 1) / 3)
    rgb = torch.tensor([0.0, 0.4, 0.6, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert M.rgb_to_mask(rgb).tolist() == [[[False, False, True, True]]]
    assert M.rgb_to_mask(rgb, threshold=0.3).tolist() == [[[False, True, True, True]]]
    with pytest.raises(ValueError, match="bool"):
        M.mask_iou(pred.float(), gt)
