"""LPIPS and FID mechanics with random weights, weight loading, and the Frechet distance against closed forms."""

import numpy as np
import pytest
import scipy.linalg
import torch

from lavin_fast.eval.fid import (
    InceptionV3Features,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_inception,
)
from lavin_fast.eval.lpips import LPIPS, load_lpips
from lavin_fast.models.checkpoints import CheckpointMismatch


def _random_lpips(net: str) -> LPIPS:
    m = LPIPS(net)
    with torch.no_grad():
        for lin in m.lins:  # LPIPS heads are non-negative (clamped in training)
            lin.weight.uniform_(0.0, 1.0)
    return m


@pytest.mark.parametrize("net,size", [("alex", 64), ("vgg", 16)])
def test_lpips_mechanics(net, size):
    m = _random_lpips(net)
    x = torch.rand(2, 3, size, size)
    y = torch.rand(2, 3, size, size)
    d = m(x, y)
    assert d.shape == (2,)
    assert torch.all(d > 0)
    assert torch.allclose(d, m(y, x), rtol=1e-5, atol=1e-7)
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-7)
    # a batch gives each pair's own distance
    assert torch.allclose(m(x[1:2], y[1:2]), d[1:2], rtol=1e-4, atol=1e-7)
    small = {"alex": 31, "vgg": 16}[net]
    assert m.net.min_size() == small
    with pytest.raises(ValueError, match=f"at least {small}x{small}"):
        m(x[..., : small - 1, :], y[..., : small - 1, :])
    # closer images are closer
    assert float(m(x, (x + 0.02 * torch.randn_like(x)).clamp(0, 1)).max()) < float(d.min())


def test_lpips_loads_both_key_layouts(tmp_path):
    src = _random_lpips("alex")
    x, y = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    want = src(x, y)
    # file layout: torchvision backbone names + LPIPS heads
    flat = {f"features.{k}.{p}": getattr(c, p).clone() for k, c in src.net.features.items() for p in ("weight", "bias")}
    flat.update({f"lin{k}.model.1.weight": lin.weight.clone() for k, lin in enumerate(src.lins)})
    torch.save(flat, tmp_path / "flat.pth")
    assert torch.allclose(load_lpips(tmp_path / "flat.pth")(x, y), want)
    # the lpips.LPIPS module's own layout: net.slice<j>.<i>.*, lin<k> and lins.<k> twins, scaling buffers
    slice_of = {"0": 1, "3": 2, "6": 3, "8": 4, "10": 5}
    mod = {f"net.slice{slice_of[k.split('.')[1]]}.{k.split('.', 1)[1]}": v for k, v in flat.items() if k[0] == "f"}
    for k, lin in enumerate(src.lins):
        mod[f"lin{k}.model.1.weight"] = lin.weight.clone()
        mod[f"lins.{k}.model.1.weight"] = lin.weight.clone()
    mod["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    mod["scaling_layer.scale"] = torch.ones(1, 3, 1, 1)
    torch.save(mod, tmp_path / "module.pth")
    assert torch.allclose(load_lpips(tmp_path / "module.pth")(x, y), want)
    # a missing head is named
    del flat["lin4.model.1.weight"]
    torch.save(flat, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch, match="lin4.model.1.weight"):
        load_lpips(tmp_path / "bad.pth")


def test_missing_weights_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="--lpips-weights"):
        load_lpips(None)
    with pytest.raises(ValueError, match="--fid-weights"):
        load_inception(None)
    with pytest.raises(FileNotFoundError, match="--fid-weights"):
        load_inception(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="--lpips-weights: cannot read"):
        load_lpips(tmp_path / "junk.pth")


def test_inception_features_and_loading(tmp_path):
    net = InceptionV3Features(resize=False)
    with torch.no_grad():  # non-trivial batch-norm statistics, so the load round trip is meaningful
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 75, 75)
    f = net(x)
    assert f.shape == (2, 2048) and torch.isfinite(f).all() and (f >= 0).all()
    # the torchvision variant differs only in pooling, which changes the features
    tv = InceptionV3Features(fid=False, resize=False)
    tv.load_state_dict(net.state_dict())
    assert not torch.allclose(tv(x), f)
    # torchvision layout with classifier, aux head and counters, which the loader ignores
    sd = dict(net.state_dict())
    sd["fc.weight"] = torch.zeros(1008, 2048)
    sd["fc.bias"] = torch.zeros(1008)
    sd["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    torch.save(sd, tmp_path / "inc.pth")
    loaded = load_inception(tmp_path / "inc.pth", resize=False)
    assert torch.allclose(loaded(x), f)
    del sd["Mixed_7c.branch_pool.bn.running_var"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch, match="Mixed_7c.branch_pool.bn.running_var"):
        load_inception(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="at least 75x75"):
        net(torch.rand(1, 3, 64, 75))


def test_frechet_distance_of_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    assert frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_full_covariance_against_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 12
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-8)
    assert got == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-10)  # symmetric


def test_fid_from_features_of_gaussian_samples_and_singular_covariance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # closed form: 4 * 1^2 (means) + 4 * (1 - 2)^2 (stds)
    assert fid_from_features(a, b) == pytest.approx(8.0, rel=0.05)
    mu, cov = feature_statistics(a[:5])
    assert mu.shape == (4,) and cov.shape == (4, 4)
    few = torch.randn(3, 64, generator=g)  # fewer samples than dimensions: singular, still finite and >= 0
    assert 0 <= fid_from_features(few, few + 0.5) < float("inf")
    # the low-rank path (Na * Nb <= D^2) against the covariance path
    fa = torch.randn(30, 40, generator=g, dtype=torch.float64)
    fb = torch.randn(25, 40, generator=g, dtype=torch.float64) * 1.5 + 0.3
    want = frechet_distance(*feature_statistics(fa), *feature_statistics(fb))
    # the covariances are singular (N < D): the eigen path takes square roots of round-off-sized eigenvalues,
    # which limits the agreement to ~sqrt(eps); with full-rank covariances the two agree to the last digit
    assert fid_from_features(fa, fb) == pytest.approx(want, rel=1e-7)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(a[:1])
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
