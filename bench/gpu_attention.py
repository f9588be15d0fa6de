"""Joint attention on the GPU: our Triton flash attention (on pre-rotated q/k, the library's default
path, and with the 3D RoPE in-kernel, opt-in) against torch SDPA per backend (flash / cuDNN /
efficient, RoPE by separate kernels), SDPA under torch.compile, and flash-attn 3
(`flash_attn_interface`) / flash-attn 2 when importable. bf16, forward, backward and both.

Ours runs exactly as the library would: the first call of each shape times each kernel's candidates
(at most 4) and keeps the fastest (lavin_fast.ops.tuning; inside the warm-up, so not in the timings);
the row's note names the configurations launched. LAVIN_FAST_ATTENTION_TUNE=0 keeps the static
report's picks. The "candidate" rows time each forward and fused-dQ dK/dV candidate of the default
path forced one at a time (tuning off) at the first case's shape: the per-variant comparison.
Useful TFLOP/s: 4*L*L*hd*Hq*B per forward, 2.5x that for the backward (so 3.5x for fwd+bwd),
whatever width the implementation computes (hd 72 runs 80 wide in ours, 96 wide in flash-attn).
Before timing, every shape is checked against a float64 reference at a short length (out, dq, dk,
dv; errors next to the bf16 reference's own error). A failing implementation is reported in its
row's note and the others still run.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

TITLE = "attention (joint, GQA, 3D RoPE), bf16: fwd and fwd+bwd"
BUDGET_WEIGHT = 3  # share of the suite's benchmark time (bench/run_gpu.py)

# (label, B, (T, H, W), Hq, Hkv, hd): 32x32 latent tokens per frame at 512 px
CASES = [
    ("3.4B L=10240", 1, (10, 32, 32), 32, 8, 72),
    ("1.0B L=10240", 1, (10, 32, 32), 16, 16, 64),
    ("3.4B L=20480", 1, (20, 32, 32), 32, 8, 72),
    ("3.4B L=4096 B=2", 2, (4, 32, 32), 32, 8, 72),
    ("1.0B L=20480", 1, (20, 32, 32), 16, 16, 64),
]
CHECK_GRID = (1, 24, 40)  # L = 960 for the float64 check


def _fwd_flops(B, L, Hq, hd):
    return 4.0 * L * L * hd * Hq * B


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    from lavin_fast.ops.rope import apply_rope

    def fn(q, k, v, grid):
        q, k = apply_rope(q, grid), apply_rope(k, grid)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        with sdpa_kernel([backend]):
            if q.shape[2] != k.shape[2]:
                try:
                    return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
                except RuntimeError:  # a backend without GQA: expanded kv (counted in its memory)
                    rep = q.shape[2] // k.shape[2]
                    kt, vt = kt.repeat_interleave(rep, 1), vt.repeat_interleave(rep, 1)
            return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)

    return fn


def _impls():
    from torch.nn.attention import SDPBackend

    from lavin_fast.ops import attention
    from lavin_fast.ops.rope import apply_rope

    # ours and the baselines interleaved, so that a short budget still yields a comparison
    impls = {
        "ours (RoPE in-kernel)": lambda q, k, v, g: attention(q, k, v, rope_grid=g, backend="triton"),
        "sdpa flash + rope": _sdpa(SDPBackend.FLASH_ATTENTION),
        "ours (pre-rotated q/k)": lambda q, k, v, g: attention(q, k, v, backend="triton"),
        "sdpa cudnn + rope": _sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa efficient + rope": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
        "ours (pre-rotated) + apply_rope": lambda q, k, v, g: attention(
            apply_rope(q, g), apply_rope(k, g), v, backend="triton"
        ),
    }

    def plain(q, k, v, grid):
        q, k = apply_rope(q, grid), apply_rope(k, grid)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=q.shape[2] != k.shape[2]
        )
        return out.transpose(1, 2)

    impls["torch.compile(sdpa + rope)"] = torch.compile(plain, dynamic=False)
    try:  # flash-attn 3 (Hopper); some versions return (out, lse)
        from flash_attn_interface import flash_attn_func as fa3

        def fa3_rope(q, k, v, g):
            out = fa3(apply_rope(q, g), apply_rope(k, g), v)
            return out[0] if isinstance(out, tuple) else out

        impls["flash-attn 3 + rope"] = fa3_rope
    except Exception:
        pass
    try:
        from flash_attn import flash_attn_func

        impls["flash-attn 2 + rope"] = lambda q, k, v, g: flash_attn_func(apply_rope(q, g), apply_rope(k, g), v)
    except Exception:
        pass
    return impls


def _our_configs(name: str, hd: int) -> str:
    """The configurations the library launches for one of our rows: the tuner's measured choices of this
    process (kernel, bucket: config), else the static picks."""
    from lavin_fast.ops.attention_kernels import TUNER, autotune_enabled, default_configs

    if autotune_enabled():
        chosen = TUNER.chosen()
        if chosen:
            return "measured first-call choices: " + "; ".join(f"{k}: {c}" for k, c in chosen.items())
    cfgs = default_configs(hd, rope="in-kernel" in name, deterministic=False)
    return "static picks: " + "; ".join(f"{k} {c}" for k, c in cfgs.items())


def _variant_rows(t_end) -> list[dict]:
    """Each forward and fused-dQ dK/dV candidate of the default path (pre-rotated q/k), forced one at a time
    with tuning off, at the first case's shape: useful TFLOP/s per variant."""
    import os

    from bench.common import cuda_time_ms
    from lavin_fast.ops import attention_kernels as K
    from lavin_fast.ops.attention import attention

    label, B, grid, Hq, Hkv, hd = CASES[0]
    L = grid[0] * grid[1] * grid[2]
    q, k, v, do = (torch.randn(B, L, h, hd, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv, Hq))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    flops = _fwd_flops(B, L, Hq, hd)
    rows = []
    saved = os.environ.get("LAVIN_FAST_ATTENTION_TUNE")
    os.environ["LAVIN_FAST_ATTENTION_TUNE"] = "0"
    try:
        for kind, table, key in (("fwd", K.FWD_CONFIGS, (hd, False)), ("dK/dV+dQ", K.DKDV_TMA_CONFIGS, (hd, True))):
            cands = list(table[key])
            for i, c in enumerate(cands):
                if c.ws and not K.warp_specialised_forward_enabled():
                    rows.append({"case": label, "impl": f"ours {kind} candidate {c}",
                                 "note": "skipped: set LAVIN_FAST_ATTENTION_WS=1 to run the warp-specialised forward"})
                    continue
                if time.time() > t_end:
                    rows.append({"case": label, "impl": f"ours {kind} candidate {c}", "note": "skipped: over budget"})
                    continue
                table[key] = [c, *(x for x in cands if x is not c)]
                row = {"case": label, "impl": f"ours {kind} candidate {c}" + (" (static pick)" if i == 0 else ""),
                       "Hq": Hq, "Hkv": Hkv, "hd": hd, "L": L, "B": B}  # fmt: skip
                try:
                    with torch.no_grad():
                        fwd_ms = cuda_time_ms(lambda: attention(q, k, v), warmup=2, iters=5)

                    def fwd_bwd():
                        torch.autograd.backward(attention(*leaves), do)

                    fb_ms = cuda_time_ms(fwd_bwd, warmup=2, iters=5)
                    if kind == "fwd":
                        row.update(fwd_ms=fwd_ms, fwd_tflops=flops / fwd_ms / 1e9)
                    else:
                        row.update(bwd_ms=fb_ms - fwd_ms, bwd_tflops=2.5 * flops / max(fb_ms - fwd_ms, 1e-6) / 1e9)
                except Exception as exc:  # a candidate that fails is reported, the others still run
                    row["note"] = f"failed: {type(exc).__name__}: {exc}"[:240]
                finally:
                    for x in leaves:
                        x.grad = None
                rows.append(row)
            table[key] = cands
    finally:
        if saved is None:
            os.environ.pop("LAVIN_FAST_ATTENTION_TUNE", None)
        else:
            os.environ["LAVIN_FAST_ATTENTION_TUNE"] = saved
    return rows


