"""J-DiT tests (CPU, tiny sizes): sizes, published-checkpoint loading, forward/guided, gradients, bf16,
torch.compile, GQA at head dim 72, and the joint 3D RoPE positions."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch
from safetensors.torch import save_file
from test_rope import published_rope

from lavin_fast.models import DIT_CONFIGS, JDiT, build_dit
from lavin_fast.models.checkpoints import CheckpointMismatch, load_dit, load_published_dit, published_shapes, save_dit
from lavin_fast.models.dit_blocks import Layout, Segment
from lavin_fast.ops.attention import reference_attention
from lavin_fast.ops.qk_norm_rope import reference_rms_norm_rope
from lavin_fast.ops.rope import apply_rope

# names and shapes of the published checkpoints, copied into the repository (no test reads a path outside it)
MANIFEST = pathlib.Path(__file__).resolve().parent / "data" / "official-checkpoint-manifest.json"

# bf16 vs fp32 (same weights, tiny model, outputs of size ~1): max |v_bf16 - v_fp32| / max |v_fp32|.
# bf16 has 8 mantissa bits (2^-8 = 3.9e-3 relative per rounding); two blocks of GEMMs and norms measured
# ~1e-2 on CPU; the bound leaves headroom for other BLAS orders. Documented in docs/dit.md.
BF16_REL_TOL = 3e-2


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def _randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Replace the zero init (identity blocks, zero output) by random weights so that every path matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain_like = name.endswith("norm") or name.endswith("embedder.1.weight")  # weights that multiply
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if gain_like else 0.0))
    return model


def _inputs(B=2, Tx=1, Tc=3, h=8, w=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 16, Tx, h, w, generator=g, dtype=dtype)
    cond = torch.randn(B, 16, Tc, h, w, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g)
    return x, t, cond


# ------------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("name", ["0.1B", "1.0B", "3.4B"])
def test_parameter_counts_on_meta(name, manifest):
    model = build_dit(name, device="meta")
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    expected = {"0.1B": 100_709_952, "1.0B": 935_095_360, "3.4B": 3_398_976_064}[name]
    assert model.num_params() == expected == manifest[name]["total_params"]
    cfg = manifest[name]["config"]
    assert {k: getattr(model.cfg, k) for k in cfg} == cfg


@pytest.mark.parametrize("name", ["0.1B", "1.0B", "3.4B"])
def test_published_name_map_is_the_manifest(name, manifest):
    ours = {k: list(v) for k, v in published_shapes(DIT_CONFIGS[name]).items()}
    assert ours == manifest[name]["tensors"]


def test_overrides_use_published_names():
    m = build_dit("3.4B", hidden_size=288, num_heads=4, depth=2, device="meta")
    assert (m.cfg.head_dim, m.cfg.num_kv_heads, len(m.blocks)) == (72, 1, 2)
    with pytest.raises(ValueError, match="kv_group"):
        build_dit("3.4B", hidden_size=144, num_heads=2, device="meta")  # 2 heads cannot share groups of 4
    with pytest.raises(ValueError, match="unknown J-DiT option"):
        build_dit("tiny", hidden=64)
    with pytest.raises(ValueError, match="unknown J-DiT size"):
        build_dit("7B")


def test_initialisation():
    m = build_dit("tiny")
    x, t, cond = _inputs()
    assert torch.equal(m(x, t, cond), torch.zeros_like(x))  # zero final projection
    for blk in m.blocks:
        assert not blk.cond_mod.weight.any() and not blk.x_mod.bias.any()
    qkv = m.blocks[0].attn.x_qkv.weight  # fused weight initialised part by part: Xavier bound of each part
    D, hd = m.cfg.hidden_size, m.cfg.head_dim
    q, k = qkv[:D], qkv[D : D + m.cfg.num_kv_heads * hd]
    assert q.abs().max() <= (6 / (D + D)) ** 0.5 and k.abs().max() <= (6 / (D + m.cfg.num_kv_heads * hd)) ** 0.5
    assert q.abs().max() > 0.9 * (6 / (D + D)) ** 0.5
    assert 0.01 < m.prompt_embed.std() < 0.04


# ------------------------------------------------------------------------------------------------ checkpoints


def _reduced_manifest(manifest: dict, D: int, heads: int, kv_group: int, depth: int) -> dict[str, list[int]]:
    """The 3.4B manifest's names and shapes for a smaller model of the same pattern (built from the JSON)."""
    big = manifest["3.4B"]
    Dkv = D // kv_group
    F = int((4 * D * 2 / 3) / 64) * 64
    sub = {2304: D, 576: Dkv, 6144: F, 9216: 4 * D}
    out = {}
    for name, shape in big["tensors"].items():
        m = re.match(r"blocks\.(\d+)\.", name)
        if m and int(m.group(1)) >= depth:
            continue
        out[name] = [sub.get(s, s) for s in shape]
    return out


