"""Optional latent cache: encode every example pair once with the (frozen) ST-VAE encoder, store
the latents in safetensors shards, and train from them without running the VAE each epoch.

    index = build_latent_cache("demo", encoder, "cache/", resolution=256)
    loader = LatentCacheLoader("cache/", n_pairs=4, batch_size=8, seed=0)
    batch = next(loader)   # InContextBatch of latents: context [B, C, Tc, h, w], target [B, C, Tx, h, w]

`encoder` is any callable mapping pixels [P, 3, T, H, W] in [-1, 1] to latents [P, C, t, h, w]
(e.g. the ST-VAE's encode followed by the latent normalisation; the cache stores what it
returns). Each context item is encoded on its own: still images as one-frame clips (T = 1),
video items as their clip. What is cached is fixed: the crops are the whole frame resized (no
augmentation) and each computed task's degradation is drawn once per image (`copies` draws if
asked), so the cache trades augmentation for speed.

Layout of the cache directory:
- `index.json`: format version, resolution, encoder name, and per task the number of pairs, the
  shard files, and the latent frames of an input and of a target;
- `<task>-<n>.safetensors`: tensors `input` [n, C, t_in, h, w] and `target` [n, C, t_out, h, w].
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lavin_fast.data.incontext.config import InContextBatch, LoaderConfig
from lavin_fast.data.incontext.decoders import Unreadable
from lavin_fast.data.incontext.loader import InContextLoader
from lavin_fast.data.incontext.planner import PairPlan, Planner, SamplePlan, _rng, _task_key
from lavin_fast.data.incontext.sources import TaskPool

Encoder = Callable[[torch.Tensor], torch.Tensor]
FORMAT_VERSION = 1


def _encode(encoder: Encoder, x: torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    if device is not None:
        x = x.to(device)
    with torch.no_grad():
        z = encoder(x)
    if not isinstance(z, torch.Tensor) or z.ndim != 5 or z.shape[0] != x.shape[0]:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"encoder: expected latents [P, C, t, h, w] for pixels {tuple(x.shape)}, got {got}")
    return z.detach().to("cpu").contiguous()


def build_latent_cache(
    source: str | os.PathLike,
    encoder: Encoder,
    out_dir: str | os.PathLike,
    *,
    resolution: int | tuple[int, int] = 256,
    tasks=None,
    copies: int = 1,
    encode_batch: int = 16,
    shard_size: int = 1024,
    seed: int = 0,
    backend: str = "auto",
    encoder_device: str | torch.device | None = None,
    encoder_name: str | None = None,
    **loader_options,
) -> dict:
    """Encode every pair of every task of `source` (`copies` per image / clip) and write the
    cache to `out_dir`; returns the index (also written as index.json). Unreadable files are
    skipped with a warning and listed in the index."""
    if copies < 1 or encode_batch < 1 or shard_size < 1:
        raise ValueError(f"copies, encode_batch, shard_size: expected >= 1, got {copies}, {encode_batch}, {shard_size}")
    if not callable(encoder):
        raise ValueError(f"encoder: expected a callable, got {type(encoder).__name__}")
    if tasks is not None and not isinstance(tasks, dict):
        tasks = {str(t): 1.0 for t in ([tasks] if isinstance(tasks, str) else tasks)}
    cfg = LoaderConfig(resolution=resolution, tasks=tasks, seed=seed, backend=backend, augment=False, **loader_options)
    loader = InContextLoader(source, cfg)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    index = {
        "version": FORMAT_VERSION,
        "resolution": list(cfg.size()),
        "encoder": encoder_name or getattr(encoder, "__qualname__", type(encoder).__name__),
        "source": str(source),
        "seed": seed,
        "tasks": {},
        "skipped": {},
    }
    counter = 2**31  # batch indices for the degradations' seeds, apart from training streams'
    for task in sorted(loader.pools):
        pool = loader.pools[task]
        todo = [(i, c) for c in range(copies) for i in range(len(pool.items))]
        writer = _ShardWriter(out, task, shard_size)
        frames = lat_shape = None

        for start in range(0, len(todo), encode_batch):
            chunk = todo[start : start + encode_batch]
            counter += 1
            plans = []
            for i, c in chunk:
                r = _rng(seed, _task_key(task), i, c)
                st = 0
                if pool.kind == "clip":
                    st = int(r.integers(0, pool.items[i].frames - pool.in_frames - pool.out_frames + 1))
                elif pool.kind == "pairs" and len(pool.items[i][0]) > pool.in_frames:
                    st = int(r.integers(0, len(pool.items[i][0]) - pool.in_frames + 1))
                plans.append(SamplePlan(task, [PairPlan(i, st, (0.5, 0.5, 0.5, 0.5), False)]))
            for _ in range(len(plans) + 1):
                try:
                    rows = loader.maker.pair_tensors(counter, plans)
                    break
                except Unreadable as exc:
                    for ref, why in exc.bad.items():
                        if ref not in index["skipped"]:
                            warnings.warn(f"skipping unreadable file {ref}: {why}", RuntimeWarning, stacklevel=2)
                        index["skipped"][ref] = why
                    plans = [p for p in plans if not set(loader.maker._refs(pool, p.pairs[0])) & set(index["skipped"])]
                    if not plans:
                        rows = []
                        break
            if not rows:
                continue
            x_in = torch.stack([r[0][0] for r in rows])
            x_tgt = torch.stack([r[0][1] for r in rows])
            z_in, z_tgt = _encode(encoder, x_in, encoder_device), _encode(encoder, x_tgt, encoder_device)
            frames = (z_in.shape[2], z_tgt.shape[2])
            lat_shape = list(z_in.shape[1:])
            writer.add(z_in, z_tgt)
        writer.close()
        if writer.count:
            index["tasks"][task] = {
                "count": writer.count,
                "shards": writer.shards,
                "input_frames": frames[0],
                "target_frames": frames[1],
                "pixel_frames": [pool.in_frames, pool.out_frames],
                "latent_shape": lat_shape,
            }
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return index


class _ShardWriter:
    """Collects (input, target) latents of one task and writes shards of `shard_size` pairs."""

    def __init__(self, out: pathlib.Path, task: str, shard_size: int):
        self.out, self.task, self.shard_size = out, task, shard_size
        self.ins: list[torch.Tensor] = []
        self.tgts: list[torch.Tensor] = []
        self.shards: list[str] = []
        self.count = 0

    def _write(self, n: int) -> None:
        a, b = torch.cat(self.ins), torch.cat(self.tgts)
        name = f"{self.task}-{len(self.shards):05d}.safetensors"
        meta = {"task": self.task, "count": str(n)}
        save_file({"input": a[:n].contiguous(), "target": b[:n].contiguous()}, str(self.out / name), metadata=meta)
        self.shards.append(name)
        self.count += n
        self.ins, self.tgts = ([a[n:]], [b[n:]]) if len(a) > n else ([], [])

    def add(self, z_in: torch.Tensor, z_tgt: torch.Tensor) -> None:
        self.ins.append(z_in)
        self.tgts.append(z_tgt)
        while sum(len(x) for x in self.ins) >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        pending = sum(len(x) for x in self.ins)
        if pending:
            self._write(pending)


class LatentCacheLoader:
    """An endless, resumable stream of in-context latent batches from a cache directory; the same
    sampling as InContextLoader (task weights, N pairs + query, seeded per batch index, sharding)."""

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
    ):
        root = pathlib.Path(cache_dir)
        if not (root / "index.json").is_file():
            raise FileNotFoundError(f"cache_dir: no index.json in {root}; build it with build_latent_cache")
        index = json.loads((root / "index.json").read_text())
        if index.get("version") != FORMAT_VERSION:
            raise ValueError(f"cache_dir: index version {index.get('version')}, expected {FORMAT_VERSION}")
        for task, info in index["tasks"].items():
            for name in info["shards"]:
                if not (root / name).is_file():
                    raise FileNotFoundError(f"cache_dir: shard {name} of task {task!r} is missing from {root}")
        if tasks is None:
            weights = {t: 1.0 for t in index["tasks"]}
        elif isinstance(tasks, dict):
            weights = {str(k): float(v) for k, v in tasks.items() if float(v) > 0}
        else:
            weights = {str(t): 1.0 for t in ([tasks] if isinstance(tasks, str) else tasks)}
        unknown = [t for t in weights if t not in index["tasks"]]
        if unknown:
            raise ValueError(f"tasks: {unknown} not in the cache; cached: {sorted(index['tasks'])}")
        self.cfg = LoaderConfig(
            n_pairs=n_pairs,
            batch_size=batch_size,
            tasks=weights,
            seed=seed,
            shard_id=shard_id,
            num_shards=num_shards,
            video_n_pairs=video_n_pairs,
            augment=False,
        )
        self.cfg.validate()
        self.root, self.index = root, index
        self.pools: dict[str, TaskPool] = {}
        self._rows: dict[str, list[tuple[str, int]]] = {}
        for task in weights:
            info = index["tasks"][task]
            rows = []
            for name in info["shards"]:
                n = int(_shard_count(root / name))
                rows += [(name, r) for r in range(n)]
            items = list(range(len(rows)))[shard_id::num_shards] or list(range(len(rows)))
            video = info["pixel_frames"][0] > 1 or info["pixel_frames"][1] > 1
            self.pools[task] = TaskPool(
                task, "latent", items, info["input_frames"], info["target_frames"], video_n_pairs if video else n_pairs
            )
            self._rows[task] = rows
        self.weights = weights
        self.planner = Planner(self.pools, weights, self.cfg)
        self._handles: dict[str, object] = {}
        self._next = 0

    def _row(self, task: str, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        name, r = self._rows[task][self.pools[task].items[item]]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.root / name), framework="pt")
        h = self._handles[name]
        return h.get_slice("input")[r : r + 1][0], h.get_slice("target")[r : r + 1][0]

    def batch_at(self, index: int) -> InContextBatch:
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
        b = self.batch_at(self._next)
        self._next += 1
        return b

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "next_index": self._next,
            "seed": self.cfg.seed,
            "shard_id": self.cfg.shard_id,
            "num_shards": self.cfg.num_shards,
            "batch_size": self.cfg.batch_size,
            "tasks": dict(sorted(self.weights.items())),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "next_index" not in state:
            raise ValueError(f"state: expected a dict from LatentCacheLoader.state_dict(), got {state!r:.200}")
        mine = self.state_dict()
        for key in ("seed", "shard_id", "num_shards", "batch_size", "tasks"):
            if state.get(key) != mine[key]:
                raise ValueError(f"state: saved {key}={state.get(key)!r} differs from this loader's {mine[key]!r}")
        self._next = int(state["next_index"])


def _shard_count(path: pathlib.Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.get_slice("input").get_shape()[0])


__all__ = ["build_latent_cache", "LatentCacheLoader", "Encoder"]
