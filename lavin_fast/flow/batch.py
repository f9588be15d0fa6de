"""Batch sampling to prediction files: which queries, which of them are still to do (resume), which this process
does (torchrun shards), and how a prediction is written (PNG, plus .npy for depth and normals).

Output names: a query `NAME.png` (or `NAME_input.png`, the make-set layout) -> `OUT/NAME.png`, which
`lavin-fast eval score --pred OUT --gt SET` matches with `SET/NAME_target.png` by name.
"""

from __future__ import annotations

import os
import pathlib
import random

import numpy as np
import torch

from lavin_fast.dense_maps import image_to_depth, image_to_normals
from lavin_fast.media import IMAGE_SUFFIXES, save_image, to_uint8
from lavin_fast.textfiles import read_text

OUTPUT_KINDS = ("image", "depth", "normal")
MANIFEST_SUFFIXES = (".txt", ".lst")


def _name(path: pathlib.Path) -> str:
    stem = path.stem
    return stem[: -len("_input")] if stem.endswith("_input") and len(stem) > len("_input") else stem


def list_queries(paths: list[str]) -> list[tuple[str, pathlib.Path]]:
    """(name, path) of every query: image files; folders (only their *_input images when they hold any, i.e. a
    task folder); manifests (.txt/.lst: one image path per line, relative to the manifest; # comments)."""
    out: list[tuple[str, pathlib.Path]] = []
    for q in paths:
        p = pathlib.Path(q)
        if p.is_dir():
            found = sorted(x for x in p.iterdir() if x.is_file() and x.suffix.lower() in IMAGE_SUFFIXES)
            inputs = [x for x in found if x.stem.endswith("_input")]
            found = inputs or found
            if not found:
                raise FileNotFoundError(f"query folder {str(p)!r} holds no images")
            out += [(_name(x), x) for x in found]
        elif p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            for n, line in enumerate(read_text(p, "query list").splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = (p.parent / line) if not os.path.isabs(line) else pathlib.Path(line)
                if not f.is_file():
                    raise FileNotFoundError(f"query manifest {p}, line {n}: {str(f)!r} does not exist")
                out.append((_name(f), f))
        elif not p.is_file():
            raise FileNotFoundError(f"query image {str(p)!r} does not exist")
        else:
            out.append((_name(p), p))
    seen: dict[str, pathlib.Path] = {}
    for name, f in out:
        if name in seen and seen[name] != f:
            raise ValueError(f"two queries would write the same prediction {name!r}: {seen[name]} and {f}")
        seen[name] = f
    return out


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) in a plain run."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, int(os.environ.get("LOCAL_RANK", 0))


def output_paths(out_dir: pathlib.Path, name: str, kind: str) -> list[pathlib.Path]:
    """The files one prediction writes: NAME.png, and NAME.npy for depth and normals."""
    paths = [out_dir / f"{name}.png"]
    if kind in ("depth", "normal"):
        paths.append(out_dir / f"{name}.npy")
    return paths


def is_done(out_dir: pathlib.Path, name: str, kind: str) -> bool:
    """Whether every file of the query's prediction exists; a temporary file an interrupted write left behind
    (only this query's: other ranks may be writing theirs) is removed."""
    for p in output_paths(out_dir, name, kind):
        p.with_name(p.stem + ".tmp" + p.suffix).unlink(missing_ok=True)
    return all(p.is_file() and p.stat().st_size > 0 for p in output_paths(out_dir, name, kind))


def to_uint8_truncated(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> [H, W, 3] uint8 by truncation, as the published sampler writes
    ((x + 1) * 127.5 cast to uint8); `media.to_uint8` rounds instead."""
    a = ((img.detach().float().clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return a.permute(1, 2, 0).cpu().numpy()


def write_prediction(pred: torch.Tensor, out_dir: pathlib.Path, name: str, kind: str, truncate: bool = False):
    """Write one prediction [3, H, W] in [-1, 1]; each file via a temporary name and a rename, so an
    interrupted run never leaves a file that a resumed run would take as done."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind: expected one of {OUTPUT_KINDS}, got {kind!r}")
    if not bool(torch.isfinite(pred).all()):
        raise ValueError(
            f"the prediction for {name!r} holds NaN/Inf values (broken weights, or bf16 overflow: try --dtype fp32); "
            "nothing was written for it"
        )
    paths = output_paths(out_dir, name, kind)
    if kind == "depth":  # the channel mean of the grey encoding (lavin_fast.dense_maps), [H, W] float32 in [0, 1]
        arr = image_to_depth(pred, source=name, require_grey=False)[0].numpy().astype(np.float32)
    elif kind == "normal":  # unit vectors [H, W, 3]
        arr = image_to_normals(pred).permute(1, 2, 0).numpy().astype(np.float32)
    if kind != "image":
        tmp = paths[1].with_name(paths[1].stem + ".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, paths[1])
    tmp = paths[0].with_name(paths[0].stem + ".tmp.png")
    save_image(to_uint8_truncated(pred) if truncate else to_uint8(pred), tmp)
    os.replace(tmp, paths[0])
    return paths


def published_context(pairs: list, num_pairs: int, seed: int) -> list:
    """The published sampler's context draw: `random.choices(pairs, k=num_pairs)` (with replacement) after
    `random.seed(seed)`, here from a private `random.Random(seed)` (the same sequence, no global state)."""
    if not pairs:
        raise ValueError("pairs: the task folder has no example pairs to draw from")
    return random.Random(seed).choices(pairs, k=num_pairs)


def auto_batch(peak_bytes_one: int, base_bytes: int, free_bytes: int, cap: int = 64) -> int:
    """Queries per call that fit: 80% of the free memory over one query's measured peak above the base."""
    per_query = max(1, peak_bytes_one - base_bytes)
    return int(max(1, min(cap, (0.8 * free_bytes) // per_query)))
