"""Where training latents come from. A source yields this rank's micro-batches of
(target latents [b, 16, Tx, h, w], context latents [b, 16, Tc, h, w]) and has a resumable state.

- `SyntheticLatentSource`: deterministic random latents keyed by the global sample index (tests, benchmarks).
- `VAEEncodedSource`: an in-context pixel loader (lavin_fast.data) encoded by the frozen ST-VAE: every context
  image on its own as a one-frame clip, the target as a clip, posterior *sampled* with a generator keyed by
  (seed, step, micro-batch, global index), then normalised (z - shift) * scale.
- `CachedLatentSource`: precomputed latents from the data package's latent cache.

The trainer's loaders are elastic (`elastic_stream`): every draw is keyed by the global sample index, so the sources
offer `seek(samples)` and a resume on another number of ranks continues the same global stream (train/resume.py).
- `BackgroundSource`: runs another source ahead of the step in a worker thread (bounded queue), on the rank's
  own device, with the state of the last batch *consumed* (so a resume is exact).

`build_source(cfg, ctx)` builds the one a training config names: online training from raw data (`data:
{sources: [...]}`) is the in-context loader (DALI mixed decoding on CUDA, the torch decoder on the CPU) ->
VAEEncodedSource -> BackgroundSource.
"""

from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
from typing import Any, Protocol

import torch

from lavin_fast.data.incontext.loader import build_incontext_loader
from lavin_fast.data.latent_cache import LatentCacheLoader
from lavin_fast.data.pipelines import dali_available
from lavin_fast.data.shard_loader import build_shard_loader
from lavin_fast.data.shards import is_shard_folder
from lavin_fast.devices import bind_thread_device
from lavin_fast.models.checkpoints import load_vae_file, weights_sha256
from lavin_fast.models.vae import build_vae
from lavin_fast.models.vae_latents import encode_segments
from lavin_fast.parallel.distributed import DistContext, all_reduce_mean
from lavin_fast.seeding import keyed_generator
from lavin_fast.streams import hand_over, on_stream, own_stream, start_event, take_over, wait_start
from lavin_fast.train.config import ConfigError, TrainConfig, cache_data, online_data

log = logging.getLogger(__name__)


