"""Depth and normals as images: the one encoding (lavin_fast.dense_maps) round-trips through 8-bit files, the
sampler's prediction writer and the evaluator's decoding."""

import numpy as np
import pytest
import torch

from lavin_fast.dense_maps import depth_to_image, image_to_depth, image_to_normals, normals_to_image
from lavin_fast.eval.tasks import load_depth, load_normals
from lavin_fast.flow.batch import write_prediction
from lavin_fast.media import save_image


def _depth(h=24, w=20):
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (1.5 + 2.0 * y + 0.5 * torch.sin(6 * x))[None]  # metres, [1, H, W]


def _normals(h=24, w=20):
    g = torch.Generator().manual_seed(0)
    n = torch.randn(3, h, w, generator=g)
    n[2] = n[2].abs() + 0.5  # facing the camera
    return n / n.norm(dim=0, keepdim=True)


def test_depth_round_trip_through_a_png_and_the_evaluator(tmp_path):
    d = _depth()
    img = depth_to_image(d)
    assert img.shape == (3, *d.shape[-2:]) and float(img.min()) == -1 and float(img.max()) == 1
    save_image(img, tmp_path / "d.png")
    back = load_depth(tmp_path / "d.png", is_gt=False, depth_scale=1000.0)[0]  # the evaluator's decoding
    unit = (d[0] - d.min()) / (d.max() - d.min())
    assert (back - unit.double()).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only


def test_depth_round_trip_through_the_sampler_writer(tmp_path):
    img = depth_to_image(_depth())
    write_prediction(img, tmp_path, "q", "depth")
    png = load_depth(tmp_path / "q.png", is_gt=False, depth_scale=1.0)
    npy = load_depth(tmp_path / "q.npy", is_gt=False, depth_scale=1.0)
    assert torch.allclose(npy, image_to_depth(img).double(), atol=1e-6)
    assert (png - npy).abs().max() <= 0.5 / 255 + 1e-6


def test_colour_mapped_depth_is_refused_naming_the_file(tmp_path):
    import matplotlib

    unit = ((_depth() - 1.5) / 2.5)[0].numpy()
    rgb = (matplotlib.colormaps["turbo"](unit)[..., :3] * 255).round().astype(np.uint8)
    save_image(rgb, tmp_path / "turbo.png")
    with pytest.raises(ValueError, match=r"turbo\.png: not a grey depth image"):
        load_depth(tmp_path / "turbo.png", is_gt=False, depth_scale=1.0)


def test_normals_round_trip_through_a_png_the_writer_and_the_evaluator(tmp_path):
    n = _normals()
    img = normals_to_image(n)
    assert torch.allclose(image_to_normals(img), n, atol=1e-6)
    write_prediction(img, tmp_path, "q", "normal")
    for f in ("q.png", "q.npy"):
        back = load_normals(tmp_path / f)
        back = back / back.norm(dim=0, keepdim=True)
        ang = torch.rad2deg(torch.acos((back * n).sum(0).clamp(-1, 1)))
        assert float(ang.max()) < (0.9 if f == "q.png" else 0.05), f  # 8-bit: under a degree; .npy: acos rounding


def test_encoding_rejects_bad_input():
    with pytest.raises(ValueError, match="depth: expected a tensor"):
        depth_to_image(torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="NaN or Inf"):
        depth_to_image(torch.full((1, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="no valid pixel"):
        depth_to_image(torch.zeros(1, 4, 4))


def test_writer_refuses_a_non_finite_prediction_and_resume_clears_leftovers(tmp_path):
    from lavin_fast.flow.batch import is_done

    bad = torch.zeros(3, 4, 4)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="'q' holds NaN/Inf"):
        write_prediction(bad, tmp_path, "q", "image")
    assert not any(tmp_path.iterdir())
    (tmp_path / "q.tmp.npy").write_bytes(b"half")  # an interrupted write
    assert not is_done(tmp_path, "q", "depth") and not (tmp_path / "q.tmp.npy").exists()
    write_prediction(torch.zeros(3, 4, 4), tmp_path, "q", "depth")
    assert is_done(tmp_path, "q", "depth") and sorted(p.name for p in tmp_path.iterdir()) == ["q.npy", "q.png"]
