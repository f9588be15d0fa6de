"""Our LPIPS and FID networks give the numbers of the reference packages (`lpips`, `pytorch-fid`), with the same
weights in both: random backbones (no download; pytorch-fid's weight download is replaced by a random state
dict) and, for LPIPS, the package's bundled linear heads. Needs the [eval] extra (lpips, pytorch-fid, torchvision);
skipped without it."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch

from lavin_fast.eval.fid import fid_from_features, load_inception
from lavin_fast.eval.lpips import load_lpips

_schemas = []  # keeps the stand-in op library alive


def _import_torchvision():
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        pytest.skip("torchvision is not installed (the [eval] extra)")
    if "torchvision" not in sys.modules:
        libs = sorted(pathlib.Path(spec.origin).parent.glob("_C*.so"))
        try:
            torch.ops.load_library(str(libs[0]))
        except Exception:
            # a torchvision whose compiled ops do not load beside this torch (e.g. its CUDA wheel beside CPU torch):
            # the networks used here need none of them, but importing torchvision registers fakes for two
            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _schemas.append(lib)
    import torchvision

    return torchvision


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)  # structure


@pytest.mark.parametrize("net", ["alex", pytest.param("vgg", marks=pytest.mark.slow)])
def test_lpips_equals_the_lpips_package(tmp_path, net):
    _import_torchvision()
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()  # random backbone, the bundled v0.1 heads
    path = tmp_path / "lpips.pth"
    torch.save(ref.state_dict(), path)
    ours = load_lpips(path)
    x, y = _images(4, 64, 1), _images(4, 64, 2)
    y[0] = x[0]  # one identical pair: distance 0 in both
    with torch.no_grad():
        theirs = ref(x * 2 - 1, y * 2 - 1).flatten()  # lpips takes [-1, 1]; ours [0, 1]
        mine = ours(x, y)
    assert float(theirs[1:].min()) > 0
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


def _random_inception_state(seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of the FID Inception (torchvision Inception3 names, 1008 classes) drawn at random, with
    batch-norm statistics that keep the activations of order one through the 94 layers."""
    tv = _import_torchvision()
    torch.manual_seed(seed)
    model = tv.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith("bn.bias"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # conv and fc weights: He-scaled
            fan_in = v[0].numel() if v.dim() > 1 else 1
            sd[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return sd


@pytest.mark.slow  # ~20 s on 2 cores: two Inception-v3 forwards
def test_fid_inception_and_distance_equal_pytorch_fid(tmp_path, monkeypatch):
    _import_torchvision()
    inception = pytest.importorskip("pytorch_fid.inception")
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    sd = _random_inception_state(0)
    # pytorch-fid downloads the FID weights; hand it the random ones instead (no network in tests)
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: sd)
    block = [inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]
    ref = inception.InceptionV3(block, resize_input=False, use_fid_inception=True).eval()
    path = tmp_path / "inception.pth"
    torch.save(sd, path)
    ours = load_inception(path, resize=False)  # 96 px in, no resize: a tenth of the 299 px cost on CPU
    a, b = _images(6, 96, 3), _images(6, 96, 4) * 0.8
    with torch.no_grad():
        fa_ref, fb_ref = (ref(x)[0].flatten(1).double() for x in (a, b))
        fa, fb = (ours(x).double() for x in (a, b))
        # and the resizing front end (to 299, bilinear) on one image
        ref.resize_input, ours.resize = True, True
        one_ref, one = ref(a[:1])[0].flatten(1), ours(a[:1])
    assert float(fa_ref.std()) > 1e-3  # the random network's features are not degenerate
    torch.testing.assert_close(fa, fa_ref, rtol=1e-4, atol=1e-4 * float(fa_ref.abs().max()))
    torch.testing.assert_close(fb, fb_ref, rtol=1e-4, atol=1e-4 * float(fb_ref.abs().max()))
    torch.testing.assert_close(one, one_ref, rtol=1e-4, atol=1e-4 * float(one_ref.abs().max()))

    # the Frechet distance of the two networks' features (a few dimensions: scipy's sqrtm, which pytorch-fid
    # uses, takes minutes on 2048 x 2048 here; the full-size formula is compared on Gaussian samples below)
    assert fid_from_features(fa[:, :4], fb[:, :4]) == pytest.approx(
        fid_score.calculate_frechet_distance(*_stats(fa_ref[:, :4]), *_stats(fb_ref[:, :4])), rel=1e-4
    )


def _stats(f: torch.Tensor):
    f = f.double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def test_frechet_distance_equals_pytorch_fid():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(48, 48, generator=g, dtype=torch.float64)
    a = torch.randn(300, 48, generator=g, dtype=torch.float64) @ mix
    b = torch.randn(300, 48, generator=g, dtype=torch.float64) @ (mix * 0.9) + 0.3
    theirs = fid_score.calculate_frechet_distance(*_stats(a), *_stats(b))
    assert theirs > 1
    assert fid_from_features(a, b) == pytest.approx(theirs, rel=1e-6)
