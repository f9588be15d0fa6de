"""Sources -> task pools: scan "demo", a directory or a manifest into images, annotated pairs and clips, then
give each task (weighted, this shard's part) the items it draws from."""

from __future__ import annotations

import math
import os
import pathlib
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from lavin_fast.data.demo_data import demo_clips, demo_image_paths, write_demo_clips
from lavin_fast.data.incontext.config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, LoaderConfig
from lavin_fast.data.manifest import FRAME_PREDICTION, IMAGE_TASKS, VIDEO_TASKS, load_manifest
from lavin_fast.data.mixture import paper_task_weights
from lavin_fast.data.tasks import COMPUTED_TASKS
from lavin_fast.media import MediaError, clip_info

_MEM = "mem:"  # prefix of in-memory references
ALL_TASKS: tuple[str, ...] = tuple(COMPUTED_TASKS) + IMAGE_TASKS + (FRAME_PREDICTION,) + VIDEO_TASKS
"""every task a source can provide"""


@dataclass
class _Clip:
    ref: str  # file path or mem:clip:<i>
    frames: int
    height: int
    width: int


@dataclass
class TaskPool:
    """What one task samples from (this shard's part)."""

    name: str
    kind: str  # "computed" (items: image refs), "pairs" (items: (input refs, target refs)), "clip" (items: _Clip)
    items: list
    in_frames: int = 1
    out_frames: int = 1
    n_pairs: int = 4

    def signature(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ctx = (self.in_frames, self.out_frames) * self.n_pairs + (self.in_frames,)
        return ctx, (self.out_frames,)


@dataclass
class _Source:
    images: list[str] = field(default_factory=list)
    pairs: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = field(default_factory=dict)
    clips: list[_Clip] = field(default_factory=list)
    memory_images: dict[str, object] = field(default_factory=dict)  # ref -> PIL image
    memory_clips: dict[str, np.ndarray] = field(default_factory=dict)  # ref -> [T, H, W, 3] uint8
    startup_skipped: dict[str, str] = field(default_factory=dict)


def _warn_skip(ref: str, reason: str) -> None:
    warnings.warn(f"skipping unreadable file {ref}: {reason}", RuntimeWarning, stacklevel=3)


def _probe_clip_file(path: str) -> _Clip | str:
    """Clip metadata from the file's header, or the reason it cannot be read."""
    try:
        n, h, w = clip_info(path)
    except MediaError as exc:
        return str(exc)
    return _Clip(path, n, h, w)


def _scan_dir(root: pathlib.Path) -> tuple[list[str], list[str]]:
    images, videos = [], []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            ext = p.suffix.lower()
            if ext in IMAGE_EXTENSIONS:
                images.append(str(p))
            elif ext in VIDEO_EXTENSIONS:
                videos.append(str(p))
    return images, videos


def _load_sources(sources, cfg: LoaderConfig, backend: str) -> _Source:
    """One source, or several merged (a list of "demo", manifests and directories): their images, annotated pairs
    and clips pooled per task, in the order given."""
    if isinstance(sources, (str, os.PathLike)):
        return _load_source(sources, cfg, backend)
    sources = list(sources)
    if not sources:
        raise ValueError("source: expected 'demo', a manifest, a directory or a list of them, got an empty list")
    merged = _Source()
    for one in sources:
        src = _load_source(one, cfg, backend)
        merged.images += src.images
        for task, records in src.pairs.items():
            merged.pairs.setdefault(task, []).extend(records)
        merged.clips += src.clips
        merged.memory_images.update(src.memory_images)
        merged.memory_clips.update(src.memory_clips)
        merged.startup_skipped.update(src.startup_skipped)
    return merged


def _load_source(source: str | os.PathLike, cfg: LoaderConfig, backend: str) -> _Source:
    src = _Source()
    video_paths: list[str] = []
    if isinstance(source, str) and source == "demo":
        paths = [str(p) for p in demo_image_paths()]
        if backend == "torch":
            short = cfg.memory_max_side or 2 * max(cfg.size())
            for i, p in enumerate(paths):
                img = Image.open(p).convert("RGB")
                s = short / min(img.size)
                if s < 1:
                    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
                ref = f"{_MEM}img:{i}:{pathlib.Path(p).name}"
                src.memory_images[ref] = img
                src.images.append(ref)
            for i, clip in enumerate(demo_clips()):
                ref = f"{_MEM}clip:{i}"
                src.memory_clips[ref] = clip
                src.clips.append(_Clip(ref, clip.shape[0], clip.shape[1], clip.shape[2]))
        else:
            src.images = paths
            video_paths = [
                str(p) for p in write_demo_clips(cfg.cache_dir and pathlib.Path(cfg.cache_dir) / "demo_clips")
            ]
    else:
        path = pathlib.Path(source)
        if path.is_dir():
            src.images, video_paths = _scan_dir(path)
            if not src.images and not video_paths:
                raise FileNotFoundError(f"source: directory {path} holds no image ({IMAGE_EXTENSIONS}) or video files")
        elif path.is_file():
            man = load_manifest(path, cfg.extra_tasks)
            src.images = list(man.images)
            video_paths = list(man.videos)
            for rec in man.pairs:
                src.pairs.setdefault(rec.task, []).append((rec.input, rec.target))
        else:
            raise FileNotFoundError(
                f"source: {str(source)!r} is neither 'demo', an existing directory, nor a manifest file"
            )
    for p in video_paths:
        info = _probe_clip_file(p)
        if isinstance(info, str):
            _warn_skip(p, info)
            src.startup_skipped[p] = info
        else:
            src.clips.append(info)
    return src


def _build_pools(src: _Source, cfg: LoaderConfig) -> tuple[dict[str, TaskPool], dict[str, float]]:
    n_img, n_vid = cfg.n_pairs, cfg.video_n_pairs
    k, m = cfg.video_frames, cfg.predict_frames
    available: dict[str, TaskPool] = {}
    if src.images:
        for name in COMPUTED_TASKS:
            available[name] = TaskPool(name, "computed", src.images, 1, 1, n_img)
    for name, records in src.pairs.items():
        frames = len(records[0][0])
        video = name in VIDEO_TASKS or frames > 1
        if video:
            short = [r for r in records if len(r[0]) < k]
            if short:
                raise ValueError(
                    f"task {name!r}: {len(short)} manifest entries have fewer than video_frames={k} frames "
                    f"(e.g. {short[0][0][0]}); lower video_frames or drop them"
                )
            pool = TaskPool(name, "pairs", records, k, k, n_vid)
        else:
            if any(len(r[0]) != 1 for r in records):
                raise ValueError(f"task {name!r}: mixes single images and frame lists; use one kind per task")
            pool = TaskPool(name, "pairs", records, 1, 1, n_img)
        available[name] = pool  # user-rendered pairs of a computed task replace the computed ones
    if src.clips:
        long_enough = [c for c in src.clips if c.frames >= k + m]
        for c in src.clips:
            if c.frames < k + m:
                warnings.warn(
                    f"clip {c.ref} has {c.frames} frames, fewer than video_frames + predict_frames = {k + m}: not used",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if long_enough:
            available[FRAME_PREDICTION] = TaskPool(FRAME_PREDICTION, "clip", long_enough, k, m, n_vid)
    if not available:
        raise ValueError("source: provides no usable task (no images, annotated pairs or long-enough clips)")

    if cfg.tasks is None:
        weights = {name: 1.0 for name in available}
    else:
        weights = {str(t): float(w) for t, w in dict(cfg.tasks).items()}
    unknown = [t for t in weights if t not in available]
    if cfg.mixture == "paper" and not unknown:  # the paper's sample counts for the tasks asked for
        weights = paper_task_weights(weights)
    if unknown:
        raise ValueError(f"tasks: {unknown} not provided by this source; available: {sorted(available)}")
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"tasks: weights must be finite, >= 0 and not all 0, got {weights}")
    pools = {}
    for name, w in weights.items():
        if w == 0:
            continue
        pool = available[name]
        if pool.n_pairs < 1:
            raise ValueError(f"task {name!r}: needs at least one example pair (video_n_pairs >= 1)")
        items = pool.items if cfg.elastic else pool.items[cfg.shard_id :: cfg.num_shards]  # elastic: whole pools
        if not items:
            warnings.warn(
                f"task {name!r}: {len(pool.items)} items for {cfg.num_shards} shards; shard {cfg.shard_id} reads them all",
                RuntimeWarning,
                stacklevel=3,
            )
            items = list(pool.items)
        pools[name] = replace(pool, items=list(items))
    return pools, {n: w for n, w in weights.items() if w > 0}
