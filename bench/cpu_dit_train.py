"""CPU training step of the J-DiT, float32 against bfloat16 autocast (float32 master weights), side by side.

    python -m bench.cpu_dit_train [--threads 2] [--steps 60] [--block 10] [--json] [--clock wall|thread]
    python -m bench.cpu_dit_train --grads ROUNDS [--threads 1]   (hand-written backward vs autograd, see grads_ab)

Each model ("tiny": the tiny config on 16-channel latents; "demo": `lavin-fast demo`'s J-DiT, the tiny config with
the demo's overrides on its 4-channel latents) trains twice from the same initial weights on the same batches and
the same flow-matching draws: once in float32, once under bfloat16 autocast, as the trainer runs them (its loss,
gradient clipping at 1, AdamW). Both runs advance in alternating blocks of --block steps, so that load from other
processes spreads over both. Printed per model and precision: steps/s (total steps over total time of the timed
blocks; the first block is a warm-up and not timed) and the mean loss of the last block; then the mean relative
difference of the two runs' per-step losses. bfloat16 rows are skipped (and the run says why) on a CPU without
native bfloat16 (lavin_fast.models.cpu_path.cpu_bf16_support).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

BATCH = 8
CONTEXT_FRAMES, TARGET_FRAMES = 5, 1  # the demo's 2 example pairs and the query, then the target
LATENT_HW = 16  # the demo's 64 px frames through its 4x ST-VAE


def models() -> dict[str, tuple[torch.nn.Module, int]]:
    from lavin_fast.cli.demo import TINY_DIT
    from lavin_fast.models import build_dit

    torch.manual_seed(0)
    tiny = build_dit("tiny")
    demo = build_dit("tiny", **TINY_DIT)
    return {"tiny": (tiny, tiny.cfg.in_channels), "demo": (demo, demo.cfg.in_channels)}


def train(
    model: torch.nn.Module, channels: int, steps: int, block: int, bf16_first: bool, clock=time.perf_counter
) -> dict:
    """Train copies of `model` in float32 and in bfloat16 autocast, alternating blocks of steps (timed by clock)."""
    from lavin_fast.flow.loss import draw_flow_randomness, flow_matching_loss

    g = torch.Generator().manual_seed(1)
    batches = [
        (
            torch.randn(BATCH, channels, TARGET_FRAMES, LATENT_HW, LATENT_HW, generator=g),
            torch.randn(BATCH, channels, CONTEXT_FRAMES, LATENT_HW, LATENT_HW, generator=g),
        )
        for _ in range(4)
    ]
    runs = {}
    for bf16 in (False, True):
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
        runs[bf16] = {"model": m, "opt": opt, "losses": [], "seconds": 0.0, "timed_steps": 0}

    def step(run: dict, i: int, bf16: bool) -> None:
        x1, cond = batches[i % len(batches)]
        draws = draw_flow_randomness(
            seed=0, step=i, indices=range(BATCH), group=range(BATCH), latent_shape=x1.shape[1:],
            null_prob=0.1, device="cpu",
        )  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = flow_matching_loss(run["model"], x1, cond, draws)
            loss.backward()
        params = [p for p in run["model"].parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        run["opt"].step()
        run["opt"].zero_grad(set_to_none=True)
        run["losses"].append(float(loss.detach()))

    order = (True, False) if bf16_first else (False, True)
    for start in range(0, steps, block):
        for bf16 in order:
            run = runs[bf16]
            t0 = clock()
            for i in range(start, min(start + block, steps)):
                step(run, i, bf16)
            if start > 0:  # the first block warms up (allocations, oneDNN primitive caches)
                run["seconds"] += clock() - t0
                run["timed_steps"] += min(start + block, steps) - start
    out = {}
    for bf16, run in runs.items():
        name = "bfloat16 autocast" if bf16 else "float32"
        out[name] = {
            "steps/s": round(run["timed_steps"] / run["seconds"], 2) if run["seconds"] else None,
            "last-block loss": float(f"{sum(run['losses'][-block:]) / len(run['losses'][-block:]):.5g}"),
            "losses": run["losses"],
        }
    a, b = runs[False]["losses"], runs[True]["losses"]
    diff = sum(abs(y - x) / abs(x) for x, y in zip(a, b, strict=True)) / len(a)
    out["mean relative loss difference"] = float(f"{diff:.3g}")
    return out


def grads_ab(threads: int, rounds: int, reps: int = 5) -> list[dict]:
    """The demo J-DiT's forward + backward (batch 8, 5+1 frames of 16x16 latents, one call) with the torch paths'
    hand-written backward passes (lavin_fast/ops/torch_grads.py, the permutation-GEMM RoPE) against autograd of the
    plain references (the code before them), interleaved in one process: per round each form runs `reps` timed
    steps after one untimed; per-round ratios, then their median."""
    import statistics

    from lavin_fast.cli.demo import TINY_DIT
    from lavin_fast.models import build_dit
    from lavin_fast.ops import rope, torch_grads

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_dit("tiny", **TINY_DIT).train()
    with torch.no_grad():  # adaLN-zero: give the gates weight so every branch carries gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, cond = (
        torch.randn(BATCH, 4, TARGET_FRAMES, LATENT_HW, LATENT_HW),
        torch.randn(BATCH, 4, CONTEXT_FRAMES, LATENT_HW, LATENT_HW),
    )
    t = torch.rand(BATCH)
    new = (torch_grads._needs_grad, rope._gemm_rotation_ok, torch_grads.swiglu)

    def plain_swiglu(gu):
        g, u = gu.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    forms = {
        "hand-written backward": new,
        "autograd of the references": (lambda *a: False, lambda x: False, plain_swiglu),
    }
    times: dict[str, list[float]] = {k: [] for k in forms}
    try:
        for _ in range(rounds):
            for name, (needs, gemm_ok, swiglu) in forms.items():
                torch_grads._needs_grad, rope._gemm_rotation_ok, torch_grads.swiglu = needs, gemm_ok, swiglu
                for i in range(reps + 1):
                    t0 = time.perf_counter()
                    model.zero_grad(set_to_none=True)
                    model(x, t, cond).square().mean().backward()
                    if i:
                        times[name].append(time.perf_counter() - t0)
    finally:
        torch_grads._needs_grad, rope._gemm_rotation_ok, torch_grads.swiglu = new
    base = times["autograd of the references"]
    out = []
    for name, v in times.items():
        ratios = [b / a for a, b in zip(v, base, strict=True)]
        out.append({"backward": name, "threads": threads, "median ms": round(statistics.median(v) * 1e3, 1),
                    "min ms": round(min(v) * 1e3, 1), "x references (median ratio)": round(statistics.median(ratios), 2)})  # fmt: skip
    return out


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
"""--clock: wall clock, or this thread's CPU time (1 thread only: torch's worker threads are not counted; less
sensitive to other processes on a loaded machine)."""


def run(threads: int, steps: int, block: int, clock: str = "wall") -> dict:
    from lavin_fast.models.cpu_path import cpu_bf16_support

    torch.set_num_threads(threads)
    ok, why = cpu_bf16_support()
    report = {"threads": threads, "steps": steps, "block": block, "batch": BATCH, "clock": clock,
              "frames": f"{CONTEXT_FRAMES}+{TARGET_FRAMES} of {LATENT_HW}x{LATENT_HW}", "models": {}}  # fmt: skip
    if not ok:
        report["note"] = f"no bfloat16 rows: {why}"
        return report
    for name, (model, channels) in models().items():
        report["models"][name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            **train(model, channels, steps, block, bf16_first=False, clock=CLOCKS[clock]),
        }
    return report


def rows(report: dict) -> list[dict]:
    out = []
    for name, r in report["models"].items():
        for prec in ("float32", "bfloat16 autocast"):
            out.append({"model": name, "parameters": r["parameters"], "precision": prec,
                        "steps/s": r[prec]["steps/s"], "last-block loss": r[prec]["last-block loss"],
                        "x float32": round(r[prec]["steps/s"] / r["float32"]["steps/s"], 2),
                        "mean rel. loss diff": r["mean relative loss difference"] if prec != "float32" else ""})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall clock, or thread CPU time (needs --threads 1)")  # fmt: skip
    ap.add_argument("--grads", type=int, metavar="ROUNDS", default=0,
                    help="instead: the demo J-DiT's forward + backward, hand-written backward passes against autograd "
                    "of the references, ROUNDS interleaved rounds")  # fmt: skip
    a = ap.parse_args(argv)
    if a.grads:
        from bench.cpu_dit import _table

        print(_table(grads_ab(a.threads, a.grads)))
        return 0
    if a.steps < 2 * a.block:
        ap.error(f"--steps {a.steps} must be at least two blocks (--block {a.block}): the first is not timed")
    if a.clock == "thread" and a.threads != 1:
        ap.error("--clock thread counts only the calling thread's CPU time: it needs --threads 1")
    rep = run(a.threads, a.steps, a.block, a.clock)
    if a.json:
        print(json.dumps(rep, indent=1))
        return 0
    from bench.cpu_dit import _table

    print(f"\nJ-DiT training step on the CPU, {rep['threads']} threads, batch {rep['batch']}, {rep['frames']} latents, "
          f"{rep['steps']} steps in alternating blocks of {rep['block']} (first block not timed), {rep['clock']} clock")  # fmt: skip
    if "note" in rep:
        print("note:", rep["note"])
    else:
        print(_table(rows(rep)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
