"""The paper's metrics (seed B.2) on a folder of predictions, or the regeneration of a benchmark set.

  lavin-fast eval score TASK --pred DIR --gt DIR [--mask DIR] [--out results.json]
                  [--lpips-weights P] [--fid-weights P] [--device auto|cpu|cuda] [--metrics a,b]
  lavin-fast eval make-set TASK --images DIR --out DIR [--seed 0] [--count N] [--size S]

Files are matched by name (stem, with a trailing _target/_pred/_prediction/_output removed; *_input files in
--gt are skipped, so a task folder written by make-set is a valid --gt). See docs/eval.md. The old forms
`eval TASK ...` and `eval --make-set TASK ...` still work for one release, with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

from lavin_fast.cli.args import BOUNDS, add_device, upgrade_mode_flags
from lavin_fast.eval.task_specs import TASKS

_SHOW = 10  # unmatched names listed on the terminal (all of them go to the JSON)
SUBCOMMANDS = ("score", "make-set")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    score = sub.add_parser("score", help="the task's metrics on a folder of predictions against the ground truth")
    score.add_argument("task", choices=sorted(TASKS), metavar="TASK", help=f"one of {sorted(TASKS)}")
    score.add_argument("--pred", type=Path, help="folder of predictions")
    score.add_argument("--gt", type=Path, help="folder of ground truth")
    score.add_argument("--mask", type=Path, help="folder of validity masks (depth/normal tasks; non-zero = valid)")
    score.add_argument("--out", type=Path, help="results JSON (default eval_TASK.json)")
    score.add_argument("--lpips-weights", help="LPIPS state-dict file (AlexNet/VGG backbone + linear heads)")
    score.add_argument("--fid-weights", help="Inception-v3 state-dict file (torchvision Inception3 layout)")
    add_device(score)
    score.add_argument("--metrics", default="", help="comma list overriding the task's metrics (e.g. mse,psnr)")
    score.add_argument(
        "--mask-threshold", type=BOUNDS["mask_threshold"], default=0.5, help="mask rule: channel mean > this (0..1)"
    )
    score.add_argument("--depth-space", choices=("depth", "disparity"), default="depth", help="alignment space")
    score.add_argument(
        "--depth-scale", type=BOUNDS["depth_scale"], default=1000.0, help="16-bit GT depth PNG divisor (mm -> m)"
    )
    make = sub.add_parser("make-set", help="write NAME_input.png / NAME_target.png pairs of a computed task")
    make.add_argument("task", metavar="TASK", help="a computed task (the degradations of lavin_fast.data.tasks)")
    make.add_argument("--images", type=Path, help="folder of clean images")
    make.add_argument("--out", type=Path, help="the set's folder")
    make.add_argument("--seed", type=BOUNDS["seed"], default=0, help="seed of the degradations and of the --count draw")
    make.add_argument("--count", type=BOUNDS["count"], default=0, help="draw this many images at random (0 = all)")
    make.add_argument(
        "--size", type=BOUNDS["make_set_size"], default=0, help="resize the shorter side to this and centre-crop square"
    )
    make.add_argument("--max-memory", type=BOUNDS["max_memory"], metavar="GIB",
                      help="refuse to start when the images imply more than this many GiB (default: free memory)")  # fmt: skip


def upgrade_argv(argv: list[str]) -> list[str]:
    """The old forms -> subcommands: `--make-set TASK ...` -> `make-set TASK ...`, `TASK ...` -> `score TASK ...`."""
    return upgrade_mode_flags("eval", argv, SUBCOMMANDS, {"--make-set": ("make-set", True)}, default="score")


def _err(msg: str) -> int:
    print(f"lavin-fast eval: error: {msg}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.eval_command is None:
        return _err("give a subcommand: score TASK --pred DIR --gt DIR, or make-set TASK --images DIR --out DIR")
    try:
        if args.eval_command == "make-set":
            return _make_set(args)
        return _evaluate(args)
    except (ValueError, FileNotFoundError) as exc:
        return _err(str(exc))


def _device(name: str) -> str:
    """This process's device, bound before any CUDA work (under torchrun: cuda:LOCAL_RANK, not GPU 0 on every rank)."""
    import torch

    from lavin_fast.parallel.distributed import rank_device

    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return str(rank_device(name))


