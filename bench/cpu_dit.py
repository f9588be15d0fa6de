"""CPU benchmark of the J-DiT and the ST-VAE side by side with the published code, on the same weights, against
the machine's own matrix rate measured in the same run.

    python -m bench.cpu_dit [--published DIR] [--threads 2] [--rounds 3] [--quick] [--skip-compile] [--skip-vae]
                            [--frozen] [--profile] [--json]

Rows (best of interleaved rounds, so that load from other processes spreads over every row):
- the float32 and bfloat16 2048^3 GEMM rates (GFLOP/s) of this CPU at this thread count, timed in the same
  interleaved rounds as the model rows;
- J-DiT forward and guided (CFG) call, a 3.4B-shaped model (head dim 72, GQA 4:1, hidden 576, 4 blocks) on
  3 context frames + 1 target of 32x32 latents (1,024 tokens): ours eager (the C++ CPU kernels for the norms,
  SwiGLU and QK norm + RoPE, where built) and beside it "ours eager, torch forms" (those ops in PyTorch, as
  before the kernels), ours compiled (Inductor, per block),
  float32 and bfloat16, and the published LaVin-DiT code (--published: a checkout of
  github.com/DerrickWang005/LaVin-DiT, loaded with small stand-ins for apex, flash-attn and timm; without it the
  published rows are skipped and the run says so). FLOPs from torch.utils.flop_counter, achieved GFLOP/s and the
  percentage of the same run's GEMM rate: of the 2048^3 GEMM, and of the GEMMs at the model's own shapes (every
  matrix product of our eager forward replayed alone: what these shapes allow); --frozen adds float32 compiled
  rows with Inductor's freezing (weights as constants, MKL-packed: inference only);
- where each eager forward's time goes (ours and the published code's): every ATen call replayed alone, summed as
  GEMMs, the attention kernel and the rest (norms, modulation, RoPE, gates, copies), and the ceiling: the forward's
  FLOPs over the GEMM and attention groups' time alone (nothing else costs), as GFLOP/s and % of the 2048^3 rate;
- ST-VAE image encode and decode (bench/cpu_vae.py's reduced-width model) against bench/published_vae.py;
- compile time of each compiled row and its break-even (calls after which compiling has paid for itself).
--profile prints torch.profiler's top operators of our float32 forward, eager and compiled.
The training step (float32 against bfloat16 autocast) is timed by bench/cpu_dit_train.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lavin_fast.ops import _cpu
from lavin_fast.ops.dispatch import use_backend

DIT_SHAPE = {"hidden_size": 576, "num_heads": 8, "depth": 4}  # on the "3.4B" config: kv_group 4, head dim 72
LATENT = (16, 32, 32)  # channels, h, w
CONTEXT_FRAMES, TARGET_FRAMES = 3, 1
GUIDANCE = 1.5


# ----------------------------------------------------------------------------------------------- timing
def best_ms(cases: list[tuple[str, Callable[[], object]]], rounds: int) -> list[float]:
    """Best-of-rounds milliseconds per case, interleaved round by round (one warm-up call each first)."""
    best = [math.inf] * len(cases)
    with torch.no_grad():
        for _, fn in cases:
            fn()
        for _ in range(rounds):
            for i, (_, fn) in enumerate(cases):
                t0 = time.perf_counter()
                fn()
                best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of SDPA's CPU flash kernel (q [B, H, Lq, d], k and v [B, Hkv, Lk, d]; GQA: every query head counts):
    torch's FLOP counter has no formula for it and would count attention as free."""
    b, h, lq, d = query_shape
    lk, dv = key_shape[2], value_shape[3]
    return 2 * b * h * lq * lk * d + 2 * b * h * lq * lk * dv


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of fn() by torch's FLOP counter (GEMMs, convolutions, attention: the CPU flash kernel included)."""
    from torch.utils.flop_counter import FlopCounterMode

    flash = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=flash) as fc:
        fn()
    return fc.get_total_flops()


# ----------------------------------------------------------------------------------------------- where the time goes
GEMM_OPS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default")
ATTENTION_OPS = ("aten._scaled_dot_product_flash_attention_for_cpu.default",)


