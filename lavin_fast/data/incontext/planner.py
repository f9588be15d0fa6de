"""The planner: every random decision of a batch (tasks, examples, frame windows, crops, flips) as a pure
function of (seed, shard, batch index), so batches are reproducible and resumable with any backend."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lavin_fast.data.incontext.config import LoaderConfig
from lavin_fast.data.incontext.sources import TaskPool


@dataclass
class PairPlan:
    item: int
    """index into the task pool's items"""
    start: int
    """first frame of the window (clips and frame lists)"""
    window: tuple[float, float, float, float]
    """uniforms of the random resized crop (area, log aspect, x, y)"""
    flip: bool


@dataclass
class SamplePlan:
    task: str
    pairs: list[PairPlan]
    """N example pairs then the query pair"""


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key])))


def _task_key(name: str) -> int:
    return zlib.crc32(name.encode())


class Planner:
    """Draws the tasks, examples, windows, crops and flips of batch `index`.

    Every draw is O(1) in the pool sizes: a task's items are drawn by index (`pool.items` only needs len() and
    indexing: a list, a numpy array or a range), distinct examples of a sequence by rejection (a handful of draws
    from pools far larger than a sequence), tasks by their weights within the batch's layout group.

    The layout (which group of tasks with one sequence signature: images or videos) of batch `index` is keyed by
    (seed, index) alone, not by the shard: every data-parallel rank takes the same layout at the same step, so no
    rank waits on another's video step. Tasks, examples and crops are keyed by the shard too."""

    def __init__(self, pools: dict[str, TaskPool], weights: dict[str, float], cfg: LoaderConfig):
        self.pools, self.cfg = pools, cfg
        groups: dict[tuple, list[str]] = {}
        for name in sorted(pools):
            groups.setdefault(pools[name].signature(), []).append(name)
        self.groups = []
        for sig, names in sorted(groups.items()):
            w = np.array([weights[n] for n in names], dtype=np.float64)
            self.groups.append((sig, names, w, np.cumsum(w / w.sum())))
        gw = np.array([g[2].sum() for g in self.groups])
        self.group_weights = gw
        self._group_cdf = np.cumsum(gw / gw.sum())

    def _window_len(self, pool: TaskPool) -> int:
        return pool.in_frames + pool.out_frames if pool.kind == "clip" else pool.in_frames

    def _draw_item(self, rng: np.random.Generator, pool: TaskPool, exclude: set[int]) -> tuple[int, int]:
        n = len(pool.items)
        item = int(rng.integers(n))
        if len(exclude) < n:  # distinct within a sequence: redraw (rarely more than once: pools >> sequences)
            while item in exclude:
                item = int(rng.integers(n))
        start = 0
        if pool.kind == "clip":
            start = int(rng.integers(0, pool.items[item].frames - self._window_len(pool) + 1))
        elif pool.kind == "pairs" and len(pool.items[item][0]) > 1:
            start = int(rng.integers(0, len(pool.items[item][0]) - pool.in_frames + 1))
        return item, start

    def layout(self, index: int) -> int:
        """The layout group of batch `index`: the same on every rank (keyed by seed and index only)."""
        u = _rng(self.cfg.seed, index, 0x1A70).random()
        return min(int(np.searchsorted(self._group_cdf, u, side="right")), len(self.groups) - 1)

    def plan(self, index: int) -> list[SamplePlan]:
        cfg = self.cfg
        rng = _rng(cfg.seed, cfg.shard_id, index, 0x5EED)
        _, names, _, cdf = self.groups[self.layout(index)]
        samples = []
        for u in rng.random(cfg.batch_size):
            task = names[min(int(np.searchsorted(cdf, u, side="right")), len(names) - 1)]
            pool = self.pools[task]
            used: set[int] = set()
            pairs = []
            for _ in range(pool.n_pairs + 1):
                item, start = self._draw_item(rng, pool, used)
                used.add(item)
                u4 = tuple(float(x) for x in rng.random(4))
                flip = bool(rng.random() < cfg.flip_prob) if cfg.augment else False
                pairs.append(PairPlan(item, start, u4, flip))
            samples.append(SamplePlan(task, pairs))
        return samples

    def replacement(self, index: int, sample: int, pair: int, attempt: int, plan: SamplePlan) -> PairPlan:
        """The `attempt`-th substitute for a pair whose files are unreadable (same crop and flip)."""
        pool = self.pools[plan.task]
        rng = _rng(self.cfg.seed, self.cfg.shard_id, index, sample * 1024 + pair, attempt + 1, 0xBAD)
        item, start = self._draw_item(rng, pool, set())
        old = plan.pairs[pair]
        return PairPlan(item, start, old.window, old.flip)


def crop_window(height: int, width: int, u: Sequence[float], cfg: LoaderConfig) -> tuple[float, float, float, float]:
    """Relative (y0, x0, y1, x1) of the random resized crop for uniforms `u`; the whole image
    without augmentation."""
    if not cfg.augment:
        return (0.0, 0.0, 1.0, 1.0)
    return random_resized_crop(height, width, u, cfg.crop_scale, cfg.crop_ratio)


def random_resized_crop(
    height: int, width: int, u: Sequence[float], scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float, float, float]:
    """The random resized crop (torchvision's and DALI's `random_resized_crop` parameters) for four uniforms
    `u` in [0, 1): area fraction in `scale`, log-uniform aspect (width / height) in `ratio`, then position.
    Returns the relative window (y0, x0, y1, x1). The one implementation: the loader's planner and the
    PIL baseline of `lavin-fast data` benchmarks call it (the DALI pipelines use DALI's operator)."""
    area = (scale[0] + u[0] * (scale[1] - scale[0])) * height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    ratio = math.exp(lo + u[1] * (hi - lo))
    cw = min(float(width), math.sqrt(area * ratio))
    ch = min(float(height), math.sqrt(area / ratio))
    x0, y0 = u[2] * (width - cw), u[3] * (height - ch)
    return (y0 / height, x0 / width, (y0 + ch) / height, (x0 + cw) / width)


# The position of a planned stream (both loaders: pixels and cached latents). Batch i is a pure function of
# (seed, shard, batch size, task weights, i), so the next index is the whole state, with what identifies it.
_STREAM_KEYS = ("seed", "shard_id", "num_shards", "batch_size", "tasks")


def stream_state(next_index: int, cfg: LoaderConfig, weights: dict[str, float]) -> dict:
    """What a loader's state_dict() holds: the next batch's index and what identifies its stream."""
    return {
        "version": 1,
        "next_index": next_index,
        "seed": cfg.seed,
        "shard_id": cfg.shard_id,
        "num_shards": cfg.num_shards,
        "batch_size": cfg.batch_size,
        "tasks": {k: float(v) for k, v in sorted(weights.items())},
    }


def check_stream_state(state: object, mine: dict, owner: str) -> int:
    """The saved next index, after checking that `state` (from `owner`.state_dict()) describes the same stream as
    `mine`; ValueError naming the first field that differs."""
    if not isinstance(state, dict) or state.get("version") != 1 or "next_index" not in state:
        raise ValueError(f"state: expected a dict from {owner}.state_dict() (version 1), got {state!r:.200}")
    for key in _STREAM_KEYS:
        if state.get(key) != mine[key]:
            raise ValueError(
                f"state: saved {key}={state.get(key)!r} differs from this loader's {mine[key]!r}; "
                "the batches would differ"
            )
    return int(state["next_index"])
