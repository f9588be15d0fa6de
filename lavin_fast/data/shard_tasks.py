"""Every task a shard folder holds, streamed: the computed tasks from its clean images, the annotated tasks from
its stored (input, target) pairs, frame prediction from its clips (lavin_fast.data.shards' layout).

One ShardReader per group (images, each annotated task, clips) reads this rank's shards in shard-and-buffer
shuffled order; the planner (incontext/planner.py) decides per batch index the layout (image or video sequences,
the same on every data-parallel rank), the task of each sequence by the mixture, and the crop and flip of each
pair; each pair then takes the next sample of its task's reader. A batch is a function of the readers' states
and its index, so state_dict() (the readers' states and the next index) resumes the stream exactly.

Pixels: PIL (images) and OpenCV (clips) with backend "torch"; DALI's external-source decoders with backend
"dali" (`device="mixed"` nvJPEG / NVDEC decoding on the rank's GPU, `device_id`, or the CPU operators).
A sample whose header does not decode or states more pixels than `max_image_pixels` (or a clip shorter than
the window) is skipped with a warning
and listed in `skipped`; the next sample of the same reader takes its place (the same on a resume).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image

from lavin_fast.data.incontext.config import InContextBatch, LoaderConfig
from lavin_fast.data.incontext.planner import Planner, _rng, _task_key, check_stream_state, crop_window, stream_state
from lavin_fast.data.incontext.sources import TaskPool
from lavin_fast.data.manifest import FRAME_PREDICTION, VIDEO_TASKS
from lavin_fast.data.mixture import loader_task_weights
from lavin_fast.data.shards import CLIPS, IMAGES, ShardReader, ShardSample, load_shard_index, rank_shards
from lavin_fast.data.tasks import COMPUTED_TASKS, build_pairs
from lavin_fast.media import check_pixels, open_image, read_clip_frames

log = logging.getLogger(__name__)
_IMAGE_SUFFIXES = ("jpg", "png", "bmp", "webp", "tif", "gif")


def shard_tasks(index: dict, cfg: LoaderConfig) -> dict[str, TaskPool]:
    """The tasks a shard index provides, as pools that carry the sequence layout only (the items are streamed)."""
    groups = index["groups"]
    k, m = cfg.video_frames, cfg.predict_frames
    out: dict[str, TaskPool] = {}
    if groups.get(IMAGES):
        for t in COMPUTED_TASKS:
            out[t] = TaskPool(t, "stream", range(1), 1, 1, cfg.n_pairs)
    for g in sorted(groups):
        if g in (IMAGES, CLIPS):
            continue
        video = g in VIDEO_TASKS or index.get("pair_frames", {}).get(g, 1) > 1
        out[g] = TaskPool(g, "stream", range(1), k if video else 1, k if video else 1,
                          cfg.video_n_pairs if video else cfg.n_pairs)  # fmt: skip
    if groups.get(CLIPS):
        out[FRAME_PREDICTION] = TaskPool(FRAME_PREDICTION, "stream", range(1), k, m, cfg.video_n_pairs)
    return out


def task_weights(cfg: LoaderConfig, available: dict[str, TaskPool], root) -> dict[str, float]:
    """The weighted tasks (cfg.tasks: None = all the folder holds; cfg.mixture "paper": Table 2's counts)."""
    return loader_task_weights(cfg.tasks, cfg.mixture, available, f"the shards of {root}")


def group_of(task: str) -> str:
    return IMAGES if task in COMPUTED_TASKS else CLIPS if task == FRAME_PREDICTION else task


class _Torch:
    """PIL / OpenCV decoding of sample bytes: crop window (relative), bicubic antialiased resize, flip."""

    def __init__(self, cfg: LoaderConfig):
        self.size, self.max_pixels = cfg.size(), cfg.max_image_pixels

    def _resize(self, img: Image.Image, win, flip) -> torch.Tensor:
        y0, x0, y1, x1 = win
        w, h = img.size
        a = np.array(img.resize((self.size[1], self.size[0]), Image.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h)))
        if flip:
            a = np.ascontiguousarray(a[:, ::-1])
        return torch.from_numpy(a).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def frames(self, reqs: list[tuple[bytes, tuple, bool]]) -> torch.Tensor:
        return torch.stack(
            [self._resize(open_image(d, self.max_pixels, name="shard member"), w, f) for d, w, f in reqs]
        )

    def clips(self, reqs: list[tuple[bytes, str, int, int, tuple, bool]]) -> torch.Tensor:
        out = []
        for data, ext, start, count, win, flip in reqs:
            with tempfile.TemporaryDirectory(prefix="lavin_fast_clip_") as tmp:  # OpenCV reads files only
                path = os.path.join(tmp, f"clip.{ext}")
                with open(path, "wb") as f:
                    f.write(data)
                frames = read_clip_frames(path, start, count, max_pixels=self.max_pixels)
            out.append(torch.stack([self._resize(Image.fromarray(fr), win, flip) for fr in frames], 1))
        return torch.stack(out)


