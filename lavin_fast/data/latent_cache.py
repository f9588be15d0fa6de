"""Optional latent cache: encode every example pair once with the (frozen) ST-VAE encoder, store
the latents in safetensors shards, and train from them without running the VAE each epoch.

    index = build_latent_cache(["demo"], VAECacheEncoder(vae, seed=0), "cache/", resolution=256)
    loader = LatentCacheLoader("cache/", n_pairs=4, batch_size=8, seed=0)
    batch = next(loader)   # InContextBatch of latents: context [B, C, Tc, h, w], target [B, C, Tx, h, w]

`encoder` maps pixels [P, 3, T, H, W] in [-1, 1] to latents [P, C, t, h, w]: `VAECacheEncoder` (the
ST-VAE's posterior, sampled with a generator keyed by the shard and chunk, then normalised, and the
sha256 of its weights), or any callable `encoder(x)` (the cache stores what it returns). Each context
item is encoded on its own: still images as one-frame clips (T = 1), video items as their clip.

Sharded and resumable: the work is cut into shards of `shard_size` pairs (per source and task, in a
fixed order); under torch.distributed rank r encodes shards r, r + world, ... Each shard is written to
a temporary name and renamed, then marked done (`<shard>.done.json`); a rerun with the same settings
(`build.json`) skips the finished shards. Every draw is keyed by (seed, source, task, shard, chunk), so
the cache is the same for any number of ranks and any interruption.

What is cached is fixed: without `augment` each crop is the whole frame resized; with it (the default
when copies > 1) each of the `copies` draws of an image has its own random resized crop and flip; each
computed task's degradation is drawn once per copy. Training from the cache therefore sees `copies`
fixed variants of each pair where online training draws new ones every epoch (docs/data.md).

Layout of the cache directory:
- `index.json` (written last, by rank 0): format version, resolution, the encoder's name and weights
  hash (`encoder_sha256`), pairs per task (`counts`), and per task the shard files with their row counts
  (`shard_counts`: the loader starts from this file alone), the latent frames of an input and of a target
  and the latent shape;
- `build.json`: the settings the shards were made with (a rerun must match them);
- `<task>-s<source>-<n>.safetensors`: tensors `input` [n, C, t_in, h, w] and `target` [n, C, t_out, h, w],
  each with its `.done.json` marker; or, with `format="shards"`, `<task>-s<source>-<n>.tar` (+ `.idx`): the
  same rows as WebDataset samples, read by random access at the offsets the index records (latent_shards.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lavin_fast.data.incontext.config import InContextBatch, LoaderConfig
from lavin_fast.data.incontext.decoders import Unreadable
from lavin_fast.data.incontext.loader import InContextLoader
from lavin_fast.data.incontext.planner import (
    PairPlan,
    Planner,
    SamplePlan,
    _rng,
    _task_key,
    check_stream_state,
    seek_index,
    stream_state,
)
from lavin_fast.data.incontext.sources import TaskPool
from lavin_fast.data.latent_shards import LatentTarRows, check_layout, write_latent_tar
from lavin_fast.data.lookahead import RunAhead
from lavin_fast.data.mixture import paper_task_weights
from lavin_fast.models.checkpoints import weights_sha256
from lavin_fast.seeding import keyed_generator
from lavin_fast.textfiles import read_json

log = logging.getLogger(__name__)
Encoder = Callable[[torch.Tensor], torch.Tensor]
FORMAT_VERSION = 1


class VAECacheEncoder:
    """The frozen ST-VAE as a cache encoder: the posterior sampled with a generator keyed by (seed, chunk key,
    purpose), normalised (z - shift) * scale like the trainer's VAE source; `sha256` identifies its weights."""

    keyed = True

    def __init__(self, vae, seed: int = 0, device: str | torch.device | None = None, name: str | None = None):
        self.vae = vae.eval().requires_grad_(False)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else next(vae.parameters()).device
        self.name = name or type(vae).__name__
        self.sha256 = weights_sha256(vae)  # computed once

    def __call__(self, x: torch.Tensor, key: int) -> torch.Tensor:
        gen = keyed_generator(self.device, self.seed, key)
        return self.vae.normalize_latents(self.vae.encode(x.to(self.device)).sample(gen)).float()