def _pre_rotated(name):
    return "pre-rotated q/k)" in name


def _check(fn, B, grid, Hq, Hkv, hd, pre_rotated):
    """Max errors of out/dq/dk/dv vs float64, and the bf16 reference's own max error."""
    from lavin_fast.ops.attention import reference_attention
    from lavin_fast.ops.rope import apply_rope

    L = grid[0] * grid[1] * grid[2]
    dev = "cuda"
    q = torch.randn(B, L, Hq, hd, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, L, Hkv, hd, device=dev, dtype=torch.bfloat16)
    v = torch.randn(B, L, Hkv, hd, device=dev, dtype=torch.bfloat16)
    if pre_rotated:  # the kernel sees q/k rotated in bf16 (as qk_norm_rope writes them)
        q, k = apply_rope(q, grid), apply_rope(k, grid)
    do = torch.randn(B, L, Hq, hd, device=dev, dtype=torch.bfloat16)

    def grads(f, xs):
        xs = [x.detach().requires_grad_() for x in xs]
        out = f(*xs)
        return [out, *torch.autograd.grad(out, xs, do.to(out.dtype))]

    if pre_rotated:
        got = grads(lambda a, b, c: fn(a, b, c, grid), (q, k, v))
        ref = grads(lambda a, b, c: reference_attention(a, b, c), (q.double(), k.double(), v.double()))
        low = grads(lambda a, b, c: reference_attention(a, b, c), (q, k, v))
    else:
        got = grads(lambda a, b, c: fn(a, b, c, grid), (q, k, v))
        ref = grads(lambda a, b, c: reference_attention(a, b, c, rope_grid=grid), (q.double(), k.double(), v.double()))
        low = grads(lambda a, b, c: reference_attention(a, b, c, rope_grid=grid), (q, k, v))
    err = max((g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-9) for g, r in zip(got, ref, strict=True))
    ref_err = max((g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-9) for g, r in zip(low, ref, strict=True))
    return err, ref_err


