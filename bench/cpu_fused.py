"""The CPU C++ kernels (lavin_fast/ops/cpu_fused.py) against the torch forms they replace, op by op, forward +
backward, side by side in one run.

    python -m bench.cpu_fused [--threads 2] [--rounds 5] [--shapes demo 3.4B] [--json]

Per op and shape: ms per forward + backward of the C++ kernel ("cpu" backend), of the hand-written torch forms
("torch": lavin_fast/ops/torch_grads.py, what the CPU ran before), and of autograd through the plain references
("autograd": what a straightforward implementation runs); the contenders alternate per round and the median of
the rounds is printed, with the ratio torch / cpu and the effective bandwidth of the C++ kernel (bytes it must
move at least: every input read once, every output written once, forward and backward).

Shapes: "demo" is `lavin-fast demo`'s J-DiT step (8 samples x 384 tokens, width 64, 2 q and 2 kv heads of 32,
SwiGLU hidden 128); "3.4B" is one 3.4B-shaped block's stream at 1,024 tokens (width 576, 8 q heads and 2 kv heads of
72, SwiGLU hidden 1,536), batch 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {
    # tokens B x L, width D, heads (H, Hkv, hd), SwiGLU hidden F, cond / x frames (hw tokens each)
    "demo": {"B": 8, "Lc": 320, "Lx": 64, "D": 64, "heads": (2, 2, 32), "F": 128, "hw": 64},
    "3.4B": {"B": 1, "Lc": 768, "Lx": 256, "D": 576, "heads": (8, 2, 72), "F": 1536, "hw": 256},
}


def _cases(shape: dict) -> dict:
    """op -> (make inputs, {contender: fn(inputs) -> outputs}, bytes moved forward + backward)."""
    from lavin_fast.ops import cpu_fused, torch_grads
    from lavin_fast.ops.rope import rope_split, rope_tables
    from lavin_fast.ops.sandwich_norm import (
        gated_rms_norm_residual,
        reference_gated_rms_norm_residual,
        reference_rms_norm_modulate,
        rms_norm_modulate,
    )

    B, L, D, F = shape["B"], shape["Lc"] + shape["Lx"], shape["D"], shape["F"]
    H, Hkv, hd = shape["heads"]
    f4 = 4

    def rows():
        return [torch.randn(B, L, D, requires_grad=True), torch.randn(B, D, requires_grad=True)]

    def gated_in():
        return [torch.randn(B, L, D, requires_grad=True), torch.randn(B, L, D, requires_grad=True),
                torch.randn(B, D, requires_grad=True)]  # fmt: skip

    W = (H + 2 * Hkv) * hd
    hw = shape["hw"]
    grid = ((shape["Lc"] + shape["Lx"]) // hw, hw // 8 if hw >= 8 else 1, 8 if hw >= 8 else hw)
    cos, sin = rope_tables(grid, hd, 0, "cpu", torch.float32)
    seg = {"c_start": 0, "c_len": shape["Lc"], "x_start": 0, "x_len": shape["Lx"], "cos": cos, "sin": sin}

    def qkv_in():
        return [torch.randn(B, shape["Lc"], W, requires_grad=True), torch.randn(B, shape["Lx"], W, requires_grad=True),
                *(torch.ones(n, requires_grad=True) for n in (H * hd, Hkv * hd, H * hd, Hkv * hd))]  # fmt: skip

    def qkv_torch(tc, tx, qwc, kwc, qwx, kwx):
        wqk = (H + Hkv) * hd
        qk_c, vc = (t.unflatten(-1, (-1, hd)) for t in tc.split([wqk, Hkv * hd], dim=-1))
        qk_x, vx = (t.unflatten(-1, (-1, hd)) for t in tx.split([wqk, Hkv * hd], dim=-1))
        qk_c = torch_grads.qk_norm(qk_c, H, qwc, kwc, 1e-6)
        qk_x = torch_grads.qk_norm(qk_x, H, qwx, kwx, 1e-6)
        qk = torch.cat([qk_c.transpose(1, 2), qk_x.transpose(1, 2)], dim=2)
        v = torch.cat([vc.transpose(1, 2), vx.transpose(1, 2)], dim=2)
        return torch_grads.rope(qk, cos, sin, rope_split(hd)), v

    def qkv_cpu(tc, tx, *w):
        return cpu_fused.qkv_prep(tc, tx, tuple(w), (H, Hkv, hd), [seg], 1e-6)[0]

    def swiglu_plain(gu):
        g, u = gu.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    n_rows, n_gu = B * L * D * f4, B * L * F * f4
    return {
        "rms_norm_modulate": (
            rows,
            {
                "cpu": lambda x, s: rms_norm_modulate(x, s, backend="cpu"),
                "torch": lambda x, s: rms_norm_modulate(x, s, backend="torch"),
                "autograd": lambda x, s: reference_rms_norm_modulate(x, s),
            },
            2 * n_rows + 3 * n_rows,
        ),  # fwd: x in, y out; bwd: dy and x in, dx out
        "gated_rms_norm_residual": (
            gated_in,
            {
                "cpu": lambda r, h, g: gated_rms_norm_residual(r, h, g, backend="cpu"),
                "torch": lambda r, h, g: gated_rms_norm_residual(r, h, g, backend="torch"),
                "autograd": lambda r, h, g: reference_gated_rms_norm_residual(r, h, g),
            },
            3 * n_rows + 3 * n_rows,
        ),  # fwd: r, h in, out; bwd: dy, h in, dh out (d residual is dy itself)
        "swiglu": (
            lambda: [torch.randn(B, L, 2 * F, requires_grad=True)],
            {
                "cpu": cpu_fused.swiglu,
                "torch": torch_grads.swiglu,
                "autograd": swiglu_plain,
            },
            3 * n_gu + 5 * n_gu,
        ),  # fwd: gu in (2F), y out; bwd: dy, gu in, dgu out (2F)
        "qkv_prep (QK norm + RoPE + layout)": (
            qkv_in,
            {
                "cpu": qkv_cpu,
                "torch": qkv_torch,
            },
            4 * B * L * W * f4,
        ),  # fwd: t in, qk|v out; bwd: dqk|dv and t in, dt out
    }


def _run_once(make, fn) -> float:
    inputs = make()
    t0 = time.perf_counter()
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return time.perf_counter() - t0


def bench(shapes: list[str], rounds: int, inner: int) -> list[dict]:
    rows = []
    for name in shapes:
        for op, (make, fns, nbytes) in _cases(SHAPES[name]).items():
            times: dict[str, list[float]] = {k: [] for k in fns}
            for fn in fns.values():  # warm-up
                _run_once(make, fn)
            for _ in range(rounds):
                for k, fn in fns.items():
                    times[k].append(min(_run_once(make, fn) for _ in range(inner)))
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rows.append({"shape": name, "op": op, "ms": ms, "torch_over_cpu": ms["torch"] / ms["cpu"],
                         "cpu_GBps": nbytes / (ms["cpu"] * 1e-3) / 1e9})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inner", type=int, default=3, help="calls per round (the fastest counts)")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.rounds < 1 or args.inner < 1:
        ap.error("--threads, --rounds and --inner must be positive")
    from lavin_fast.ops import _cpu

    ok, detail = _cpu.status()
    if not ok:
        ap.exit(2, f"the CPU kernels are not in use: {detail}\n")
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        rows = bench(args.shapes, args.rounds, args.inner)
    finally:
        torch.set_num_threads(before)
    if args.json:
        print(json.dumps({"threads": args.threads, "library": detail, "rows": rows}, indent=1))
        return 0
    print(f"CPU kernels: {detail}; {args.threads} threads; median of {args.rounds} rounds, forward + backward")
    print(f"{'shape':<6} {'op':<36} {'cpu ms':>8} {'torch ms':>9} {'autograd':>9} {'torch/cpu':>9} {'cpu GB/s':>9}")
    for r in rows:
        ag = r["ms"].get("autograd")
        ag_text = "-" if ag is None else f"{ag:.3f}"
        print(
            f"{r['shape']:<6} {r['op']:<36} {r['ms']['cpu']:>8.3f} {r['ms']['torch']:>9.3f} {ag_text:>9} "
            f"{r['torch_over_cpu']:>8.2f}x {r['cpu_GBps']:>9.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
