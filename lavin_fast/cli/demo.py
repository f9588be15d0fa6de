"""Train a tiny LaVin-DiT on the embedded demo data (scikit-image's photographs), then sample two tasks.

What it does, in order (about 10 minutes on 2 idle CPU cores, estimated from measured rates; fixed step counts,
`--vae-steps` and `--steps`, so the same seed and thread count give the same figures on any machine; a slow machine
takes longer and prints its steps per second):
0. writes the demo photographs at the frame size: all but three for training, with CROPS augmented crops of each,
   three (demo_data.DEMO_HELD_OUT_PHOTOS) held out, never cropped;
1. builds a tiny ST-VAE with `build_vae` overrides (3 levels of 16-32 channels: 4x spatial, 4 latent channels)
   and, when this build's ST-VAE can be trained (its decoder supports autograd), fits it for a short while to
   reconstruct the training frames, then measures its reconstruction PSNR on every demo photograph;
2. encodes every example pair of the training photographs once into a latent cache (lavin_fast.data.latent_cache);
3. trains a tiny J-DiT (build_dit "tiny" with hidden 64, depth 4, patch 2) with the real trainer (flow matching,
   null context 10%, AdamW, clipping, EMA, checkpoints) and its progress bar, for `--steps` (DIT_STEPS), on the
   two tasks half and half;
4. samples each task on a query seen in training and on the held-out photographs with the EMA weights (published
   20-point grid, guidance 1.5), writes the labelled grid samples.png (PSNR under the panels), loss.png, the
   figures (printed and in demo_metrics.json), and the task folders and model files that `lavin-fast sample` takes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
from typing import TYPE_CHECKING

from lavin_fast.cli.args import BOUNDS, add_deprecated_alias, add_device
from lavin_fast.cli.demo_plots import COLUMNS, _plot_losses, grid_figure_size, plot_sample_grid  # noqa: F401

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch

DEFAULT_TASKS = ("colorization", "grayscale")
"""the same photographs in opposite directions: only the example pairs say which way (measured: a tiny model
learns both in minutes; edge maps came out nearly black at this scale)"""
TINY_VAE = {"block_out_channels": (16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4}
"""3 levels: 4x spatial, 4 latent channels (16x16x4 latents at 64 px: with 16 channels the J-DiT had 4x as
much to predict and its samples stayed noisy in the time budget, measured)"""
TINY_DIT = {"hidden_size": 64, "depth": 4, "num_heads": 2, "patch_size": 2, "in_channels": 4}
"""patch 2 on the 4x latents: 64 tokens of 16 values per 64 px frame (0.49 M parameters). Measured at 3,000 steps,
seed 0, against patch 4 / hidden 128 / 4 heads (2.1 M): held-out gaps colorization 6.8 against 7.6 dB, grayscale
3.4 against 5.4 dB, at about 0.68x the steps per second (docs/training.md)"""
QUICK_VAE = {"block_out_channels": (8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4}
QUICK_DIT = {"hidden_size": 32, "depth": 1, "num_heads": 2, "patch_size": 4, "in_channels": 4}
VAE_STEPS = 2500
"""tiny-VAE fit steps (batches of 8 crops): 189-291 s on 2 idle cores (13.2-8.6 steps/s, two runs of the defaults)"""
DIT_STEPS = 3000
"""J-DiT optimizer steps (batch 8): 336-446 s on 2 idle cores (8.9-6.7 steps/s, eager float32, two runs of the
defaults); with the VAE fit, the cache and sampling the demo's job took 531-747 s there. Step counts, not seconds: the same seed and
thread count give the same figures on any machine, a slow one only takes longer (and says so)"""
QUICK_VAE_STEPS = 20
CROPS = 24
"""augmented crops (random scale 0.3-1, flip, colour jitter: demo_data.augmented_crop) per training photograph"""
QUICK_CROPS = 2
EXTRA_PHOTOS = False
"""train also on the other bundled photographs (demo_data.extra_image_paths); off: measured with GREY_PHOTOS at full
length, held-out grayscale 1 dB better, colorization 0.6 dB worse and its seen query 1.2 dB worse (4.2 dB)"""
GREY_PHOTOS = False
"""and on scikit-image's greyscale photographs (demo_data.GREY_IMAGE_FILES), with EXTRA_PHOTOS"""
CROP_MIN_SCALE = 0.3
"""the smallest crop side, as a fraction of the photograph's shorter side"""
SEEN_QUERY = "astronaut"  # a training photograph; the held-out queries: demo_data.DEMO_HELD_OUT_PHOTOS
EXAMPLES = ("motorcycle_left", "retina")  # training photographs: the in-context examples when sampling
QUICK_DIT_STEPS = 3
SHARP_LOGVAR = -8.0
"""the VAE encoder's starting log-variance: posterior samples start nearly noise-free (the L1 fit then
converges without first having to learn to shrink the noise)"""


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="lavin_fast_demo", help="output folder")
    p.add_argument(
        "--minutes",
        type=BOUNDS["minutes"],
        default=5.75,
        help="legacy: a time budget until the end of training, VAE fit included, instead of the fixed step counts "
        "(figures then follow the machine's speed)",
    )
    p.add_argument(
        "--steps",
        type=BOUNDS["steps"],
        default=None,
        help=f"J-DiT optimizer steps (default {DIT_STEPS}; --quick {QUICK_DIT_STEPS})",
    )
    p.add_argument(
        "--vae-seconds", type=BOUNDS["vae_seconds"], default=150.0, help="legacy: a tiny-VAE fitting time instead of --vae-steps"
    )
    p.add_argument("--tasks", nargs=2, default=list(DEFAULT_TASKS), help="the two tasks to train and sample")
    p.add_argument("--image-size", type=BOUNDS["image_size"], default=64, help="frame size in pixels (multiple of 16)")
    p.add_argument(
        "--grid-points",
        "--nfe",
        type=BOUNDS["grid_points"],
        default=20,
        help="sampling time-grid points (20: the published grid)",
    )
    add_deprecated_alias(p, "--sample-steps", "--grid-points")
    p.add_argument("--guidance", type=BOUNDS["guidance"], default=1.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=BOUNDS["seed"], default=0)
    add_device(p)
    p.add_argument("--quick", action="store_true", help="seconds, not minutes: minute models, 3 steps (smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-memory", type=BOUNDS["max_memory"], metavar="GIB",
                   help="refuse to start when the arguments imply more than this many GiB (default: the free memory)")  # fmt: skip
    p.add_argument(
        "--threads",
        type=BOUNDS["threads"],
        default=None,
        help="CPU threads for torch (default: torch's choice, or 1 when the load average shows the machine busy "
        "with other work, where competing OpenMP threads slow everything down)",
    )
    p.add_argument(
        "--vae-steps",
        type=BOUNDS["vae_steps"],
        default=None,
        help=f"tiny-VAE fit steps (default {VAE_STEPS}; --quick {QUICK_VAE_STEPS}): steps, not seconds, so the same "
        "seed gives the same figures on any machine",
    )
    p.add_argument(
        "--crops",
        type=BOUNDS["crops"],
        default=None,
        help=f"augmented crops per training photograph (default {CROPS}; --quick {QUICK_CROPS}; 0: whole photos only)",
    )
    # fixed step counts by default (--steps DIT_STEPS, --vae-steps VAE_STEPS); --minutes / --vae-seconds, when
    # given, switch back to the old time budgets (figures then depend on the machine's speed)
    p.set_defaults(minutes=None, vae_seconds=None)
    from lavin_fast.cli.sample import CPU_PATH_CHOICES

    p.add_argument(
        "--cpu-path",
        choices=CPU_PATH_CHOICES,
        default="auto",
        help="on the CPU: how the models run (docs/cpu.md); auto: float32, the J-DiT's blocks compiled when the run "
        "is long enough to pay the compile back (training: yes by default; sampling: no), printed as it starts",
    )


