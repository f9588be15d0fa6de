"""In-context sampling: a task folder of example pairs + query image(s) -> a PNG grid (query, prediction,
optionally the examples); or video frame prediction: a clip -> a video file with the predicted frames.

  lavin-fast sample --dit jdit.safetensors --vae vae.pt --model 3.4B --task-dir examples/ --query q.png --out grid.png
  lavin-fast sample --dit ... --vae ... --video clip.avi --out clip_pred.avi

--grid-points (alias --nfe) is the number of time-grid points of the ODE (the old spelling --steps still works for
one release; train's --steps counts optimizer steps).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from lavin_fast.cli_args import add_deprecated_alias, add_device


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--dit", required=True, help="J-DiT checkpoint: the published .safetensors or ours (from train/demo)"
    )
    p.add_argument("--vae", required=True, help="ST-VAE checkpoint: the published .pt or ours (.safetensors)")
    p.add_argument("--model", default="3.4B", help="size of a published J-DiT file (0.1B, 1.0B, 3.4B); ours carry it")
    p.add_argument("--task-dir", help="folder of NAME_input.png / NAME_target.png example pairs")
    p.add_argument("--query", nargs="+", default=[], help="query image(s) (or a folder of them)")
    p.add_argument("--num-pairs", type=int, default=4, help="example pairs used as context (published: 4)")
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="resize every image to SIZE x SIZE (bicubic, antialiased); default: keep the examples' size",
    )
    p.add_argument("--video", help="frame prediction: a clip; its first frames form the example, its last the query")
    p.add_argument("--clip-frames", type=int, default=5, help="frames per video item (1 + 4k)")
    p.add_argument(
        "--grid-points", "--nfe", type=int, default=20, help="time-grid points of the ODE (published grids: 20, 30, 40)"
    )
    add_deprecated_alias(p, "--steps", "--grid-points")
    p.add_argument("--grid", choices=["published", "uniform"], default="published", help="time grid")
    p.add_argument("--guidance", type=float, default=1.5, help="classifier-free guidance scale (1: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4, help="queries per model call")
    add_device(p)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the J-DiT blocks (GPU)")
    p.add_argument(
        "--cuda-graphs", action="store_true", help="with --compile: mode reduce-overhead (CUDA graphs of the blocks)"
    )
    p.add_argument(
        "--context-parallel-mode",
        choices=["auto", "ulysses", "ring", "hybrid"],
        default="auto",
        help="under torchrun: every rank holds a share of each sequence; how attention crosses the ranks",
    )
    p.add_argument("--show-context", action="store_true", help="put the example pairs in the grid too")
    p.add_argument("--out", default="sample.png", help="output PNG (or .avi with --video)")


def _queries(paths: list[str]) -> list[pathlib.Path]:
    from lavin_fast.flow.images import IMAGE_SUFFIXES

    out = []
    for q in paths:
        p = pathlib.Path(q)
        if p.is_dir():
            found = sorted(x for x in p.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"query folder {str(p)!r} holds no images")
            out += found
        elif not p.is_file():
            raise FileNotFoundError(f"query image {str(p)!r} does not exist")
        else:
            out.append(p)
    return out


def load_models(args, device: torch.device, bf16: bool = False):
    from lavin_fast.models.checkpoints import load_dit_file, load_vae_file

    dit = load_dit_file(args.dit, args.model, device=device, dtype=torch.bfloat16 if bf16 else torch.float32)
    vae = load_vae_file(args.vae, device=device)
    if args.compile:
        mode = "reduce-overhead" if args.cuda_graphs else None
        for blk in dit.blocks:
            blk.compile(mode=mode)
    return dit, vae


def run(args: argparse.Namespace) -> int:
    from lavin_fast.flow.images import find_pairs, grid, resize
    from lavin_fast.flow.pipeline import SamplerOptions, predict
    from lavin_fast.media import load_image, read_clip, write_clip
    from lavin_fast.media import save_image as save_png
    from lavin_fast.models.checkpoints import ModelFileError
    from lavin_fast.train.context_parallel import attach_for_sampling
    from lavin_fast.train.distributed import setup

    try:
        if bool(args.task_dir) == bool(args.video):
            raise ValueError("give either --task-dir (with --query) or --video")
        if args.task_dir and not args.query:
            raise ValueError("--task-dir needs at least one --query image")
        ctx = setup(args.device)  # torchrun: a process group; the ranks split every sequence (context parallel)
        device = ctx.device
        bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
        opts = SamplerOptions(
            num_points=args.grid_points,
            grid=args.grid,
            guidance=args.guidance,
            seed=args.seed,
            batch=args.batch,
            dtype=None,  # bf16 runs on bf16 weights (no autocast casts of the weights at every step)
        )
        if args.grid == "published":
            from lavin_fast.flow.timesteps import published_grid

            published_grid(args.grid_points)  # fail before loading anything
        if args.task_dir:
            pairs_files = find_pairs(args.task_dir)[: args.num_pairs]
            query_files = _queries(args.query)
            pairs = [(load_image(a), load_image(b)) for _, a, b in pairs_files]
            queries = [load_image(q) for q in query_files]
            if args.size:
                pairs = [(resize(a, args.size), resize(b, args.size)) for a, b in pairs]
                queries = [resize(q, args.size) for q in queries]
            size = tuple(pairs[0][0].shape[-2:])
            for (_name, a, b), (x, y) in zip(pairs_files, pairs, strict=True):
                for path, img in ((a, x), (b, y)):
                    if tuple(img.shape[-2:]) != size:
                        raise ValueError(
                            f"{path} is {img.shape[-1]}x{img.shape[-2]}, the first example "
                            f"{size[1]}x{size[0]}: give --size to resize all images"
                        )
            for path, q in zip(query_files, queries, strict=True):
                if tuple(q.shape[-2:]) != size:
                    raise ValueError(
                        f"query {path} is {q.shape[-1]}x{q.shape[-2]} but the examples are "
                        f"{size[1]}x{size[0]}: give --size N to resize every image to N x N"
                    )
            dit, vae = load_models(args, device, bf16)
            attach_for_sampling(dit, ctx, args.context_parallel_mode)
            t0 = time.time()
            pred = predict(dit, vae, [(a[:, None], b[:, None]) for a, b in pairs], [q[:, None] for q in queries], opts)
            if not ctx.is_main:  # every rank holds the same prediction; rank 0 writes it
                return 0
            rows = []
            for q, p in zip(queries, pred, strict=True):
                row = [t for a, b in pairs for t in (a, b)] if args.show_context else []
                rows.append(row + [q, p[:, 0]])
            out = save_png(grid(rows), args.out)
            print(
                f"{len(queries)} prediction(s) from {len(pairs)} example pair(s) in {time.time() - t0:.1f} s: "
                f"{out.resolve()} (rows: {'examples, ' if args.show_context else ''}query, prediction)"
            )
            return 0
        clip = read_clip(args.video)
        if args.size:
            clip = torch.stack([resize(clip[:, i], args.size) for i in range(clip.shape[1])], dim=1)
        n = args.clip_frames
        if (n - 1) % 4:
            raise ValueError(f"--clip-frames {n}: the ST-VAE needs 1 + 4k frames per item (5, 9, ...)")
        if clip.shape[1] < 3 * n:
            raise ValueError(
                f"--video has {clip.shape[1]} frames; frame prediction needs at least 3 x --clip-frames = "
                f"{3 * n} (an example input and target, then the query)"
            )
        example = (clip[:, :n], clip[:, n : 2 * n])
        query = clip[:, -n:]
        dit, vae = load_models(args, device, bf16)
        attach_for_sampling(dit, ctx, args.context_parallel_mode)
        t0 = time.time()
        pred = predict(dit, vae, [example], [query], opts)[0]
        if not ctx.is_main:
            return 0
        out = write_clip(torch.cat([clip, pred], dim=1), args.out)
        print(
            f"predicted {pred.shape[1]} frames in {time.time() - t0:.1f} s: {out.resolve()} "
            f"(the clip's {clip.shape[1]} frames, then the prediction)"
        )
        return 0
    except (ValueError, FileNotFoundError, ModelFileError) as exc:
        print(f"lavin-fast sample: error: {exc}", file=sys.stderr)
        return 2
