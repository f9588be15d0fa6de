"""CPU benchmark of the ST-VAE on a reduced-width model (published depth and group count, narrower levels).

    python -m bench.cpu_vae [--json] [--quick] [--rounds N] [--threads N] [--clock wall|thread] [--skip-memory]

Times (best of interleaved rounds, eager PyTorch, float32) for image batches and a short clip: our model with the
one-frame fast path, our model forced onto the general path, and the published structure run plainly
(bench/published_vae.py: NCDHW, padded copies, separate GroupNorm/SiLU); then our model in channels-last and in
bfloat16 (weights and activations; `err_vs_fp32` is its relative L2 error against our float32 output, measured
once outside the timing). `--threads 1 --clock thread` times each call by the CPU time of the one thread doing the
work (time.thread_time): on a machine shared with other jobs it counts the work, not the waits for a core, so its
ratios hold under load where wall-clock ones do not. Then peak memory of chunked against
whole-clip encode/decode of long clips: each case runs in a fresh subprocess, resets the kernel's peak
resident size (/proc/self/clear_refs) just before the call (model and input allocated, libraries warmed up)
and reports the peak (VmHWM) above the resident size at that moment.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import torch

CFG = dict(block_out_channels=(32, 64, 64, 128), layers_per_block=3, norm_num_groups=32)


def _models(seed: int = 0):
    from bench.published_vae import PublishedVAE, randomize_vae_
    from lavin_fast.models import build_vae

    torch.manual_seed(seed)
    ours = build_vae(**CFG)
    randomize_vae_(ours)
    pub = PublishedVAE(**CFG).eval()
    pub.load_state_dict(ours.state_dict())
    return ours, pub


def _time_all(cases: list, rounds: int, clock=time.perf_counter) -> list[float]:
    """Best-of-rounds milliseconds of each case; the cases are interleaved round by round so that load
    from other processes on a shared machine spreads over all of them (the minimum is the least disturbed)."""
    best = [float("inf")] * len(cases)
    with torch.no_grad():
        for _, _, fn in cases:
            fn()
        for _ in range(rounds):
            for i, (_, _, fn) in enumerate(cases):
                t0 = clock()
                fn()
                best[i] = min(best[i], (clock() - t0) * 1e3)
    return best


def timing_rows(quick: bool, rounds: int | None = None, clock=time.perf_counter) -> list[dict]:
    from lavin_fast.models import build_vae

    ours, pub = _models()
    rep = rounds if rounds is not None else 2 if quick else 4
    rows = []
    img = torch.rand(2, 3, 96, 96) * 2 - 1
    with torch.no_grad():
        z_img = ours.encode(img).mean
    clip = torch.rand(1, 3, 9, 48, 48) * 2 - 1
    with torch.no_grad():
        z_clip = ours.encode(clip).mean
    cases = [
        ("image encode 2x96x96", "ours fast path", lambda: ours.encode(img)),
        ("image encode 2x96x96", "ours general path", lambda: ours.encode(img, fast=False)),
        ("image encode 2x96x96", "published structure", lambda: pub.encode(img[:, :, None])),
        ("image decode 2x96x96", "ours fast path", lambda: ours.decode(z_img)),
        ("image decode 2x96x96", "ours general path", lambda: ours.decode(z_img, fast=False)),
        ("image decode 2x96x96", "published structure", lambda: pub.decode(z_img[:, :, None])),
        ("clip encode 9x48x48", "ours", lambda: ours.encode(clip)),
        ("clip encode 9x48x48", "published structure", lambda: pub.encode(clip)),
        ("clip decode 9x48x48", "ours", lambda: ours.decode(z_clip)),
        ("clip decode 9x48x48", "published structure", lambda: pub.decode(z_clip)),
    ]
    # channels-last on CPU (the model's default there is contiguous): a second model sharing the weights
    ours_cl = build_vae(**CFG)
    ours_cl.load_state_dict(ours.state_dict(), assign=True)
    ours_cl.channels_last = True
    cases += [
        ("image encode 2x96x96", "ours fast path, channels_last_3d", lambda: ours_cl.encode(img)),
        ("image decode 2x96x96", "ours fast path, channels_last_3d", lambda: ours_cl.decode(z_img)),
    ]
    # bfloat16 weights and activations (the norms' statistics and modulation in float32), against our float32 output
    ours_bf = build_vae(**CFG, dtype=torch.bfloat16)
    ours_bf.load_state_dict(ours.state_dict())
    img_bf, z_img_bf, clip_bf, z_clip_bf = (t.bfloat16() for t in (img, z_img, clip, z_clip))
    bf_cases = [
        ("image encode 2x96x96", lambda: ours_bf.encode(img_bf).mean, lambda: ours.encode(img).mean),
        ("image decode 2x96x96", lambda: ours_bf.decode(z_img_bf), lambda: ours.decode(z_img)),
        ("clip encode 9x48x48", lambda: ours_bf.encode(clip_bf).mean, lambda: ours.encode(clip).mean),
        ("clip decode 9x48x48", lambda: ours_bf.decode(z_clip_bf), lambda: ours.decode(z_clip)),
    ]
    err = {}
    with torch.no_grad():
        for case, fn, ref in bf_cases:
            got, want = fn().double(), ref().double()
            err[case] = float((got - want).norm() / want.norm())
    cases += [(case, "ours, bfloat16", fn) for case, fn, _ in bf_cases]
    best = _time_all(cases, rep, clock)
    base = {case: ms for (case, impl, _), ms in zip(cases, best, strict=True) if impl == "published structure"}
    for (case, impl, _), ms in zip(cases, best, strict=True):
        row = {"case": case, "impl": impl, "ms": round(ms, 1), "speedup_vs_published": round(base[case] / ms, 2)}
        if impl.endswith("bfloat16"):
            row["err_vs_fp32"] = f"{err[case]:.2e}"
        rows.append(row)
    order: dict[str, int] = {}
    for r in rows:
        order.setdefault(r["case"], len(order))
    rows.sort(key=lambda r: order[r["case"]])  # stable: each case's rows together
    return rows


# ----------------------------------------------------------------------------- memory (one subprocess per case)

MEM_HW = 32
MEM_LENGTHS = (65, 257)  # frames of the long clips (17 and 65 latent frames)
MEM_CHUNK = 8  # latent frames per chunk
# glibc serves allocations >= 64 KiB with mmap and returns them at once, so that resident memory follows the
# live tensors (otherwise freed heap memory stays resident and the peak depends on fragmentation)
MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _memory_case(kind: str, impl: str, frames: int, chunk: int | None, mode: str) -> dict:
    torch.set_num_threads(2)
    ours, pub = _models()
    x = torch.rand(1, 3, frames, MEM_HW, MEM_HW) * 2 - 1
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, MEM_HW // 8, MEM_HW // 8)
    if kind == "encode":
        fn = (lambda: pub.encode(x)) if impl == "published" else (lambda: ours.encode(x, chunk=chunk, chunk_mode=mode))
    else:
        fn = (lambda: pub.decode(z)) if impl == "published" else (lambda: ours.decode(z, chunk=chunk, chunk_mode=mode))
    # warm the allocator and libraries on a small input first, so that their one-off costs are in the baseline
    with torch.no_grad():
        ours.encode(x[:, :, :5, :16, :16])
        ours.decode(z[:, :, :2, :2, :2])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak resident size (VmHWM) to the current one
        f.write("5")
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    sec = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    out = out[0] if isinstance(out, tuple) else out if isinstance(out, torch.Tensor) else out.mean
    out_mib = out.numel() * out.element_size() / 2**20
    return {
        "peak_above_start_mib": round((peak - before) / 1024, 1),
        "output_mib": round(out_mib, 2),
        "s": round(sec, 2),
    }


def memory_rows() -> list[dict]:
    rows = []
    for kind in ("encode", "decode"):
        for frames in MEM_LENGTHS:
            for impl, chunk, mode in (
                ("published", None, "cache"),
                ("ours", None, "cache"),
                ("ours", MEM_CHUNK, "cache"),
                ("ours", MEM_CHUNK, "overlap"),
            ):
                code = (
                    "import json, bench.cpu_vae as b; "
                    f"print('RESULT', json.dumps(b._memory_case({kind!r}, {impl!r}, {frames}, {chunk!r}, {mode!r})))"
                )
                res = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, check=True,
                    env={**os.environ, **MEM_ENV},
                )  # fmt: skip
                line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
                label = "whole clip" if chunk is None else f"chunk={chunk} latent frames, {mode}"
                rows.append({"case": f"{kind} {frames}x{MEM_HW}x{MEM_HW}", "impl": f"{impl}: {label}",
                             **json.loads(line[7:])})  # fmt: skip
    return rows


def _table(rows: list[dict]) -> str:
    from bench.run_gpu import markdown_table

    return markdown_table(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (2 rounds unless --rounds)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (best of; default 4, 2 with --quick)"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--clock", choices=("wall", "thread"), default="wall",
        help="wall: elapsed time; thread: CPU time of the calling thread (needs --threads 1)",
    )  # fmt: skip
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error(
            f"--clock thread counts one thread's CPU time: use it with --threads 1 (now {torch.get_num_threads()})"
        )
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    report = {"config": {k: list(v) if isinstance(v, tuple) else v for k, v in CFG.items()},
              "threads": torch.get_num_threads(), "clock": args.clock,
              "timing": timing_rows(args.quick, args.rounds, clock)}  # fmt: skip
    if not args.skip_memory:
        report["memory"] = memory_rows()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(
            f"ST-VAE CPU benchmark, model {report['config']}, {report['threads']} threads, eager, {args.clock} clock\n"
        )
        print(_table(report["timing"]))
        if "memory" in report:
            print("\nPeak resident memory above the start of the call (fresh process per row), long clip:\n")
            print(_table(report["memory"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
