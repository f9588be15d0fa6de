"""Data tools.

lavin-fast data --bench [--images DIR] [--workers 2] [--seconds 8] [--device cpu|gpu] [--json out.json]
    images/s of the DALI pipeline against PIL in a torch DataLoader (same files, same workers),
    plus the in-context loader's frames/s and the computed task builders' images/s
lavin-fast data --check SOURCE        load a source (demo, manifest, directory), list its tasks, make a batch
lavin-fast data --preview SOURCE --out grid.png    one in-context batch as an image grid
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--bench", action="store_true", help="DALI vs PIL DataLoader throughput")
    mode.add_argument("--check", metavar="SOURCE", help="'demo', a manifest (.jsonl) or a directory")
    mode.add_argument("--preview", metavar="SOURCE", help="write one in-context batch as a PNG grid (--out)")
    parser.add_argument("--images", help="bench: a directory of images (default: JPEGs made from the demo photos)")
    parser.add_argument("--resolution", type=int, default=256, help="output size (bench: 256; check/preview: 64)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader worker processes")
    parser.add_argument("--seconds", type=float, default=8.0, help="bench: seconds per measurement")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="DALI device")
    parser.add_argument("--backend", default="auto", choices=["auto", "dali", "torch"], help="check/preview backend")
    parser.add_argument("--n-pairs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="preview: PNG path")
    parser.add_argument("--json", help="bench: also write the rows as JSON here")
    parser.add_argument("--quick", action="store_true", help="bench: skip the in-context and task-builder rows")
    parser.add_argument("--repeats", type=int, default=3, help="bench: alternating rounds of PIL vs DALI (median)")


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
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        r["files"] = len(files)
        r["resolution"] = args.resolution
    if not args.quick:
        rows += benchmark.bench_dali_stages(files, args.resolution, args.batch_size, args.workers, args.seconds / 2)
        # the in-context loader (computed tasks, 64 px, N pairs): the in-memory demo, then the same
        # JPEG files through PIL (in process and in workers) and through DALI
        ic = dict(resolution=64, batch_size=8, n_pairs=args.n_pairs, seconds=args.seconds)
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


def _preview(args) -> int:
    import numpy as np
    from PIL import Image

    from lavin_fast.data.incontext import build_incontext_loader

    if not args.out:
        print("--preview needs --out PATH.png", file=sys.stderr)
        return 2
    res = args.resolution if args.resolution != 256 else 64
    loader = build_incontext_loader(
        args.preview,
        resolution=res,
        n_pairs=args.n_pairs,
        batch_size=min(args.batch_size, 8),
        seed=args.seed,
        backend=args.backend,
        device=args.device,
    )
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
    from lavin_fast.data.incontext import build_incontext_loader

    res = args.resolution if args.resolution != 256 else 64
    loader = build_incontext_loader(
        args.check,
        resolution=res,
        n_pairs=args.n_pairs,
        batch_size=min(args.batch_size, 4),
        seed=args.seed,
        backend=args.backend,
        device=args.device,
    )
    print(f"source {args.check}: backend {loader.backend} ({loader.device}), tasks:")
    for name, pool in sorted(loader.pools.items()):
        print(f"  {name:28s} {pool.kind:9s} {len(pool.items):8d} items, context frames {pool.signature()[0]}")
    b = next(loader)
    print(f"first batch: context {tuple(b.context.shape)}, target {tuple(b.target.shape)}, tasks {b.task}")
    print(f"skipped files: {loader.num_skipped}")
    for ref, why in list(loader.skipped.items())[:20]:
        print(f"  {ref}: {why}")
    return 0


def run(args) -> int:
    if args.bench:
        rows = run_bench(args)
        _print_table(rows)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    if args.check:
        return _check(args)
    if args.preview:
        return _preview(args)
    print("lavin-fast data: give --bench, --check SOURCE or --preview SOURCE --out PNG (see --help)", file=sys.stderr)
    return 2
