"""Streaming shards: raw data written once as WebDataset-style tar files, read sequentially, shuffled by shard
and by a buffer, one disjoint set of shards per data-parallel rank, resumable at a step.

    index = build_shards(["photos/", "annotations.jsonl"], "shards/", target_bytes=1 << 30)
    reader = ShardReader("shards/", rank=0, world=8, seed=0, buffer=1024)
    sample = next(reader)   # ShardSample: key, group, meta (the JSON), members {extension: bytes}

Layout of a shard folder:
- `shard-000000.tar`, ...: a sample is the tar members that share a key (`000000042.jpg`, `000000042.json`):
  an image (group "images", the clean images the computed tasks degrade: `<key>.<ext>`), an annotated pair
  (group: its task; `<key>.input.<ext>` and `<key>.target.<ext>`, or numbered frames `<key>.input.0003.<ext>`),
  or a clip (group "clips": `<key>.<ext>`); `<key>.json` holds the group, the kind, the task and the members;
- `shard-000000.idx`: the tar's index in DALI's webdataset format (v1.2: member extension, data offset, size,
  name), so `fn.readers.webdataset` opens the shard without scanning it;
- `index.json` (written last, by rank 0): per shard its sample count, bytes and samples per group, so a reader
  starts from this one file.

Under torch.distributed, rank r writes shards r, r + world, ...; each shard goes to a temporary name and is
renamed, then marked done (`.done.json`); a rerun with the same settings skips the finished shards.
Latent caches can use the same layout (latent_cache.py, `build-cache --format shards`); see docs/data.md.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lavin_fast.data.incontext.config import LoaderConfig
from lavin_fast.data.wds import write_wds_index

log = logging.getLogger(__name__)
SHARD_FORMAT = 1
IMAGES, CLIPS = "images", "clips"
"""the groups of clean images (the computed tasks' raw material) and of clips (frame prediction)"""


def _write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _ext(path: str) -> str:
    e = pathlib.Path(path).suffix.lower().lstrip(".")
    return "jpg" if e == "jpeg" else "tif" if e == "tiff" else e


def _plan_samples(sources, cfg: LoaderConfig) -> list[dict]:
    """Every sample of `sources` in a fixed order: {"group", "kind", "task", "files": [(member suffix, path)]}."""
    from lavin_fast.data.incontext.sources import _load_sources

    src = _load_sources(sources, cfg, "dali")  # file paths (the demo's in-memory images only exist for "torch")
    samples = []
    for p in src.images:
        samples.append({"group": IMAGES, "kind": "image", "task": None, "files": [(_ext(p), p)]})
    for task, records in sorted(src.pairs.items()):
        for inp, tgt in records:
            if len(inp) == 1 and len(tgt) == 1:
                files = [(f"input.{_ext(inp[0])}", inp[0]), (f"target.{_ext(tgt[0])}", tgt[0])]
            else:
                files = [(f"input.{i:04d}.{_ext(p)}", p) for i, p in enumerate(inp)]
                files += [(f"target.{i:04d}.{_ext(p)}", p) for i, p in enumerate(tgt)]
            samples.append({"group": task, "kind": "pair", "task": task, "files": files})
    for c in src.clips:  # the clip's header (frames, size) goes into its JSON: a reader plans without probing it
        info = {"frames": c.frames, "height": c.height, "width": c.width}
        samples.append({"group": CLIPS, "kind": "clip", "task": None, "files": [(_ext(c.ref), c.ref)], "info": info})
    return samples


def _cut(samples: list[dict], target_bytes: int) -> list[list[int]]:
    """Consecutive samples per shard, each shard's bytes near `target_bytes` (at least one sample)."""
    shards, cur, size = [], [], 0
    for i, s in enumerate(samples):
        n = sum(os.path.getsize(p) + 1024 for _, p in s["files"]) + 1536  # tar headers and the JSON
        if cur and size + n > target_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    if cur:
        shards.append(cur)
    return shards


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def build_shards(
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    target_bytes: int = 1 << 30,
    video_frames: int = 5,
    predict_frames: int = 5,
    extra_tasks: Sequence[str] = (),
) -> dict:
    """Write every image, annotated pair and clip of `sources` ("demo", manifests, directories) as tar shards of
    about `target_bytes` each into `out_dir`; returns the index (also written as index.json). Under
    torch.distributed each rank writes its share of the shards and every rank returns the index."""
    from lavin_fast.data.latent_cache import _check_settings, _dist

    if target_bytes < 1:
        raise ValueError(f"target_bytes: expected >= 1, got {target_bytes}")
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not sources:
        raise ValueError("sources: expected at least one source")
    rank, world, barrier = _dist()
    cfg = LoaderConfig(video_frames=video_frames, predict_frames=predict_frames, extra_tasks=tuple(extra_tasks))
    samples = _plan_samples([str(s) for s in sources], cfg)
    if not samples:
        raise ValueError(f"sources: {sources} hold no image, annotated pair or clip")
    shards = _cut(samples, target_bytes)
    out = pathlib.Path(out_dir)
    settings = {
        "version": SHARD_FORMAT,
        "format": "webdataset",
        "sources": [str(s) for s in sources],
        "target_bytes": int(target_bytes),
        "samples": len(samples),
        "extra_tasks": sorted(extra_tasks),
    }
    _check_settings(out / "build.json", settings)
    barrier()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "build.json", settings)
    barrier()
    for n, members in enumerate(shards):
        name = f"shard-{n:06d}"
        if n % world != rank or (out / f"{name}.done.json").is_file():
            continue
        _write_shard(out, name, [(i, samples[i]) for i in members], rank)
    barrier()
    if rank == 0:
        entries, groups = [], {}
        for n in range(len(shards)):
            done = out / f"shard-{n:06d}.done.json"
            if not done.is_file():
                raise RuntimeError(f"shard {done.name[:-10]} was not written (did a rank fail?); run the same command")
            entry = json.loads(done.read_text())
            entries.append(entry)
            for g, c in entry["groups"].items():
                groups[g] = groups.get(g, 0) + c
        # frames per input of each annotated task (1: image pairs; more: frame lists, a video task)
        pair_frames = {s["task"]: sum(f.startswith("input.") for f, _ in s["files"]) for s in samples if s["task"]}
        index = {**settings, "shards": entries, "groups": groups, "pair_frames": pair_frames}
        _write_json(out / "index.json", index)
    barrier()
    return json.loads((out / "index.json").read_text())


