"""Training-step throughput and MFU of the 1.0B and 3.4B J-DiT on one GPU (ours: fused kernels through the
dispatcher, vs the same model on the torch reference ops + SDPA), and guided sampling latency.

Training case: the real Trainer step (bf16 autocast, fused AdamW, clipping, float32 EMA, keyed draws) on
synthetic latents of 256 px images (32 x 32 latents, 256 tokens per frame) with 4 example pairs + query
(9 context frames) and one target frame: 2,560 tokens per sequence; activation checkpointing on.
Sampling case: 512 px (1,024 tokens per frame), 4 pairs, the published 20-point grid (19 guided steps).
MFU = model FLOPs (lavin_fast.train.metrics) / (time x dense bf16 peak of the device).
Context-parallel case (machines with >= 2 GPUs; skipped with one): the 3.4B trainer step on one 32k-token
sequence (31 context frames + 1 target of 32 x 32 tokens) split over every GPU, Ulysses and ring, one process
per GPU (NCCL): step time, tokens/s and peak memory per GPU.
"""

from __future__ import annotations

import gc
import tempfile
import time

import torch

TITLE = "Training step (1.0B, 3.4B) and guided sampling: fused kernels vs torch reference ops + SDPA"
BUDGET_WEIGHT = 2  # share of the suite's benchmark time (bench/run_gpu.py)

TRAIN_CASES = [("1.0B", 8), ("3.4B", 4)]  # (size, micro batch)


def _train_row(name: str, batch: int, backend: str, budget_s: float) -> dict:
    from lavin_fast.models.dit import build_dit
    from lavin_fast.train.config import load_config
    from lavin_fast.train.metrics import device_peak_tflops, dit_shape_of, dit_train_flops
    from lavin_fast.train.sources import SyntheticLatentSource
    from lavin_fast.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            None,
            {
                "model": name,
                "grad_checkpointing": True,
                "steps": 1000,
                "batch_size": batch,
                "micro_batch_size": batch,
                "lr": 1e-4,
                "device": "cuda",
                "precision": "bf16",
                "out_dir": out,
                "save_every": 10**6,
                "tensorboard": False,
                "progress": False,
                "resume": False,
                "null_prob": 0.0,
            },
        )
        trainer = Trainer(
            cfg,
            model_factory=lambda c, d: build_dit(name, device=d, backend=backend, grad_checkpointing=True),
            source_factory=lambda c, ctx: SyntheticLatentSource(
                micro_batch=batch, num_samples=batch, context_frames=9, size=32, device=ctx.device
            ),
        )
        torch.cuda.reset_peak_memory_stats()
        start = time.time()
        for _ in range(2):  # warm-up: allocator, autotuning
            trainer.train_step()
        torch.cuda.synchronize()
        times = []
        while len(times) < 5 and (len(times) < 2 or time.time() - start < budget_s):
            t0 = time.perf_counter()
            trainer.train_step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = sorted(times)[len(times) // 2]
        shape = dit_shape_of(trainer.model)
        lc, lx = 9 * 256, 256
        flops = dit_train_flops(shape, lc, lx, batch)
        peak = device_peak_tflops(torch.cuda.get_device_name()) or float("nan")
        row = {
            "case": f"train {name} b{batch} L{lc + lx}",
            "impl": "ours" if backend == "auto" else "torch+SDPA",
            "ms": dt * 1e3,
            "tokens_per_s": batch * (lc + lx) / dt,
            "tflops": flops / dt / 1e12,
            "mfu": flops / dt / (peak * 1e12),
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "steps_timed": len(times),
        }
        del trainer
    gc.collect()
    torch.cuda.empty_cache()
    return row


def _sample_row(name: str, backend: str) -> dict:
    from lavin_fast.flow.sampler import sample_latents
    from lavin_fast.models.dit import build_dit

    model = build_dit(name, device="cuda", dtype=torch.bfloat16, backend=backend).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    cond = torch.randn(1, 16, 9, 64, 64, device="cuda")
    shape = (1, 16, 1, 64, 64)
    sample_latents(model, cond, shape, num_points=3, grid="uniform", guidance=1.5)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    sample_latents(model, cond, shape, num_points=20, grid="published", guidance=1.5)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "case": f"sample {name} 512px 4 pairs, 20-point grid, cfg 1.5",
        "impl": "ours" if backend == "auto" else "torch+SDPA",
        "ms": dt * 1e3,
        "note": "19 guided Euler steps, one packed call each, bf16",
    }


CP_CASE = ("3.4B", 31, 64)  # (size, context frames, latent side): 32 frames x 1,024 tokens