def device_is_cpu(name: str) -> bool:
    import torch

    return name == "cpu" or (name == "auto" and not torch.cuda.is_available())


def _busy() -> bool:
    """Whether other processes keep the cores busy (1-minute load average >= the number of cores)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        return False


def _vae_trainable(vae) -> bool:
    """Whether gradients flow through this ST-VAE build's encoder and decoder (probe on a tiny input)."""
    import torch

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
    vae,
    frames: torch.Tensor,
    steps: int,
    seed: int,
    kl_weight: float = 1e-6,
    crop: int = 32,
    lr: float = 3e-3,
    seconds: float | None = None,
    batch: int = 8,
) -> list[float]:
    """Fit the VAE to reconstruct `frames` [N, 3, 1, H, W] (L1 + a small KL; an added L1 of pixel differences
    measured worse in PSNR at this budget) for exactly `steps` steps (or, legacy, about `seconds` when given),
    on random `crop` x `crop` crops in batches of `batch` (convolutional: what it learns holds at full size, at a
    fraction of the cost); the learning rate decays on a cosine over the budget, and the encoder starts with a
    small posterior variance (SHARP_LOGVAR). Fixed steps and `seed`: the same fit on any machine."""
    import torch

    if steps < 1 and seconds is None:
        raise ValueError(f"fit_vae: steps must be >= 1, got {steps}")
    with torch.no_grad():
        bias = vae.encoder.conv_out.conv.bias
        bias[bias.shape[0] // 2 :] = SHARP_LOGVAR
    # fused: one kernel per parameter, 7.5 -> 1.5 ms a step (measured)
    opt = torch.optim.Adam(vae.parameters(), lr=lr, fused=True)
    gen = torch.Generator().manual_seed(seed)
    losses, start = [], time.time()
    h, w = frames.shape[-2:]
    crop = min(crop, h, w)
    vae.train()
    while True:
        if seconds is None:
            if len(losses) >= steps:
                break
            frac = len(losses) / steps
        else:
            if (elapsed := time.time() - start) >= seconds:
                break
            frac = min(elapsed / seconds, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.randint(0, frames.shape[0], (batch,), generator=gen)
        i = int(torch.randint(0, h - crop + 1, (), generator=gen))
        j = int(torch.randint(0, w - crop + 1, (), generator=gen))
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


def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [N, 3, H, W] through the VAE's encode (posterior mean) and decode, clamped to [-1, 1]."""
    import torch

    with torch.no_grad():
        return vae.decode(vae.encode(images.to(vae.device)).mode()).float().clamp(-1, 1).cpu()


def psnr_db(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image of [N, 3, H, W] images in [-1, 1] (peak: the full range)."""
    from lavin_fast.eval.metrics import psnr

    return psnr((a.float() + 1) / 2, (b.float() + 1) / 2)


def sample_queries(dit, vae, tasks, train_paths, held_paths, opts, seed: int, out: pathlib.Path | None = None):
    """Per task: the example pairs of two training photographs (EXAMPLES), then the seen query (SEEN_QUERY) and
    every held-out photograph, predicted with `opts`. Returns (grid rows, row labels, notes under the panels,
    one record of figures per query); with `out`, writes the task folders that `lavin-fast sample` takes."""
    import torch

    from lavin_fast.data.tasks import build_pair
    from lavin_fast.flow.pipeline import predict
    from lavin_fast.media import load_image, save_image

    by_name = {p.stem: p for p in train_paths}
    seen_path = by_name.get(SEEN_QUERY, train_paths[0])
    rest = [p for p in train_paths if p != seen_path]
    example_paths = ([by_name[n] for n in EXAMPLES if n in by_name and by_name[n] != seen_path] + rest)[:2]
    images = [load_image(p) for p in example_paths]
    queries = [("seen", seen_path.stem, load_image(seen_path))] + [
        ("held-out", p.stem, load_image(p)) for p in held_paths
    ]
    rows, labels, notes, records = [], [], [], []
    for task in tasks:
        pair_gen = torch.Generator().manual_seed(seed)
        pairs = [tuple(t[:, None] for t in build_pair(task, img, pair_gen)) for img in images[:2]]
        asked = [build_pair(task, img, pair_gen) for _, _, img in queries]
        preds = predict(dit, vae, pairs, [q[:, None] for q, _ in asked], opts)
        answers = torch.stack([a for _, a in asked])
        through_vae = reconstruct(vae, answers)
        predicted = torch.stack([p[:, 0].float().cpu() for p in preds])
        vs_answer, vae_vs_answer = psnr_db(predicted, answers), psnr_db(through_vae, answers)
        vs_vae = psnr_db(predicted, through_vae)
        # the trivial answer, for scale: the query itself as the prediction (a grey photo for colorization)
        copied = psnr_db(torch.stack([q for q, _ in asked]), answers)
        examples = [pairs[0][0], pairs[0][1], pairs[1][0], pairs[1][1]]
        for k, (kind, name, _) in enumerate(queries):
            gap = float(vae_vs_answer[k] - vs_answer[k])
            rows.append([t[:, 0] for t in examples] + [asked[k][0], predicted[k], through_vae[k], answers[k]])
            labels.append(f"{task}\n{kind} query\n({name})")
            notes.append(
                {
                    5: f"{vs_vae[k]:.1f} dB vs VAE answer\n{vs_answer[k]:.1f} dB vs answer\ngap {gap:.1f} dB",
                    6: f"{vae_vs_answer[k]:.1f} dB",
                }
            )
            records.append(
                {
                    "task": task,
                    "query": kind,
                    "image": name,
                    "prediction_vs_answer_through_vae_db": round(float(vs_vae[k]), 2),
                    "prediction_vs_answer_db": round(float(vs_answer[k]), 2),
                    "answer_through_vae_vs_answer_db": round(float(vae_vs_answer[k]), 2),
                    "gap_db": round(gap, 2),
                    "query_vs_answer_db": round(float(copied[k]), 2),
                    "query_gap_db": round(float(vae_vs_answer[k] - copied[k]), 2),
                }
            )
        if out is not None:
            folder = out / "tasks" / task  # a task folder for `lavin-fast sample`
            for k, (a, b) in enumerate(pairs):
                save_image(a[:, 0], folder / f"example{k}_input.png")
                save_image(b[:, 0], folder / f"example{k}_target.png")
            save_image(asked[0][0], out / "tasks" / f"{task}_query.png")
    return rows, labels, notes, records


def run(args: argparse.Namespace) -> int:
    import torch

    before = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(before)  # an in-process caller (tests) keeps its own setting


def _run(args: argparse.Namespace) -> int:
    import torch

    from lavin_fast.data import build_incontext_loader, build_latent_cache
    from lavin_fast.data.demo_data import write_demo_set
    from lavin_fast.devices import resolve_device
    from lavin_fast.flow.pipeline import SamplerOptions
    from lavin_fast.media import load_image
    from lavin_fast.models.checkpoints import load_dit_file, save_vae
    from lavin_fast.models.cpu_path import apply_cpu_path, resolve_cpu_path
    from lavin_fast.models.vae import build_vae
    from lavin_fast.preflight import check_memory
    from lavin_fast.train.config import load_config
    from lavin_fast.train.trainer import Trainer, TrainingDiverged

    t_start = time.time()
    size = 32 if args.quick and args.image_size == 64 else args.image_size
    # the demo images and one training batch of 8 sequences of 3 pairs, float32 (a lower bound of the peak)
    frame = 3.0 * size * size * 4
    check_memory({"demo images": 24 * frame, "one training batch": 8 * 6 * frame * 2}, "demo", args.max_memory)
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
    try:  # checked before any work: bf16 on a CPU without it, or a CPU path on another device, stops here
        resolve_cpu_path(args.cpu_path, device)
    except ValueError as exc:
        print(f"lavin-fast demo: error: --cpu-path: {exc}", file=sys.stderr)
        return 2
    size = 32 if args.quick and args.image_size == 64 else args.image_size
    if size % 16:
        print(f"lavin-fast demo: error: --image-size {size} must be a multiple of 16", file=sys.stderr)
        return 2
    tasks = list(args.tasks)
    torch.manual_seed(args.seed)
    say = print
    crops = args.crops if args.crops is not None else (QUICK_CROPS if args.quick else CROPS)
    train_paths, held_paths, crop_paths = write_demo_set(
        out / "images",
        size,
        crops=crops,
        seed=args.seed,
        extra=EXTRA_PHOTOS,
        grey=GREY_PHOTOS,
        min_scale=CROP_MIN_SCALE,
    )
    train_dir = str(out / "images" / "train")
    photos = torch.stack([load_image(p) for p in train_paths + held_paths])

    # 1. the tiny VAE
    vae_cfg = QUICK_VAE if args.quick else TINY_VAE
    vae = build_vae(device=device, **vae_cfg)
    say(
        f"[1/4] tiny ST-VAE: build_vae({', '.join(f'{k}={v}' for k, v in vae_cfg.items())}): "
        f"{sum(p.numel() for p in vae.parameters()):,} parameters, {vae.config.spatial_factor}x spatial"
    )
    vae_losses, vae_seconds = [], 0.0
    vae_note = "randomly initialised"
    loader = build_incontext_loader(train_dir, resolution=size, n_pairs=2, batch_size=8, tasks=tasks, seed=args.seed)
    if _vae_trainable(vae):
        frames = torch.cat(
            [
                next(loader).context.permute(0, 2, 1, 3, 4).reshape(-1, 3, 1, size, size)
                for _ in range(1 if args.quick else 6)
            ]
        )
        vae_steps = args.vae_steps if args.vae_steps is not None else (QUICK_VAE_STEPS if args.quick else VAE_STEPS)
        t0 = time.time()
        vae_losses = fit_vae(vae, frames, vae_steps, args.seed, seconds=args.vae_seconds)
        vae_seconds = time.time() - t0
        vae_note = (
            f"fitted for {len(vae_losses)} steps in {vae_seconds:.0f} s ({len(vae_losses) / vae_seconds:.1f} steps/s), "
            f"L1 {vae_losses[0]:.3f} -> {vae_losses[-1]:.3f}"
        )
    else:
        say(
            "      note: this build's ST-VAE has no backward pass through its decoder, so the tiny VAE stays randomly "
            "initialised: the J-DiT still learns (see the loss curve), but decoded pictures show the random "
            "decoder's texture, not the content. Published weights (--vae) decode properly."
        )
    vae.requires_grad_(False).eval()
    photo_psnr = psnr_db(reconstruct(vae, photos), photos)
    vae_psnr = float(photo_psnr.mean())
    say(f"      VAE: {vae_note}; reconstruction PSNR {vae_psnr:.1f} dB (mean of {len(photos)} demo photos)")
    vae_path = save_vae(vae, out / "vae.safetensors")

    # 2. latent cache of every example pair of the training photographs
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def encoder(x: torch.Tensor) -> torch.Tensor:
        post = vae.encode(x.to(device))
        return vae.normalize_latents(post.sample(gen)).float()

    cache_dir = out / "latents"
    t0 = time.time()
    index = build_latent_cache(
        train_dir,
        encoder,
        cache_dir,
        resolution=size,
        tasks=tasks,
        copies=1,  # the default tasks are deterministic: more copies would repeat the same pairs
        encode_batch=16,
        seed=args.seed,
        backend="torch",
        encoder_name="demo tiny VAE",
    )
    counts = {t: info["count"] for t, info in index["tasks"].items()}
    say(
        f"[2/4] latent cache {cache_dir}: {counts} pairs in {time.time() - t0:.1f} s "
        f"({len(train_paths)} photographs and {len(crop_paths)} augmented crops of them; held out, never cropped: "
        f"{', '.join(p.stem for p in held_paths)})"
    )

    # 3. train the tiny J-DiT
    remaining = None if args.minutes is None else args.minutes - (time.time() - t_start) / 60
    if args.steps is not None:
        steps = args.steps
    elif remaining is not None:
        steps = 100_000  # legacy time budget: until --minutes have passed
    else:
        steps = QUICK_DIT_STEPS if args.quick else DIT_STEPS
    overrides = {
        "model": "tiny",
        "model_overrides": QUICK_DIT if args.quick else TINY_DIT,
        "data": "latent-cache",
        "latent_cache": str(cache_dir),
        "tasks": {t: 1.0 for t in tasks},  # an equal mixture (a list would take the paper's: 91% colorization)
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
        "cpu_path": args.cpu_path if device.type == "cpu" else "auto",
        "out_dir": str(out / "run"),
        "save_every": 1000,  # a checkpoint costs ~0.2 s here; 30 of them were 1-2% of the run
        "log_every": 5,
        "seed": args.seed,
        "resume": False,
        "progress": not args.no_progress,
        "tensorboard": False,
        "max_minutes": None if args.steps is not None or remaining is None else max(remaining, 0.2),
    }
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    limit = f"{cfg.steps} steps" if cfg.max_minutes is None else f"{cfg.max_minutes:.1f} minutes"
    say(f"[3/4] training a tiny J-DiT ({n_params:,} parameters) on {device.type} for {limit}")
    t0 = time.time()
    try:
        result = trainer.fit()
    except TrainingDiverged as exc:
        print(f"lavin-fast demo: error: {exc}", file=sys.stderr)
        return 3
    dit_path = trainer.export_ema(out / "dit_ema.safetensors")
    first = sum(v for _, v in result.losses[:10]) / max(len(result.losses[:10]), 1)
    last = sum(v for _, v in result.losses[-10:]) / max(len(result.losses[-10:]), 1)
    dit_seconds = time.time() - t0
    say(
        f"      {result.step} steps in {dit_seconds:.0f} s ({result.step / max(dit_seconds, 1e-9):.1f} steps/s), "
        f"loss {first:.3f} (first 10) -> {last:.3f} (last 10)"
    )
    loss_png = _plot_losses(result.losses, vae_losses, vae_psnr, out / "loss.png")

    # 4. per task: examples from two training photographs, then a seen query and the held-out one
    dit = load_dit_file(dit_path, device=device)
    if device.type == "cpu":  # J-DiT calls: one per grid point per task (the queries of a task share a batch)
        calls = len(tasks) * (args.grid_points if not args.quick else 3)
        say("      " + apply_cpu_path(resolve_cpu_path(args.cpu_path, device, expected_calls=calls), dit, vae))
    opts = SamplerOptions(
        num_points=args.grid_points if not args.quick else 3,
        grid="published" if args.grid_points in (20, 30, 40) and not args.quick else "uniform",
        guidance=args.guidance,
        seed=args.seed,
        batch=4,
    )
    t0 = time.time()
    rows, labels, notes, records = sample_queries(dit, vae, tasks, train_paths, held_paths, opts, args.seed, out)
    grid_png = plot_sample_grid(rows, labels, notes, out / "samples.png")
    say(
        f"[4/4] sampled {len(rows)} queries of {tasks} in {time.time() - t0:.1f} s "
        f"({opts.num_points}-point {opts.grid} grid, guidance {opts.guidance})"
    )
    say("")
    say(f"samples (rows: each task's seen query, then its held-out queries; columns: {', '.join(COLUMNS)}):")
    say(f"  {grid_png.resolve()}")
    if loss_png is not None:
        say(f"loss curves:\n  {loss_png.resolve()}")
    say(f"models: {pathlib.Path(dit_path).resolve()} (EMA J-DiT), {vae_path.resolve()} (tiny VAE)")
    say(f"metrics: {(out / 'run' / 'metrics.jsonl').resolve()}; checkpoints: {(out / 'run' / 'checkpoints').resolve()}")
    say(
        "try the sampler on a task folder:\n  lavin-fast sample "
        f"--dit {dit_path} --vae {vae_path} --task-dir {out / 'tasks' / tasks[0]} "
        f"--query {out / 'tasks' / (tasks[0] + '_query.png')} --out {out / 'my_sample.png'} --show-context"
    )
    total = time.time() - t_start
    say("")
    say(f"figures (PSNR of {size} px images in [0, 1] scale; {torch.get_num_threads()} torch thread(s)):")
    names = [p.stem for p in train_paths + held_paths]
    worst = int(photo_psnr.argmin())
    say(
        f"  VAE reconstruction: {vae_psnr:.1f} dB mean over {len(photos)} demo photos "
        f"(lowest {float(photo_psnr[worst]):.1f} dB: {names[worst]}; "
        f"held out {float(photo_psnr[len(train_paths) :].mean()):.1f} dB)"
    )
    for r in records:
        gap = r["gap_db"]
        say(
            f"  {r['task']:<14} {r['query']:<8} query ({r['image']}): prediction vs answer "
            f"{r['prediction_vs_answer_db']:.1f} dB, answer through the VAE vs answer "
            f"{r['answer_through_vae_vs_answer_db']:.1f} dB (gap {gap:.1f} dB), prediction vs answer through the VAE "
            f"{r['prediction_vs_answer_through_vae_db']:.1f} dB"
        )
    vae_rate = len(vae_losses) / vae_seconds if vae_losses else None
    dit_rate = result.step / max(dit_seconds, 1e-9)
    say(
        f"  speed: VAE fit {len(vae_losses)} steps"
        + (f" in {vae_seconds:.0f} s ({vae_rate:.1f} steps/s)" if vae_rate else "")
        + f", J-DiT {result.step} steps in {dit_seconds:.0f} s ({dit_rate:.1f} steps/s)"
    )
    gaps = {}
    for task in tasks:
        for kind in ("seen", "held-out"):
            g = torch.tensor([r["gap_db"] for r in records if r["task"] == task and r["query"] == kind])
            sd = float(g.std()) if len(g) > 1 else 0.0
            copy = torch.tensor([r["query_gap_db"] for r in records if r["task"] == task and r["query"] == kind])
            stats = {"mean_db": float(g.mean()), "sd_db": sd, "min_db": float(g.min()), "max_db": float(g.max())}
            stats["query_as_prediction_mean_db"] = float(copy.mean())
            gaps[f"{task}/{kind}"] = {k: round(v, 2) for k, v in stats.items()} | {"queries": len(g)}
            say(
                f"  {task:<14} {kind:<8} gap (answer through the VAE minus prediction, vs answer): mean "
                f"{float(g.mean()):.1f} dB, sd {sd:.1f} dB, range {float(g.min()):.1f} to {float(g.max()):.1f} dB "
                f"over {len(g)} quer{'ies' if len(g) > 1 else 'y'} (the query itself as the prediction: "
                f"{float(copy.mean()):.1f} dB)"
            )
    say(f"  total {math.ceil(total)} s")
    summary = {
        "vae_psnr_db": round(vae_psnr, 2),
        "vae_psnr_db_per_photo": {n: round(float(v), 2) for n, v in zip(names, photo_psnr, strict=True)},
        "queries": records,
        "gaps": gaps,
        "training_images": {"photographs": len(train_paths), "augmented_crops": len(crop_paths)},
        "columns": list(COLUMNS),
        "row_labels": labels,
        "vae_fit_steps": len(vae_losses),
        "dit_steps": result.step,
        "vae_fit_seconds": round(vae_seconds, 1) if vae_losses else None,
        "vae_fit_steps_per_second": round(vae_rate, 2) if vae_rate else None,
        "dit_seconds": round(dit_seconds, 1),
        "dit_steps_per_second": round(dit_rate, 2),
        "seconds": round(total, 1),
        "threads": torch.get_num_threads(),
    }
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0