def _write_shard(out: pathlib.Path, name: str, samples: list[tuple[int, dict]], rank: int) -> None:
    tmp = out / f"{name}.tar.tmp{os.getpid()}"
    groups: dict[str, int] = {}
    runs: list[list] = []  # [group, first sample, count]: samples of a group are consecutive (a few runs a shard)
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for i, s in samples:
            key = f"{i:09d}"
            members = [suffix for suffix, _ in s["files"]]
            meta = {"group": s["group"], "kind": s["kind"], "task": s["task"], "members": members}
            meta["sources"] = [p for _, p in s["files"]]
            meta.update(s.get("info", {}))
            for suffix, path in s["files"]:
                _member(tar, f"{key}.{suffix}", pathlib.Path(path).read_bytes())
            _member(tar, f"{key}.json", json.dumps(meta).encode())
            groups[s["group"]] = groups.get(s["group"], 0) + 1
            if runs and runs[-1][0] == s["group"]:
                runs[-1][2] += 1
            else:
                runs.append([s["group"], len(runs) and runs[-1][1] + runs[-1][2], 1])
    os.replace(tmp, out / f"{name}.tar")
    count = write_wds_index(out / f"{name}.tar", out / f"{name}.idx")
    entry = {"name": f"{name}.tar", "idx": f"{name}.idx", "samples": count, "groups": groups, "runs": runs}
    entry["rank"] = rank
    entry["bytes"] = (out / f"{name}.tar").stat().st_size
    _write_json(out / f"{name}.done.json", entry)


def load_shard_index(root: str | os.PathLike) -> dict:
    """index.json of a shard folder, checked (version, every listed tar and idx present)."""
    root = pathlib.Path(root)
    path = root / "index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"shards: no index.json in {root}; write the shards with `lavin-fast data build-shards`"
        )
    index = json.loads(path.read_text())
    if index.get("format") != "webdataset" or index.get("version") != SHARD_FORMAT:
        raise ValueError(f"shards: {path} is not a shard index (format webdataset, version {SHARD_FORMAT})")
    for e in index["shards"]:
        for f in (e["name"], e["idx"]):
            if not (root / f).is_file():
                raise FileNotFoundError(f"shards: {f} is listed in {path} but missing")
    return index


def is_shard_folder(path: str | os.PathLike) -> bool:
    p = pathlib.Path(path) / "index.json"
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == "webdataset"
    except (OSError, ValueError):
        return False


def rank_shards(index: dict, rank: int, world: int) -> list[int]:
    """The shards of `rank`: r, r + world, ... (disjoint across ranks); an error when there are fewer shards than
    ranks (some rank would read nothing: write smaller shards)."""
    n = len(index["shards"])
    if not 0 <= rank < world:
        raise ValueError(f"rank: expected 0 <= rank < world={world}, got {rank}")
    if n < world:
        raise ValueError(f"shards: {n} shards for {world} ranks; write at least one per rank (a smaller --shard-size)")
    return list(range(rank, n, world))


@dataclass
class ShardSample:
    key: str
    group: str
    meta: dict
    members: dict[str, bytes]
    """member suffix (`jpg`, `input.png`, ...) -> bytes"""