def run(budget_s: float) -> list[dict]:
    t_end = time.time() + budget_s
    rows: list[dict] = []
    impls = _impls()
    checked: set[tuple] = set()
    for case in CASES:
        if time.time() > t_end:
            rows.append({"case": case[0], "note": "skipped: over budget"})
            continue
        rows += _run_case(case, impls, checked, t_end)
        torch.cuda.empty_cache()
    rows += _variant_rows(t_end)
    return rows


def _run_case(case, impls, checked, t_end) -> list[dict]:
    from bench.common import cuda_time_ms, peak_memory_mib

    label, B, grid, Hq, Hkv, hd = case
    L = grid[0] * grid[1] * grid[2]
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(B, L, Hq, hd, device=dev, dtype=dt)
    k = torch.randn(B, L, Hkv, hd, device=dev, dtype=dt)
    v = torch.randn(B, L, Hkv, hd, device=dev, dtype=dt)
    do = torch.randn(B, L, Hq, hd, device=dev, dtype=dt)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    flops = _fwd_flops(B, L, Hq, hd)
    rows: list[dict] = []
    best_fb = None
    for name, fn in impls.items():
        if time.time() > t_end:
            rows.append({"case": label, "impl": name, "note": "skipped: over budget"})
            continue
        row = {"case": label, "impl": name, "Hq": Hq, "Hkv": Hkv, "hd": hd, "L": L, "B": B}
        try:
            key = (name, Hq, Hkv, hd)
            if key not in checked and name.startswith("ours"):
                err, ref_err = _check(fn, 1, CHECK_GRID, Hq, Hkv, hd, _pre_rotated(name))
                row.update(rel_err=err, ref_bf16_rel_err=ref_err)
                checked.add(key)
            with torch.no_grad():
                fwd_ms = cuda_time_ms(lambda fn=fn: fn(q, k, v, grid), warmup=2, iters=5)

            def fwd_bwd(fn=fn):
                torch.autograd.backward(fn(*leaves, grid), do)

            fb_ms = cuda_time_ms(fwd_bwd, warmup=2, iters=5)
            row.update(
                fwd_ms=fwd_ms,
                fwd_tflops=flops / fwd_ms / 1e9,
                bwd_ms=fb_ms - fwd_ms,
                bwd_tflops=2.5 * flops / max(fb_ms - fwd_ms, 1e-6) / 1e9,
                fwd_bwd_ms=fb_ms,
                fwd_bwd_tflops=3.5 * flops / fb_ms / 1e9,
                peak_mib=peak_memory_mib(fwd_bwd),
            )
            if name.startswith("ours"):
                row["note"] = _our_configs(name, hd)
            elif best_fb is None or fb_ms < best_fb[1]:
                best_fb = (name, fb_ms)
        except Exception as exc:  # one implementation failing must not stop the others
            row["note"] = f"failed: {type(exc).__name__}: {exc}"[:240]
        finally:
            for x in leaves:
                x.grad = None
        rows.append(row)
    if best_fb is not None:
        for r in rows:
            if "fwd_bwd_ms" in r:
                r["speedup_vs_best_baseline"] = best_fb[1] / r["fwd_bwd_ms"]
        rows.append({"case": label, "impl": "best baseline (fwd+bwd)", "note": best_fb[0]})
    return rows
