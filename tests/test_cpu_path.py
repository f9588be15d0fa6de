"""The CPU path (lavin_fast/models/cpu_path.py): choosing it; the compiled J-DiT against the float64 spec written on
the published tensor names (tests/test_dit.py's _published_forward, an implementation independent of the model's),
the compiled ST-VAE against a float64 evaluation of the eager one; bfloat16 against the float64 spec within the
tolerance docs/cpu.md states.

Compile tests use tiny models (Inductor's CPU backend compiles C++: seconds per graph)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dit import _published_forward

from lavin_fast.models import build_dit, build_vae
from lavin_fast.models.cpu_path import (
    AUTO_COMPILE_MIN_CALLS,
    apply_cpu_path,
    compile_dit_blocks,
    compile_vae,
    cpu_bf16_support,
    resolve_cpu_path,
)

FP32_TOL = 2e-5
"""relative L2 error of a float32 forward (eager or compiled) against float64: float32 rounding is ~1e-7 per op"""
BF16_TOL = 3e-2
"""relative L2 error of a bfloat16 forward against float64 (docs/cpu.md: 0.8-1.1% measured on the 3.4B-shaped
model, 8 significant bits give ~0.4% per rounding)"""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


D, H, KV_GROUP, DEPTH = 288, 4, 4, 2  # head dim 72, one kv head


def _random_dit(seed: int = 0):
    from bench.cpu_dit import randomize_dit_

    m = build_dit("tiny-gqa", hidden_size=D, num_heads=H, kv_group=KV_GROUP, depth=DEPTH).eval()
    randomize_dit_(m, seed)
    return m


def _spec(m, x, t, cond, guidance: float | None = None) -> torch.Tensor:
    """float64 velocity (guided when guidance is given) of m's weights by the spec on the published names."""
    from bench.cpu_dit import published_state_dict

    sd = published_state_dict(m)
    v_c = _published_forward(sd, D, H, H // KV_GROUP, DEPTH, x, t, cond)
    if guidance is None:
        return v_c
    v_u = _published_forward(sd, D, H, H // KV_GROUP, DEPTH, x, t, m.null_context(cond))
    return v_u + guidance * (v_c - v_u)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 1, 8, 8, generator=g, dtype=dtype)
    cond = torch.randn(2, 16, 2, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(2, generator=g)
    return x, t, cond


# ------------------------------------------------------------------------------------------------ choosing
def test_resolve_names_and_auto(monkeypatch):
    from lavin_fast.ops import _cpu

    if _cpu.library() is not None:  # the C++ kernels outrun the compiled blocks: auto stays eager at any count
        assert resolve_cpu_path("auto", "cpu", expected_calls=10**9).name == "eager"
    monkeypatch.setenv("LAVIN_FAST_CPU_KERNELS", "0")  # without them, compiling pays back after enough calls
    assert resolve_cpu_path("eager", "cpu").compile is False
    p = resolve_cpu_path("compiled", "cpu")
    assert p.compile and not p.bf16 and p.dtype == torch.float32
    assert resolve_cpu_path("auto", "cpu").name == "eager"  # unknown number of calls: no compile
    assert resolve_cpu_path("auto", "cpu", expected_calls=AUTO_COMPILE_MIN_CALLS - 1).name == "eager"
    assert resolve_cpu_path("auto", "cpu", expected_calls=AUTO_COMPILE_MIN_CALLS).name == "compiled"
    assert resolve_cpu_path("auto", "cuda", expected_calls=10**6).name == "eager"  # not a CPU run: untouched
    with pytest.raises(ValueError, match="not one of"):
        resolve_cpu_path("fast", "cpu")
    with pytest.raises(ValueError, match="applies to CPU runs"):
        resolve_cpu_path("compiled", "cuda")


def test_bf16_refused_without_cpu_support(monkeypatch):
    monkeypatch.setenv("LAVIN_FAST_CPU_BF16", "0")
    assert cpu_bf16_support()[0] is False
    for name in ("bf16", "compiled-bf16"):
        with pytest.raises(ValueError, match="needs native bfloat16"):
            resolve_cpu_path(name, "cpu")
    monkeypatch.setenv("LAVIN_FAST_CPU_BF16", "1")
    p = resolve_cpu_path("compiled-bf16", "cpu")
    assert p.bf16 and p.compile and p.dtype == torch.bfloat16


def test_bf16_detection_reads_the_cpu_flags(monkeypatch):
    from lavin_fast.models import cpu_path

    monkeypatch.delenv("LAVIN_FAST_CPU_BF16", raising=False)
    monkeypatch.setattr(cpu_path, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    ok, why = cpu_bf16_support()
    assert not ok and "avx512_bf16" in why
    monkeypatch.setattr(cpu_path, "_cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert cpu_bf16_support() == (True, cpu_bf16_support()[1]) and "amx_bf16" in cpu_bf16_support()[1]


# ------------------------------------------------------------------------------------------------ compiled
def test_compiled_dit_matches_float64_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = _random_dit()
    x, t, cond = _inputs()
    with torch.no_grad():
        want, want_g = _spec(m, x, t, cond), _spec(m, x, t, cond, guidance=1.5)
        eager = m(x, t, cond)
        assert compile_dit_blocks(m) == 2
        assert compile_dit_blocks(m) == 0  # idempotent
        got = m(x, t, cond)
        got_g = m.guided(x, t, cond, scale=1.5)  # packed segments: other shapes, other graphs
    assert counters["stats"]["unique_graphs"] >= 2, "no graph was compiled"
    assert _rel(eager, want) < FP32_TOL
    assert _rel(got, want) < FP32_TOL
    assert _rel(got_g, want_g) < FP32_TOL
    assert list(m.state_dict()) == list(_random_dit().state_dict())  # parameter names unchanged


def test_frozen_compiled_dit_matches_float64_and_freezes_the_weights():
    """bench/cpu_dit.py's --frozen rows (Inductor's freezing: weights as constants, MKL-packed): within the float32
    tolerance of the spec, and really frozen: a later change of a GEMM weight (packed into a constant copy) leaves
    the compiled output as it was (hence inference only), while the same change moves the eager output."""
    from torch._dynamo.utils import counters

    from bench.cpu_dit import _frozen_backend, _inductor_freezing

    torch._dynamo.reset()
    counters.clear()
    m = _random_dit(seed=2)
    x, t, cond = _inputs()
    with torch.no_grad():
        want = _spec(m, x, t, cond)
        mf = copy.deepcopy(m)
        compile_dit_blocks(mf, backend=_frozen_backend)
        with _inductor_freezing(True):
            got = mf(x, t, cond)
        assert counters["stats"]["unique_graphs"] >= 1, "no graph was compiled"
        assert _rel(got, want) < FP32_TOL
        for mod in (m, mf):  # the same change to both: scale the last block's x-stream modulation weight
            mod.blocks[-1].x_mod.weight.mul_(3.0)
        moved = _rel(m(x, t, cond), want)
        again = mf(x, t, cond)
    assert moved > 1e-3, "the weight change does not move the eager output: the check below would prove nothing"
    assert _rel(again, got) < 1e-6, "the compiled graph read the changed weight: freezing did not run"


def test_compiled_dit_trains_like_eager():
    """One backward through the compiled blocks: the same gradients as eager float32 (within its tolerance)."""
    m = _random_dit(seed=1)
    m.train()
    mc = copy.deepcopy(m)
    compile_dit_blocks(mc)
    x, t, cond = _inputs()
    for model in (m, mc):
        model(x, t, cond).square().mean().backward()
    for (name, a), (_, b) in zip(m.named_parameters(), mc.named_parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        assert (b.grad - a.grad).norm() <= 1e-4 * a.grad.norm() + 1e-12, name  # zero where eager's is zero


def test_compiled_vae_matches_float64_eager():
    from bench.published_vae import randomize_vae_

    torch.manual_seed(0)
    vae = randomize_vae_(build_vae(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4)).eval()
    ref64 = copy.deepcopy(vae).double()
    img = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        want = ref64.encode(img.double()).mean
        want_dec = ref64.decode(want)
        compile_vae(vae)
        got = vae.encode(img).mean
        got_dec = vae.decode(want.float())
    assert _rel(got, want) < FP32_TOL
    assert _rel(got_dec, want_dec) < FP32_TOL


# ------------------------------------------------------------------------------------------------ eager torch path
@pytest.mark.parametrize("rope_in_attention", [False, True])
def test_joint_torch_attention_path_equals_the_op_path(monkeypatch, rope_in_attention):
    """The plain-PyTorch attention path (one QK norm per stream, one RoPE pass over q and k together on the joint
    grid) against the op path the GPU runs (per-segment qk_norm_rope calls, here on their torch references), both
    against the float64 spec: forward, the packed guided call (two segments) and the gradients of every parameter."""
    from lavin_fast.models import dit_blocks

    m = _random_dit(seed=4).configure(rope_in_attention=rope_in_attention)
    mo = copy.deepcopy(m)
    x, t, cond = _inputs()
    with torch.no_grad():
        want, want_g = _spec(m, x, t, cond), _spec(m, x, t, cond, guidance=1.5)
        got, got_g = m(x, t, cond), m.guided(x, t, cond, scale=1.5)
    m.train()
    m(x, t, cond, rope_t_offset=3).square().mean().backward()
    monkeypatch.setattr(dit_blocks, "qk_norm_rope_backend", lambda *a: "op path")  # any name but "torch"
    with torch.no_grad():
        op, op_g = mo(x, t, cond), mo.guided(x, t, cond, scale=1.5)
    mo.train()
    mo(x, t, cond, rope_t_offset=3).square().mean().backward()
    for a, b, ref in ((got, op, want), (got_g, op_g, want_g)):
        assert _rel(a, ref) < FP32_TOL and _rel(b, ref) < FP32_TOL
        assert _rel(a, b) < 2e-6  # the same operations, differently grouped: float32 rounding apart
    for (name, a), (_, b) in zip(m.named_parameters(), mo.named_parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None, name
            continue
        assert (a.grad - b.grad).norm() <= 1e-5 * b.grad.norm() + 1e-12, name


# ------------------------------------------------------------------------------------------------ bfloat16
def test_bf16_path_within_stated_tolerance_of_float64(monkeypatch):
    monkeypatch.setenv("LAVIN_FAST_CPU_BF16", "1")  # the numbers hold with emulated bf16 too (only slower)
    m = _random_dit(seed=2)
    x, t, cond = _inputs()
    with torch.no_grad():
        want = _spec(m, x, t, cond)
    vae = build_vae(block_out_channels=(8, 8, 16), layers_per_block=1, norm_num_groups=4)
    line = apply_cpu_path(resolve_cpu_path("bf16", "cpu"), dit=m, vae=vae)
    assert "bf16" in line and m.dtype == torch.bfloat16
    assert vae.dtype == torch.float32  # the ST-VAE stays float32 (its bf16 decode is slower on the CPU)
    with torch.no_grad():
        got = m(x, t, cond)  # float32 latents in: the model casts them; float32 velocity out
    assert got.dtype == torch.float32
    err = _rel(got, want)
    assert err < BF16_TOL
    assert err > 1e-4, "bf16 output as exact as float32: did the weights stay float32?"


# ------------------------------------------------------------------------------------------------ the switches
def test_cli_choices_are_the_library_paths():
    from lavin_fast.cli.sample import CPU_PATH_CHOICES
    from lavin_fast.models.cpu_path import CPU_PATHS

    assert CPU_PATH_CHOICES == CPU_PATHS


def test_train_config_cpu_path_checked_and_applied(tmp_path, monkeypatch):
    from lavin_fast.train.config import ConfigError, load_config
    from lavin_fast.train.trainer import Trainer

    with pytest.raises(ConfigError, match="cpu_path"):
        load_config(None, {"cpu_path": "turbo"})
    base = {"model": "tiny", "device": "cpu", "out_dir": str(tmp_path / "run"), "tensorboard": False,
            "batch_size": 2, "micro_batch_size": 2}  # fmt: skip
    monkeypatch.setenv("LAVIN_FAST_CPU_BF16", "0")
    with pytest.raises(ConfigError, match="needs native bfloat16"):
        Trainer(load_config(None, {**base, "cpu_path": "bf16"}))
    monkeypatch.setenv("LAVIN_FAST_CPU_BF16", "1")
    tr = Trainer(load_config(None, {**base, "cpu_path": "bf16"}))
    assert tr.bf16 and not tr.cpu_path.compile  # bf16 autocast, eager
    assert Trainer(load_config(None, {**base, "steps": 10})).cpu_path.name == "eager"  # too short to pay back
    monkeypatch.setenv("LAVIN_FAST_CPU_KERNELS", "0")  # with the C++ kernels auto never compiles (test above)
    long = Trainer(load_config(None, {**base, "steps": AUTO_COMPILE_MIN_CALLS}))
    assert long.cpu_path.name == "compiled" and not long.bf16
    blocks = long.model.blocks
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)


def test_demo_refuses_bf16_without_cpu_support_before_any_work(tmp_path, monkeypatch, capsys):
    from lavin_fast.cli import main

    monkeypatch.setenv("LAVIN_FAST_CPU_BF16", "0")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--device", "cpu", "--cpu-path", "bf16", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--cpu-path" in err and "needs native bfloat16" in err
    assert not (out / "images").exists()  # nothing written
