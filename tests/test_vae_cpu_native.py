"""The ST-VAE decoder's CPU whole-clip path: SpatialNorm + SiLU on torch's native GroupNorm with the latent's
modulation broadcast in place (`SpatialNorm.forward_native`), checked against the published structure's plain
float64 math (bench/published_vae.py: GroupNorm module, F.interpolate of the latent, two 1x1x1 convs at full
resolution), which shares no code with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lavin_fast.models.vae_blocks as vb
from bench.published_vae import PlainSpatialNorm, PublishedVAE, randomize_vae_
from lavin_fast.models import build_vae

TINY = dict(block_out_channels=(32, 32, 64, 64), norm_num_groups=8, layers_per_block=1)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
# float32 against float64: the measured errors are ~2e-7 (SpatialNorm alone) and ~1e-6 (whole decoder or encoder); the bounds
# are a few times that, far below what a 1% slip in any term (a wrong eps, group or frame mapping) produces
NORM_TOL = 2e-6
DECODE_TOL = 1e-5
GRAD_TOL = 3e-5  # measured 6e-6 (the largest over all parameters)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _pair(C: int = 64, zc: int = 16, G: int = 8, seed: int = 0) -> tuple[vb.SpatialNorm, PlainSpatialNorm]:
    """Our SpatialNorm (float32) and the published one (float64) with the same random weights."""
    ours = vb.SpatialNorm(C, zc, G, 1e-6)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
        ours.norm_layer.weight.add_(1.0)
    pub = PlainSpatialNorm(C, zc, G, 1e-6).double()
    pub.load_state_dict(ours.state_dict())
    return ours, pub


def _inputs(B, C, Tf, H, W, Tz, h, w, fmt, seed=1):
    g = torch.Generator().manual_seed(seed)
    # an offset and a spread per channel, so that a missing mean or rstd shows at once
    f = torch.randn(B, C, Tf, H, W, generator=g, dtype=torch.float64) * 3 + torch.randn(1, C, 1, 1, 1, generator=g)
    zq = torch.randn(B, 16, Tz, h, w, generator=g, dtype=torch.float64)
    return f.contiguous(memory_format=fmt), zq.contiguous(memory_format=fmt)


SHAPES = [  # (Tf, H, W, Tz, h, w): an image at 8x (the last level), a clip at 4x with the time rule, same size
    (1, 48, 40, 1, 6, 5),
    (9, 16, 24, 3, 4, 6),
    (5, 8, 8, 2, 8, 8),
]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", SHAPES)
def test_native_spatial_norm_matches_published_float64(shape, layout):
    Tf, H, W, Tz, h, w = shape
    ours, pub = _pair()
    f, zq = _inputs(2, 64, Tf, H, W, Tz, h, w, LAYOUTS[layout])
    ctx = vb.RunContext()
    with torch.no_grad():
        want = F.silu(pub(f, zq))
        got = ours.forward_native(f.float(), zq.float(), ctx)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.is_contiguous(memory_format=LAYOUTS[layout])  # the input's layout is kept (no hidden copies)
    assert _rel(got, want) < NORM_TOL


def test_native_spatial_norm_gradients_match_published_float64():
    """The demo fits the ST-VAE through decode: under autograd the pieces are new tensors (no in-place writes)."""
    ours, pub = _pair()
    f, zq = _inputs(2, 64, 9, 16, 24, 3, 4, 6, torch.contiguous_format)
    g = torch.Generator().manual_seed(2)
    upstream = torch.randn(f.shape, generator=g, dtype=torch.float64)
    f32, z32 = f.float().requires_grad_(), zq.float().requires_grad_()
    (ours.forward_native(f32, z32, vb.RunContext()) * upstream.float()).sum().backward()
    f64, z64 = f.clone().requires_grad_(), zq.clone().requires_grad_()
    (F.silu(pub(f64, z64)) * upstream).sum().backward()
    # measured 2e-7 to 6e-7
    assert _rel(f32.grad, f64.grad) < 3e-6 and _rel(z32.grad, z64.grad) < 3e-6
    for name, p in ours.named_parameters():
        assert _rel(p.grad, pub.get_parameter(name).grad) < 3e-6, name


def test_native_spatial_norm_bfloat16_error_is_bfloat16_sized():
    ours, pub = _pair()
    f, zq = _inputs(2, 64, 9, 16, 24, 3, 4, 6, torch.channels_last_3d)
    ours.to(torch.bfloat16)
    with torch.no_grad():
        want = F.silu(pub(f, zq))
        got = ours.forward_native(f.bfloat16(), zq.bfloat16(), vb.RunContext())
    assert got.dtype == torch.bfloat16
    # bfloat16 rounding of the input, the weights and the output (2^-8 each; measured 5.7e-3): well above float32's
    # error, and at about twice the measured value
    assert 1e-4 < _rel(got, want) < 1.2e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("T", [1, 9])
def test_decoder_cpu_path_matches_published_float64(monkeypatch, T, layout):
    vae = randomize_vae_(build_vae(**TINY))
    vae.channels_last = layout == "channels_last"
    pub64 = PublishedVAE(**TINY).double().eval()
    pub64.load_state_dict(vae.state_dict())
    calls = []
    real = vb.SpatialNorm.forward_native

    def spy(self, f, zq, ctx):
        calls.append(f.shape)
        return real(self, f, zq, ctx)

    monkeypatch.setattr(vb.SpatialNorm, "forward_native", spy)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 16, 1 + (T - 1) // 4, 4, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        want = pub64.decode(z)
        got = vae.decode(z.float())
    n_norms = sum(isinstance(m, vb.SpatialNorm) for m in vae.decoder.modules())
    assert len(calls) == n_norms  # every SpatialNorm took the native path
    assert got.shape == want.shape
    assert _rel(got, want) < DECODE_TOL


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("T", [1, 9])
def test_encoder_cpu_path_matches_published_float64(T, layout):
    """Encode on the CPU path (native GroupNorm + SiLU; one-frame clips through the cached folded 2D conv)."""
    vae = randomize_vae_(build_vae(**TINY))
    vae.channels_last = layout == "channels_last"
    pub64 = PublishedVAE(**TINY).double().eval()
    pub64.load_state_dict(vae.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, T, 32, 24, generator=g, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        want, _ = pub64.encode(x)
        got = vae.encode(x.float()).mean
    assert _rel(got, want) < DECODE_TOL


def test_cpu_path_gradients_match_published_float64():
    """The demo fits the ST-VAE on the CPU through encode + decode of images: every parameter's gradient."""
    vae = randomize_vae_(build_vae(**TINY)).train()
    pub64 = PublishedVAE(**TINY).double()
    pub64.load_state_dict(vae.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.rand(2, 3, 1, 32, 24, generator=g, dtype=torch.float64) * 2 - 1
    u = torch.randn(2, 3, 1, 32, 24, generator=g, dtype=torch.float64)
    (vae.decode(vae.encode(x.float()).mean) * u.float()).sum().backward()
    mean, _ = pub64.encode(x)
    (pub64.decode(mean) * u).sum().backward()
    worst = max(_rel(p.grad, pub64.get_parameter(n).grad) for n, p in vae.named_parameters())
    assert worst < GRAD_TOL
