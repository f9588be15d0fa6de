"""Train a tiny LaVin-DiT on the embedded demo data (scikit-image's photographs), then sample two tasks.

What it does, in order (about 5 minutes on 2 CPU cores; `--minutes` sets the training time):
1. builds a tiny ST-VAE with `build_vae` overrides (4 levels of 16-32 channels: 8x spatial, 16 latent channels)
   and, when this build's ST-VAE can be trained (its decoder supports autograd), fits it for a short while to
   reconstruct the demo frames; otherwise it stays randomly initialised and the demo says so;
2. encodes every demo example pair once into a latent cache (lavin_fast.data.latent_cache), each image on its
   own as a one-frame clip;
3. trains a tiny J-DiT (build_dit "tiny" with hidden 128, depth 4) with the real trainer (flow matching, null
   context 10%, AdamW, clipping, EMA, checkpoints) and its progress bar, for `--minutes` or `--steps`;
4. samples two tasks with the EMA weights (published 20-point grid, guidance 1.5), writes a PNG grid per run
   (examples, query, prediction, ground truth through the VAE, ground truth) and the loss curve, and the task folders and model files that
   `lavin-fast sample` takes.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

import torch

from lavin_fast.cli_args import add_deprecated_alias, add_device

DEFAULT_TASKS = ("colorization", "edge_detection")
TINY_VAE = {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}
TINY_DIT = {"hidden_size": 128, "depth": 4, "num_heads": 4}
QUICK_VAE = {"block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4}
QUICK_DIT = {"hidden_size": 32, "depth": 1, "num_heads": 2}


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="lavin_fast_demo", help="output folder")
    p.add_argument(
        "--minutes",
        type=float,
        default=4.5,
        help="time until the end of training, VAE fit included (sampling then takes seconds)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="train exactly this many optimizer steps instead of --minutes"
    )
    p.add_argument("--vae-seconds", type=float, default=60.0, help="tiny-VAE fitting time (when trainable)")
    p.add_argument("--tasks", nargs=2, default=list(DEFAULT_TASKS), help="the two tasks to train and sample")
    p.add_argument("--image-size", type=int, default=64, help="frame size in pixels (multiple of 16)")
    p.add_argument(
        "--grid-points", "--nfe", type=int, default=20, help="sampling time-grid points (20: the published grid)"
    )
    add_deprecated_alias(p, "--sample-steps", "--grid-points")
    p.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)
    p.add_argument("--quick", action="store_true", help="seconds, not minutes: minute models, 3 steps (smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice, or 1 when the load average shows the machine busy "
        "with other work, where competing OpenMP threads slow everything down)",
    )


def device_is_cpu(name: str) -> bool:
    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


def _busy() -> bool:
    """Whether other processes keep the cores busy (1-minute load average >= the number of cores)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        return False


def _vae_trainable(vae) -> bool:
    """Whether gradients flow through this ST-VAE build's encoder and decoder (probe on a tiny input)."""
    x = torch.zeros(1, 3, 1, 8 * vae.config.spatial_factor // 8 * 8, 8 * vae.config.spatial_factor // 8 * 8)
    try:
        with torch.enable_grad():
            vae.train()
            vae.decode(vae.encode(x.to(vae.device)).mode()).sum().backward()
        return True
    except RuntimeError:
        return False
    finally:
        vae.zero_grad(set_to_none=True)
        vae.eval()


def fit_vae(
    vae, frames: torch.Tensor, seconds: float, seed: int, kl_weight: float = 1e-6, crop: int = 32
) -> list[float]:
    """Fit the VAE to reconstruct `frames` [N, 3, 1, H, W] (L1 + a small KL) for about `seconds`, on random
    `crop` x `crop` crops in batches of 8 (convolutional: what it learns holds at full size; 8x cheaper)."""
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.time()
    h, w = frames.shape[-2:]
    crop = min(crop, h, w)
    vae.train()
    while time.time() - start < seconds:
        idx = torch.randint(0, frames.shape[0], (8,), generator=gen)
        i, j = torch.randint(0, h - crop + 1, ()).item(), torch.randint(0, w - crop + 1, ()).item()
        x = frames[idx][..., i : i + crop, j : j + crop].to(vae.device)
        post = vae.encode(x)
        rec = vae.decode(post.sample())
        kl = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1 - post.logvar).mean()
        loss = (rec - x).abs().mean() + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval()
    return losses


