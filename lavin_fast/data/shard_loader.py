"""In-context batches streamed from tar shards (lavin_fast.data.shards): the clean images of this rank's shards,
read in shard-and-buffer shuffled order, cropped, flipped and resized, then degraded by the computed tasks into
(input, target) pairs and grouped N + 1 to a sequence.

Two readers, one stream contract (next batch, state_dict, load_state_dict, close):
- backend "dali": `fn.readers.webdataset` over this rank's shards (their .idx files), shuffled by shard
  (`shuffle_after_epoch`) and by a buffer (`initial_fill`), decoded on the rank's GPU ("mixed") or on the CPU
  (device_id None); resumable through DALI's pipeline checkpoint;
- backend "torch": ShardReader (Python, the same layout) with PIL decoding; resumable through its state.

Each batch draws its sequences' tasks by the mixture (seeded by batch index, like the planner), so task shares
follow the weights whatever the reader. This loader streams the computed tasks (the "images" group);
`build_shard_loader` gives ShardTaskLoader (shard_tasks.py) when annotated pairs or clips are wanted too.
"""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import torch
from PIL import Image

from lavin_fast._optional import optional_import
from lavin_fast.data.incontext.config import CROP_RATIO, CROP_SCALE, InContextBatch, LoaderConfig
from lavin_fast.data.incontext.planner import _rng, _task_key, check_stream_state, random_resized_crop, stream_state
from lavin_fast.data.mixture import loader_task_weights
from lavin_fast.data.shards import IMAGES, ShardReader, load_shard_index, rank_shards
from lavin_fast.data.tasks import COMPUTED_TASKS, build_pairs

IMAGE_EXT = "jpg;jpeg;png;bmp;webp;tif"
"""the member extensions of an image sample that DALI's reader takes (an annotated pair's are input.*, target.*)"""


