"""Data tools: a subcommand each.

lavin-fast data demo [SOURCE] [--out grid.png]     one in-context batch as an image grid (default: the embedded demo data)
lavin-fast data check SOURCE        load a source (demo, manifest, directory), list its tasks, make a batch
lavin-fast data bench [--images DIR] [--workers 2] [--seconds 8] [--device cpu|cuda] [--json out.json]
    images/s of the DALI pipeline against PIL in a torch DataLoader (same files, same workers) and of online
    training's data path (decode + augment + ST-VAE encode), plus the in-context loader's frames/s and the
    computed task builders' images/s
lavin-fast data build-cache SOURCES... --vae VAE --out DIR [--resolution 256] [--tasks ...] [--copies 1]
    encode every example pair once with the frozen ST-VAE into a latent cache (train with
    --data latent-cache --latent-cache DIR); under torchrun each rank encodes its share of the shards
    (`torchrun --nproc-per-node 8 -m lavin_fast.cli data build-cache ...`), a rerun skips finished shards;
    --format shards (default: WebDataset-style tars that also stream) or safetensors
lavin-fast data build-shards SOURCES... --out DIR [--shard-mb 1024]
    write the images, annotated pairs and clips of the sources as WebDataset-style tar shards (+ DALI .idx files and
    index.json), the streaming format that training reads with `data: {sources: [DIR]}`; sharded across torchrun
    ranks like build-cache

The old mode flags (--check SOURCE, --preview SOURCE, --bench) and --n-pairs / --device gpu still work for one
release, with a note naming the new spelling.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

from lavin_fast.cli.args import BOUNDS, add_deprecated_alias, add_device, upgrade_mode_flags

SUBCOMMANDS = ("demo", "check", "bench", "build-cache", "build-shards")
_DALI_DEVICE = "DALI device: cpu, or cuda (auto: cuda when present)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    demo = sub.add_parser("demo", help="write one in-context batch of a source as a PNG grid")
    demo.add_argument("source", nargs="?", default="demo", help="'demo' (default), a manifest (.jsonl) or a directory")
    demo.add_argument("--out", default="data_demo.png", help="PNG path")
    _loader_args(demo, batch_size=8)
    check = sub.add_parser("check", help="load a source, list its tasks, make one batch, list skipped files")
    check.add_argument("source", help="'demo', a manifest (.jsonl) or a directory")
    _loader_args(check, batch_size=4)

    bench = sub.add_parser("bench", help="images/s of DALI against a PIL DataLoader (and the in-context loader)")
    bench.add_argument("--images", help="a directory of images (default: JPEGs made from the demo photos)")
    bench.add_argument("--resolution", type=BOUNDS["resolution"], default=256, help="output size in pixels")
    bench.add_argument("--batch-size", type=BOUNDS["batch_size"], default=32)
    bench.add_argument(
        "--workers", type=BOUNDS["workers"], default=2, help="DALI threads = DataLoader worker processes"
    )
    bench.add_argument("--seconds", type=BOUNDS["seconds"], default=8.0, help="seconds per measurement")
    add_device(bench, default="cpu", help=_DALI_DEVICE)
    _num_pairs(bench, "pairs per sequence of the in-context loader rows")
    bench.add_argument("--json", help="also write the rows as JSON here")
    bench.add_argument("--quick", action="store_true", help="skip the in-context and task-builder rows")
    bench.add_argument(
        "--repeats", type=BOUNDS["repeats"], default=3, help="alternating rounds of PIL vs DALI (median)"
    )
    bench.add_argument(
        "--vae", help="ST-VAE weights for the online-path rows (default: the tiny-cpu config's VAE, random weights)"
    )
    bench.add_argument(
        "--rows",
        choices=["all", "scale", "cache-wait"],
        default="all",
        help="scale: only the data-at-scale rows (cache plan time and index bytes per item at --plan-items, the shard "
        "readers against the PIL DataLoader on the same files); cache-wait: data_wait_frac of the tiny-cpu config "
        "trained from a latent cache of the demo data, the cache read 0 and 2 micro-batches ahead (--wait-steps)",
    )
    bench.add_argument("--wait-steps", type=BOUNDS["wait_steps"], default=20, help="training steps per cache-wait row")
    bench.add_argument(
        "--plan-items", type=BOUNDS["plan_items"], default=10_000_000, help="cached pairs of the synthetic plan index"
    )

    cache = sub.add_parser("build-cache", help="encode every example pair once with the ST-VAE into a latent cache")
    cache.add_argument("sources", nargs="+", metavar="SOURCE", help="'demo', manifests (.jsonl) or directories")
    cache.add_argument("--vae", required=True, help="ST-VAE weights: the published .pt or ours (.safetensors)")
    cache.add_argument("--out", required=True, help="cache folder (index.json and the shards)")
    cache.add_argument(
        "--resolution", type=BOUNDS["resolution"], default=256, help="frame size in pixels (train's --image-size)"
    )
    cache.add_argument("--tasks", nargs="+", default=None, help="only these tasks (default: every task of the source)")
    cache.add_argument(
        "--copies", type=BOUNDS["copies"], default=1, help="draws per image: degradation (and crop, flip) redrawn"
    )
    cache.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a random resized crop and flip per copy (default: on when --copies > 1)",
    )
    cache.add_argument("--encode-batch", type=BOUNDS["encode_batch"], default=16, help="pairs per encoder call")
    cache.add_argument("--shard-size", type=BOUNDS["shard_size"], default=1024, help="pairs per shard")
    cache.add_argument(
        "--format",
        choices=["shards", "safetensors"],
        default="shards",
        help="shards: WebDataset-style tars (+ DALI .idx; the cache also streams; default); safetensors: a tensor "
        "file per shard (the earlier layout; both load)",
    )
    cache.add_argument(
        "--seed", type=BOUNDS["seed"], default=0, help="seed of the degradations and of the VAE posterior draws"
    )
    cache.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"], help="decoding backend")
    add_device(cache, help="device of the ST-VAE: auto (CUDA when present), cpu or cuda")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    _max_memory(cache)

    shards = sub.add_parser("build-shards", help="write raw data as WebDataset-style tar shards (streamed by DALI)")
    shards.add_argument("sources", nargs="+", metavar="SOURCE", help="'demo', manifests (.jsonl) or directories")
    shards.add_argument("--out", required=True, help="shard folder (tar shards, .idx files, index.json)")
    shards.add_argument(
        "--shard-mb", type=BOUNDS["shard_mb"], default=1024.0, help="target size of a shard in MB (1e6 bytes)"
    )
    shards.add_argument(
        "--video-frames", type=BOUNDS["video_frames"], default=5, help="frames of a video task's clip (as in training)"
    )
    shards.add_argument("--extra-tasks", nargs="*", default=(), help="task names a manifest may use besides ours")


def _max_memory(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", type=BOUNDS["max_memory"], metavar="GIB",
                        help="refuse to start when the arguments imply more than this many GiB (default: free memory)")  # fmt: skip


def _num_pairs(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--num-pairs", type=BOUNDS["num_pairs"], default=4, help=help)
    add_deprecated_alias(parser, "--n-pairs", "--num-pairs")


def _loader_args(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--resolution", type=BOUNDS["resolution"], default=64, help="frame size in pixels")
    parser.add_argument("--batch-size", type=BOUNDS["batch_size"], default=batch_size)
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"], help="decoding backend")
    add_device(parser, default="cpu", help=_DALI_DEVICE)
    _num_pairs(parser, "in-context example pairs per sequence")
    parser.add_argument("--seed", type=BOUNDS["seed"], default=0)
    _max_memory(parser)


def upgrade_argv(argv: list[str]) -> list[str]:
    """The old mode flags -> subcommands: `--check S` -> `check S`, `--preview S` -> `demo S`, `--bench` -> `bench`."""
    modes = {"--check": ("check", True), "--preview": ("demo", True), "--bench": ("bench", False)}
    return upgrade_mode_flags("data", argv, SUBCOMMANDS, modes)


def _dali_device(name: str) -> str:
    """--device (auto, cpu, cuda[:N]) -> DALI's name ("cpu" or "gpu")."""
    if name == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu" if name == "cpu" else "gpu"