def _plot_losses(losses: list[tuple[int, float]], vae_losses: list[float], path: pathlib.Path) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [s for s, _ in losses]
    vals = [v for _, v in losses]
    ax.plot(steps, vals, lw=0.6, alpha=0.5, label="J-DiT loss per step")
    if len(vals) >= 10:
        k = max(len(vals) // 20, 5)
        smooth = [sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, lw=2, label=f"moving mean ({k} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching loss (MSE of the velocity)")
    title = "lavin-fast demo: tiny J-DiT on the embedded demo data"
    if vae_losses:
        title += f"\n(tiny VAE fitted first: L1 {vae_losses[0]:.3f} -> {vae_losses[-1]:.3f})"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(args: argparse.Namespace) -> int:
    before = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)  # an in-process caller (tests) keeps its own setting


def _run(args: argparse.Namespace) -> int:
    from lavin_fast.data import build_incontext_loader, build_latent_cache
    from lavin_fast.devices import resolve_device
    from lavin_fast.flow.images import grid
    from lavin_fast.flow.pipeline import SamplerOptions, predict
    from lavin_fast.media import save_image
    from lavin_fast.models.checkpoints import load_dit_file, save_vae
    from lavin_fast.models.vae import build_vae
    from lavin_fast.train.config import load_config
    from lavin_fast.train.trainer import Trainer, TrainingDiverged

    t_start = time.time()
    threads = args.threads
    if threads is None and device_is_cpu(args.device) and _busy():
        threads = 1
        print(
            "note: this machine is busy with other work (load average >= its cores): running torch on 1 thread, "
            "which is much faster here than competing OpenMP threads (--threads N to choose)"
        )
    if threads:
        torch.set_num_threads(threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    size = 32 if args.quick and args.image_size == 64 else args.image_size
    if size % 16:
        print(f"lavin-fast demo: error: --image-size {size} must be a multiple of 16", file=sys.stderr)
        return 2
    tasks = list(args.tasks)
    torch.manual_seed(args.seed)
    say = print

    # 1. the tiny VAE
    vae_cfg = QUICK_VAE if args.quick else TINY_VAE
    vae = build_vae(device=device, **vae_cfg)
    say(
        f"[1/4] tiny ST-VAE: build_vae({', '.join(f'{k}={v}' for k, v in vae_cfg.items())}): "
        f"{sum(p.numel() for p in vae.parameters()):,} parameters, {vae.config.spatial_factor}x spatial"
    )
    vae_losses: list[float] = []
    vae_note = "randomly initialised"
    loader = build_incontext_loader("demo", resolution=size, n_pairs=2, batch_size=8, tasks=tasks, seed=args.seed)
    if _vae_trainable(vae):
        frames = torch.cat(
            [
                next(loader).context.permute(0, 2, 1, 3, 4).reshape(-1, 3, 1, size, size)
                for _ in range(1 if args.quick else 6)
            ]
        )
        seconds = 1.0 if args.quick else args.vae_seconds
        vae_losses = fit_vae(vae, frames, seconds, args.seed)
        vae_note = (
            f"fitted for {seconds:.0f} s ({len(vae_losses)} steps, L1 {vae_losses[0]:.3f} -> {vae_losses[-1]:.3f})"
        )
    else:
        say(
            "      note: this build's ST-VAE has no backward pass through its decoder, so the tiny VAE stays randomly "
            "initialised: the J-DiT still learns (see the loss curve), but decoded pictures show the random "
            "decoder's texture, not the content. Published weights (--vae) decode properly."
        )
    say(f"      VAE: {vae_note}")
    vae.requires_grad_(False).eval()
    vae_path = save_vae(vae, out / "vae.safetensors")

    # 2. latent cache of every example pair
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def encoder(x: torch.Tensor) -> torch.Tensor:
        post = vae.encode(x.to(device))
        return vae.normalize_latents(post.sample(gen)).float()

    cache_dir = out / "latents"
    t0 = time.time()
    index = build_latent_cache(
        "demo",
        encoder,
        cache_dir,
        resolution=size,
        tasks=tasks,
        copies=1 if args.quick else 3,
        encode_batch=16,
        seed=args.seed,
        backend="torch",
        encoder_name="demo tiny VAE",
    )
    counts = {t: info["count"] for t, info in index["tasks"].items()}
    say(f"[2/4] latent cache {cache_dir}: {counts} pairs in {time.time() - t0:.1f} s")

    # 3. train the tiny J-DiT
    remaining = args.minutes - (time.time() - t_start) / 60
    steps = args.steps if args.steps is not None else (3 if args.quick else 100_000)
    overrides = {
        "model": "tiny",
        "model_overrides": QUICK_DIT if args.quick else TINY_DIT,
        "data": "latent-cache",
        "latent_cache": str(cache_dir),
        "tasks": tasks,
        "num_pairs": 2,
        "image_size": size,
        "steps": steps,
        "batch_size": 8,
        "micro_batch_size": 8,
        "lr": 1e-3,
        "warmup_steps": 0 if args.quick else 20,
        "schedule": "constant",
        "ema_decay": 0.99,
        "null_prob": 0.1,
        "device": device.type,
        "precision": "auto",
        "out_dir": str(out / "run"),
        "save_every": 100,
        "log_every": 5,
        "seed": args.seed,
        "resume": False,
        "progress": not args.no_progress,
        "tensorboard": False,
        "max_minutes": None if args.steps is not None or args.quick else max(remaining, 0.2),
    }
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    limit = f"{cfg.steps} steps" if cfg.max_minutes is None else f"{cfg.max_minutes:.1f} minutes"
    say(f"[3/4] training a tiny J-DiT ({n_params:,} parameters) on {device.type} for {limit}")
    try:
        result = trainer.fit()
    except TrainingDiverged as exc:
        print(f"lavin-fast demo: error: {exc}", file=sys.stderr)
        return 3
    dit_path = trainer.export_ema(out / "dit_ema.safetensors")
    first = sum(v for _, v in result.losses[:10]) / max(len(result.losses[:10]), 1)
    last = sum(v for _, v in result.losses[-10:]) / max(len(result.losses[-10:]), 1)
    say(f"      {result.step} steps, loss {first:.3f} (first 10) -> {last:.3f} (last 10)")
    loss_png = _plot_losses(result.losses, vae_losses, out / "loss.png")

    # 4. sample the two tasks with the EMA weights
    dit = load_dit_file(dit_path, device=device)
    opts = SamplerOptions(
        num_points=args.grid_points if not args.quick else 3,
        grid="published" if args.grid_points in (20, 30, 40) and not args.quick else "uniform",
        guidance=args.guidance,
        seed=args.seed,
        batch=4,
    )
    rows = []
    t0 = time.time()
    for task in tasks:
        folder = out / "tasks" / task
        for j in range(2):  # two different sequences (examples and query) per task
            task_loader = build_incontext_loader(
                "demo",
                resolution=size,
                n_pairs=2,
                batch_size=1,
                tasks=[task],
                seed=args.seed + 1000 + 7 * j,
                augment=False,
            )
            batch = next(task_loader)
            ctx = batch.context[0]
            pairs = [(ctx[:, 0:1], ctx[:, 1:2]), (ctx[:, 2:3], ctx[:, 3:4])]
            query, truth = ctx[:, 4:5], batch.target[0]
            pred = predict(dit, vae, pairs, [query], opts)[0]
            with torch.no_grad():  # the best this VAE allows: the ground truth through encode + decode
                ceiling = vae.decode(vae.encode(truth[None].to(vae.device)).mode()).float().clamp(-1, 1)[0].cpu()
            examples = [pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]]
            rows.append([t[:, 0] for t in examples] + [query[:, 0], pred[:, 0], ceiling[:, 0], truth[:, 0]])
            if j == 0:  # a task folder for `lavin-fast sample`
                for k, (a, b) in enumerate(pairs):
                    save_image(a[:, 0], folder / f"example{k}_input.png")
                    save_image(b[:, 0], folder / f"example{k}_target.png")
                save_image(query[:, 0], out / "tasks" / f"{task}_query.png")
    grid_png = save_image(grid(rows), out / "samples.png")
    say(
        f"[4/4] sampled {len(rows)} queries of {tasks} in {time.time() - t0:.1f} s "
        f"({opts.num_points}-point {opts.grid} grid, guidance {opts.guidance})"
    )
    say("")
    say(
        f"samples (rows: {tasks[0]} x2, {tasks[1]} x2; columns: input 1, target 1, input 2, target 2, query, "
        f"prediction, ground truth through the VAE (the best this VAE allows), ground truth):\n  {grid_png.resolve()}"
    )
    say(f"loss curve:\n  {loss_png.resolve()}")
    say(f"models: {pathlib.Path(dit_path).resolve()} (EMA J-DiT), {vae_path.resolve()} (tiny VAE)")
    say(f"metrics: {(out / 'run' / 'metrics.jsonl').resolve()}; checkpoints: {(out / 'run' / 'checkpoints').resolve()}")
    say(
        "try the sampler on a task folder:\n  lavin-fast sample "
        f"--dit {dit_path} --vae {vae_path} --task-dir {out / 'tasks' / tasks[0]} "
        f"--query {out / 'tasks' / (tasks[0] + '_query.png')} --out {out / 'my_sample.png'} --show-context"
    )
    say(f"total {math.ceil(time.time() - t_start)} s")
    return 0