class DaliShardImages:
    """Batches of `batch_size` clean images [B, 3, H, W] in [-1, 1] from this rank's shards through DALI's
    webdataset reader: random resized crop and flip (augment) or a plain resize; state_dict() is DALI's
    checkpoint of the reader, its shuffle buffer and its random generators."""

    def __init__(
        self,
        root,
        *,
        rank: int,
        world: int,
        batch_size: int,
        resolution: tuple[int, int],
        seed: int = 0,
        buffer: int = 256,
        device: str = "cpu",
        device_id: int | None = None,
        num_threads: int = 2,
        prefetch: int = 2,
        augment: bool = True,
        flip_prob: float = 0.5,
    ):
        from lavin_fast.data.pipelines import _device_args

        self.root = os.fspath(root)
        index = load_shard_index(self.root)
        mine = [index["shards"][n] for n in rank_shards(index, rank, world)]
        if not any(e["groups"].get(IMAGES) for e in mine):
            raise ValueError(f"shards: rank {rank} of {world} has no images in {self.root}")
        self.paths = [os.path.join(self.root, e["name"]) for e in mine]
        self.index_paths = [os.path.join(self.root, e["idx"]) for e in mine]
        self.device_id, self.decoder = _device_args(device, device_id)
        self.kw = dict(batch_size=batch_size, resolution=resolution, seed=seed, buffer=buffer, threads=num_threads)
        self.kw.update(prefetch=max(1, prefetch), augment=augment, flip_prob=flip_prob)
        self._pipe = None

    def _build(self, checkpoint: str | None):
        optional_import("nvidia.dali")  # a missing DALI: the one-line "install [dali-cu13]" error
        from nvidia.dali import fn, pipeline_def, types

        kw = self.kw
        h, w = kw["resolution"]

        @pipeline_def(
            batch_size=kw["batch_size"],
            num_threads=kw["threads"],
            device_id=self.device_id,
            seed=kw["seed"],
            prefetch_queue_depth=kw["prefetch"],
            enable_checkpointing=True,
        )
        def pipe():
            data = fn.readers.webdataset(
                paths=self.paths,
                index_paths=self.index_paths,
                ext=[IMAGE_EXT],
                missing_component_behavior="skip",
                random_shuffle=True,
                initial_fill=kw["buffer"],
                shuffle_after_epoch=True,
                seed=kw["seed"],
                name="reader",
            )
            if kw["augment"]:
                img = fn.decoders.image_random_crop(
                    data,
                    device=self.decoder,
                    output_type=types.RGB,
                    random_area=list(CROP_SCALE),
                    random_aspect_ratio=list(CROP_RATIO),
                )
                img = fn.resize(img, size=[h, w], interp_type=types.INTERP_CUBIC, antialias=True)
                img = fn.flip(img, horizontal=fn.random.coin_flip(probability=kw["flip_prob"]))
            else:
                img = fn.decoders.image(data, device=self.decoder, output_type=types.RGB)
                img = fn.resize(img, size=[h, w], interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop_mirror_normalize(
                img, dtype=types.FLOAT, mean=[127.5] * 3, std=[127.5] * 3, output_layout="CHW"
            )

        p = pipe(checkpoint=checkpoint) if checkpoint else pipe()
        p.build()
        return p

    def __next__(self) -> torch.Tensor:
        from lavin_fast.data.pipelines import _to_torch

        if self._pipe is None:
            self._pipe = self._build(None)
        (out,) = self._pipe.run()
        return _to_torch(out, self.device_id)

    def state_dict(self) -> dict:
        if self._pipe is None:
            self._pipe = self._build(None)
        ck = self._pipe.checkpoint()  # bytes: kept as base64 text, so a checkpoint's JSON holds it
        return {"dali_checkpoint": base64.b64encode(ck if isinstance(ck, bytes) else ck.encode()).decode("ascii")}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._pipe = self._build(base64.b64decode(state["dali_checkpoint"]))

    def close(self) -> None:
        self._pipe = None


class TorchShardImages:
    """The same contract as DaliShardImages with ShardReader and PIL (CPU): crops and flips keyed by
    (seed, rank, sample number), so the stream is a pure function of its state."""

    def __init__(self, root, *, rank, world, batch_size, resolution, seed=0, buffer=256, augment=True, flip_prob=0.5):
        self.reader = ShardReader(root, rank=rank, world=world, seed=seed, buffer=buffer, groups=[IMAGES])
        self.b, self.size, self.seed, self.rank = batch_size, resolution, seed, rank
        self.augment, self.flip_prob = augment, flip_prob

    def _image(self, data: bytes, n: int) -> torch.Tensor:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        r = _rng(self.seed, self.rank, n, 0xC0F)
        u = r.random(5)
        y0, x0, y1, x1 = random_resized_crop(h, w, u[:4], CROP_SCALE, CROP_RATIO) if self.augment else (0, 0, 1, 1)
        img = img.resize((self.size[1], self.size[0]), Image.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h))
        a = np.array(img, dtype=np.uint8)
        if self.augment and u[4] < self.flip_prob:
            a = a[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def __next__(self) -> torch.Tensor:
        out = []
        for _ in range(self.b):
            n = self.reader.taken
            s = next(self.reader)
            data = next(v for k, v in s.members.items() if k in IMAGE_EXT.split(";"))
            out.append(self._image(data, n))
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])

    def close(self) -> None:
        self.reader.close()