def _evaluate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lavin_fast.eval.tasks import EvalConfig, Evaluator, format_table, match_files

    for opt, folder in (("--pred", args.pred), ("--gt", args.gt)):
        if folder is None:
            raise ValueError(f"{opt} DIR is required")
        if not folder.is_dir():
            raise ValueError(f"{opt}: not a folder: {folder}")
    kind = TASKS[args.task].kind
    if args.mask is not None:
        if kind not in ("depth", "normal"):
            raise ValueError(f"--mask applies to the depth and normal tasks, not {args.task!r}")
        if not args.mask.is_dir():
            raise ValueError(f"--mask: not a folder: {args.mask}")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    cfg = EvalConfig(
        task=args.task,
        metrics=metrics,
        device=_device(args.device),
        lpips_weights=args.lpips_weights,
        fid_weights=args.fid_weights,
        mask_threshold=args.mask_threshold,
        depth_space=args.depth_space,
        depth_scale=args.depth_scale,
    )
    # networks (and missing weights) first: fail before reading any file
    evaluator = Evaluator(cfg)
    match = match_files(args.pred, args.gt)
    for label, names in (
        ("predictions without ground truth", match.pred_only),
        ("ground truth without prediction", match.gt_only),
    ):
        if names:
            shown = ", ".join(names[:_SHOW]) + (f" ... (+{len(names) - _SHOW})" if len(names) > _SHOW else "")
            print(f"warning: {len(names)} {label}: {shown}", file=sys.stderr)
    if not match.pairs:
        raise ValueError(f"no file in --pred {args.pred} matches a file in --gt {args.gt} by name")
    masks = {}
    if args.mask is not None:
        from lavin_fast.eval.tasks import list_files

        found = list_files(args.mask)
        missing = [k for k, _, _ in match.pairs if k not in found]
        if missing:
            raise ValueError(f"--mask {args.mask}: no mask for {len(missing)} pairs: {', '.join(missing[:_SHOW])}")
        masks = found
    t0 = time.perf_counter()
    for key, p, g in tqdm(match.pairs, desc=f"eval {args.task}", unit="img", file=sys.stderr):
        try:
            evaluator.add(key, p, g, masks.get(key))
        except ValueError as exc:  # say which pair, then stop: a partial result would be silently wrong
            raise ValueError(f"pair {key!r} ({p} vs {g}): {exc}") from exc
    result = evaluator.result()
    elapsed = time.perf_counter() - t0
    n = len(match.pairs)
    print(format_table(args.task, result, n))
    if evaluator.resized:
        print(f"note: {evaluator.resized} predictions were resized to their ground truth's size", file=sys.stderr)
    out = args.out or Path(f"eval_{args.task}.json")
    report = {
        "task": args.task,
        "protocol": TASKS[args.task].protocol,
        "metrics": {k: _json_num(v) for k, v in result.items()},
        "num_pairs": n,
        "pred": str(args.pred),
        "gt": str(args.gt),
        "mask": str(args.mask) if args.mask else None,
        "settings": {
            "metrics": list(evaluator.metric_names),
            "device": cfg.device,
            "mask_threshold": cfg.mask_threshold,
            "depth_space": cfg.depth_space,
            "depth_scale": cfg.depth_scale,
            "lpips_weights": cfg.lpips_weights,
            "fid_weights": cfg.fid_weights,
        },
        "resized_predictions": evaluator.resized,
        "unmatched": {"pred_only": match.pred_only, "gt_only": match.gt_only},
        "seconds": round(elapsed, 3),
        "per_image": {k: {m: _json_num(v) for m, v in row.items()} for k, row in evaluator.per_image.items()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _json_num(v: float) -> float | str:
    # JSON has no inf/nan: spell them as strings (e.g. PSNR of an identical pair)
    return v if math.isfinite(v) else str(v)


def _make_set_preflight(files, args) -> None:
    """The largest image (from the headers, within the decode limit) as float32 at each stage of one pair, and
    the --size crops: a lower bound of make-set's peak."""
    from lavin_fast.media import MAX_IMAGE_PIXELS, MediaError, open_image_size
    from lavin_fast.preflight import check_memory

    largest = 0
    for p in files:
        try:
            w, h = open_image_size(p)
        except MediaError:
            continue  # read_image_array names it when its turn comes
        largest = max(largest, min(w * h, MAX_IMAGE_PIXELS))
    parts = {"largest image (float32, 3 copies)": 3.0 * largest * 3 * 4, "--size crops": 4.0 * args.size**2 * 3 * 4}
    check_memory(parts, "eval make-set", args.max_memory)


def _make_set(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from lavin_fast.data.tasks import COMPUTED_TASKS, build_pair
    from lavin_fast.eval.tasks import load_rgb
    from lavin_fast.media import save_image

    task = args.task
    if task not in COMPUTED_TASKS:
        raise ValueError(f"make-set: no builder for {task!r}; the computed tasks are {sorted(COMPUTED_TASKS)}")
    if args.images is None or not args.images.is_dir():
        raise ValueError(f"--images: a folder of clean images is required, got {args.images}")
    if args.out is None:
        raise ValueError("--out DIR is required")
    if args.count < 0 or args.size < 0:
        raise ValueError(f"--count and --size must be >= 0, got {args.count} and {args.size}")
    from lavin_fast.media import IMAGE_SUFFIXES as exts

    files = sorted(p for p in args.images.iterdir() if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise ValueError(f"--images {args.images}: no image files ({', '.join(exts)})")
    if args.count:
        if args.count > len(files):
            raise ValueError(f"--count {args.count} exceeds the {len(files)} images in {args.images}")
        perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(args.seed))[: args.count]
        files = [files[i] for i in sorted(perm.tolist())]
    stems = [p.stem for p in files]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--images {args.images}: two files share a name (stem); names must be unique")
    _make_set_preflight(files, args)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is a file, not a folder")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc=f"make-set {task}", unit="img", file=sys.stderr):
        img = load_rgb(path)
        if args.size:
            # shorter side to --size (bicubic, antialiased: the model's resizing), then a centre square
            h, w = img.shape[-2:]
            s = args.size / min(h, w)
            nh, nw = max(args.size, round(h * s)), max(args.size, round(w * s))
            img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
            top, left = (nh - args.size) // 2, (nw - args.size) // 2
            img = img[:, top : top + args.size, left : left + args.size].clamp(0, 1)
        # one generator per image, seeded from (seed, name): an image's degradation does not depend on which
        # other images are in the folder
        gen = torch.Generator().manual_seed((args.seed << 32) ^ zlib.crc32(os.fsencode(path.stem)))
        inp, tgt = build_pair(task, img * 2 - 1, gen)
        for suffix, t in (("input", inp), ("target", tgt)):
            arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            save_image(np.ascontiguousarray(arr), args.out / f"{path.stem}_{suffix}.png")  # PIL: any file name
    print(f"wrote {len(files)} pairs of {task} to {args.out} (seed {args.seed})", file=sys.stderr)
    return 0
