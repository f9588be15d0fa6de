"""The planner: every random decision of a batch (tasks, examples, frame windows, crops, flips) as a pure
function of (seed, shard, batch index), so batches are reproducible and resumable with any backend."""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lavin_fast.data.incontext.config import LoaderConfig
from lavin_fast.data.incontext.sources import TaskPool

_log = logging.getLogger(__name__)


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
    key: int | None = None
    """elastic streams: the sample's global index (its draws, substitutes and degradations are keyed by it)"""


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
    rank waits on another's video step. Tasks, examples and crops are keyed by the shard too.

    Elastic (cfg.elastic): sample j of batch i on shard s is global sample g = (i * num_shards + s) * batch_size + j,
    drawn from the whole pools with a generator keyed by (seed, g), and its layout is keyed by g // layout_span: the
    global stream is the same for any number of ranks, which each compute their share of it."""

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

    def first_sample(self, index: int) -> int:
        """Global index of the first sample of this rank's batch `index` (elastic streams)."""
        cfg = self.cfg
        return (index * cfg.num_shards + cfg.shard_id) * cfg.batch_size

    def layout(self, index: int) -> int:
        """The layout group of batch `index`: the same on every rank (keyed by seed and index only; elastic: by
        the layout span its global samples fall in, the same for any number of ranks)."""
        key = index
        if self.cfg.elastic:
            span = self.cfg.layout_span or self.cfg.batch_size * self.cfg.num_shards
            key = index * self.cfg.batch_size * self.cfg.num_shards // span
        u = _rng(self.cfg.seed, key, 0x1A70).random()
        return min(int(np.searchsorted(self._group_cdf, u, side="right")), len(self.groups) - 1)

    def _draw_sample(self, rng: np.random.Generator, u: float, cdf, names, key: int | None) -> SamplePlan:
        task = names[min(int(np.searchsorted(cdf, u, side="right")), len(names) - 1)]
        pool = self.pools[task]
        used: set[int] = set()
        pairs = []
        for _ in range(pool.n_pairs + 1):
            item, start = self._draw_item(rng, pool, used)
            used.add(item)
            u4 = tuple(float(x) for x in rng.random(4))
            flip = bool(rng.random() < self.cfg.flip_prob) if self.cfg.augment else False
            pairs.append(PairPlan(item, start, u4, flip))
        return SamplePlan(task, pairs, key)

    def plan(self, index: int) -> list[SamplePlan]:
        cfg = self.cfg
        _, names, _, cdf = self.groups[self.layout(index)]
        if cfg.elastic:  # one generator per global sample
            g0 = self.first_sample(index)
            out = []
            for g in range(g0, g0 + cfg.batch_size):
                rng = _rng(cfg.seed, g, 0xE1A5)
                out.append(self._draw_sample(rng, float(rng.random()), cdf, names, g))
            return out
        rng = _rng(cfg.seed, cfg.shard_id, index, 0x5EED)
        return [self._draw_sample(rng, u, cdf, names, None) for u in rng.random(cfg.batch_size)]

    def replacement(self, index: int, sample: int, pair: int, attempt: int, plan: SamplePlan) -> PairPlan:
        """The `attempt`-th substitute for a pair whose files are unreadable (same crop and flip)."""
        pool = self.pools[plan.task]
        if plan.key is not None:  # elastic: keyed by the global sample
            rng = _rng(self.cfg.seed, plan.key, pair, attempt + 1, 0xBAD)
        else:
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
_STREAM_KEYS = ("seed", "shard_id", "num_shards", "batch_size", "tasks", "elastic", "layout_span")
_STREAM_DEFAULTS = {"elastic": False, "layout_span": None}  # a state saved before these keys existed
_DRAW_KEYS = ("elastic", "layout_span")  # how the draws are keyed, not where the stream is


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
        "elastic": cfg.elastic,
        "layout_span": cfg.layout_span,
    }


def check_stream_state(state: object, mine: dict, owner: str) -> int:
    """The saved next index, after checking that `state` (from `owner`.state_dict()) describes the same stream as
    `mine`; ValueError naming the first field that differs. A state whose draws were keyed otherwise (a per-rank
    stream saved before `elastic` existed) continues at the same position with this loader's draws (logged)."""
    if not isinstance(state, dict) or state.get("version") != 1 or "next_index" not in state:
        raise ValueError(f"state: expected a dict from {owner}.state_dict() (version 1), got {state!r:.200}")
    for key in _STREAM_KEYS:
        saved = state.get(key, _STREAM_DEFAULTS.get(key))
        if saved != mine[key] and key not in _DRAW_KEYS:
            raise ValueError(
                f"state: saved {key}={saved!r} differs from this loader's {mine[key]!r}; the batches would differ"
            )
    changed = [f"{k} {state.get(k, _STREAM_DEFAULTS[k])!r} -> {mine[k]!r}" for k in _DRAW_KEYS
               if state.get(k, _STREAM_DEFAULTS[k]) != mine[k]]  # fmt: skip
    if changed:
        _log.warning("%s: the saved stream's draws were keyed otherwise (%s): it continues at the same position "
                     "with this loader's draws", owner, ", ".join(changed))  # fmt: skip
    return int(state["next_index"])


def seek_index(samples: int, cfg: LoaderConfig, owner: str) -> int:
    """The batch index at which an elastic stream reaches global sample `samples` (a whole number of global
    micro-batches of batch_size * num_shards); ValueError for a per-rank stream or another position."""
    if not cfg.elastic:
        raise ValueError(f"{owner}.seek: this stream's draws are per rank (elastic=False): it cannot continue at a "
                         "global sample position on another number of ranks; build it with elastic=True")  # fmt: skip
    per = cfg.batch_size * cfg.num_shards
    if samples < 0 or samples % per:
        raise ValueError(f"samples: {samples} is not a whole number of global micro-batches of {per} "
                         f"(batch_size {cfg.batch_size} x {cfg.num_shards} ranks)")  # fmt: skip
    return samples // per
