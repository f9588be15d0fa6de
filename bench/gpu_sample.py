"""End-to-end sampling latency of the published default task: 3.4B J-DiT, 512x512, 4 context pairs, the 20-point
published grid (19 Euler updates), CFG 1.5 (both passes in one call), VAE encode of the 9 context and query
images and decode of the prediction included. Random weights (the same arithmetic as the published files).

Rows: eager (bf16 J-DiT, fp32 VAE: `lavin-fast sample` on CUDA), eager with --published precision (bf16 VAE and
integration state), and the J-DiT blocks under torch.compile (default mode, and reduce-overhead = CUDA graphs).
Target: 5 s per query on an H200. `time_predict` is shared with bench/cpu_sample.py (the CPU row).
"""

from __future__ import annotations

import time

import torch

TITLE = "Sampling latency, published default task (3.4B, 512 px, 4 pairs, 20 points, CFG 1.5, VAE included)"
BUDGET_WEIGHT = 2


def build_models(dit_name: str, vae_cfg: dict, device, dit_dtype, vae_dtype, **dit_overrides):
    from lavin_fast.models import build_dit
    from lavin_fast.models.vae import build_vae

    torch.manual_seed(0)
    dit = build_dit(dit_name, device=device, dtype=dit_dtype, drop_path=0.0, **dit_overrides).eval()
    with torch.no_grad():  # the zero-initialised modulations and output get random weights (a trained model's work)
        for n, p in dit.named_parameters():
            if "mod" in n or "final_layer" in n:
                p.normal_(std=0.02)
    vae = build_vae(device=device, dtype=vae_dtype, **vae_cfg).eval()
    return dit, vae


def time_predict(dit, vae, size: int, *, pairs: int = 4, points: int = 20, guidance: float = 1.5,
                 state_dtype=torch.float32, repeats: int = 2) -> float:  # fmt: skip
    """Seconds per query of `predict` (one query, everything from pixels to pixels), best of `repeats` after a
    warm-up call."""
    from lavin_fast.flow.pipeline import SamplerOptions, predict

    g = torch.Generator().manual_seed(0)
    img = lambda: torch.rand(3, 1, size, size, generator=g) * 2 - 1  # noqa: E731
    ctx = [(img(), img()) for _ in range(pairs)]
    query = [img()]
    opts = SamplerOptions(num_points=points, grid="published", guidance=guidance, batch=1, state_dtype=state_dtype)
    sync = torch.cuda.synchronize if vae.device.type == "cuda" else (lambda: None)
    predict(dit, vae, ctx, query, opts)  # warm-up (and compilation)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        predict(dit, vae, ctx, query, opts)
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def run(budget_s: float = 120.0) -> list[dict]:
    start = time.time()
    dev = torch.device("cuda")
    rows = []
    cases = [
        ("eager", torch.float32, torch.float32, None),
        ("eager, --published precision", torch.bfloat16, torch.bfloat16, None),
        ("compile blocks", torch.float32, torch.float32, "default"),
        ("compile blocks, reduce-overhead (CUDA graphs)", torch.float32, torch.float32, "reduce-overhead"),
    ]
    dit = vae = None
    for name, vae_dtype, state_dtype, mode in cases:
        if time.time() - start > budget_s:
            rows.append({"case": name, "note": "skipped: time budget spent"})
            continue
        try:
            dit, vae = build_models("3.4B", {}, dev, torch.bfloat16, vae_dtype)
            if mode is not None:
                for blk in dit.blocks:
                    blk.compile(mode=None if mode == "default" else mode)
            torch.cuda.reset_peak_memory_stats()
            s = time_predict(dit, vae, 512, state_dtype=state_dtype)
            rows.append({"case": name, "s_per_query": s, "target_s": 5.0,
                         "peak_mib": torch.cuda.max_memory_allocated() / 2**20})  # fmt: skip
        except Exception as exc:  # one failing case (e.g. a compile error) does not hide the others
            rows.append({"case": name, "note": f"failed: {type(exc).__name__}: {str(exc)[:200]}"})
        finally:
            dit = vae = None
            torch._dynamo.reset()
            torch.cuda.empty_cache()
    return rows