class LatentSource(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SyntheticLatentSource:
    """`num_samples` fixed random sequences, visited in order by global index; the target is a fixed function
    of the context (so a model can learn it). Rank r of `world` takes samples [r*b, (r+1)*b) of each global
    micro-batch of world*b."""

    def __init__(
        self,
        *,
        micro_batch: int,
        rank: int = 0,
        world: int = 1,
        num_samples: int = 64,
        channels: int = 16,
        context_frames: int = 3,
        target_frames: int = 1,
        size: int = 4,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.b, self.rank, self.world = micro_batch, rank, world
        self.num_samples, self.seed, self.device = num_samples, seed, torch.device(device)
        self.shape = (channels, context_frames, size, size)
        self.target_frames = target_frames
        self.position = 0  # micro-batches consumed

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = keyed_generator("cpu", self.seed, index % self.num_samples, 3)
        cond = torch.randn(self.shape, generator=gen)
        target = (0.5 * cond[:, -1:] - 0.5 * cond[:, :1]).repeat(1, self.target_frames, 1, 1)
        return target, cond

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g0 = self.position * self.b * self.world + self.rank * self.b
        pairs = [self._sample(g0 + i) for i in range(self.b)]
        self.position += 1
        x = torch.stack([p[0] for p in pairs]).to(self.device)
        c = torch.stack([p[1] for p in pairs]).to(self.device)
        return x, c

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def seek(self, samples: int) -> None:
        """Continue at global sample `samples` (an elastic resume on another number of ranks)."""
        per = self.b * self.world
        if samples % per:
            raise ValueError(f"samples: {samples} is not a whole number of global micro-batches of {per}")
        self.position = samples // per


class _LoaderTaskCounts:
    """Task shares of a source that draws from `self.loader` and counts its sequences per task in `self._counts`."""

    loader: Any
    _counts: collections.Counter[str]

    def pop_task_counts(self) -> dict[str, int]:
        """Sequences per task drawn since the last call (the metrics log's task shares)."""
        out = dict(self._counts)
        self._counts.clear()
        return out

    @property
    def task_names(self) -> list[str]:
        """Every task this source can draw (the same list on every rank)."""
        return sorted(self.loader.weights)


class VAEEncodedSource(_LoaderTaskCounts):
    """Pixel batches from an in-context loader (InContextBatch: `context` [b, 3, Tc, H, W] and `target`
    [b, 3, Tx, H, W] in [-1, 1], with the frame count of each item) encoded by a frozen VAE. The loader yields
    this rank's samples and carries the data position in its state_dict()."""

    def __init__(self, loader, vae, *, seed: int, rank: int, world: int, micro_batch: int, device: torch.device):
        self.loader, self.vae = loader, vae.eval().requires_grad_(False)
        self.seed, self.rank, self.world, self.b, self.device = seed, rank, world, micro_batch, device
        self.position = 0
        self.last_tasks: list[str] = []
        """the task of each sequence of the last batch"""
        self._counts: collections.Counter[str] = collections.Counter()
        if getattr(loader, "can_seek", False):  # an elastic stream: train/resume.py looks for `seek`
            self.seek = self._seek

    def _seek(self, samples: int) -> None:
        """Continue at global sample `samples` (an elastic resume on another number of ranks): the loader's stream
        and the posterior noise, both keyed by the global sample index."""
        self.loader.seek(samples)
        self.position = samples // (self.b * self.world)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.loader)
        self.last_tasks = list(batch.task)
        self._counts.update(batch.task)
        ctx, tgt = _to_device(batch.context, self.device), _to_device(batch.target, self.device)
        b = ctx.shape[0]
        g0 = self.position * self.b * self.world + self.rank * self.b
        gens_c = [keyed_generator(self.device, self.seed, g0 + i, 4) for i in range(b)]
        gens_t = [keyed_generator(self.device, self.seed, g0 + i, 5) for i in range(b)]
        self.position += 1
        cond = encode_segments(self.vae, ctx, tuple(batch.context_segments), gens_c)
        x = encode_segments(self.vae, tgt, tuple(batch.target_segments), gens_t)
        return x, cond

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self.loader.load_state_dict(state["loader"])

    def close(self) -> None:
        self.loader.close()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a CPU -> CUDA copy goes through pinned memory without blocking the host (enqueued on the
    current stream; the pinned block is kept until the copy is done by torch's caching host allocator)."""
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Stop(Exception):
    pass


class BackgroundSource:
    """Runs `inner.next_batch()` ahead of the training step in one worker thread, at most `depth` batches ahead
    (a bounded queue), so that decoding and VAE encoding overlap the step; `data_wait_frac` in the metrics is then
    the part it does not hide.

    - The worker binds `device` first (CUDA's current device is per thread: DALI pipelines built and kernels
      launched there would otherwise go to device 0 on every rank) and follows lavin_fast.streams' protocol: all
      of a batch's GPU work on its own stream (the loader's look-ahead hands its pixels over to it by event), one
      wait at start on the starting thread's stream (the VAE's weights), an event recorded after the batch's
      last enqueue, on which the training stream waits, and the latents held for the training stream.
    - state_dict() is the inner source's state right after the last batch the step *took* (the worker's look-ahead
      is redone after a resume), so a resume is exact.
    - `pop_task_counts()` counts the tasks of the batches taken since the last call (for the metrics log).
    """

    def __init__(self, inner, depth: int, device: torch.device | str):
        if depth < 1:
            raise ValueError(f"depth: expected >= 1 batches ahead, got {depth}")
        self.inner, self.depth, self.device = inner, depth, torch.device(device)
        self._cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._state = copy.deepcopy(inner.state_dict())
        self._counts: collections.Counter[str] = collections.Counter()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        if hasattr(inner, "seek"):
            self.seek = self._seek

    def _seek(self, samples: int) -> None:
        """Continue at global sample `samples` (the look-ahead is dropped and redone from there)."""
        self.close()
        self.inner.seek(samples)
        self._state = copy.deepcopy(self.inner.state_dict())

    def _start(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.depth)
        started = start_event(self.device) if self._cuda else None  # what this thread enqueued so far (weights)
        self._thread = threading.Thread(target=self._work, args=(started,), name="lavin-fast-train-data", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def _work(self, started) -> None:
        try:
            bind_thread_device(self.device)
            stream = own_stream(self.device) if self._cuda else None
            wait_start(stream, started)
            while not self._stop.is_set():
                with on_stream(stream):  # the loader's hand-over is waited for on this stream, inside next_batch
                    x, c = self.inner.next_batch()
                    event = hand_over(stream)  # after the batch's last enqueue (the VAE encode)
                tasks = list(getattr(self.inner, "last_tasks", ()))
                self._put((x, c, tasks, copy.deepcopy(self.inner.state_dict()), event))
        except _Stop:
            return
        except BaseException as exc:  # handed to the step, which raises it
            try:
                self._put(exc)
            except _Stop:
                return

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        x, c, tasks, state, event = item
        take_over((x, c), event, self.device)  # the step's stream waits on the hand-over and holds x, c
        self._state = state
        self._counts.update(tasks)
        return x, c

    def pop_task_counts(self) -> dict[str, int]:
        out = dict(self._counts)
        self._counts.clear()
        return out

    @property
    def task_names(self) -> list[str]:
        return list(getattr(self.inner, "task_names", ()))

    def close(self) -> None:
        """Stop the worker (the look-ahead is dropped; the next next_batch() restarts it after the last batch
        taken) and the inner source's own threads."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = None
            self.inner.load_state_dict(copy.deepcopy(self._state))
        if hasattr(self.inner, "close"):
            self.inner.close()

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.inner.load_state_dict(copy.deepcopy(state))
        self._state = copy.deepcopy(state)


class GroupSharedSource:
    """Context parallelism: the cp ranks of a group train on the same samples, so only the group's first rank (its
    leader) runs the source -- decoding, degradations, VAE encode -- and broadcasts each batch's latents to the
    others, instead of every rank of the group doing the same work.

    The shapes go first over a CPU (gloo) group, so that no rank waits on its GPU to learn them; the latents then
    go over the cp group (NCCL on CUDA: on the step's stream, after the data thread's hand-over). The other ranks
    build no source at all (no loader, no DALI pipelines, no VAE). state_dict() is collective: every rank returns
    the leader's data state (every rank's checkpoint stores it, so a resume with other groupings still finds it).
    """

    def __init__(self, make_inner, cp, ctx: DistContext):
        import torch.distributed as dist

        self.dist, self.cp, self.device = dist, cp, ctx.device
        self.leader = ctx.rank - cp.rank  # global rank of the group's cp rank 0
        self.is_leader = cp.rank == 0
        self.meta_group = cp.group if dist.get_backend(cp.group) == "gloo" else _cpu_groups(ctx.world, cp.degree)
        self.inner = make_inner() if self.is_leader else None
        # what the leader's source offers, on every rank of the group (one collective, at construction): `seek` for
        # an elastic resume (train/resume.py looks for it) and the task list that pop_task_counts all-reduces over
        inner = self.inner
        box = [(hasattr(inner, "seek"), list(getattr(inner, "task_names", ()) or ())) if self.is_leader else None]
        dist.broadcast_object_list(box, src=self.leader, group=self.meta_group)
        can_seek, self.task_names = box[0]
        if can_seek:
            self.seek = self._seek

    def _seek(self, samples: int) -> None:
        if self.is_leader:
            self.inner.seek(samples)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.dist
        if self.is_leader:
            x, c = self.inner.next_batch()
            x, c = x.contiguous(), c.contiguous()
            meta = torch.tensor([*x.shape, *c.shape], dtype=torch.int64)
        else:
            meta = torch.empty(10, dtype=torch.int64)
        d.broadcast(meta, src=self.leader, group=self.meta_group)
        if not self.is_leader:
            dims = meta.tolist()  # a CPU tensor: no device sync
            x = torch.empty(dims[:5], dtype=torch.float32, device=self.device)
            c = torch.empty(dims[5:], dtype=torch.float32, device=self.device)
        d.broadcast(x, src=self.leader, group=self.cp.group)
        d.broadcast(c, src=self.leader, group=self.cp.group)
        return x, c

    def state_dict(self) -> dict[str, Any]:
        """Collective over the cp group: the leader's state on every rank."""
        box = [self.inner.state_dict() if self.is_leader else None]
        self.dist.broadcast_object_list(box, src=self.leader, group=self.meta_group)
        return box[0]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.is_leader:
            self.inner.load_state_dict(state)

    def pop_task_counts(self) -> dict[str, int]:
        return self.inner.pop_task_counts() if self.is_leader and hasattr(self.inner, "pop_task_counts") else {}

    def close(self) -> None:
        if self.is_leader and hasattr(self.inner, "close"):
            self.inner.close()


def _cpu_groups(world: int, degree: int):
    """A gloo group per cp group (collective: every rank creates every group, in the same order); this rank's."""
    import torch.distributed as dist

    rank, mine = dist.get_rank(), None
    for first in range(0, world, degree):
        group = dist.new_group(list(range(first, first + degree)), backend="gloo")
        if first <= rank < first + degree:
            mine = group
    return mine


def share_in_cp_group(make_source, cp, ctx: DistContext):
    """The training source: `make_source()` itself without context parallelism, else a GroupSharedSource (the cp
    group's leader makes the batches, the others receive them)."""
    return make_source() if cp is None else GroupSharedSource(make_source, cp, ctx)


def build_vae_from_config(cfg: TrainConfig, device: torch.device):
    """The frozen ST-VAE of a config: the given checkpoint, or build_vae(**vae_overrides) (+ vae_weights)."""
    if cfg.vae_checkpoint:
        return load_vae_file(cfg.vae_checkpoint, device=device)
    if cfg.vae_weights:
        return load_vae_file(cfg.vae_weights, device=device)
    return build_vae(device=device, **cfg.vae_overrides).eval()


class CachedLatentSource(_LoaderTaskCounts):
    """Batches from a LatentCacheLoader (already normalised latents; its look-ahead thread reads them ahead of the
    step), moved to the device."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.last_tasks: list[str] = []
        self._counts: collections.Counter[str] = collections.Counter()
        if getattr(loader, "can_seek", False):  # an elastic stream: train/resume.py looks for `seek`
            self.seek = loader.seek

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(self.loader)
        self.last_tasks = list(batch.task)
        self._counts.update(batch.task)
        return batch.target.to(self.device, torch.float32), batch.context.to(self.device, torch.float32)

    def close(self) -> None:
        self.loader.close()

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])


def pop_task_counts(source, ctx: DistContext) -> dict[str, int]:
    """Sequences per task that `source` handed out since the last call, summed over all data-parallel ranks
    (every rank must call it at the same step: one all-reduce over the source's task list)."""
    counts = source.pop_task_counts() if hasattr(source, "pop_task_counts") else {}
    names = list(getattr(source, "task_names", ()) or ())
    if not ctx.initialized or ctx.world == 1 or not names:
        return counts
    local = torch.tensor([float(counts.get(n, 0)) for n in names], dtype=torch.float64, device=ctx.device)
    total = (all_reduce_mean(ctx, local) * ctx.world).tolist()
    return {n: round(c) for n, c in zip(names, total, strict=True) if c > 0}


def check_cache_vae(cfg: TrainConfig, index: dict) -> None:
    """Refuse a latent cache that another VAE wrote: the sha256 of the weights the config names (vae_checkpoint or
    vae_weights) must equal the cache's `encoder_sha256`. A config that names no VAE file is not checked."""
    path = cfg.vae_checkpoint or cfg.vae_weights
    if not path:
        return
    cached, where = index.get("encoder_sha256"), (cache_data(cfg) or {}).get("latent_cache", cfg.latent_cache)
    if not cached:
        log.warning("latent cache %s records no VAE identity: cannot check it against %s", where, path)
        return
    mine = weights_sha256(build_vae_from_config(cfg, torch.device("cpu")))
    if mine != cached:
        raise ConfigError(
            f"config field 'latent_cache': {where} was written by another VAE ({index.get('encoder')}, "
            f"sha256 {cached[:16]}...) than this run's {path} (sha256 {mine[:16]}...); rebuild the cache with "
            "`lavin-fast data build-cache ... --vae` of this VAE, or point the config at the VAE that wrote it"
        )


def _online_backend(spec: dict[str, Any], device: torch.device) -> tuple[str, str]:
    """(loader backend, DALI device) of online training: DALI with mixed GPU decoding on CUDA, the torch decoder on
    the CPU; "dali" / "torch" as asked."""
    backend = spec["backend"]
    if backend == "auto":
        if device.type != "cuda":
            return "torch", "cpu"
        ok, why = dali_available()
        if ok:
            return "dali", "gpu"
        log.warning("data backend auto: %s; decoding with the torch backend on the CPU instead", why)
        return "torch", "cpu"
    if backend == "dali":
        ok, why = dali_available()
        if not ok:
            raise ConfigError(f"config field 'data': backend dali: {why}; use backend: torch")
        return "dali", "gpu" if device.type == "cuda" else "cpu"
    return "torch", "cpu"


def elastic_stream(cfg: TrainConfig) -> dict[str, Any]:
    """Loader options of the trainer's random-access loaders (in-context pixels, latent cache): draws keyed by the
    global sample index, one layout (images or videos) per optimizer step, so that a resume on another number of
    ranks seeks to the same global sample (train/resume.py)."""
    return {"elastic": True, "layout_span": cfg.batch_size}


def _mixture(cfg: TrainConfig, weights: dict | None) -> str:
    """The mixture name: given when the data section's weights or a {task: weight} `tasks` field set it, else paper."""
    return "given" if weights is not None or isinstance(cfg.tasks, dict) else "paper"


def build_source(cfg: TrainConfig, ctx: DistContext) -> LatentSource:
    cache = cache_data(cfg)
    if cache is not None:
        if not cache["latent_cache"]:
            raise ConfigError(
                "config field 'latent_cache': data = latent-cache needs the cache folder (--latent_cache DIR)"
            )
        weights = cache["weights"]  # None: the paper's mixture over the cached (or listed) tasks
        try:
            loader = LatentCacheLoader(
                cache["latent_cache"],
                n_pairs=cfg.num_pairs,
                batch_size=cfg.micro_batch_size,
                tasks=weights if weights is not None else cfg.tasks,
                mixture=_mixture(cfg, weights),
                seed=cfg.seed,
                shard_id=ctx.rank,
                num_shards=ctx.world,
                prefetch=cache["prefetch"],
                **elastic_stream(cfg),
            )
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"config field 'data' (latent cache): {exc}") from None
        if ctx.is_main:
            shares = ", ".join(f"{t} {w / sum(loader.weights.values()):.3f}" for t, w in sorted(loader.weights.items()))
            log.info("latent cache %s (%s mixture): %s", cache["latent_cache"], loader.mixture, shares)
        check_cache_vae(cfg, loader.index)
        return CachedLatentSource(loader, ctx.device)
    spec = online_data(cfg)
    if spec is None:  # "demo": the embedded demo data, decoded in the calling thread
        loader = build_incontext_loader(
            "demo",
            resolution=cfg.image_size,
            n_pairs=cfg.num_pairs,
            batch_size=cfg.micro_batch_size,
            tasks=cfg.tasks,
            seed=cfg.seed,
            shard_id=ctx.rank,
            num_shards=ctx.world,
            num_workers=cfg.num_workers,
            **elastic_stream(cfg),
        )
        vae = build_vae_from_config(cfg, ctx.device)
        return VAEEncodedSource(
            loader,
            vae,
            seed=cfg.seed,
            rank=ctx.rank,
            world=ctx.world,
            micro_batch=cfg.micro_batch_size,
            device=ctx.device,
        )
    backend, dali_device = _online_backend(spec, ctx.device)
    weights = spec["weights"]
    extra: dict[str, Any] = {}
    if backend == "dali" and dali_device == "gpu":
        extra["device_id"] = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
    if backend == "dali":
        extra["num_threads"] = spec["num_threads"]
        extra["prefetch"] = spec["prefetch"]
    if spec["queue"] > 0:
        extra["batch_threads"] = None  # the worker thread must not change torch's process-wide thread count
    sources = spec["sources"]
    build = build_incontext_loader
    if len(sources) == 1 and is_shard_folder(sources[0]):  # tar shards (`lavin-fast data build-shards`): streamed
        build, sources = build_shard_loader, sources[0]
    else:
        extra.update(elastic_stream(cfg))
    try:
        loader = build(
            sources,
            resolution=cfg.image_size,
            n_pairs=cfg.num_pairs,
            batch_size=cfg.micro_batch_size,
            tasks=weights if weights is not None else cfg.tasks,
            mixture=_mixture(cfg, weights),
            seed=cfg.seed,
            shard_id=ctx.rank,
            num_shards=ctx.world,
            backend=backend,
            device=dali_device,
            num_workers=cfg.num_workers if backend == "torch" else 0,
            **extra,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"config field 'data': {exc}") from None
    if ctx.is_main:
        shares = ", ".join(f"{t} {w / sum(loader.weights.values()):.3f}" for t, w in sorted(loader.weights.items()))
        log.info("online data: %s backend (%s), task mixture: %s", backend, dali_device, shares)
    vae = build_vae_from_config(cfg, ctx.device)
    source = VAEEncodedSource(
        loader, vae, seed=cfg.seed, rank=ctx.rank, world=ctx.world, micro_batch=cfg.micro_batch_size, device=ctx.device
    )
    return BackgroundSource(source, spec["queue"], ctx.device) if spec["queue"] > 0 else source