def record_ops(fn: Callable[[], object]) -> list[tuple]:
    """The ATen calls of one fn() (below autograd, after decompositions), each as (op, args, kwargs) with
    every tensor replaced by its (shape, stride, dtype)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    def describe(a):
        return _TensorLayout(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, torch.Tensor) else a

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            self.calls.append((func, tree_map(describe, args), tree_map(describe, kwargs)))
            return func(*args, **kwargs)

    with torch.no_grad(), Recorder() as rec:
        fn()
    return rec.calls


@dataclasses.dataclass(frozen=True)
class _TensorLayout:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype


def _materialize(a):
    if isinstance(a, _TensorLayout):
        n = 1 + sum((size - 1) * st for size, st in zip(a.shape, a.stride, strict=True)) if all(a.shape) else 0
        base = torch.empty(n, dtype=a.dtype)  # the storage the layout spans (expanded tensors span less)
        base = base.normal_() if a.dtype.is_floating_point else base.zero_()
        return base.as_strided(a.shape, a.stride)
    return a


def replay_groups(calls: list[tuple]) -> dict[str, dict]:
    """The recorded calls split into GEMMs, the attention kernel and the rest (norms, modulation, RoPE, gates,
    copies, views), each group as one callable that replays its calls in order on fresh random tensors of the
    recorded layouts (identical calls share their tensors), with its call count and GFLOP."""
    from torch.utils._pytree import tree_map

    unique: dict[str, tuple] = {}
    groups = {k: {"calls": [], "GFLOP": 0.0} for k in ("GEMM", "attention", "other")}
    for func, args, kwargs in calls:
        key = repr((func, args, kwargs))
        if key not in unique:
            a, kw = tree_map(_materialize, args), tree_map(_materialize, kwargs)
            kind = "GEMM" if str(func) in GEMM_OPS else "attention" if str(func) in ATTENTION_OPS else "other"
            flops = count_flops(lambda f=func, a=a, kw=kw: f(*a, **kw)) if kind != "other" else 0
            unique[key] = (kind, func, a, kw, flops)
        kind, func, a, kw, flops = unique[key]
        groups[kind]["calls"].append((func, a, kw))
        groups[kind]["GFLOP"] += flops / 1e9

    def replay(seq):
        def fn():
            for f, a, kw in seq:
                f(*a, **kw)

        return fn

    for grp in groups.values():
        grp["fn"] = replay(grp["calls"])
        grp["calls"] = len(grp["calls"])
    return groups


# ----------------------------------------------------------------------------------------------- published code
class _RMSNorm(nn.RMSNorm):
    """apex FusedRMSNorm(normalized_shape, elementwise_affine=True, eps): the norm in float32, as apex's kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        return F.rms_norm(x.float(), self.normalized_shape, w, self.eps).to(x.dtype)


def _flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func on [B, L, H, hd] (GQA) through torch's SDPA (its CPU flash kernel)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, scale=softmax_scale, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


@contextlib.contextmanager
def published_stand_ins() -> Iterator[None]:
    """sys.modules entries for the published code's GPU-only imports (apex, flash_attn, timm), removed after."""
    mods = {name: types.ModuleType(name) for name in (
        "apex", "apex.normalization", "apex.normalization.fused_layer_norm", "flash_attn", "timm", "timm.models",
        "timm.models.layers")}  # fmt: skip
    mods["apex.normalization.fused_layer_norm"].FusedLayerNorm = nn.LayerNorm
    mods["apex.normalization.fused_layer_norm"].FusedRMSNorm = _RMSNorm
    mods["flash_attn"].flash_attn_func = _flash_attn_func
    mods["timm.models.layers"].DropPath = nn.Identity  # inference: drop path is the identity
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load_published_class(checkout: str):
    """The published LaVinDiT class from a checkout of the published repository (lib/model/dit.py)."""
    import importlib
    import pathlib

    root = pathlib.Path(checkout)
    if not (root / "lib" / "model" / "dit.py").is_file():
        raise FileNotFoundError(f"--published {checkout}: no lib/model/dit.py there (a LaVin-DiT checkout?)")
    sys.path.insert(0, str(root))
    try:
        with published_stand_ins():
            return importlib.import_module("lib.model.dit").LaVinDiT
    finally:
        sys.path.remove(str(root))


def published_state_dict(ours: nn.Module) -> dict[str, torch.Tensor]:
    """Our J-DiT's weights under the published names (fused tensors split as models.checkpoints maps them)."""
    from lavin_fast.models.checkpoints import published_name_map

    sd = ours.state_dict()
    out = {}
    for our_name, parts in published_name_map(ours.cfg):
        pieces = torch.split(sd[our_name], [shape[0] for _, shape in parts], dim=0)
        for (name, shape), piece in zip(parts, pieces, strict=True):
            out[name] = piece.reshape(shape).clone()
    return out