def _encode(encoder, x: torch.Tensor, device: str | torch.device | None, key: int) -> torch.Tensor:
    if device is not None:
        x = x.to(device)
    with torch.no_grad():
        z = encoder(x, key) if getattr(encoder, "keyed", False) else encoder(x)
    if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[0] != x.shape[0]:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"encoder: expected latents [P, C, t, h, w] for pixels {tuple(x.shape)}, got {got}")
    return z.detach().to("cpu").contiguous()


def _dist() -> tuple[int, int, Callable[[], None]]:
    """(rank, world, barrier) of the torch.distributed group if one is initialised, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None


def _write_json(path: pathlib.Path, obj) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _unit_key(source: int, task: str, shard: int, chunk: int) -> int:
    return zlib.crc32(f"cache/{source}/{task}/{shard}/{chunk}".encode())


def build_latent_cache(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    encoder,
    out_dir: str | os.PathLike,
    *,
    resolution: int | tuple[int, int] = 256,
    tasks=None,
    copies: int = 1,
    augment: bool | None = None,
    encode_batch: int = 16,
    shard_size: int = 1024,
    seed: int = 0,
    backend: str = "auto",
    encoder_device: str | torch.device | None = None,
    encoder_name: str | None = None,
    encoder_sha256: str | None = None,
    progress: bool = False,
    format: str = "safetensors",
    **loader_options,
) -> dict:
    """Encode every pair of every task of `source` (one source or a list; `copies` per image / clip) and
    write the cache to `out_dir`; returns the index (also written as index.json). Under torch.distributed
    each rank encodes its share of the shards and every rank returns the index. Finished shards of an
    earlier run with the same settings are skipped. Unreadable files are skipped with a warning and
    listed in the index. `augment` (default: copies > 1) gives each copy its own crop and flip. `format`:
    "safetensors" (a tensor file per shard) or "shards" (WebDataset-style tars, latent_shards.py: a cache that
    also streams)."""
    if format not in ("safetensors", "shards"):
        raise ValueError(f"format: expected 'safetensors' or 'shards', got {format!r}")
    if copies < 1 or encode_batch < 1 or shard_size < 1:
        raise ValueError(f"copies, encode_batch, shard_size: expected >= 1, got {copies}, {encode_batch}, {shard_size}")
    if not callable(encoder):
        raise ValueError(f"encoder: expected a callable, got {type(encoder).__name__}")
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise ValueError("source: expected at least one source")
    if tasks is not None:
        tasks = sorted({str(t) for t in ([tasks] if isinstance(tasks, str) else tasks)})
    augment = copies > 1 if augment is None else bool(augment)
    rank, world, barrier = _dist()
    cfg = LoaderConfig(resolution=resolution, seed=seed, backend=backend, augment=augment, **loader_options)
    loaders = [InContextLoader(s, cfg) for s in sources]
    # each source gives the asked tasks it has; a task that no source has is an error
    wanted = [sorted(t for t in loader.pools if tasks is None or t in tasks) for loader in loaders]
    missing = sorted(set(tasks or ()) - {t for w in wanted for t in w})
    if missing:
        have = sorted({t for loader in loaders for t in loader.pools})
        raise ValueError(f"tasks: {missing} provided by none of the sources; they provide {have}")
    encoder_sha256 = encoder_sha256 or getattr(encoder, "sha256", None)
    encoder_name = (
        encoder_name or getattr(encoder, "name", None) or getattr(encoder, "__qualname__", type(encoder).__name__)
    )
    out = pathlib.Path(out_dir)

    # the shards in a fixed order: (source, task, shard number, its (item, copy) list)
    units: list[tuple[int, str, int, list[tuple[int, int]]]] = []
    frames_of: dict[str, tuple[int, int]] = {}
    for j, loader in enumerate(loaders):
        for task in wanted[j]:
            pool = loader.pools[task]
            pf = (pool.in_frames, pool.out_frames)
            if frames_of.setdefault(task, pf) != pf:
                raise ValueError(
                    f"source {sources[j]}: task {task!r} has {pf} frames, another source {frames_of[task]}"
                )
            todo = [(i, c) for c in range(copies) for i in range(len(pool.items))]
            for k in range(math.ceil(len(todo) / shard_size)):
                units.append((j, task, k, todo[k * shard_size : (k + 1) * shard_size]))

    settings = {
        "version": FORMAT_VERSION,
        "sources": [str(s) for s in sources],
        "resolution": list(cfg.size()),
        "tasks": sorted(frames_of),
        "copies": copies,
        "augment": augment,
        "encode_batch": encode_batch,
        "shard_size": shard_size,
        "seed": seed,
        "encoder": encoder_name,
        "encoder_sha256": encoder_sha256,
        "loader_options": {k: repr(v) for k, v in sorted(loader_options.items())},
    }
    if format == "shards":  # (absent for safetensors: an older folder's build.json still matches)
        settings["format"] = "shards"
    _check_settings(out / "build.json", settings)  # every rank, before anything is written
    barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "build.json", settings)
    barrier()

    mine = [u for n, u in enumerate(units) if n % world == rank and not _done(out, _shard_name(u, format))]
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        total = sum(len(u[3]) for u in mine)
        bar = tqdm(total=total, desc=f"build-cache (rank 0 of {world})", unit="pair", dynamic_ncols=True)
    for unit in mine:
        _build_shard(out, unit, loaders[unit[0]], encoder, encoder_device, encode_batch, seed, bar, rank, format)
    if bar is not None:
        bar.close()
    barrier()
    if rank == 0:
        index = _assemble_index(out, units, settings)
        _write_json(out / "index.json", index)
    barrier()
    return json.loads((out / "index.json").read_text())


def _check_settings(path: pathlib.Path, settings: dict) -> None:
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if differ:
        seen = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in differ)
        raise ValueError(
            f"out_dir: {path.parent} holds a cache built with other settings ({seen}); finish it with the same "
            "settings, or use a new folder"
        )


def _shard_name(unit, fmt: str = "safetensors") -> str:
    j, task, k, _ = unit
    return f"{task}-s{j}-{k:05d}." + ("tar" if fmt == "shards" else "safetensors")


def _done(out: pathlib.Path, name: str) -> bool:
    marker = out / (name + ".done.json")
    if not marker.is_file():
        return False
    return json.loads(marker.read_text())["count"] == 0 or (out / name).is_file()


def _build_shard(out, unit, loader, encoder, encoder_device, encode_batch, seed, bar, rank, fmt) -> None:
    """Encode one shard's pairs, write the shard under a temporary name, rename it, then mark it done."""
    j, task, k, todo = unit
    pool = loader.pools[task]
    name = _shard_name(unit, fmt)
    skipped: dict[str, str] = {}
    ins, tgts = [], []
    for c, start in enumerate(range(0, len(todo), encode_batch)):
        chunk = todo[start : start + encode_batch]
        key = _unit_key(j, task, k, c)
        plans = []
        for i, copy in chunk:
            r = _rng(seed, _task_key(task), j, i, copy)
            st = 0
            if pool.kind == "clip":
                st = int(r.integers(0, pool.items[i].frames - pool.in_frames - pool.out_frames + 1))
            elif pool.kind == "pairs" and len(pool.items[i][0]) > pool.in_frames:
                st = int(r.integers(0, len(pool.items[i][0]) - pool.in_frames + 1))
            window = tuple(float(x) for x in r.random(4))
            flip = bool(r.random() < loader.cfg.flip_prob) if loader.cfg.augment else False
            plans.append(SamplePlan(task, [PairPlan(i, st, window, flip)]))
        rows = []
        for _ in range(len(plans) + 1):
            try:
                rows = loader.maker.pair_tensors(key, plans)
                break
            except Unreadable as exc:
                for ref, why in exc.bad.items():
                    if ref not in skipped:
                        warnings.warn(f"skipping unreadable file {ref}: {why}", RuntimeWarning, stacklevel=3)
                    skipped[ref] = why
                plans = [p for p in plans if not set(loader.maker._refs(pool, p.pairs[0])) & set(skipped)]
                rows = []
                if not plans:
                    break
        if rows:
            x_in = torch.stack([r[0][0] for r in rows])
            x_tgt = torch.stack([r[0][1] for r in rows])
            ins.append(_encode(encoder, x_in, encoder_device, 2 * key))
            tgts.append(_encode(encoder, x_tgt, encoder_device, 2 * key + 1))
        if bar is not None:
            bar.update(len(chunk))
    done = {"count": 0, "skipped": skipped, "pixel_frames": [pool.in_frames, pool.out_frames], "rank": rank}
    if ins:
        a, b = torch.cat(ins), torch.cat(tgts)
        if fmt == "shards":
            done["tar_layout"] = write_latent_tar(out / name, a, b, task)
        else:
            tmp = out / (name + f".tmp{os.getpid()}")
            save_file({"input": a, "target": b}, str(tmp), metadata={"task": task, "count": str(len(a))})
            os.replace(tmp, out / name)
        done.update(count=len(a), input_frames=a.shape[2], target_frames=b.shape[2], latent_shape=list(a.shape[1:]))
    _write_json(out / (name + ".done.json"), done)