class ShardInContextLoader:
    """An endless, resumable stream of InContextBatch (computed tasks) from a shard folder; the loader interface
    of InContextLoader (next, state_dict, load_state_dict, close, weights)."""

    def __init__(self, root, cfg: LoaderConfig, backend: str = "torch", buffer: int = 256):
        cfg.validate()
        index = load_shard_index(root)
        if not index["groups"].get(IMAGES):
            raise ValueError(f"shards: {root} holds no clean images (groups {sorted(index['groups'])})")
        weights = loader_task_weights(cfg.tasks, cfg.mixture, COMPUTED_TASKS, "a stream of clean-image shards")
        self.cfg, self.weights, self.backend = cfg, weights, backend
        self._names = sorted(weights)
        w = np.array([weights[t] for t in self._names])
        self._cdf = np.cumsum(w / w.sum())
        per_batch = cfg.batch_size * (cfg.n_pairs + 1)
        common = dict(rank=cfg.shard_id, world=cfg.num_shards, batch_size=per_batch, resolution=cfg.size())
        common.update(seed=cfg.seed, buffer=buffer, augment=cfg.augment, flip_prob=cfg.flip_prob)
        if backend == "dali":
            device = {"auto": "gpu" if torch.cuda.is_available() else "cpu", "cuda": "gpu"}.get(cfg.device, cfg.device)
            self.images = DaliShardImages(
                root,
                device=device,
                device_id=cfg.device_id,
                num_threads=cfg.num_threads,
                prefetch=cfg.prefetch or 2,
                **common,
            )
        elif backend == "torch":
            self.images = TorchShardImages(root, **common)
        else:
            raise ValueError(f"backend: expected 'dali' or 'torch', got {backend!r}")
        self._next = 0

    def tasks_at(self, index: int) -> list[str]:
        u = _rng(self.cfg.seed, self.cfg.shard_id, index, 0x5EED).random(self.cfg.batch_size)
        return [self._names[min(int(np.searchsorted(self._cdf, x, side="right")), len(self._names) - 1)] for x in u]

    def __iter__(self):
        return self

    def __next__(self) -> InContextBatch:
        cfg, index = self.cfg, self._next
        k = cfg.n_pairs + 1
        frames = next(self.images).cpu().view(cfg.batch_size, k, 3, *cfg.size())
        tasks = self.tasks_at(index)
        inputs, targets = torch.empty_like(frames), torch.empty_like(frames)
        for task in sorted(set(tasks)):
            rows = [i for i, t in enumerate(tasks) if t == task]
            gen = torch.Generator().manual_seed(
                int(_rng(cfg.seed, cfg.shard_id, index, _task_key(task)).integers(2**62))
            )
            a, b = build_pairs(task, frames[rows].flatten(0, 1), gen)
            inputs[rows], targets[rows] = a.view(len(rows), k, 3, *cfg.size()), b.view(len(rows), k, 3, *cfg.size())
        # context: in_1, tgt_1, ..., in_N, tgt_N, query_in (one frame each); target: the query's target
        ctx = torch.stack([inputs[:, :-1], targets[:, :-1]], 2).flatten(1, 2)
        ctx = torch.cat([ctx, inputs[:, -1:]], 1).permute(0, 2, 1, 3, 4).contiguous()
        tgt = targets[:, -1:].permute(0, 2, 1, 3, 4).contiguous()
        self._next += 1
        return InContextBatch(ctx, tgt, tasks, (1,) * (2 * cfg.n_pairs + 1), (1,), index)

    def state_dict(self) -> dict:
        """Where the stream stands after the last batch taken: the batch index and the reader's state."""
        return {**stream_state(self._next, self.cfg, self.weights), "images": self.images.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._next = check_stream_state(state, self.state_dict(), "ShardInContextLoader")
        self.images.load_state_dict(state["images"])

    def close(self) -> None:
        self.images.close()


def build_shard_loader(
    root,
    resolution: int | tuple[int, int] = 256,
    n_pairs: int = 4,
    batch_size: int = 8,
    tasks=None,
    backend: str = "torch",
    buffer: int = 256,
    **kwargs,
) -> ShardInContextLoader:
    """The stream of a shard folder with build_incontext_loader's arguments (tasks: None = every task the folder
    holds, a list or {task: weight}; further keyword arguments are LoaderConfig fields): ShardInContextLoader
    when the tasks are computed ones only, else ShardTaskLoader (annotated pairs and clips as well)."""
    if tasks is not None and not isinstance(tasks, dict):
        tasks = {str(t): 1.0 for t in ([tasks] if isinstance(tasks, str) else tasks)}
    unknown = [k for k in kwargs if k not in LoaderConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"build_shard_loader: unknown options {unknown}; see LoaderConfig")
    kwargs.pop("num_workers", None)  # the stream reads in the calling thread (or DALI's)
    cfg = LoaderConfig(resolution=resolution, n_pairs=n_pairs, batch_size=batch_size, tasks=tasks, **kwargs)
    from lavin_fast.data.shard_tasks import ShardTaskLoader, shard_tasks

    wanted = set(shard_tasks(load_shard_index(root), cfg)) if tasks is None else set(tasks)
    if wanted <= set(COMPUTED_TASKS):  # clean images only: DALI's webdataset reader streams them
        return ShardInContextLoader(root, cfg, backend=backend, buffer=buffer)
    return ShardTaskLoader(root, cfg, backend=backend, buffer=buffer)
