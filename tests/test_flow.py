"""Flow matching: time sampling, grids, loss, Euler + guidance sampler."""

from __future__ import annotations

import pytest
import torch

from lavin_fast.flow.loss import (
    draw_flow_randomness,
    flow_matching_loss,
    interpolate,
    null_context,
    velocity_target,
)
from lavin_fast.flow.sampler import euler_sample, guided_velocity, guided_velocity_reference, sample_latents
from lavin_fast.flow.timesteps import PUBLISHED_GRIDS, sample_logit_normal, time_grid
from lavin_fast.models.dit import build_dit


def _random_dit():
    """A tiny J-DiT with every weight perturbed: from-scratch init zeroes the gates (context has no effect)."""
    model = build_dit("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_logit_normal_distribution():
    t = sample_logit_normal(20000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    with pytest.raises(ValueError, match="std"):
        sample_logit_normal(3, std=0.0)


@pytest.mark.parametrize("n", [20, 30, 40])
def test_published_grids_exact(n):
    g = time_grid(n, "published")
    assert g.numel() == n and g[0] == 0 and g[-1] == 1 and bool((g[1:] > g[:-1]).all())
    assert g.tolist() == list(PUBLISHED_GRIDS[n])


def test_grid_errors_and_uniform():
    assert torch.allclose(time_grid(5), torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64))
    with pytest.raises(ValueError, match="20, 30, 40"):
        time_grid(25, "published")
    with pytest.raises(ValueError, match="num_points"):
        time_grid(1)
    with pytest.raises(ValueError, match="kind"):
        time_grid(10, "cosine")


def test_published_20_points_gives_19_updates():
    calls = []

    def velocity(z, t):
        calls.append(t[0].item())
        return torch.ones_like(z)

    z = euler_sample(velocity, torch.zeros(2, 1, 1, 2, 2), time_grid(20, "published"))
    assert len(calls) == 19
    assert calls == pytest.approx(list(PUBLISHED_GRIDS[20][:-1]), abs=1e-6)
    # constant velocity 1 over [0, 1] moves the state by exactly 1
    assert torch.allclose(z, torch.ones_like(z), atol=1e-6)


def test_euler_exact_for_linear_path():
    # along the straight path the true velocity is x1 - x0 everywhere: Euler lands on the data
    x0, x1 = torch.randn(3, 4), torch.randn(3, 4)
    z = euler_sample(lambda z, t: x1 - x0, x0, time_grid(7))
    assert torch.allclose(z, x1, atol=1e-5)


def test_interpolation_conventions():
    x1, x0 = torch.randn(2, 16, 1, 4, 4), torch.randn(2, 16, 1, 4, 4)
    t = torch.tensor([0.0, 1.0])
    xt = interpolate(x1, x0, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[1], x1[1])  # t=0 noise, t=1 data
    assert torch.equal(velocity_target(x1, x0), x1 - x0)
    nc = null_context(torch.randn(2, 16, 5, 4, 4))
    assert nc.shape == (2, 16, 2, 4, 4) and nc[:, :, 0].abs().sum() == 0


def test_draws_independent_of_world_size_and_accumulation():
    kw = dict(seed=3, step=5, latent_shape=(16, 1, 2, 2), null_prob=0.5, device="cpu")
    full = draw_flow_randomness(indices=range(4), group=range(4), **kw)
    lo = draw_flow_randomness(indices=range(2), group=range(4), **kw)
    hi = draw_flow_randomness(indices=range(2, 4), group=range(4), **kw)
    assert torch.equal(torch.cat([lo.noise, hi.noise]), full.noise)
    assert torch.equal(torch.cat([lo.t, hi.t]), full.t) and lo.null + hi.null == full.null
    assert lo.any_null == full.any_null
    micro = draw_flow_randomness(indices=range(2, 4), group=range(2, 4), **kw)  # 2nd accumulation micro-batch
    assert torch.equal(micro.noise, hi.noise) and torch.equal(micro.t, hi.t)
    other = draw_flow_randomness(indices=range(4), group=range(4), **{**kw, "step": 6})
    assert not torch.equal(other.noise, full.noise)


def test_loss_matches_definition_with_null_context():
    model = _random_dit()
    x1, cond = torch.randn(4, 16, 1, 4, 4), torch.randn(4, 16, 3, 4, 4)
    draws = draw_flow_randomness(
        seed=0, step=0, indices=range(4), group=range(4), latent_shape=x1.shape[1:], null_prob=0.5, device="cpu"
    )
    draws.null = (True, False, False, True)
    draws.any_null, draws.all_null = True, False
    loss, per = flow_matching_loss(model, x1, cond, draws)
    xt = interpolate(x1, draws.noise, draws.t)
    expected = []
    for i in range(4):
        c = null_context(cond[i : i + 1]) if draws.null[i] else cond[i : i + 1]
        v = model(xt[i : i + 1], draws.t[i : i + 1], c)
        expected.append(((v - (x1[i : i + 1] - draws.noise[i : i + 1])) ** 2).mean())
    assert torch.allclose(per, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert torch.allclose(loss, torch.stack(expected).mean(), rtol=1e-5)


def test_guidance_scale_one_is_conditional():
    model = _random_dit()
    x, t, cond = torch.randn(2, 16, 1, 4, 4), torch.rand(2), torch.randn(2, 16, 5, 4, 4)
    with torch.no_grad():
        v_c = model(x, t, cond)
        assert torch.equal(guided_velocity(model, x, t, cond, 1.0), v_c)
        g = guided_velocity(model, x, t, cond, 1.5)
        ref = guided_velocity_reference(model, x, t, cond, 1.5)
    assert not torch.allclose(g, v_c)
    assert torch.allclose(g, ref, atol=1e-5, rtol=1e-4)


def test_sampling_deterministic_for_seed():
    model = _random_dit()
    cond = torch.randn(2, 16, 3, 4, 4)
    a = sample_latents(model, cond, (2, 16, 1, 4, 4), num_points=5, grid="uniform", seed=7)
    b = sample_latents(model, cond, (2, 16, 1, 4, 4), num_points=5, grid="uniform", seed=7)
    c = sample_latents(model, cond, (2, 16, 1, 4, 4), num_points=5, grid="uniform", seed=8)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # a query's result does not depend on the batch it is in
    one = sample_latents(model, cond[1:], (1, 16, 1, 4, 4), num_points=5, grid="uniform", seed=7, first_index=1)
    assert torch.allclose(one, a[1:], atol=1e-5)


def test_noise_keys_and_bf16_state():
    model = _random_dit()
    cond = torch.randn(3, 16, 3, 4, 4)
    kw = dict(num_points=5, grid="uniform", seed=7)
    full = sample_latents(model, cond, (3, 16, 1, 4, 4), **kw)
    # a query keyed by its place in the whole list gets its result in any subset (resumed or sharded runs)
    part = sample_latents(model, cond[[2, 0]], (2, 16, 1, 4, 4), indices=[2, 0], **kw)
    assert torch.allclose(part, full[[2, 0]], atol=1e-5)
    # the published bfloat16 integration state: representable in bf16, close to but not the float32 result
    bf = sample_latents(model, cond, (3, 16, 1, 4, 4), state_dtype=torch.bfloat16, **kw)
    assert torch.equal(bf, bf.to(torch.bfloat16).float()) and not torch.equal(bf, full)
    assert (bf - full).abs().max() < 0.05 * full.abs().max()
    with pytest.raises(ValueError, match="guidance: expected a finite scale"):
        sample_latents(model, cond, (3, 16, 1, 4, 4), guidance=float("nan"), **kw)
    with pytest.raises(ValueError, match="indices: expected 3 keys"):
        sample_latents(model, cond, (3, 16, 1, 4, 4), indices=[0], **kw)