def _assemble_index(out: pathlib.Path, units, settings: dict) -> dict:
    index = {
        "version": FORMAT_VERSION,
        "resolution": settings["resolution"],
        "encoder": settings["encoder"],
        "encoder_sha256": settings["encoder_sha256"],
        "sources": settings["sources"],
        "seed": settings["seed"],
        "copies": settings["copies"],
        "augment": settings["augment"],
        "format": settings.get("format", "safetensors"),
        "counts": {},
        "tasks": {},
        "skipped": {},
    }
    for unit in units:
        name = _shard_name(unit, index["format"])
        marker = out / (name + ".done.json")
        if not marker.is_file():
            raise RuntimeError(f"shard {name} was not built (did a rank fail?); run the same command again to finish")
        done = json.loads(marker.read_text())
        index["skipped"].update(done["skipped"])
        if not done["count"]:
            continue
        task = unit[1]
        info = index["tasks"].setdefault(
            task,
            {
                "count": 0,
                "shards": [],
                "input_frames": done["input_frames"],
                "target_frames": done["target_frames"],
                "pixel_frames": done["pixel_frames"],
                "latent_shape": done["latent_shape"],
                "shard_counts": [],
            },
        )
        if info["latent_shape"] != done["latent_shape"]:
            raise ValueError(f"shard {name}: latent shape {done['latent_shape']}, other shards {info['latent_shape']}")
        info["count"] += done["count"]
        info["shards"].append(name)
        info["shard_counts"].append(done["count"])
        if "tar_layout" in done:
            info.setdefault("tar_layouts", []).append(done["tar_layout"])
    index["counts"] = {t: info["count"] for t, info in index["tasks"].items()}
    return index