class ShardReader:
    """An endless stream of this rank's samples (groups `groups`, or all): its shards in an order reshuffled each
    epoch, each read from start to end, through a shuffle buffer of `buffer` samples. The order is a pure
    function of (seed, rank, world); state_dict() (the buffer's sample ids, the position, the generator's state)
    resumes it exactly, reading only the shards still needed."""

    def __init__(self, root, *, rank: int = 0, world: int = 1, seed: int = 0, buffer: int = 256, groups=None):
        if buffer < 1:
            raise ValueError(f"buffer: expected >= 1 samples, got {buffer}")
        self.root = pathlib.Path(root)
        self.index = load_shard_index(self.root)
        self.rank, self.world, self.seed, self.buffer = rank, world, seed, buffer
        self.mine = rank_shards(self.index, rank, world)
        self.groups = None if groups is None else set(groups)
        self._idx: dict[int, list] = {}
        self._file = None
        self._ids: list[list[int]] = [self._sample_ids(n) for n in self.mine] if self.groups else []
        if self.groups is not None and not any(self._ids):
            have = sorted(self.index["groups"])
            raise ValueError(f"groups: {sorted(self.groups)} not in this rank's shards (the folder holds {have})")
        self._reset()

    def _sample_ids(self, shard: int) -> list[int]:
        """Positions (in the shard) of the samples of the wanted groups: from the index's runs of samples per group
        (else from the samples' JSON members)."""
        if not set(self.index["shards"][shard]["groups"]) & self.groups:
            return []
        runs = self.index["shards"][shard].get("runs")
        if runs is not None:  # from the index alone
            return [i for g, first, n in runs if g in self.groups for i in range(first, first + n)]
        return [i for i in range(len(self._members(shard))) if self._meta(shard, i)["group"] in self.groups]

    def _members(self, shard: int) -> list[list[tuple[str, int, int]]]:
        """Per sample of `shard`: (suffix, data offset, size) of each member, from the shard's .idx file."""
        if shard not in self._idx:
            if len(self._idx) >= 4:
                self._idx.pop(next(iter(self._idx)))
            lines = (self.root / self.index["shards"][shard]["idx"]).read_text().splitlines()
            rows = []
            for line in lines[1:]:
                f = line.split(" ")
                rows.append([(f[k], int(f[k + 1]), int(f[k + 2])) for k in range(0, len(f), 4)])
            self._idx[shard] = rows
        return self._idx[shard]

    def _bytes(self, shard: int, offset: int, size: int) -> bytes:
        if self._file is None or self._file[0] != shard:
            if self._file is not None:
                self._file[1].close()
            self._file = (shard, open(self.root / self.index["shards"][shard]["name"], "rb"))  # noqa: SIM115
        f = self._file[1]
        f.seek(offset)
        return f.read(size)

    def _meta(self, shard: int, sample: int) -> dict:
        for suffix, off, size in self._members(shard)[sample]:
            if suffix == "json":
                return json.loads(self._bytes(shard, off, size))
        raise ValueError(f"shards: sample {sample} of {self.index['shards'][shard]['name']} has no .json member")

    def _reset(self) -> None:
        self.epoch, self.cursor, self.taken = 0, 0, 0
        self._rng = np.random.Generator(np.random.PCG64([self.seed, self.rank, self.world, 0x5A4D]))
        self._order = self._epoch_order(0)
        self._buf: list[tuple[int, int]] = []

    def _epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(shard, sample) of one epoch: the rank's shards shuffled (keyed by epoch), samples in file order."""
        rng = np.random.Generator(np.random.PCG64([self.seed, self.rank, self.world, epoch, 0x0DE5]))
        order = []
        for j in rng.permutation(len(self.mine)):
            n = self.mine[int(j)]
            ids = self._ids[int(j)] if self.groups else range(self.index["shards"][n]["samples"])
            order += [(n, i) for i in ids]
        return order

    def _next_id(self) -> tuple[int, int]:
        while self.cursor >= len(self._order):
            self.epoch += 1
            self.cursor, self._order = 0, self._epoch_order(self.epoch)
        sid = self._order[self.cursor]
        self.cursor += 1
        return sid

    def next_id(self) -> tuple[int, int]:
        """The (shard, sample) that comes next, without reading it."""
        while len(self._buf) < self.buffer:
            self._buf.append(self._next_id())
        j = int(self._rng.integers(len(self._buf)))
        sid, self._buf[j] = self._buf[j], self._buf[-1]
        self._buf.pop()
        self.taken += 1
        return sid

    def _read(self, shard: int, sample: int) -> ShardSample:
        members = {sfx: self._bytes(shard, off, size) for sfx, off, size in self._members(shard)[sample]}
        meta = json.loads(members.pop("json"))
        key = f"{self.index['shards'][shard]['name']}/{sample}"
        return ShardSample(key, meta["group"], meta, members)

    def close(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None

    def __iter__(self) -> Iterator[ShardSample]:
        return self

    def __next__(self) -> ShardSample:
        return self._read(*self.next_id())

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "seed": self.seed,
            "rank": self.rank,
            "world": self.world,
            "buffer": [list(s) for s in self._buf],
            "epoch": self.epoch,
            "cursor": self.cursor,
            "taken": self.taken,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"state: saved {key}={state.get(key)!r} differs from this reader's {getattr(self, key)!r}"
                )
        self.epoch, self.cursor, self.taken = int(state["epoch"]), int(state["cursor"]), int(state["taken"])
        self._order = self._epoch_order(self.epoch)
        self._buf = [tuple(s) for s in state["buffer"]]
        self._rng.bit_generator.state = state["rng"]