class _Dali:
    """DALI's external-source decoders (pipelines.py) fed with the samples' bytes; built on first use, on
    `device` ("gpu": mixed decoding on `cfg.device_id`, "cpu")."""

    def __init__(self, cfg: LoaderConfig, pools: dict[str, TaskPool], device: str):
        self.cfg, self.device, self.pools = cfg, device, pools
        self._frames = self._clips = None

    def _max_frames(self) -> int:
        per_seq = [
            (p.n_pairs + 1) * (p.in_frames + p.out_frames) for t, p in self.pools.items() if t != FRAME_PREDICTION
        ]
        return self.cfg.batch_size * max(per_seq, default=1)

    def frames(self, reqs) -> torch.Tensor:
        from lavin_fast.data.pipelines import DaliFrameDecoder

        c = self.cfg
        if self._frames is None:
            self._frames = DaliFrameDecoder(
                c.size(), self._max_frames(), self.device, c.num_threads, c.seed, c.device_id
            )
        return self._frames(
            [d for d, _, _ in reqs], np.array([w for _, w, _ in reqs], np.float32), [f for *_, f in reqs]
        )

    def clips(self, reqs) -> torch.Tensor:
        from lavin_fast.data.pipelines import DaliClipDecoder

        c = self.cfg
        if self._clips is None:
            n = c.batch_size * (c.video_n_pairs + 1)
            self._clips = DaliClipDecoder(c.size(), reqs[0][3], n, self.device, c.num_threads, c.seed, c.device_id)
        return self._clips(
            [r[0] for r in reqs], [r[2] for r in reqs], np.array([r[4] for r in reqs], np.float32), [r[5] for r in reqs]
        )