class LatentCacheLoader:
    """An endless, resumable stream of in-context latent batches from a cache directory; the same
    sampling as InContextLoader (task weights, N pairs + query, seeded per batch index, sharding).

    Scales to millions of cached pairs: start-up reads index.json alone (each task's shard files and their row
    counts, written at build time), a task's items on this rank are a `range` (rank r takes rows r, r + world,
    ...), and a row is found from the cumulative shard counts (one int64 per shard), so the host memory is a few
    bytes per shard, not per item, and a draw is O(1).

    Tasks are drawn by `mixture`: "paper" (the default when `tasks` is None or a list): weights proportional to
    the paper's Table 2 sample counts, renormalised over the cached (or listed) tasks, as the online loader does;
    "given": `tasks` as a {task: weight} mapping (the default for a mapping), or equal weights for a list.
    `prefetch` batches are made ahead in a background thread (0: on the caller's thread). `elastic`: every rank
    draws from every row, each sample keyed by its global index, so `seek(samples)` continues the one global stream
    on another number of ranks (LoaderConfig.elastic, `layout_span`)."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        n_pairs: int = 4,
        batch_size: int = 8,
        tasks=None,
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
        video_n_pairs: int = 1,
        mixture: str | None = None,
        prefetch: int = 0,
        elastic: bool = False,
        layout_span: int | None = None,
    ):
        root = pathlib.Path(cache_dir)
        if not (root / "index.json").is_file():
            raise FileNotFoundError(f"cache_dir: no index.json in {root}; build it with build_latent_cache")
        index = read_json(root / "index.json", "cache index")
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(f"cache_dir: index version {index.get('version')}, expected {FORMAT_VERSION}")
        _check_index(index, root / "index.json")
        if mixture is None:
            mixture = "given" if isinstance(tasks, dict) else "paper"
        if mixture not in ("paper", "given"):
            raise ValueError(f"mixture: expected 'paper' or 'given', got {mixture!r}")
        if prefetch < 0:
            raise ValueError(f"prefetch: expected >= 0 batches ahead, got {prefetch}")
        for task, info in index["tasks"].items():
            for name in info["shards"]:
                if not (root / name).is_file():
                    raise FileNotFoundError(f"cache_dir: shard {name} of task {task!r} is missing from {root}")
        if tasks is None:
            weights = {t: 1.0 for t in sorted(index["tasks"])}
        elif isinstance(tasks, dict):
            weights = {str(k): float(v) for k, v in tasks.items()}
            if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"tasks: weights must be finite, >= 0 and not all 0, got {weights}")
            weights = {k: w for k, w in weights.items() if w > 0}
        else:
            weights = {str(t): 1.0 for t in ([tasks] if isinstance(tasks, str) else tasks)}
        unknown = [t for t in weights if t not in index["tasks"]]
        if unknown:
            raise ValueError(f"tasks: {unknown} not in the cache; cached: {sorted(index['tasks'])}")
        if mixture == "paper":
            weights = paper_task_weights(weights)
        self.cfg = LoaderConfig(
            n_pairs=n_pairs,
            batch_size=batch_size,
            tasks=weights,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            video_n_pairs=video_n_pairs,
            augment=False,
            elastic=elastic,
            layout_span=layout_span,
        )
        self.cfg.validate()
        self.root, self.index, self.mixture = root, index, mixture
        self.pools, self._shards = cache_pools(index, weights, self.cfg, lambda name: _shard_count(root / name))
        self.weights = weights
        self.planner = Planner(self.pools, weights, self.cfg)
        self._handles: dict[str, object] = {}
        self._tars = LatentTarRows(root) if index.get("format") == "shards" else None
        self._next = 0
        self._ahead = RunAhead(self.batch_at, prefetch, name="lavin-fast-cache") if prefetch else None

    def _locate(self, task: str, item: int) -> tuple[int, int]:
        names, cum = self._shards[task]
        g = self.pools[task].items[item]
        s = int(np.searchsorted(cum, g, side="right"))
        return s, g - (int(cum[s - 1]) if s else 0)

    def locate(self, task: str, item: int) -> tuple[str, int]:
        """(shard file, row) of item `item` of this rank's pool of `task`."""
        s, r = self._locate(task, item)
        return self._shards[task][0][s], r

    def _row(self, task: str, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, r = self._locate(task, item)
        name = self._shards[task][0][s]
        if self._tars is not None:  # a tar shard: one positional read per member at the shard's fixed stride
            pair = self._tars.row(name, self.index["tasks"][task]["tar_layouts"][s], r)
        else:
            pair = self._safetensors_row(name, r)
        for key, t in zip(("input", "target"), pair, strict=True):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"latent cache shard {self.root / name}: tensor {key!r} row {r} holds NaN/Inf")
        return pair

    def _safetensors_row(self, name: str, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._handles:
            h = safe_open(str(self.root / name), framework="pt")
            for key in ("input", "target"):  # latents are floats: an integer or bool shard is never cast
                if h.get_slice(key).get_dtype() not in ("F32", "F16", "BF16"):
                    raise ValueError(f"latent cache shard {self.root / name}: tensor {key!r} is "
                                     f"{h.get_slice(key).get_dtype()}, expected F32, F16 or BF16")  # fmt: skip
            self._handles[name] = h
        h = self._handles[name]
        return h.get_slice("input")[r : r + 1][0], h.get_slice("target")[r : r + 1][0]

    def batch_at(self, index: int) -> InContextBatch:
        """The batch at position `index` of the stream (a pure function of it; does not move the stream)."""
        plans = self.planner.plan(index)
        contexts, targets = [], []
        for plan in plans:
            items = [self._row(plan.task, p.item) for p in plan.pairs]
            contexts.append(torch.cat([t for a, b in items[:-1] for t in (a, b)] + [items[-1][0]], 1))
            targets.append(items[-1][1])
        ctx_seg, tgt_seg = self.pools[plans[0].task].signature()
        return InContextBatch(
            context=torch.stack(contexts),
            target=torch.stack(targets),
            task=[p.task for p in plans],
            context_segments=ctx_seg,
            target_segments=tgt_seg,
            index=index,
        )

    def __iter__(self) -> Iterator[InContextBatch]:
        return self

    def __next__(self) -> InContextBatch:
        b = self._ahead.get(self._next) if self._ahead is not None else self.batch_at(self._next)
        self._next += 1
        return b

    def close(self) -> None:
        """Stop the look-ahead thread (a later batch starts it again)."""
        if self._ahead is not None:
            self._ahead.close()

    def state_dict(self) -> dict:
        return stream_state(self._next, self.cfg, self.weights)

    def load_state_dict(self, state: dict) -> None:
        self._next = check_stream_state(state, self.state_dict(), "LatentCacheLoader")
        if self._ahead is not None:
            self._ahead.close()

    @property
    def can_seek(self) -> bool:
        """Whether seek() can continue the stream at a global sample position (an elastic stream)."""
        return self.cfg.elastic

    def seek(self, samples: int) -> None:
        """Continue an elastic stream at global sample `samples` (a resume on another number of ranks)."""
        self._next = seek_index(samples, self.cfg, "LatentCacheLoader")
        if self._ahead is not None:
            self._ahead.close()


def cache_pools(
    index: dict, weights: dict[str, float], cfg: LoaderConfig, read_count: Callable[[str], int]
) -> tuple[dict[str, TaskPool], dict[str, tuple[list[str], np.ndarray]]]:
    """This rank's pool of every weighted task of a cache index (items: a range of the task's rows) and, per task,
    its shard files with their cumulative row counts. `read_count(name)` counts a shard's rows where the index
    (an older build) does not list them."""
    pools, shards = {}, {}
    for task in weights:
        info = index["tasks"][task]
        counts = info.get("shard_counts")
        if counts is None:  # a cache written before the counts were indexed: read the shard headers once
            log.warning("latent cache: index.json has no shard_counts (an older build); reading the shard headers")
            counts = [read_count(name) for name in info["shards"]]
        cum = np.cumsum(np.asarray(counts, dtype=np.int64))
        total = int(cum[-1]) if len(cum) else 0
        items = range(total) if cfg.elastic else range(cfg.shard_id, total, cfg.num_shards)  # elastic: every row
        if not len(items):
            items = range(total)
        video = info["pixel_frames"][0] > 1 or info["pixel_frames"][1] > 1
        n_pairs = cfg.video_n_pairs if video else cfg.n_pairs
        pools[task] = TaskPool(task, "latent", items, info["input_frames"], info["target_frames"], n_pairs)
        shards[task] = (list(info["shards"]), cum)
    return pools, shards


_TASK_KEYS = {"shards": list, "pixel_frames": list, "input_frames": int, "target_frames": int}


def _check_index(index: dict, path: pathlib.Path) -> None:
    """Every entry the loader reads is there, with its type: a named error, not a bare KeyError."""
    tasks = index.get("tasks")
    if not isinstance(tasks, dict):
        raise ValueError(f"cache index {path}: 'tasks' is a {type(tasks).__name__}, expected a mapping")
    for task, info in tasks.items():
        if not isinstance(info, dict):
            raise ValueError(f"cache index {path}: task {task!r} is a {type(info).__name__}, expected a mapping")
        for key, kind in _TASK_KEYS.items():
            if key not in info:
                raise ValueError(f"cache index {path}: task {task!r} lacks {key!r} (an index of an older or other "
                                 "build: build the cache again)")  # fmt: skip
            if not isinstance(info[key], kind) or isinstance(info[key], bool):
                raise ValueError(f"cache index {path}: task {task!r}: {key!r} is a {type(info[key]).__name__}, "
                                 f"expected a {kind.__name__}")  # fmt: skip
        if len(info["pixel_frames"]) != 2 or not all(isinstance(s, str) for s in info["shards"]):
            raise ValueError(f"cache index {path}: task {task!r}: malformed 'pixel_frames' or 'shards'")
        if any(pathlib.PurePath(s).name != s for s in info["shards"]):
            raise ValueError(f"cache index {path}: task {task!r}: shard names must be files of the cache folder")
        if index.get("format", "safetensors") not in ("safetensors", "shards"):
            raise ValueError(f"cache index {path}: format {index.get('format')!r}, expected 'safetensors' or 'shards'")
        if index.get("format") == "shards":
            layouts = info.get("tar_layouts")
            if not isinstance(layouts, list) or len(layouts) != len(info["shards"]):
                raise ValueError(f"cache index {path}: task {task!r}: 'tar_layouts' must list one layout per shard")
            for layout in layouts:
                check_layout(layout, f"cache index {path}: task {task!r}")


def _shard_count(path: pathlib.Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.get_slice("input").get_shape()[0])


__all__ = ["build_latent_cache", "LatentCacheLoader", "VAECacheEncoder", "Encoder"]