def _cp_worker(rank: int, world: int, port: int, opts: dict, result_path: str) -> None:
    """One rank of a context-parallel trainer run; rank 0 writes its row as JSON."""
    import json
    import os

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    from lavin_fast.parallel.distributed import teardown
    from lavin_fast.train.config import load_config
    from lavin_fast.train.sources import SyntheticLatentSource
    from lavin_fast.train.trainer import Trainer

    name, frames, side, device = opts["model"], opts["frames"], opts["side"], opts["device"]
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            None,
            {
                "model": name,
                "model_overrides": opts.get("overrides", {}),
                "grad_checkpointing": True,
                "steps": 1000,
                "batch_size": 1,
                "micro_batch_size": 1,
                "device": device,
                "precision": "bf16" if cuda else "fp32",
                "out_dir": out,
                "save_every": 10**6,
                "tensorboard": False,
                "progress": False,
                "resume": False,
                "null_prob": 0.0,
                "context_parallel": world,
                "context_parallel_mode": opts["mode"],
            },
        )
        trainer = Trainer(
            cfg,
            source_factory=lambda c, ctx: SyntheticLatentSource(
                micro_batch=1, num_samples=1, context_frames=frames, size=side, device=ctx.device
            ),
        )
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        for _ in range(opts["warmup"]):
            trainer.train_step()
        sync()
        times = []
        while len(times) < opts["min_steps"] or (len(times) < 5 and time.time() - start < opts["budget_s"]):
            t0 = time.perf_counter()
            trainer.train_step()
            sync()
            times.append(time.perf_counter() - t0)
        dt = sorted(times)[len(times) // 2]
        tokens = (frames + 1) * (side // 2) ** 2
        if rank == 0:
            row = {
                "case": f"train {name} L{tokens} context parallel x{world}",
                "impl": f"{opts['mode']} ({trainer.cp.mode}, Ulysses {trainer.cp.ulysses})",
                "ms": dt * 1e3,
                "tokens_per_s": tokens / dt,
                "steps_timed": len(times),
            }
            if cuda:
                row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            with open(result_path, "w") as f:
                json.dump(row, f)
        teardown(trainer.ctx)


def context_parallel_rows(world: int, budget_s: float, **opts) -> list[dict]:
    """Ulysses and ring rows of a `world`-process context-parallel trainer step (spawned processes)."""
    import json
    import socket

    import torch.multiprocessing as mp

    rows = []
    for i, mode in enumerate(("ulysses", "ring")):
        with socket.socket() as s, tempfile.TemporaryDirectory() as tmp:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            path = f"{tmp}/row.json"
            args = {"mode": mode, "budget_s": budget_s / (2 - i), "warmup": 1, "min_steps": 2, **opts}
            mp.spawn(_cp_worker, args=(world, port, args, path), nprocs=world, join=True)
            with open(path) as f:
                rows.append(json.load(f))
    return rows


def run(budget_s: float = 90.0) -> list[dict]:
    rows: list[dict] = []
    start = time.time()
    cases = [(n, b, be) for n, b in TRAIN_CASES for be in ("torch", "auto")]
    for i, (name, batch, backend) in enumerate(cases):
        left = budget_s * 0.8 - (time.time() - start)
        if left < 5:
            rows.append({"case": f"train {name}", "impl": backend, "note": "skipped: out of budget"})
            continue
        try:
            rows.append(_train_row(name, batch, backend, left / max(len(cases) - i, 1)))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"case": f"train {name} b{batch}", "impl": backend, "note": f"OOM: {str(exc)[:80]}"})
            gc.collect()
            torch.cuda.empty_cache()
    base = {r["case"]: r["ms"] for r in rows if r.get("impl") == "torch+SDPA" and "ms" in r}
    for r in rows:
        if r.get("impl") == "ours" and r["case"] in base:
            r["speedup"] = base[r["case"]] / r["ms"]
    for backend in ("torch", "auto"):
        if time.time() - start > budget_s * 0.95:
            rows.append({"case": "sample 3.4B", "impl": backend, "note": "skipped: out of budget"})
            continue
        rows.append(_sample_row("3.4B", backend))
    samp = [r for r in rows if r["case"].startswith("sample") and "ms" in r]
    if len(samp) == 2:
        samp[1]["speedup"] = samp[0]["ms"] / samp[1]["ms"]
    n = torch.cuda.device_count()
    cp_case = f"train {CP_CASE[0]} context parallel"
    left = budget_s - (time.time() - start)
    if n < 2:
        rows.append({"case": cp_case, "note": f"skipped: needs >= 2 GPUs, this machine has {n}"})
    elif left < 60:
        rows.append({"case": cp_case, "note": "skipped: out of budget"})
    else:
        name, frames, side = CP_CASE
        try:
            rows += context_parallel_rows(n, left - 40, model=name, frames=frames, side=side, device="cuda")
        except Exception as exc:  # a failed spawn must not lose the rows above
            rows.append({"case": cp_case, "note": f"failed: {type(exc).__name__}: {str(exc)[:120]}"})
    return rows


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