def randomize_dit_(model: nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (the training init zeroes the modulations and the final layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("embedder.1.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------- J-DiT rows
def dit_models(published: str | None, seed: int = 0):
    from lavin_fast.models import build_dit

    ours = build_dit("3.4B", **DIT_SHAPE).eval()
    randomize_dit_(ours, seed)
    pub = None
    if published:
        cls = load_published_class(published)
        cfg = ours.cfg
        pub = cls(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, kv_group=cfg.kv_group)
        pub.load_state_dict(published_state_dict(ours), strict=True)
        pub.eval()
    return ours, pub


def _clone(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def _patch_tokens(z: torch.Tensor, p: int = 2) -> torch.Tensor:
    """The published forward_with_cfg's rearrange: B C F (H pH) (W pW) -> B F H W (pH pW C)."""
    B, C, T, H, W = z.shape
    return z.reshape(B, C, T, H // p, p, W // p, p).permute(0, 2, 3, 5, 4, 6, 1).reshape(B, T, H // p, W // p, -1)


FROZEN = "ours compiled, frozen weights"


def _frozen_backend(gm, example_inputs):
    """Inductor with its freezing pass (weights as constants, prepacked for MKL/oneDNN): inference only."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


@contextlib.contextmanager
def _inductor_freezing(on: bool) -> Iterator[None]:
    """Inductor's freezing for the compiles inside (the first calls); a no-op when off. Set around the call, not
    inside the backend: patched there, the freezing pass did not run (measured, torch 2.13)."""
    if not on:
        yield
        return
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    # frozen graphs come on top of the plain ones for the same code objects: Dynamo's default limit (8) would
    # silently run the rest eagerly
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    with inductor_config.patch(freezing=True):
        yield


TORCH_FORMS = "ours eager, torch forms"
"""our eager float32 J-DiT with the C++ CPU kernels off (`use_backend("torch")`): what it ran before them"""


def _torch_forms(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with use_backend("torch"):
            return fn()

    return run


def dit_rows(published: str | None, rounds: int, compile_: bool, profile: bool, frozen: bool = False) -> tuple:
    from lavin_fast.models.cpu_path import compile_dit_blocks, cpu_bf16_support

    ours, pub = dit_models(published)
    g = torch.Generator().manual_seed(1)
    C, h, w = LATENT
    x = torch.randn(1, C, TARGET_FRAMES, h, w, generator=g)
    cond = torch.randn(1, C, CONTEXT_FRAMES, h, w, generator=g)
    t = torch.rand(1, generator=g)
    null = ours.null_context(cond)
    bf16_ok, bf16_why = cpu_bf16_support()
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_ok else [])
    if not bf16_ok:
        print(f"note: no bfloat16 rows: {bf16_why}")

    def ours_calls(m, dt):
        xd, cd, nd = x.to(dt), cond.to(dt), null.to(dt)
        return (lambda: m(xd, t, cd)), (lambda: m.guided(xd, t, cd, scale=GUIDANCE, null_cond=nd))

    def pub_calls(m, dt):
        xd, cd, nd = _patch_tokens(x.to(dt)), _patch_tokens(cond.to(dt)), _patch_tokens(null.to(dt))
        tt = t.to(dt)

        def guided():  # forward_with_cfg's two passes, on the already rearranged tokens
            v_c, v_u = m(xd, tt, cd), m(xd, tt, nd)
            return v_u + GUIDANCE * (v_c - v_u)

        return (lambda: m(xd, tt, cd)), guided

    models, cases = {}, []  # (label, impl, dtype, kind, fn)
    for dt in dtypes:
        mo = ours if dt == torch.float32 else _clone(ours, dt)
        f, gd = ours_calls(mo, dt)
        cases += [("ours eager", dt, "forward", f), ("ours eager", dt, "guided", gd)]
        models[("ours eager", dt)] = mo
        if dt == torch.float32 and _cpu.library() is not None:  # the same model on the torch forms (no C++ kernels)
            cases += [(TORCH_FORMS, dt, kind, _torch_forms(fn)) for kind, fn in (("forward", f), ("guided", gd))]
        if pub is not None:
            mp = pub if dt == torch.float32 else _clone(pub, dt)
            f, gd = pub_calls(mp, dt)
            cases += [("published", dt, "forward", f), ("published", dt, "guided", gd)]
    # agreement on the same weights (float32): ours against the published code
    agree = {}
    with torch.no_grad():
        ref_f, ref_g = ours(x, t, cond), ours.guided(x, t, cond, scale=GUIDANCE, null_cond=null)
        if pub is not None:
            pf, pg = pub_calls(pub, torch.float32)
            agree["published vs ours, forward"] = float((pf() - ref_f).norm() / ref_f.norm())
            agree["published vs ours, guided"] = float((pg() - ref_g).norm() / ref_g.norm())
    compile_s = {}
    if compile_:
        variants = [("ours compiled", dt) for dt in dtypes] + ([(FROZEN, torch.float32)] if frozen else [])
        for impl, dt in variants:
            mc = _clone(ours, dt)
            f, gd = ours_calls(mc, dt)
            # frozen: its own backend callable (Dynamo keys its cache on the backend: no reuse of the plain graphs)
            compile_dit_blocks(mc, backend=_frozen_backend if impl == FROZEN else "inductor")
            for kind, fn in (("forward", f), ("guided", gd)):
                with torch.no_grad(), _inductor_freezing(impl == FROZEN):
                    t0 = time.perf_counter()
                    out = fn()
                    compile_s[(impl, dt, kind)] = time.perf_counter() - t0
                ref = ref_f if kind == "forward" else ref_g
                what = "compiled, frozen weights" if impl == FROZEN else "compiled"
                agree[f"{what} {str(dt)[6:]} vs eager float32, {kind}"] = float((out - ref).norm() / ref.norm())
                cases.append((impl, dt, kind, fn))
            models[(impl, dt)] = mc
    if bf16_ok:
        with torch.no_grad():
            fb, gb = ours_calls(models[("ours eager", torch.bfloat16)], torch.bfloat16)
            agree["eager bfloat16 vs float32, forward"] = float((fb() - ref_f).norm() / ref_f.norm())
            agree["eager bfloat16 vs float32, guided"] = float((gb() - ref_g).norm() / ref_g.norm())
    flops = {kind: count_flops(fn) for impl, dt, kind, fn in cases if impl == "ours eager" and dt == torch.float32}
    pub_flops = {kind: count_flops(fn) for impl, dt, kind, fn in cases if impl == "published" and dt == torch.float32}
    # where the time goes: our eager forward's and the published forward's ATen calls replayed group by group
    # (GEMMs, attention, the rest); the GEMM group's rate is what the model's own shapes allow (% own-shape column)
    replays, rcases = {}, []
    for impl, dt, kind, fn in cases:
        if kind == "forward" and impl in ("ours eager", "published"):
            replays[(impl, dt)] = replay_groups(record_ops(fn))
            rcases += [(f"{impl} {dt} replay {k}", grp["fn"]) for k, grp in replays[(impl, dt)].items()]
    # the 2048^3 GEMMs and the replays are timed in the same interleaved rounds as the model rows (same load)
    n, gemms = 2048, []
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, generator=g).to(dt)
        gemms.append((f"GEMM {n}^3 {dt}", lambda a=a: a @ a))
    ms = best_ms(gemms + rcases + [(f"{impl} {dt} {kind}", fn) for impl, dt, kind, fn in cases], rounds)
    rates = {torch.float32: 2 * n**3 / ms[0] / 1e6, torch.bfloat16: 2 * n**3 / ms[1] / 1e6}
    breakdown, k = {}, 2
    for key, grps in replays.items():
        breakdown[key] = {}
        for kind, grp in grps.items():
            m = ms[k]
            k += 1
            breakdown[key][kind] = {"ms": m, "calls": grp["calls"], "GFLOP": grp["GFLOP"],
                                    "GFLOP/s": grp["GFLOP"] / m * 1e3 if m else float("nan")}  # fmt: skip
    ms = ms[k:]
    own_rate = {dt: breakdown[("ours eager", dt)]["GEMM"]["GFLOP/s"] for dt in dtypes}
    base = {
        kind: m for (impl, dt, kind, _), m in zip(cases, ms, strict=True) if impl == "published" and dt == torch.float32
    }
    eager = {(dt, kind): m for (impl, dt, kind, _), m in zip(cases, ms, strict=True) if impl == "ours eager"}
    rows = []
    for (impl, dt, kind, _), m in zip(cases, ms, strict=True):
        fl = pub_flops[kind] if impl == "published" else flops[kind]
        gfs = fl / m / 1e6
        row = {"case": f"J-DiT {kind}", "impl": impl, "dtype": str(dt)[6:], "ms": round(m, 1),
               "GFLOP": round(fl / 1e9, 2), "GFLOP/s": round(gfs, 1),
               "% fp32 GEMM": round(100 * gfs / rates[torch.float32], 1),
               "% own-dtype GEMM": round(100 * gfs / rates[dt], 1),
               "% own-shape GEMM": round(100 * gfs / own_rate[dt], 1),
               "x published fp32": round(base[kind] / m, 2) if kind in base else None}  # fmt: skip
        if impl.startswith("ours compiled"):
            cs, saved = compile_s[(impl, dt, kind)], (eager[(dt, kind)] - m) / 1e3
            row["compile s"] = round(cs - m / 1e3, 1)
            row["break-even calls"] = round((cs - m / 1e3) / saved) if saved > 0 else "never"
        rows.append(row)
    if profile:
        _profile(models, ours_calls)
    fwd_ms = {(impl, dt): m for (impl, dt, kind, _), m in zip(cases, ms, strict=True) if kind == "forward"}
    split = []
    for (impl, dt), b in breakdown.items():
        fl_ = (pub_flops if impl == "published" else flops)["forward"]
        split.append({"forward": impl, "dtype": str(dt)[6:], "ms (timed above)": round(fwd_ms[(impl, dt)], 1),
                      "GEMM ms": round(b["GEMM"]["ms"], 1), "GEMM calls": b["GEMM"]["calls"],
                      "GEMM GFLOP/s (own shapes)": round(b["GEMM"]["GFLOP/s"], 1),
                      "attention ms": round(b["attention"]["ms"], 1),
                      "attention GFLOP/s": round(b["attention"]["GFLOP/s"], 1), "other ms": round(b["other"]["ms"], 1),
                      "other calls": b["other"]["calls"],
                      # the ceiling: GEMMs at their own shapes' rate, attention at its kernel's, nothing else
                      "ceiling GFLOP/s": round(fl_ / (b["GEMM"]["ms"] + b["attention"]["ms"]) / 1e6, 1),
                      "ceiling % fp32 2048^3": round(
                          100 * fl_ / (b["GEMM"]["ms"] + b["attention"]["ms"]) / 1e6 / rates[torch.float32], 1)})  # fmt: skip
    return rows, agree, split, rates


def _profile(models: dict, ours_calls) -> None:
    from torch.profiler import ProfilerActivity, profile

    for key in (("ours eager", torch.float32), ("ours compiled", torch.float32)):
        if key not in models:
            continue
        f, _ = ours_calls(models[key], torch.float32)
        with torch.no_grad():
            f()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                f()
        print(f"\ntorch.profiler, {key[0]} float32 forward (self CPU time):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


# ----------------------------------------------------------------------------------------------- ST-VAE rows
def vae_rows(rounds: int, compile_: bool) -> list[dict]:
    from bench.cpu_vae import _models
    from lavin_fast.models.cpu_path import compile_vae, cpu_bf16_support

    ours, pub = _models()
    img = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        z = ours.encode(img).mean
    cases = [
        ("encode", "ours eager", torch.float32, lambda: ours.encode(img)),
        ("encode", "published structure", torch.float32, lambda: pub.encode(img[:, :, None])),
        ("decode", "ours eager", torch.float32, lambda: ours.decode(z)),
        ("decode", "published structure", torch.float32, lambda: pub.decode(z[:, :, None])),
    ]
    cl = _clone(ours, torch.float32)
    cl.channels_last = True
    cases += [("encode", "ours eager, channels_last_3d", torch.float32, lambda: cl.encode(img)),
              ("decode", "ours eager, channels_last_3d", torch.float32, lambda: cl.decode(z))]  # fmt: skip
    if cpu_bf16_support()[0]:
        ob, pb = _clone(ours, torch.bfloat16), _clone(pub, torch.bfloat16)
        ib, zb = img.bfloat16(), z.bfloat16()
        cases += [
            ("encode", "ours eager", torch.bfloat16, lambda: ob.encode(ib)),
            ("encode", "published structure", torch.bfloat16, lambda: pb.encode(ib[:, :, None])),
            ("decode", "ours eager", torch.bfloat16, lambda: ob.decode(zb)),
            ("decode", "published structure", torch.bfloat16, lambda: pb.decode(zb[:, :, None])),
        ]
    compile_s = {}
    if compile_:
        oc = _clone(ours, torch.float32)
        compile_vae(oc)
        for kind, fn in (("encode", lambda: oc.encode(img)), ("decode", lambda: oc.decode(z))):
            with torch.no_grad():
                t0 = time.perf_counter()
                fn()
                compile_s[kind] = time.perf_counter() - t0
            cases.append((kind, "ours compiled", torch.float32, fn))
    ms = best_ms([(f"{k} {i} {d}", fn) for k, i, d, fn in cases], rounds)
    base = {
        k: m for (k, i, d, _), m in zip(cases, ms, strict=True) if i == "published structure" and d == torch.float32
    }
    eager = {k: m for (k, i, d, _), m in zip(cases, ms, strict=True) if i == "ours eager" and d == torch.float32}
    rows = []
    for (kind, impl, dt, _), m in zip(cases, ms, strict=True):
        row = {"case": f"ST-VAE image {kind} 2x96x96", "impl": impl, "dtype": str(dt)[6:], "ms": round(m, 1),
               "x published fp32": round(base[kind] / m, 2)}  # fmt: skip
        if impl == "ours compiled":
            saved = (eager[kind] - m) / 1e3
            row["compile s"] = round(compile_s[kind] - m / 1e3, 1)
            row["break-even calls"] = round(row["compile s"] / saved) if saved > 0 else "never"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- main
def run(
    published: str | None, threads: int, rounds: int, compile_: bool, vae: bool, profile: bool, frozen: bool = False
) -> dict:
    torch.set_num_threads(threads)
    notes = []
    if published is None:
        notes.append("no --published checkout: our rows only (pass a checkout of DerrickWang005/LaVin-DiT)")
    rows, agree, split, rates = dit_rows(published, rounds, compile_, profile, frozen)
    report = {
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "gemm_gflops": {"float32": round(rates[torch.float32], 1), "bfloat16": round(rates[torch.bfloat16], 1)},
        "dit": rows,
        "dit_time_split": split,
        "relative_error": {k: float(f"{v:.3g}") for k, v in agree.items()},
        "notes": notes,
    }
    if vae:
        report["vae"] = vae_rows(rounds, compile_)
    return report


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _table(rows: list[dict]) -> str:
    from bench.run_gpu import markdown_table

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return markdown_table([{k: ("" if r.get(k) is None else r.get(k)) for k in keys} for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--published", metavar="DIR", help="a checkout of github.com/DerrickWang005/LaVin-DiT")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best of)")
    ap.add_argument("--quick", action="store_true", help="one round, no compiled rows, no ST-VAE rows")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch.profiler top operators, eager and compiled")
    ap.add_argument(
        "--frozen",
        action="store_true",
        help="also float32 compiled rows with Inductor's freezing (weights as constants, MKL-packed; inference only)",
    )
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.skip_compile, a.skip_vae = 1, True, True
    rep = run(a.published, a.threads, a.rounds, not a.skip_compile, not a.skip_vae, a.profile, a.frozen)
    if a.json:
        print(json.dumps(rep, indent=1))
        return 0
    g = rep["gemm_gflops"]
    print(f"\nCPU: {rep['cpu']}, {rep['threads']} threads; 2048^3 GEMM: float32 {g['float32']} GFLOP/s, "
          f"bfloat16 {g['bfloat16']} GFLOP/s (measured in this run)")  # fmt: skip
    for n in rep["notes"]:
        print("note:", n)
    shape = ", ".join(f"{k} {v}" for k, v in DIT_SHAPE.items())
    print(f"\nJ-DiT (3.4B config, {shape}; {CONTEXT_FRAMES}+{TARGET_FRAMES} frames of {LATENT[1]}x{LATENT[2]} latents)")
    print(_table(rep["dit"]))
    print(
        "\nWhere the forward's time goes: its ATen calls replayed in order on fresh tensors of their layouts, in three"
    )
    print(
        "groups timed in the same rounds (the sum leaves out Python and dispatch); GEMM GFLOP/s at the model's shapes"
    )
    print(_table(rep["dit_time_split"]))
    print("\nrelative L2 error:", json.dumps(rep["relative_error"], indent=1))
    if "vae" in rep:
        print("\nST-VAE (bench/cpu_vae.py's model)")
        print(_table(rep["vae"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