def _print_table(rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"  # fractions and milliseconds keep their digits
        return str(v)

    widths = {k: max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).ljust(widths[k]) for k in keys))


def _dali_or_note() -> bool:
    """Whether DALI is importable; if not, one line on stderr saying that its rows are left out and why."""
    from lavin_fast.data.pipelines import dali_available

    ok, why = dali_available()
    if not ok:
        print(f"note: DALI is missing, so only the PIL / torch rows are measured: {why}", file=sys.stderr)
    return ok


def run_bench(args) -> list[dict]:
    from lavin_fast.data import benchmark

    dali = _dali_or_note()

    if args.images:
        from lavin_fast.data.incontext import IMAGE_EXTENSIONS

        root = pathlib.Path(args.images)
        if not root.is_dir():
            raise FileNotFoundError(f"--images: directory not found: {root}")
        files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"--images: no image files in {root}")
    else:
        files = benchmark.make_jpeg_set(pathlib.Path(tempfile.gettempdir()) / "lavin_fast_bench_jpeg")
    common = dict(resolution=args.resolution, batch_size=args.batch_size, workers=args.workers, seconds=args.seconds)
    if args.rows == "scale":
        return _scale_rows(args, files, common, baseline=True)
    if args.rows == "cache-wait":
        return _cache_wait_rows(args.wait_steps)
    # alternate the contenders for `repeats` rounds and keep the median: on a shared machine the
    # load moves between measurements
    contenders = [
        ("pil", lambda: benchmark.bench_pil(files, **common)),
        ("dali_cpu", lambda: benchmark.bench_dali(files, device="cpu", **common)),
    ]
    if args.device == "gpu":
        contenders.append(("dali_gpu", lambda: benchmark.bench_dali(files, device="gpu", **common)))
    if not dali:
        contenders = contenders[:1]
    runs: dict[str, list[dict]] = {name: [] for name, _ in contenders}
    for _ in range(max(1, args.repeats)):
        for name, fn in contenders:
            runs[name].append(fn())
    rows = []
    for name, _ in contenders:
        rs = sorted(runs[name], key=lambda r: r["images_per_s"])
        row = dict(rs[len(rs) // 2])
        row["min_max"] = f"{rs[0]['images_per_s']:.1f}..{rs[-1]['images_per_s']:.1f}"
        row["repeats"] = len(rs)
        rows.append(row)
    rows += _online_rows(args, files, dali)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        r["files"] = len(files)
        r["resolution"] = args.resolution
    if not args.quick:
        if dali:
            rows += benchmark.bench_dali_stages(files, args.resolution, args.batch_size, args.workers, args.seconds / 2)
        # the in-context loader (computed tasks, 64 px, N pairs): the in-memory demo, then the same
        # JPEG files through PIL (in process and in workers) and through DALI
        ic = dict(resolution=64, batch_size=8, n_pairs=args.num_pairs, seconds=args.seconds)
        rows.append({**benchmark.bench_incontext("demo", "torch", **ic), "source": "demo (in memory)"})
        jpeg_dir = args.images or str(pathlib.Path(files[0]).parent)
        rows.append({**benchmark.bench_incontext(jpeg_dir, "torch", **ic), "source": "JPEG files"})
        rows.append(
            {**benchmark.bench_incontext(jpeg_dir, "torch", num_workers=args.workers, **ic), "source": "JPEG files"}
        )
        if dali:
            rows.append({**benchmark.bench_incontext(jpeg_dir, "dali", device="cpu", **ic), "source": "JPEG files"})
        if dali and args.device == "gpu":
            rows.append({**benchmark.bench_incontext(jpeg_dir, "dali", device="gpu", **ic), "source": "JPEG files"})
        rows += benchmark.bench_tasks("cpu", resolution=256, batch_size=8, seconds=max(1.0, args.seconds / 8))
    return rows if args.quick else rows + _scale_rows(args, files, common, baseline=False)


def _scale_rows(args, files: list[str], common: dict, baseline: bool) -> list[dict]:
    """The data-at-scale rows: planning from a synthetic cache index of --plan-items pairs, and the tar-shard
    readers on the same files (with the PIL DataLoader and DALI file-reader baselines when `baseline`)."""
    from lavin_fast.data import benchmark

    rows = benchmark.bench_plan(n_items=args.plan_items, n_pairs=args.num_pairs)
    if baseline:
        rows.append(benchmark.bench_pil(files, **common))
        rows.append(benchmark.bench_dali(files, device="cpu", **common))
    rows += benchmark.bench_shards(files, **common)
    rows += benchmark.bench_cache_reads(seconds=args.seconds, n_pairs=args.num_pairs)
    return rows


def _cache_wait_rows(steps: int) -> list[dict]:
    """data_wait_frac (the step's share of time spent waiting for data) of the tiny-cpu config trained from a latent
    cache of the demo data (64 px, its two tasks, the config's ST-VAE with random weights), with the cache loader's
    look-ahead at 0 and 2 micro-batches."""
    import os

    import torch

    from lavin_fast.data.latent_cache import VAECacheEncoder, build_latent_cache
    from lavin_fast.models.checkpoints import save_vae
    from lavin_fast.train import sources
    from lavin_fast.train.config import load_config
    from lavin_fast.train.trainer import Trainer

    root = pathlib.Path(tempfile.mkdtemp(prefix="lavin_fast_cache_wait_"))
    base = load_config("tiny-cpu", {})
    cpu = torch.device("cpu")
    vae = sources.build_vae_from_config(base, cpu)
    vae_file = save_vae(vae, root / "vae.safetensors")
    build_latent_cache(
        "demo",
        VAECacheEncoder(vae, seed=0, device=cpu),
        root / "cache",
        resolution=base.image_size,
        tasks=base.tasks,
        backend="torch",
    )
    rows = []
    for depth in (0, 2):
        out = root / f"run{depth}"
        over = {"data": {"latent_cache": str(root / "cache"), "prefetch": depth}, "vae_weights": str(vae_file)}
        over.update(steps=steps, log_every=max(1, steps // 2), save_every=10**6, out_dir=str(out))
        over.update(progress=False, tensorboard=False)
        Trainer(load_config("tiny-cpu", over)).fit()
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rows.append(
            {
                "impl": f"tiny-cpu from a latent cache, {depth} micro-batches ahead",
                "data_wait_frac": max(r["data_wait_frac"] for r in logged),
                "steps_per_s": logged[-1]["steps_per_s"],
                "steps": steps,
                "load1": round(os.getloadavg()[0], 1),
            }
        )
    return rows


def _online_rows(args, files: list[str], dali: bool = True) -> list[dict]:
    """Online training's data path on the same files and resolution: decode + augment + computed task + VAE
    encode, with the torch decoder (and DALI's CPU and GPU decoders unless --quick)."""
    from lavin_fast.data import benchmark

    vae = None
    if getattr(args, "vae", None):
        from lavin_fast.models.checkpoints import load_vae_file

        vae = load_vae_file(args.vae, device="cuda" if args.device == "gpu" else "cpu")
    folder = args.images or str(pathlib.Path(files[0]).parent)
    common = dict(resolution=args.resolution, batch_size=2, n_pairs=1, seconds=args.seconds, vae=vae)
    paths = [("torch", "cpu")] + ([] if args.quick or not dali else [("dali", "cpu")])
    if args.device == "gpu" and not args.quick and dali:
        paths.append(("dali", "gpu"))
    return [benchmark.bench_online(folder, backend, device, **common) for backend, device in paths]


def _loader(args):
    """The in-context loader that `data demo` and `data check` look at (after the memory pre-flight)."""
    from lavin_fast.data.incontext import build_incontext_loader
    from lavin_fast.preflight import check_memory

    frame = 3.0 * args.resolution**2 * 4
    sequences = args.batch_size * 2 * (args.num_pairs + 1) * frame
    check_memory({"one batch of sequences": sequences * 2}, f"data {args.data_command}", args.max_memory)

    return build_incontext_loader(
        args.source,
        resolution=args.resolution,
        n_pairs=args.num_pairs,
        batch_size=args.batch_size,
        seed=args.seed,
        backend=args.backend,
        device=args.device,
    )


def _demo_path(out: str) -> pathlib.Path:
    """--out as a PNG path: a folder (existing, or written with a trailing /) gets data_demo.png inside."""
    path = pathlib.Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        return path / "data_demo.png"
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out: expected a .png file or a folder, got {out!r}")
    return path


def column_labels(context_segments, target_segments) -> list[str]:
    """One label per frame column of a batch: in 1, out 1, ..., query, then target (with the frame after a colon
    where an item is a clip)."""
    n = (len(context_segments) - 1) // 2
    items = [f"{k} {i + 1}" for i in range(n) for k in ("in", "out")] + ["query"]
    items += ["target"] * len(target_segments)
    labels = []
    for item, frames in zip(items, list(context_segments) + list(target_segments), strict=True):
        labels += [item] if frames == 1 else [f"{item}:{f}" for f in range(frames)]
    return labels


def labelled_grid(frames, tasks: list[str], labels: list[str]):
    """[B, 3, T, H, W] uint8 frames -> a PIL image: one row per sequence named by its task on the left, one
    column per frame named on top, 2 px white gaps."""
    from PIL import Image, ImageDraw, ImageFont

    bsz, _, t, h, w = frames.shape
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 6 + int(max(probe.textlength(x, font=font) for x in tasks))
    top = 16
    canvas = Image.new("RGB", (left + t * (w + 2), top + bsz * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(labels):
        draw.text((left + j * (w + 2) + 1, 2), label, fill="black", font=font)
    for i in range(bsz):
        y = top + i * (h + 2)
        draw.text((2, y + h // 2 - 5), tasks[i], fill="black", font=font)
        for j in range(t):
            canvas.paste(Image.fromarray(frames[i, :, j].permute(1, 2, 0).numpy()), (left + j * (w + 2), y))
    return canvas


def _demo(args) -> int:
    out = _demo_path(args.out)
    loader = _loader(args)
    b = next(loader)
    frames = torch_cat_frames(b)
    grid = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte()  # [B, 3, T, H, W]
    labels = column_labels(b.context_segments, b.target_segments)
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(grid, list(b.task), labels).save(out)
    print(
        f"wrote {out}: {grid.shape[0]} sequences ({', '.join(b.task)}), context {tuple(b.context.shape)} + target "
        f"{tuple(b.target.shape)}; the columns labelled target are the targets"
    )
    return 0


def torch_cat_frames(batch):
    import torch

    return torch.cat([batch.context.cpu(), batch.target.cpu()], 2)


def _check(args) -> int:
    loader = _loader(args)
    print(f"source {args.source}: backend {loader.backend} ({loader.device}), tasks:")
    for name, pool in sorted(loader.pools.items()):
        print(f"  {name:28s} {pool.kind:9s} {len(pool.items):8d} items, context frames {pool.signature()[0]}")
    b = next(loader)
    print(f"first batch: context {tuple(b.context.shape)}, target {tuple(b.target.shape)}, tasks {b.task}")
    print(f"skipped files: {loader.num_skipped}")
    for ref, why in list(loader.skipped.items())[:20]:
        print(f"  {ref}: {why}")
    return 0


def _build_cache(args) -> int:

    from lavin_fast.preflight import check_memory, file_bytes
    from lavin_fast.runlock import run_lock

    frames = args.encode_batch * 2 * 3.0 * args.resolution**2 * 4  # one encoder call's input pairs, float32
    parts = {"VAE weights": float(file_bytes(args.vae)), "one encoder call": frames * 2}
    check_memory(parts, "data build-cache", args.max_memory)
    with run_lock(args.out, "data build-cache"):  # another build into this folder stops here, naming the first
        return _build_cache_locked(args)


def _build_cache_locked(args) -> int:
    from lavin_fast.data.latent_cache import VAECacheEncoder, build_latent_cache
    from lavin_fast.models.checkpoints import load_vae_file
    from lavin_fast.parallel.distributed import process_group

    # under torchrun: this rank's device bound first (cuda:LOCAL_RANK), then the process group (gloo on CPU, nccl on
    # CUDA); a rank that fails leaves the group at once (no barrier on its failure path: see parallel/distributed.py)
    with process_group(device=args.device) as ctx:
        vae = load_vae_file(args.vae, device=ctx.device)
        encoder = VAECacheEncoder(vae, seed=args.seed, device=ctx.device, name=pathlib.Path(args.vae).name)
        index = build_latent_cache(
            args.sources,
            encoder,
            args.out,
            resolution=args.resolution,
            tasks=args.tasks,
            copies=args.copies,
            augment=args.augment,
            encode_batch=args.encode_batch,
            shard_size=args.shard_size,
            seed=args.seed,
            backend=args.backend,
            progress=not args.no_progress,
            format=args.format,
        )
    if not sum(index["counts"].values()):
        why = "; ".join(f"{ref}: {reason}" for ref, reason in list(index["skipped"].items())[:3])
        raise ValueError(
            f"no pair could be cached from {' '.join(args.sources)}: all {len(index['skipped'])} file(s) were "
            f"skipped ({why or 'no files found'}); {args.out} holds no usable cache"
        )
    if ctx.is_main:
        counts = ", ".join(f"{t} {n}" for t, n in index["counts"].items())
        print(
            f"wrote {args.out}: pairs per task: {counts}; skipped files: {len(index['skipped'])}; "
            f"VAE sha256 {index['encoder_sha256'][:16]}..."
        )
    return 0


def _build_shards(args) -> int:
    from lavin_fast.data.shards import build_shards
    from lavin_fast.parallel.distributed import process_group

    # under torchrun: a gloo group; each rank writes shards r, r + world, ...; a failing rank leaves the group
    # without a barrier (parallel/distributed.py), the others' teardown barrier then fails instead of hanging
    with process_group(device="cpu") as ctx:
        index = build_shards(
            args.sources,
            args.out,
            target_bytes=int(args.shard_mb * 1e6),
            video_frames=args.video_frames,
            extra_tasks=tuple(args.extra_tasks),
        )
    if ctx.is_main:
        size = sum(e["bytes"] for e in index["shards"]) / 1e6
        groups = ", ".join(f"{g} {n}" for g, n in sorted(index["groups"].items()))
        print(f"wrote {args.out}: {len(index['shards'])} shards, {size:.1f} MB; samples per group: {groups}")
    return 0


def run(args) -> int:
    command = args.data_command
    if command is None:
        print("lavin-fast data: error: give a subcommand: " + ", ".join(SUBCOMMANDS) + " (see --help)", file=sys.stderr)
        return 2
    try:
        if command == "build-cache":
            return _build_cache(args)
        if command == "build-shards":
            return _build_shards(args)
        args.device = _dali_device(args.device)
        if command == "bench":
            rows = run_bench(args)
            _print_table(rows)
            if args.json:
                pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
            return 0
        return _check(args) if command == "check" else _demo(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lavin-fast data {command}: error: {exc}", file=sys.stderr)
        return 2
