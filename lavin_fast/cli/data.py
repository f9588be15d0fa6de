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
    (`torchrun --nproc-per-node 8 -m lavin_fast.cli data build-cache ...`), a rerun skips finished shards

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

SUBCOMMANDS = ("demo", "check", "bench", "build-cache")
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

    cache = sub.add_parser("build-cache", help="encode every example pair once with the ST-VAE into a latent cache")
    cache.add_argument("sources", nargs="+", metavar="SOURCE", help="'demo', manifests (.jsonl) or directories")
    cache.add_argument("--vae", required=True, help="ST-VAE weights: the published .pt or ours (.safetensors)")
    cache.add_argument("--out", required=True, help="cache folder (index.json and safetensors shards)")
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
    cache.add_argument("--shard-size", type=BOUNDS["shard_size"], default=1024, help="pairs per safetensors shard")
    cache.add_argument(
        "--seed", type=BOUNDS["seed"], default=0, help="seed of the degradations and of the VAE posterior draws"
    )
    cache.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"], help="decoding backend")
    add_device(cache, help="device of the ST-VAE: auto (CUDA when present), cpu or cuda")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    _max_memory(cache)


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
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    widths = {k: max(len(k), *(len(fmt(r.get(k, ""))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(fmt(r.get(k, "")).ljust(widths[k]) for k in keys))


def run_bench(args) -> list[dict]:
    from lavin_fast.data import benchmark

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
    # alternate the contenders for `repeats` rounds and keep the median: on a shared machine the
    # load moves between measurements
    contenders = [
        ("pil", lambda: benchmark.bench_pil(files, **common)),
        ("dali_cpu", lambda: benchmark.bench_dali(files, device="cpu", **common)),
    ]
    if args.device == "gpu":
        contenders.append(("dali_gpu", lambda: benchmark.bench_dali(files, device="gpu", **common)))
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
    rows += _online_rows(args, files)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        r["files"] = len(files)
        r["resolution"] = args.resolution
    if not args.quick:
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
        rows.append({**benchmark.bench_incontext(jpeg_dir, "dali", device="cpu", **ic), "source": "JPEG files"})
        if args.device == "gpu":
            rows.append({**benchmark.bench_incontext(jpeg_dir, "dali", device="gpu", **ic), "source": "JPEG files"})
        rows += benchmark.bench_tasks("cpu", resolution=256, batch_size=8, seconds=max(1.0, args.seconds / 8))
    return rows


def _online_rows(args, files: list[str]) -> list[dict]:
    """Online training's data path on the same files and resolution: decode + augment + computed task + VAE
    encode, with the torch decoder (and DALI's CPU and GPU decoders unless --quick)."""
    from lavin_fast.data import benchmark

    vae = None
    if getattr(args, "vae", None):
        from lavin_fast.models.checkpoints import load_vae_file

        vae = load_vae_file(args.vae, device="cuda" if args.device == "gpu" else "cpu")
    folder = args.images or str(pathlib.Path(files[0]).parent)
    common = dict(resolution=args.resolution, batch_size=2, n_pairs=1, seconds=args.seconds, vae=vae)
    paths = [("torch", "cpu")] + ([] if args.quick else [("dali", "cpu")])
    if args.device == "gpu" and not args.quick:
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


def _demo(args) -> int:
    import numpy as np
    from PIL import Image

    loader = _loader(args)
    b = next(loader)
    frames = torch_cat_frames(b)
    grid = ((frames.clamp(-1, 1) + 1) * 127.5).round().byte()  # [B, 3, T, H, W]
    bsz, _, t, h, w = grid.shape
    canvas = np.full((bsz * (h + 2), t * (w + 2), 3), 255, np.uint8)
    for i in range(bsz):
        for j in range(t):
            canvas[i * (h + 2) : i * (h + 2) + h, j * (w + 2) : j * (w + 2) + w] = (
                grid[i, :, j].permute(1, 2, 0).numpy()
            )
    Image.fromarray(canvas).save(args.out)
    print(
        f"wrote {args.out}: {bsz} sequences ({', '.join(b.task)}), context {tuple(b.context.shape)} + target "
        f"{tuple(b.target.shape)}; the last {b.target.shape[2]} column(s) are the targets"
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
    from lavin_fast.parallel.distributed import setup, teardown

    ctx = setup(device=args.device)  # under torchrun: the process group (gloo on CPU, nccl on CUDA), cuda:LOCAL_RANK
    try:
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
        )
    finally:
        teardown(ctx)
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


def run(args) -> int:
    command = args.data_command
    if command is None:
        print(
            "lavin-fast data: error: give a subcommand: demo, check, bench or build-cache (see --help)", file=sys.stderr
        )
        return 2
    try:
        if command == "build-cache":
            return _build_cache(args)
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
