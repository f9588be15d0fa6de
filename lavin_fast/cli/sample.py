"""In-context sampling: a task folder of example pairs + query image(s) -> a PNG grid (query, prediction,
optionally the examples); batch mode (--out-dir): one prediction file per query, resumable, sharded by rank
under torchrun; or video frame prediction: a clip -> a video file with the predicted frames.

  lavin-fast sample --dit jdit.safetensors --vae vae.pt --model 3.4B --task-dir examples/ --query q.png --out grid.png
  lavin-fast sample --dit ... --vae ... --task-dir examples/ --query queries/ --out-dir preds/ [--published]
  torchrun --nproc-per-node 8 -m lavin_fast.cli sample ... --out-dir preds/
  lavin-fast sample --dit ... --vae ... --video clip.avi --out clip_pred.avi

--grid-points (alias --nfe) is the number of time-grid points of the ODE (the old spelling --steps still works for
one release; train's --steps counts optimizer steps). docs/sampling.md has the details.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time
from typing import TYPE_CHECKING

from lavin_fast.cli.args import BOUNDS, add_deprecated_alias, add_device

CPU_PATH_CHOICES = ("auto", "eager", "compiled", "bf16", "compiled-bf16")
"""lavin_fast.models.cpu_path.CPU_PATHS, here so that --help does not import torch (tests/test_cpu_path.py: equal)"""

if TYPE_CHECKING:  # torch loads when a command runs, not for --help
    import torch


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--dit", required=True, help="J-DiT checkpoint: the published .safetensors or ours (from train/demo)"
    )
    p.add_argument("--vae", required=True, help="ST-VAE checkpoint: the published .pt or ours (.safetensors)")
    p.add_argument("--model", default="3.4B", help="size of a published J-DiT file (0.1B, 1.0B, 3.4B); ours carry it")
    p.add_argument("--task-dir", help="folder of NAME_input.png / NAME_target.png example pairs")
    p.add_argument(
        "--query",
        nargs="+",
        default=[],
        help="query image(s), folder(s) of them (only *_input images of a task folder) or a .txt list of paths",
    )
    p.add_argument(
        "--num-pairs", type=BOUNDS["num_pairs"], default=4, help="example pairs used as context (published: 4)"
    )
    p.add_argument(
        "--out-dir", help="batch mode: write one prediction per query here (NAME.png; skips queries already done)"
    )
    p.add_argument(
        "--output-kind",
        choices=["image", "depth", "normal"],
        default="image",
        help="batch mode: depth/normal also write NAME.npy (decoded as docs/sampling.md says)",
    )
    p.add_argument(
        "--published",
        action="store_true",
        help="the published sampler's choices: 512x512 bicubic resize, 4 pairs by seeded random.choices, bf16 VAE "
        "and integration state, truncation to uint8 (docs/sampling.md lists every difference)",
    )
    p.add_argument(
        "--allow-unexpected-keys",
        action="store_true",
        help="load a published checkpoint that holds tensors the model does not use (listed, then ignored)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--size",
        type=BOUNDS["size"],
        default=None,
        help="resize every image to SIZE x SIZE (bicubic, antialiased); default: keep the examples' size",
    )
    p.add_argument("--video", help="frame prediction: a clip; its first frames form the example, its last the query")
    p.add_argument("--clip-frames", type=BOUNDS["clip_frames"], default=5, help="frames per video item (1 + 4k)")
    p.add_argument(
        "--grid-points",
        "--nfe",
        type=BOUNDS["grid_points"],
        default=20,
        help="time-grid points of the ODE (published grids: 20, 30, 40)",
    )
    add_deprecated_alias(p, "--steps", "--grid-points")
    p.add_argument("--grid", choices=["published", "uniform"], default="published", help="time grid")
    p.add_argument("--guidance", type=BOUNDS["guidance"], default=1.5, help="classifier-free guidance scale (1: off)")
    p.add_argument("--seed", type=BOUNDS["seed"], default=0)
    p.add_argument("--batch", default="4", help="queries per model call, or 'auto': sized to free GPU memory (CPU: 4)")
    add_device(p)
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the J-DiT blocks (GPU)")
    p.add_argument("--cpu-path", choices=CPU_PATH_CHOICES, default="auto",
                   help="on the CPU: eager or Inductor-compiled models, float32 or bfloat16 (CPUs with avx512_bf16 / "
                        "AMX); auto compiles when the run makes enough model calls to pay the compile back")  # fmt: skip
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
    p.add_argument("--max-memory", type=BOUNDS["max_memory"], metavar="GIB",
                   help="refuse to start when the arguments imply more than this many GiB (default: the free memory)")  # fmt: skip


def load_models(args, device: torch.device, bf16: bool = False, expected_calls: int | None = None):
    """The J-DiT and the ST-VAE; on the CPU in the form --cpu-path says (expected_calls: J-DiT calls of the run)."""
    import torch

    from lavin_fast.models.checkpoints import load_dit_file, load_vae_file
    from lavin_fast.models.cpu_path import apply_cpu_path, resolve_cpu_path

    loose = getattr(args, "allow_unexpected_keys", False)
    dit = load_dit_file(
        args.dit, args.model, device=device, dtype=torch.bfloat16 if bf16 else torch.float32, allow_unexpected=loose
    )
    vae_dtype = torch.bfloat16 if getattr(args, "published", False) else None
    vae = load_vae_file(args.vae, device=device, dtype=vae_dtype, allow_unexpected=loose)
    if device.type == "cpu":
        name = getattr(args, "cpu_path", "auto")
        if args.compile and name == "auto":
            name = "compiled"
        path = resolve_cpu_path(name, device, expected_calls=expected_calls)
        print(apply_cpu_path(path, dit, vae), file=sys.stderr)
    elif args.compile:
        mode = "reduce-overhead" if args.cuda_graphs else None
        for blk in dit.blocks:
            blk.compile(mode=mode)
    return dit, vae


def _calls(args, queries: int, batch: int) -> int:
    """J-DiT calls of a run: one per grid point per batch of queries (guidance packs both passes in one call)."""
    return -(-queries // max(int(batch), 1)) * args.grid_points


def check_args(args: argparse.Namespace) -> int | str:
    """Every numeric argument checked before anything is loaded; returns --batch as an int or "auto"."""
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance: expected a finite scale (1: no guidance; published 1.5), got {args.guidance}")
    if args.num_pairs < 1:
        raise ValueError(f"--num-pairs: expected at least 1 example pair as context, got {args.num_pairs}")
    if args.grid_points < 2:
        raise ValueError(f"--grid-points: expected >= 2 time points (both ends 0 and 1), got {args.grid_points}")
    if args.size is not None and args.size < 16:
        raise ValueError(f"--size: expected >= 16 pixels (the VAE and patch factor), got {args.size}")
    batch: int | str = str(args.batch).strip().lower()
    if batch != "auto":
        try:
            batch = int(batch)
        except ValueError:
            raise ValueError(f"--batch: expected a positive integer or 'auto', got {args.batch!r}") from None
        if not 1 <= batch <= 4096:
            raise ValueError(f"--batch: expected 1 to 4096 queries per model call (or 'auto'), got {batch}")
    if bool(args.task_dir) == bool(args.video):
        raise ValueError("give either --task-dir (with --query) or --video")
    if args.task_dir and not args.query:
        raise ValueError("--task-dir needs at least one --query image (or a folder or a .txt list of them)")
    if args.out_dir and args.video:
        raise ValueError("--out-dir (batch mode) takes --task-dir and --query, not --video")
    if args.published and args.grid != "published":
        raise ValueError("--published integrates on the published grid: drop --grid uniform")
    if args.grid == "published":
        from lavin_fast.flow.timesteps import published_grid

        published_grid(args.grid_points)
    return batch


def check_prediction(pred: torch.Tensor, what: str) -> None:
    """A sampled image that is not finite or holds one value everywhere is an error, never a file."""
    import torch

    if not bool(torch.isfinite(pred).all()):
        raise ValueError(
            f"the prediction for {what} holds NaN/Inf values (broken weights, or bf16 overflow: try --dtype fp32); "
            "nothing was written"
        )
    if pred.numel() > 1 and float(pred.max() - pred.min()) == 0.0:
        raise ValueError(
            f"the prediction for {what} is one constant value ({float(pred.flatten()[0]):g}) everywhere: the weights "
            "are broken or untrained; nothing was written"
        )


def memory_parts(args, size: int | None, batch: int | str) -> dict[str, float]:
    """A lower bound of sampling's host memory from the arguments and the files' headers: the weights (their file
    sizes), the example pairs and the queries held at once (from the first example's size, or --size), the clip's
    frames."""
    from lavin_fast.flow.images import find_pairs
    from lavin_fast.media import clip_info, open_image_size
    from lavin_fast.preflight import file_bytes

    parts = {"weights": float(file_bytes(args.dit, args.vae))}
    b = 4 if batch == "auto" else int(batch)
    if args.task_dir:
        found = find_pairs(args.task_dir)
        w, h = (size, size) if size else open_image_size(found[0][1])
        per_image = 3.0 * w * h * 4
        parts["example pairs"] = 2 * min(args.num_pairs, len(found)) * per_image
        parts["queries"] = min(b * 8, max(1, len(args.query))) * per_image
    elif args.video:
        _n, h, w = clip_info(args.video)
        h, w = (size, size) if size else (h, w)
        parts["clip frames"] = 4.0 * args.clip_frames * 3 * w * h * 4
    return parts


def _context(args, size: int | None):
    """The example pairs used as context: the first --num-pairs by name, or (--published) a seeded draw with
    replacement; each image resized to `size` when given. Returns (names, pairs)."""
    from lavin_fast.flow.batch import published_context
    from lavin_fast.flow.images import find_pairs
    from lavin_fast.media import load_image

    found = find_pairs(args.task_dir)
    chosen = published_context(found, args.num_pairs, args.seed) if args.published else found[: args.num_pairs]
    pairs = [(load_image(a, size), load_image(b, size)) for _, a, b in chosen]
    ref = tuple(pairs[0][0].shape[-2:])
    for (_name, a, b), (x, y) in zip(chosen, pairs, strict=True):
        for path, img in ((a, x), (b, y)):
            if tuple(img.shape[-2:]) != ref:
                raise ValueError(
                    f"{path} is {img.shape[-1]}x{img.shape[-2]}, the first example {ref[1]}x{ref[0]}: "
                    "give --size to resize all images"
                )
    return [n for n, _, _ in chosen], pairs


def _load_query(path, size: int | None, ref: tuple[int, int]) -> torch.Tensor:
    from lavin_fast.media import load_image

    q = load_image(path, size)
    if tuple(q.shape[-2:]) != ref:
        raise ValueError(
            f"query {path} is {q.shape[-1]}x{q.shape[-2]} but the examples are {ref[1]}x{ref[0]}: "
            "give --size N to resize every image to N x N"
        )
    return q


def _options(args, batch: int, bf16: bool):
    import torch

    from lavin_fast.flow.pipeline import SamplerOptions

    return SamplerOptions(
        num_points=args.grid_points,
        grid=args.grid,
        guidance=args.guidance,
        seed=args.seed,
        batch=batch,
        dtype=None,  # bf16 runs on bf16 weights (no autocast casts of the weights at every step)
        state_dtype=torch.bfloat16 if args.published else torch.float32,
    )


def _batch_mode(args, device, bf16: bool, batch: int | str, size: int | None) -> int:
    from lavin_fast.flow.batch import dist_env, list_queries
    from lavin_fast.runlock import run_lock

    rank, world, _ = dist_env()
    names, pairs = _context(args, size)
    ref = tuple(pairs[0][0].shape[-2:])
    queries = list_queries(args.query)
    index = {name: i for i, (name, _) in enumerate(queries)}  # noise keys: the same in any shard or resumed run
    mine = queries[rank::world]
    out_dir = pathlib.Path(args.out_dir)
    with run_lock(out_dir, "sample --out-dir"):  # another run writing this folder stops here, naming the first
        return _batch_run(
            args, device, bf16, batch, size, out_dir, names, pairs, ref, queries, index, mine, rank, world
        )


def _batch_run(args, device, bf16, batch, size, out_dir, names, pairs, ref, queries, index, mine, rank, world) -> int:
    import torch
    from tqdm import tqdm

    from lavin_fast.flow.batch import auto_batch, is_done, write_prediction
    from lavin_fast.flow.pipeline import predict

    todo = [(n, q) for n, q in mine if not is_done(out_dir, n, args.output_kind)]
    skipped = len(mine) - len(todo)
    print(
        f"rank {rank}/{world}: {len(mine)} of {len(queries)} queries, {skipped} already done, {len(todo)} to predict "
        f"from {len(pairs)} example pair(s) ({', '.join(names)})",
        file=sys.stderr,
    )
    if not todo:
        return 0
    dit, vae = load_models(args, device, bf16, _calls(args, len(todo), batch if isinstance(batch, int) else 4))
    ctx = [(a[:, None], b[:, None]) for a, b in pairs]
    bar = tqdm(total=len(todo), desc="sample", unit="img", file=sys.stderr, disable=args.no_progress or rank != 0)
    t0 = time.time()
    written = [0]

    def run_chunk(chunk, opts) -> None:
        qs = [_load_query(q, size, ref)[:, None] for _, q in chunk]

        def write(positions, pix) -> None:
            for pos, img in zip(positions, pix, strict=True):
                check_prediction(img, repr(chunk[pos][0]))
                written[0] += 1
                write_prediction(img[:, 0], out_dir, chunk[pos][0], args.output_kind, truncate=args.published)
            bar.update(len(positions))

        predict(dit, vae, ctx, qs, opts, indices=[index[n] for n, _ in chunk], on_batch=write)

    if batch == "auto":
        if device.type == "cuda":  # measure one query's peak, then fill 80% of what is free
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            run_chunk(todo[:1], _options(args, 1, bf16))
            free, _total = torch.cuda.mem_get_info(device)
            batch = auto_batch(torch.cuda.max_memory_allocated(device), base, free)
            todo = todo[1:]
            print(f"--batch auto: {batch} queries per call", file=sys.stderr)
        else:
            batch = 4
    opts = _options(args, batch, bf16)
    step = batch * 8  # queries per context encoding (bounds the images held in memory)
    for start in range(0, len(todo), step):
        run_chunk(todo[start : start + step], opts)
    bar.close()
    print(f"rank {rank}: {written[0]} prediction(s) in {time.time() - t0:.1f} s: {out_dir.resolve()}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    from lavin_fast.flow.batch import list_queries
    from lavin_fast.flow.images import grid, resize
    from lavin_fast.flow.pipeline import predict
    from lavin_fast.media import MediaError, check_pixels, clip_info, read_clip, write_clip
    from lavin_fast.media import save_image as save_png
    from lavin_fast.models.checkpoints import ModelFileError
    from lavin_fast.parallel.context_parallel import attach_for_sampling
    from lavin_fast.parallel.distributed import process_group, rank_device
    from lavin_fast.preflight import check_memory

    try:
        batch = check_args(args)
        size = args.size or (512 if args.published else None)
        check_memory(memory_parts(args, size, batch), "sample", args.max_memory)
        if args.out_dir:  # batch mode: under torchrun each rank takes its share of the queries
            device = rank_device(args.device)  # cuda:LOCAL_RANK, current before any kernel (Triton launches there)
            bf16 = args.published or args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
            return _batch_mode(args, device, bf16, batch, size)
        # torchrun: this rank's device, then a process group; the ranks split every sequence (context parallel)
        with process_group(args.device) as ctx:
            device = ctx.device
            bf16 = args.published or args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
            if batch == "auto":
                batch = 4
            opts = _options(args, batch, bf16)
            if args.task_dir:
                _names, pairs = _context(args, size)
                ref = tuple(pairs[0][0].shape[-2:])
                queries = [_load_query(q, size, ref) for _, q in list_queries(args.query)]
                dit, vae = load_models(args, device, bf16, _calls(args, len(queries), batch))
                attach_for_sampling(dit, ctx, args.context_parallel_mode)
                t0 = time.time()
                pred = predict(
                    dit, vae, [(a[:, None], b[:, None]) for a, b in pairs], [q[:, None] for q in queries], opts
                )
                if not ctx.is_main:  # every rank holds the same prediction; rank 0 writes it
                    return 0
                for (name, _), p in zip(list_queries(args.query), pred, strict=True):
                    check_prediction(p, repr(name))
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
            n = args.clip_frames
            if (n - 1) % 4:
                raise ValueError(f"--clip-frames {n}: the ST-VAE needs 1 + 4k frames per item (5, 9, ...)")
            total, height, width = clip_info(args.video)
            if total < 3 * n:
                raise ValueError(
                    f"--video has {total} frames; frame prediction needs at least 3 x --clip-frames = "
                    f"{3 * n} (an example input and target, then the query)"
                )
            check_pixels(width, height, f"--video {args.video!r}")
            # frame-bounded: the example's 2n frames and the query's last n, never the whole clip
            clip = torch.cat([read_clip(args.video, 0, 2 * n), read_clip(args.video, total - n, n)], dim=1)
            if size:
                clip = torch.stack([resize(clip[:, i], size) for i in range(clip.shape[1])], dim=1)
            example = (clip[:, :n], clip[:, n : 2 * n])
            query = clip[:, 2 * n :]
            dit, vae = load_models(args, device, bf16)
            attach_for_sampling(dit, ctx, args.context_parallel_mode)
            t0 = time.time()
            pred = predict(dit, vae, [example], [query], opts)[0]
            if not ctx.is_main:
                return 0
            check_prediction(pred, f"--video {args.video!r}")
            out = write_clip(torch.cat([clip, pred], dim=1), args.out)
            print(
                f"predicted {pred.shape[1]} frames in {time.time() - t0:.1f} s: {out.resolve()} "
                f"(the example's {2 * n} frames, the query's {n}, then the prediction)"
            )
            return 0
    except (ValueError, FileNotFoundError, ModelFileError, MediaError) as exc:
        print(f"lavin-fast sample: error: {exc}", file=sys.stderr)
        return 2