class ShardTaskLoader:
    """An endless, resumable stream of InContextBatch over every task of a shard folder (computed, annotated,
    frame prediction); the loader interface of InContextLoader (next, state_dict, load_state_dict, close,
    weights, skipped)."""

    def __init__(self, root, cfg: LoaderConfig, backend: str = "torch", buffer: int = 256):
        cfg.validate()
        self.root, self.cfg, self.backend = os.fspath(root), cfg, backend
        self.index = load_shard_index(self.root)
        available = shard_tasks(self.index, cfg)
        self.weights = task_weights(cfg, available, self.root)
        self.pools = {t: available[t] for t in self.weights}
        self.planner = Planner(self.pools, self.weights, cfg)
        mine = set(rank_shards(self.index, cfg.shard_id, cfg.num_shards))
        self.readers: dict[str, ShardReader] = {}
        for g in sorted({group_of(t) for t in self.pools}):
            has = any(self.index["shards"][n]["groups"].get(g) for n in mine)
            if has:
                r = ShardReader(
                    self.root, rank=cfg.shard_id, world=cfg.num_shards, seed=cfg.seed, buffer=buffer, groups=[g]
                )
            else:  # a small group in other ranks' shards only: read it from all shards (a seed of this rank's own)
                warnings.warn(f"shards: group {g!r} is not in the shards of rank {cfg.shard_id} of {cfg.num_shards}; "
                              "this rank reads it from every shard", RuntimeWarning, stacklevel=2)  # fmt: skip
                seed = cfg.seed * 1_000_003 + cfg.shard_id + 1
                r = ShardReader(self.root, rank=0, world=1, seed=seed, buffer=buffer, groups=[g])
            self.readers[g] = r
        if backend == "dali":
            device = {"auto": "gpu" if torch.cuda.is_available() else "cpu", "cuda": "gpu"}.get(cfg.device, cfg.device)
            self.decoder = _Dali(cfg, self.pools, device)
        elif backend == "torch":
            self.decoder = _Torch(cfg)
        else:
            raise ValueError(f"backend: expected 'dali' or 'torch', got {backend!r}")
        self.skipped: dict[str, str] = {}
        self._next = 0

    def _skip(self, s: ShardSample, why: str) -> None:
        if s.key not in self.skipped:
            warnings.warn(f"skipping shard sample {s.key}: {why}", RuntimeWarning, stacklevel=4)
            self.skipped[s.key] = why

    def _take(self, task: str) -> tuple[ShardSample, tuple[int, int], int]:
        """The next usable sample of `task`'s reader, its (height, width) and frame count (clips, frame lists)."""
        pool, reader = self.pools[task], self.readers[group_of(task)]
        for _ in range(1024):
            s = next(reader)
            try:
                if s.group == CLIPS:
                    n, hw = int(s.meta["frames"]), (int(s.meta["height"]), int(s.meta["width"]))
                    check_pixels(hw[1], hw[0], s.key, self.cfg.max_image_pixels)
                    if n < pool.in_frames + pool.out_frames:
                        raise ValueError(f"{n} frames, fewer than the window of {pool.in_frames + pool.out_frames}")
                    return s, hw, n
                first = sorted(k for k in s.members if k.startswith("input.") or k.split(".")[-1] in _IMAGE_SUFFIXES)
                n = sum(k.startswith("input.") for k in first) or 1
                if n < pool.in_frames:
                    raise ValueError(f"{n} frames, fewer than video_frames={pool.in_frames}")
                with Image.open(io.BytesIO(s.members[first[0]])) as im:
                    check_pixels(im.width, im.height, s.key, self.cfg.max_image_pixels)  # before anything decodes
                    return s, (im.height, im.width), n
            except Exception as exc:  # an unusable sample: the next one of the same reader
                self._skip(s, f"{type(exc).__name__}: {exc}")
        raise ValueError(f"task {task!r}: no usable sample in 1024 tries ({len(self.skipped)} skipped); check the data")

    def batch(self, index: int) -> InContextBatch:
        """The batch at `index`, taking its samples from the readers (call with consecutive indices)."""
        cfg = self.cfg
        plans = self.planner.plan(index)
        frame_reqs, clip_reqs, slots = [], [], []
        for i, plan in enumerate(plans):
            pool, row = self.pools[plan.task], []
            for j, pair in enumerate(plan.pairs):
                s, (h, w), n = self._take(plan.task)
                win = crop_window(h, w, pair.window, cfg)
                r = _rng(cfg.seed, cfg.shard_id, index, i * 1024 + j, 0xC11)
                if s.group == CLIPS:
                    ext = next(iter(s.members))
                    span = pool.in_frames + pool.out_frames
                    row.append(("c", len(clip_reqs)))
                    clip_reqs.append((s.members[ext], ext, int(r.integers(0, n - span + 1)), span, win, pair.flip))
                elif s.group == IMAGES:
                    row.append(("f", len(frame_reqs), 1))
                    data = next(v for k, v in s.members.items() if k.split(".")[-1] in _IMAGE_SUFFIXES)
                    frame_reqs.append((data, win, pair.flip))
                else:
                    ins = sorted(k for k in s.members if k.startswith("input."))
                    tgts = sorted(k for k in s.members if k.startswith("target."))
                    st = int(r.integers(0, n - pool.in_frames + 1)) if n > pool.in_frames else 0
                    keys = ins[st : st + pool.in_frames] + tgts[st : st + pool.in_frames]
                    row.append(("f", len(frame_reqs), len(keys)))
                    frame_reqs += [(s.members[k], win, pair.flip) for k in keys]
            slots.append(row)
        frames = self.decoder.frames(frame_reqs).cpu() if frame_reqs else None
        clips = self.decoder.clips(clip_reqs).cpu() if clip_reqs else None
        made = {}
        for task in sorted({p.task for p in plans if p.task in COMPUTED_TASKS}):
            idx = [s[1] for p, row in zip(plans, slots, strict=True) if p.task == task for s in row]
            gen = torch.Generator().manual_seed(
                int(_rng(cfg.seed, cfg.shard_id, index, _task_key(task)).integers(2**62))
            )
            a, b = build_pairs(task, frames[idx], gen)
            made.update({f: (a[n][:, None], b[n][:, None]) for n, f in enumerate(idx)})
        contexts, targets = [], []
        for plan, row in zip(plans, slots, strict=True):
            pool, items = self.pools[plan.task], []
            for s in row:
                if s[0] == "c":
                    c = clips[s[1]]
                    items.append((c[:, : pool.in_frames], c[:, pool.in_frames :]))
                elif plan.task in COMPUTED_TASKS:
                    items.append(made[s[1]])
                else:
                    f, k = frames[s[1] : s[1] + s[2]], s[2] // 2
                    items.append((f[:k].permute(1, 0, 2, 3), f[k:].permute(1, 0, 2, 3)))
            contexts.append(torch.cat([t for a, b in items[:-1] for t in (a, b)] + [items[-1][0]], 1))
            targets.append(items[-1][1])
        ctx_seg, tgt_seg = self.pools[plans[0].task].signature()
        task = [p.task for p in plans]
        return InContextBatch(torch.stack(contexts), torch.stack(targets), task, ctx_seg, tgt_seg, index)

    def __iter__(self):
        return self

    def __next__(self) -> InContextBatch:
        b = self.batch(self._next)
        self._next += 1
        return b

    def state_dict(self) -> dict:
        """The next batch index (with what identifies the stream) and each group reader's state."""
        readers = {g: r.state_dict() for g, r in self.readers.items()}
        return {**stream_state(self._next, self.cfg, self.weights), "readers": readers, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        nxt = check_stream_state(state, self.state_dict(), "ShardTaskLoader")
        if set(state.get("readers", {})) != set(self.readers):
            raise ValueError(
                f"state: readers of groups {sorted(state.get('readers', {}))}, expected {sorted(self.readers)}"
            )
        for g, r in self.readers.items():
            r.load_state_dict(state["readers"][g])
        self.skipped = dict(state.get("skipped", {}))
        self._next = nxt

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