def _random_published_file(path, shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    tensors = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    save_file(tensors, str(path))
    return tensors


def test_load_published_strict(tmp_path, manifest):
    shapes = _reduced_manifest(manifest, D=288, heads=4, kv_group=4, depth=2)
    path = tmp_path / "jdit.safetensors"
    pub = _random_published_file(path, shapes)
    model = load_published_dit(path, "3.4B", hidden_size=288, num_heads=4, depth=2)
    assert not model.training and model.num_params() == sum(t.numel() for t in pub.values())
    a = model.blocks[1].attn
    torch.testing.assert_close(
        a.cond_qkv.weight,
        torch.cat([pub[f"blocks.1.joint_attn.cond_{n}.weight"] for n in "qkv"]),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(a.x_knorm, pub["blocks.1.joint_attn.x_knorm.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        model.blocks[0].x_mlp.gate_up.weight,
        torch.cat([pub["blocks.0.x_mlp.gate_proj.weight"], pub["blocks.0.x_mlp.up_proj.weight"]]),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(model.blocks[0].cond_mod.bias, pub["blocks.0.cond_modulation.1.bias"], rtol=0, atol=0)
    torch.testing.assert_close(
        model.final_layer.modulation.weight, pub["final_layer.adaLN_modulation.1.weight"], rtol=0, atol=0
    )
    x, t, cond = _inputs()
    v = model(x, t, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()

    bf = load_published_dit(path, "3.4B", hidden_size=288, num_heads=4, depth=2, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}


def _published_forward(sd: dict[str, torch.Tensor], D: int, H: int, Hkv: int, depth: int, x, t, cond) -> torch.Tensor:
    """docs/numerics.md's J-DiT written out on the published tensor names, unfused, in float64 (the spec)."""
    sd = {k: v.double() for k, v in sd.items()}
    F_ = torch.nn.functional
    hd = D // H
    rms = lambda z: z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6)
    lin = lambda z, n, bias=True: F_.linear(z, sd[n + ".weight"], sd.get(n + ".bias") if bias else None)

    def patchify(z):  # tokens (frame, row, col), features (patch-row, patch-col, channel)
        B, C, T, h, w = z.shape
        z = z.reshape(B, C, T, h // 2, 2, w // 2, 2).permute(0, 2, 3, 5, 4, 6, 1)
        return z.reshape(B, T * (h // 2) * (w // 2), 4 * C)

    B, _, Tx, h, w = x.shape
    Tc = cond.shape[2]
    emb = lambda z, s: F_.layer_norm(
        lin(z, f"{s}_embedder.0"), (D,), sd[f"{s}_embedder.1.weight"], sd[f"{s}_embedder.1.bias"], 1e-5
    )
    cs, xs = emb(patchify(cond.double()), "cond"), emb(patchify(x.double()), "x")
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128).double()
    args = t.double()[:, None] * freqs[None]
    temb = lin(F_.silu(lin(torch.cat([args.cos(), args.sin()], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = {"cond": temb + sd["prompt_embed"], "x": temb + sd["answer_embed"]}
    grid = (Tc + Tx, h // 2, w // 2)
    for i in range(depth):
        b = f"blocks.{i}"
        mods = {s: lin(F_.silu(c[s]), f"{b}.{s}_modulation.1")[:, None].chunk(4, -1) for s in ("cond", "x")}
        streams = {"cond": cs, "x": xs}
        q, k, v = [], [], []
        for s in ("cond", "x"):
            hs = rms(streams[s]) * (1 + mods[s][0])
            a = f"{b}.joint_attn.{s}"
            q.append(rms(lin(hs, f"{a}_q", False)) * sd[f"{a}_qnorm.weight"])
            k.append(rms(lin(hs, f"{a}_k", False)) * sd[f"{a}_knorm.weight"])
            v.append(lin(hs, f"{a}_v", False))
        # the RoPE transcribed from the published code (tests/test_rope.py), not the library's apply_rope
        q = published_rope(torch.cat(q, 1).unflatten(-1, (H, hd)), grid)
        k = published_rope(torch.cat(k, 1).unflatten(-1, (Hkv, hd)), grid)
        v = torch.cat(v, 1).unflatten(-1, (Hkv, hd))
        o = reference_attention(q, k, v).flatten(2)
        Lc = cs.shape[1]
        outs = {"cond": o[:, :Lc], "x": o[:, Lc:]}
        for s in ("cond", "x"):
            sa, ga, sm, gm = mods[s]
            z = streams[s] + torch.tanh(ga) * rms(lin(outs[s], f"{b}.joint_attn.{s}_proj", False))
            hm = rms(z) * (1 + sm)
            mlp = f"{b}.{s}_mlp"
            m = lin(
                F_.silu(lin(hm, f"{mlp}.gate_proj", False)) * lin(hm, f"{mlp}.up_proj", False),
                f"{mlp}.down_proj",
                False,
            )
            streams[s] = z + torch.tanh(gm) * rms(m)
        cs, xs = streams["cond"], streams["x"]
    out = lin(rms(xs) * (1 + lin(F_.silu(c["x"]), "final_layer.adaLN_modulation.1")[:, None]), "final_layer.linear")
    out = out.reshape(B, Tx, h // 2, w // 2, 2, 2, 16).permute(0, 6, 1, 2, 4, 3, 5)
    return out.reshape(B, 16, Tx, h, w)


@pytest.mark.parametrize("rope_in_attention", [False, True])
def test_published_weights_give_the_published_function(tmp_path, manifest, rope_in_attention):
    """Random weights with the published names: our fused model == the spec written on those names."""
    shapes = _reduced_manifest(manifest, D=288, heads=4, kv_group=4, depth=2)
    path = tmp_path / "jdit.safetensors"
    pub = _random_published_file(path, shapes)
    g = torch.Generator().manual_seed(4)
    for n, val in pub.items():  # gains near 1 so that every path matters
        if n.endswith(("norm.weight", "embedder.1.weight")):
            pub[n] = 1 + torch.randn(val.shape, generator=g) * 0.1
    save_file(pub, str(path))
    model = load_published_dit(path, "3.4B", hidden_size=288, num_heads=4, depth=2, rope_in_attention=rope_in_attention)
    x, t, cond = _inputs(Tc=3, h=4, w=6)
    want = _published_forward(pub, 288, 4, 1, 2, x, t, cond)
    got = model(x, t, cond)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_load_published_names_every_problem(tmp_path, manifest):
    shapes = _reduced_manifest(manifest, D=64, heads=4, kv_group=1, depth=1)
    shapes.pop("blocks.0.joint_attn.x_v.weight")
    shapes["blocks.0.extra.weight"] = [3]
    shapes["final_layer.linear.bias"] = [65]
    path = tmp_path / "bad.safetensors"
    _random_published_file(path, shapes)
    with pytest.raises(CheckpointMismatch) as err:
        load_published_dit(path, "tiny", depth=1, kv_group=1)
    msg = str(err.value)
    for needle in ("blocks.0.joint_attn.x_v.weight", "blocks.0.extra.weight", "final_layer.linear.bias", "(65,)"):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_published_dit(tmp_path / "nope.safetensors", "tiny")


def test_save_load_roundtrip(tmp_path):
    m = _randomize(build_dit("tiny", rope_in_attention=True))
    path = tmp_path / "ours.safetensors"
    save_dit(m, path)
    m2 = load_dit(path)
    assert m2.cfg == m.cfg
    x, t, cond = _inputs()
    torch.testing.assert_close(m2(x, t, cond), m.eval()(x, t, cond), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not a lavin_fast J-DiT file"):
        save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_dit(tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("Tx,Tc", [(1, 3), (2, 5)])
def test_forward_and_guided_shapes(Tx, Tc):
    m = _randomize(build_dit("tiny")).eval()
    x, t, cond = _inputs(Tx=Tx, Tc=Tc, h=8, w=12)
    v = m(x, t, cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    g = m.guided(x, t, cond, scale=1.5)
    assert g.shape == x.shape and g.dtype == torch.float32


def test_guidance_scale_one_is_conditional():
    m = _randomize(build_dit("tiny")).eval()
    x, t, cond = _inputs()
    torch.testing.assert_close(m.guided(x, t, cond, scale=1.0), m(x, t, cond), rtol=0, atol=0)


@pytest.mark.parametrize("Tc", [2, 3])  # 2: stacked on the batch; 3: packed along the tokens
@pytest.mark.parametrize("rope_in_attention", [False, True])
def test_guided_equals_two_separate_passes(Tc, rope_in_attention):
    m = _randomize(build_dit("tiny", rope_in_attention=rope_in_attention)).eval()
    x, t, cond = _inputs(Tc=Tc)
    null = JDiT.null_context(cond)
    assert null.shape[2] == 2 and not null[:, :, 0].any() and torch.equal(null[:, :, 1], cond[:, :, -1])
    v_c, v_u = m(x, t, cond), m(x, t, null)
    assert (v_c - v_u).abs().max() > 1e-3  # the context matters, so the check below can fail
    torch.testing.assert_close(m.guided(x, t, cond, scale=2.5), v_u + 2.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter():
    m = _randomize(build_dit("tiny-gqa", depth=2)).train()
    x, t, cond = _inputs(h=4, w=4)
    m(x, t, cond).square().mean().backward()
    dead = {n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    # the last block's cond-side outputs never reach the prediction (as in the published model)
    last = f"blocks.{m.cfg.depth - 1}"
    expected_dead = {f"{last}.attn.cond_qnorm", f"{last}.attn.cond_proj.weight"}
    expected_dead |= {f"{last}.cond_mlp.{n}.weight" for n in ("gate_up", "down")}
    assert dead == expected_dead, f"no gradient reaches {sorted(dead - expected_dead)}"


def test_grad_checkpointing_and_drop_path():
    ref = _randomize(build_dit("tiny")).train()
    ck = build_dit("tiny", grad_checkpointing=True).train()
    ck.load_state_dict(ref.state_dict())
    x, t, cond = _inputs(h=4, w=4)
    ref(x, t, cond).square().mean().backward()
    ck(x, t, cond).square().mean().backward()
    for (n, a), b in zip(ref.named_parameters(), ck.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    # drop path: random in training (per sample), off in eval; last block at the configured rate
    dp = build_dit("tiny", drop_path=0.5)
    dp.load_state_dict(ref.state_dict())
    assert [b.drop_path for b in dp.blocks] == [0.0, 0.5]
    dp.train()
    outs = [dp(x, t, cond) for _ in range(6)]
    assert any((o - outs[0]).abs().max() > 1e-4 for o in outs[1:])
    dp.eval()
    torch.testing.assert_close(dp(x, t, cond), ref.eval()(x, t, cond), rtol=0, atol=0)


def test_configure_runtime_options():
    m = _randomize(build_dit("tiny")).eval()
    x, t, cond = _inputs()
    ref = m(x, t, cond)
    m.configure(backend="torch", rope_in_attention=True, drop_path=0.2)
    assert all(mod.cfg.rope_in_attention for mod in m.modules() if hasattr(mod, "cfg"))
    assert [b.drop_path for b in m.blocks] == [0.0, 0.2]
    torch.testing.assert_close(m(x, t, cond), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot change on a built model"):
        m.configure(hidden_size=128)


def test_bfloat16_matches_float32():
    m = _randomize(build_dit("tiny-gqa")).eval()
    x, t, cond = _inputs(h=4, w=4)
    v32 = m(x, t, cond)
    mb = build_dit("tiny-gqa", dtype=torch.bfloat16).eval()
    mb.load_state_dict(m.state_dict())
    v16 = mb(x.bfloat16(), t, cond.bfloat16())
    assert v16.dtype == torch.float32
    rel = ((v16 - v32).abs().max() / v32.abs().max()).item()
    assert rel < BF16_REL_TOL, rel
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 weights and residual streams, bf16 GEMMs
        va = m(x, t, cond)
    rel = ((va - v32).abs().max() / v32.abs().max()).item()
    assert va.dtype == torch.float32 and 0 < rel < BF16_REL_TOL, rel


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_block_compiles_fullgraph(backend):
    m = _randomize(build_dit("tiny", backend=backend)).eval()
    blk = m.blocks[0]
    B, D, hp, wp = 2, m.cfg.hidden_size, 2, 2
    cs, xs = torch.randn(B, 3 * hp * wp, D), torch.randn(B, hp * wp, D)
    sc, sx = torch.randn(B, D), torch.randn(B, D)
    layout = Layout(hp, wp, (Segment(0, 3, 0, 1, 0),))
    ref = blk(cs, xs, sc, sx, layout)

    torch._dynamo.reset()
    got = torch.compile(blk, fullgraph=True, backend="aot_eager")(cs, xs, sc, sx, layout)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_3p4b_shaped_reduced_model_runs():
    m = _randomize(build_dit("3.4B", hidden_size=288, num_heads=4, depth=2), std=0.05).eval()
    assert (m.cfg.head_dim, m.cfg.num_heads, m.cfg.num_kv_heads) == (72, 4, 1)
    x, t, cond = _inputs(Tc=3, h=4, w=6)
    v = m(x, t, cond)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert m.guided(x, t, cond).shape == x.shape


# ------------------------------------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("rope_in_attention", [False, True])
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_joint_rope_positions(name, rope_in_attention):
    """Per-stream QK norm with per-stream offsets == norm, concatenate, RoPE on the joint grid."""
    m = _randomize(build_dit(name, rope_in_attention=rope_in_attention))
    attn = m.blocks[0].attn
    B, D, hp, wp, Tc, Tx, off = 2, m.cfg.hidden_size, 2, 3, 3, 2, 5
    hc, hx = torch.randn(B, Tc * hp * wp, D), torch.randn(B, Tx * hp * wp, D)
    layout = Layout(hp, wp, (Segment(0, Tc, 0, Tx, off),))
    got_c, got_x = attn(hc, hx, layout)

    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    streams = []
    for s, h in (("cond", hc), ("x", hx)):
        q, k, v = getattr(attn, f"{s}_qkv")(h).split([H * hd, Hkv * hd, Hkv * hd], -1)
        q = reference_rms_norm_rope(q.unflatten(-1, (H, hd)), getattr(attn, f"{s}_qnorm"))
        k = reference_rms_norm_rope(k.unflatten(-1, (Hkv, hd)), getattr(attn, f"{s}_knorm"))
        streams.append((q, k, v.unflatten(-1, (Hkv, hd))))
    grid = (Tc + Tx, hp, wp)
    q = apply_rope(torch.cat([streams[0][0], streams[1][0]], 1), grid, off)
    k = apply_rope(torch.cat([streams[0][1], streams[1][1]], 1), grid, off)
    v = torch.cat([streams[0][2], streams[1][2]], 1)
    o = reference_attention(q.double(), k.double(), v.double()).float().flatten(2)
    Lc = Tc * hp * wp
    torch.testing.assert_close(got_c, attn.cond_proj(o[:, :Lc]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_x, attn.x_proj(o[:, Lc:]), rtol=1e-4, atol=1e-5)


def test_rope_split_documented_choices():
    from lavin_fast.ops.rope import rope_split

    assert rope_split(64) == (16, 24, 24) and rope_split(72) == (24, 24, 24)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_tensors():
    m = build_dit("tiny")
    x, t, cond = _inputs()
    cases = [
        ((x[:, :8], t, cond), r"x has 8 channels"),
        ((x, t, cond[:, :15]), r"cond has 15 channels"),
        ((torch.randn(2, 16, 1, 7, 8), t, cond), r"x spatial size \(7, 8\).*not divisible by the patch 2"),
        ((x, t, cond[..., :6]), r"cond spatial size \(8, 6\).*differs from x"),
        ((x, t[:1], cond), r"batch sizes disagree: x \(2, 16, 1, 8, 8\), t \(1,\)"),
        ((x, t, cond[:1]), r"batch sizes disagree.*cond \(1, 16, 3, 8, 8\)"),
        ((x.double(), t, cond), r"dtypes disagree: x is torch.float64"),
        ((x, t[:, None], cond), r"t must be a 1-D tensor"),
        ((x, t, cond[:, :, :0]), r"cond needs at least one frame"),
        ((x[0], t, cond), r"x must be latents"),
    ]
    for args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            m(*args)
    with pytest.raises(ValueError, match="null_cond has 3 channels"):
        m.guided(x, t, cond, null_cond=cond[:, :3, :2])
    with pytest.raises(ValueError, match="devices disagree"):
        build_dit("tiny", device="meta")(x, t, cond)


# ------------------------------------------------------------------------------------------------ published time grids

# Copied from DerrickWang005/LaVin-DiT at commit f3728580115a4efbcd38d2279f1dbd868297b05e,
# lib/transport/integrators.py: class ode, `if num_steps == 20` (lines 103-127), `== 30` (128-162), `== 40` (163-207).
# Written here independently of lavin_fast.flow.timesteps.PUBLISHED_GRIDS, so a typo there fails.
PUBLISHED_CODE_GRIDS = {
    20: [
        0.0000, 0.0056, 0.0111, 0.0167, 0.0222, 0.0278, 0.0333, 0.0389, 0.0444, 0.0500,
        0.0524, 0.0730, 0.1148, 0.1777, 0.2618, 0.3671, 0.4936, 0.6412, 0.8100, 1.0000,
    ],
    30: [
        0.0000, 0.0036, 0.0071, 0.0107, 0.0143, 0.0179, 0.0214, 0.0250, 0.0286, 0.0321,
        0.0357, 0.0393, 0.0429, 0.0464, 0.0500, 0.0511, 0.0600, 0.0779, 0.1049, 0.1410,
        0.1862, 0.2403, 0.3036, 0.3759, 0.4573, 0.5477, 0.6472, 0.7557, 0.8733, 1.0000,
    ],
    40: [
        0.0000, 0.0026, 0.0053, 0.0079, 0.0105, 0.0132, 0.0158, 0.0184, 0.0211, 0.0237,
        0.0263, 0.0289, 0.0316, 0.0342, 0.0368, 0.0395, 0.0421, 0.0447, 0.0474, 0.0500,
        0.0506, 0.0555, 0.0655, 0.0804, 0.1004, 0.1253, 0.1553, 0.1902, 0.2302, 0.2752,
        0.3251, 0.3801, 0.4401, 0.5051, 0.5750, 0.6500, 0.7300, 0.8150, 0.9050, 1.0000,
    ],
}  # fmt: skip


@pytest.mark.parametrize("n", sorted(PUBLISHED_CODE_GRIDS))
def test_published_time_grids_are_the_published_code_literals(n):
    from lavin_fast.flow.timesteps import time_grid

    g = time_grid(n, "published")
    assert g.dtype == torch.float64 and g.tolist() == PUBLISHED_CODE_GRIDS[n]
