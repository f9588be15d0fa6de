"""In-context sequence assembly: per sample one task, N example pairs of it and a query pair.

    loader = build_incontext_loader("demo", resolution=64, n_pairs=4, batch_size=8, seed=0)
    for batch in loader:          # an endless stream of InContextBatch
        batch.context             # [B, 3, 2N + 1, H, W]: in_1, tgt_1, ..., in_N, tgt_N, query_in
        batch.target              # [B, 3, 1, H, W]: the query's target
        batch.task                # list of B task names (one task per sequence)

Sources: "demo" (the embedded photographs and generated clips), a JSON-lines manifest
(`lavin_fast.data.manifest`), or a directory of images (computed tasks) and clips (frame prediction).

Everything random is decided in Python by a planner seeded with (seed, shard_id, batch index), so a
batch is a pure function of its index: resuming from `state_dict()` reproduces the same batches,
with any backend and any number of DataLoader workers. The pixels are produced by a backend:
- "dali": NVIDIA DALI decodes, crops, resizes (bicubic, antialiased) and flips
  (`lavin_fast.data.pipelines`), mixed GPU decoding with device="gpu", the CPU operators otherwise;
- "torch": PIL decodes, crops and resizes (bicubic with antialiasing, the same crop windows),
  optionally in DataLoader worker processes; with source "demo" the photographs are held in
  memory, pre-shrunk, for a loader that costs little next to a tiny model on 2 CPU cores.
The computed tasks (`lavin_fast.data.tasks`) then run in torch on the decoded frames' device.

Unreadable or corrupt files are skipped with a warning and counted (`loader.skipped`): the pair
that needed one is replaced by another drawn from a seeded sequence, so the result does not depend
on when the bad file was discovered.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from lavin_fast._optional import optional_import
from lavin_fast.data.manifest import FRAME_PREDICTION, IMAGE_TASKS, VIDEO_TASKS, load_manifest
from lavin_fast.data.tasks import COMPUTED_TASKS, build_pairs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv", ".mov")
_MEM = "mem:"  # prefix of in-memory references


# ---------------------------------------------------------------------------------------------
# the batch handed to the trainer


@dataclass
class InContextBatch:
    """One batch of in-context sequences (pixels in [-1, 1], or latents from the latent cache).

    Every sequence in a batch has the same layout (batched by shape): `context_segments` gives
    the frame count of each item of the context in order (in_1, tgt_1, ..., in_N, tgt_N, query_in),
    each item an independent clip for the VAE (1 frame for an image: encode each frame on its own),
    and `target_segments` the same for the target (one item: the query's target).
    """

    context: torch.Tensor
    """[B, C, Tc, H, W] float32; C = 3 for pixels in [-1, 1]"""
    target: torch.Tensor
    """[B, C, Tx, H, W] float32"""
    task: list[str]
    """the task of each sequence"""
    context_segments: tuple[int, ...]
    """frames of each context item; sums to Tc; 2N + 1 items"""
    target_segments: tuple[int, ...]
    """frames of each target item; sums to Tx"""
    index: int
    """position of this batch in the loader's stream"""

    @property
    def n_pairs(self) -> int:
        return (len(self.context_segments) - 1) // 2

    def to(self, device: torch.device | str, non_blocking: bool = False) -> InContextBatch:
        return replace(
            self,
            context=self.context.to(device, non_blocking=non_blocking),
            target=self.target.to(device, non_blocking=non_blocking),
        )


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class LoaderConfig:
    """In-context loader settings."""

    resolution: int | tuple[int, int] = 256
    """output size: an int for square frames or (height, width)"""
    n_pairs: int = 4
    """example pairs per image sequence (the published sampler uses 4)"""
    batch_size: int = 8
    """sequences per batch"""
    tasks: dict[str, float] | None = None
    """task -> sampling weight; None: every task the source provides, equally weighted"""
    seed: int = 0
    """seed of everything random (choice of tasks and examples, crops, flips, degradations)"""
    shard_id: int = 0
    """this rank (0 .. num_shards - 1): each rank reads its own part of every pool"""
    num_shards: int = 1
    """number of ranks"""
    backend: str = "auto"
    """'dali', 'torch', or 'auto' (torch for source 'demo', dali otherwise)"""
    device: str = "auto"
    """DALI device: 'cpu', 'gpu' (mixed decoding), or 'auto' (gpu when CUDA is available)"""
    num_workers: int = 0
    """torch backend: DataLoader worker processes (0: decode in the calling process)"""
    num_threads: int = 2
    """DALI backend: CPU threads"""
    augment: bool = True
    """random resized crop and horizontal flip (the same for an input and its target)"""
    crop_scale: tuple[float, float] = (0.5, 1.0)
    """range of the crop's area as a fraction of the image"""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """range of the crop's aspect ratio (width / height, in pixels)"""
    flip_prob: float = 0.5
    """probability of a horizontal flip"""
    video_n_pairs: int = 1
    """example pairs per video sequence"""
    video_frames: int = 5
    """frames of a video task's input clip (and its target clip for annotated video tasks);
    1 + 4k frames suit the ST-VAE's temporal factor 4"""
    predict_frames: int = 5
    """frame prediction: frames to predict after the `video_frames` context frames; 1 + 4k frames
    (5, 9, ...) encode with the ST-VAE's temporal factor 4"""
    cache_dir: str | None = None
    """where generated demo clips are written for the DALI backend (default: ~/.cache/lavin_fast)"""
    extra_tasks: tuple[str, ...] = ()
    """task names accepted in a manifest besides the known ones"""
    memory_max_side: int | None = None
    """in-memory demo images are pre-shrunk so that their shorter side is this (default 2x resolution)"""
    prefetch: int | None = None
    """DALI backend: batches made ahead in a background thread while the caller trains; None: 2 with
    device 'gpu' (the pixel work is on the GPU), 0 on the CPU (there the thread would compete with
    the caller for the cores; measured 5x slower on a busy 2-core machine)"""
    batch_threads: int | None = 1
    """torch intra-op threads while a batch is made in the calling process (restored afterwards);
    the data ops are small, and on a busy 2-core machine two threads made them 10-17x slower
    (measured); None leaves the setting alone"""

    def size(self) -> tuple[int, int]:
        r = self.resolution
        return (int(r), int(r)) if isinstance(r, int) else (int(r[0]), int(r[1]))

    def validate(self) -> None:
        h, w = self.size()
        if h < 8 or w < 8:
            raise ValueError(f"resolution: expected >= 8 px, got {self.resolution}")
        for name in ("n_pairs", "batch_size", "video_frames", "predict_frames", "num_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.video_n_pairs < 1:
            raise ValueError(f"video_n_pairs: expected >= 1, got {self.video_n_pairs}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0, got {self.num_workers}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ValueError(f"prefetch: expected >= 0, got {self.prefetch}")
        if self.batch_threads is not None and self.batch_threads < 1:
            raise ValueError(f"batch_threads: expected None or >= 1, got {self.batch_threads}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id: expected 0 <= shard_id < num_shards={self.num_shards}, got {self.shard_id}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale: expected 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio: expected 0 < lo <= hi, got {self.crop_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob: expected 0..1, got {self.flip_prob}")
        if self.backend not in ("auto", "dali", "torch"):
            raise ValueError(f"backend: expected 'auto', 'dali' or 'torch', got {self.backend!r}")
        if self.device not in ("auto", "cpu", "gpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'gpu', got {self.device!r}")


# ---------------------------------------------------------------------------------------------
# pools: what each task draws from


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
    """Clip metadata through OpenCV, or the reason it cannot be read."""
    cv2 = optional_import("cv2")

    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            return "cannot open the video"
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        if n <= 0 or w <= 0 or h <= 0:
            return f"no frames (count {n}, size {w}x{h})"
        return _Clip(path, n, h, w)
    finally:
        cap.release()


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


def _load_source(source: str | os.PathLike, cfg: LoaderConfig, backend: str) -> _Source:
    from lavin_fast.data import demo

    src = _Source()
    video_paths: list[str] = []
    if isinstance(source, str) and source == "demo":
        paths = [str(p) for p in demo.demo_image_paths()]
        if backend == "torch":
            from PIL import Image

            short = cfg.memory_max_side or 2 * max(cfg.size())
            for i, p in enumerate(paths):
                img = Image.open(p).convert("RGB")
                s = short / min(img.size)
                if s < 1:
                    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
                ref = f"{_MEM}img:{i}:{pathlib.Path(p).name}"
                src.memory_images[ref] = img
                src.images.append(ref)
            for i, clip in enumerate(demo.demo_clips()):
                ref = f"{_MEM}clip:{i}"
                src.memory_clips[ref] = clip
                src.clips.append(_Clip(ref, clip.shape[0], clip.shape[1], clip.shape[2]))
        else:
            src.images = paths
            video_paths = [
                str(p) for p in demo.write_demo_clips(cfg.cache_dir and pathlib.Path(cfg.cache_dir) / "demo_clips")
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
        items = pool.items[cfg.shard_id :: cfg.num_shards]
        if not items:
            warnings.warn(
                f"task {name!r}: {len(pool.items)} items for {cfg.num_shards} shards; shard {cfg.shard_id} reads them all",
                RuntimeWarning,
                stacklevel=3,
            )
            items = list(pool.items)
        pools[name] = replace(pool, items=list(items))
    return pools, {n: w for n, w in weights.items() if w > 0}


# ---------------------------------------------------------------------------------------------
# the planner: every random decision, as a pure function of (seed, shard, batch index)


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
    """Draws the tasks, examples, windows, crops and flips of batch `index`."""

    def __init__(self, pools: dict[str, TaskPool], weights: dict[str, float], cfg: LoaderConfig):
        self.pools, self.cfg = pools, cfg
        groups: dict[tuple, list[str]] = {}
        for name in sorted(pools):
            groups.setdefault(pools[name].signature(), []).append(name)
        self.groups = [
            (sig, names, np.array([weights[n] for n in names], dtype=np.float64)) for sig, names in groups.items()
        ]
        self.group_weights = np.array([w.sum() for _, _, w in self.groups])

    def _window_len(self, pool: TaskPool) -> int:
        return pool.in_frames + pool.out_frames if pool.kind == "clip" else pool.in_frames

    def _draw_item(self, rng: np.random.Generator, pool: TaskPool, exclude: set[int]) -> tuple[int, int]:
        n = len(pool.items)
        choices = [i for i in range(n) if i not in exclude] if len(exclude) < n else list(range(n))
        item = int(choices[int(rng.integers(len(choices)))])
        start = 0
        if pool.kind == "clip":
            start = int(rng.integers(0, pool.items[item].frames - self._window_len(pool) + 1))
        elif pool.kind == "pairs" and len(pool.items[item][0]) > 1:
            start = int(rng.integers(0, len(pool.items[item][0]) - pool.in_frames + 1))
        return item, start

    def plan(self, index: int) -> list[SamplePlan]:
        cfg = self.cfg
        rng = _rng(cfg.seed, cfg.shard_id, index, 0x5EED)
        g = int(rng.choice(len(self.groups), p=self.group_weights / self.group_weights.sum()))
        _, names, w = self.groups[g]
        samples = []
        for _ in range(cfg.batch_size):
            task = names[int(rng.choice(len(names), p=w / w.sum()))]
            pool = self.pools[task]
            used: set[int] = set()
            pairs = []
            for _ in range(pool.n_pairs + 1):
                item, start = self._draw_item(rng, pool, used)
                used.add(item)
                u = tuple(float(x) for x in rng.random(4))
                flip = bool(rng.random() < cfg.flip_prob) if cfg.augment else False
                pairs.append(PairPlan(item, start, u, flip))
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
    area = (cfg.crop_scale[0] + u[0] * (cfg.crop_scale[1] - cfg.crop_scale[0])) * height * width
    lo, hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
    ratio = math.exp(lo + u[1] * (hi - lo))
    cw = min(float(width), math.sqrt(area * ratio))
    ch = min(float(height), math.sqrt(area / ratio))
    x0, y0 = u[2] * (width - cw), u[3] * (height - ch)
    return (y0 / height, x0 / width, (y0 + ch) / height, (x0 + cw) / width)


# ---------------------------------------------------------------------------------------------
# decoding backends: frame requests -> pixels


@dataclass
class _FrameReq:
    ref: str
    window: tuple[float, float, float, float]
    flip: bool


@dataclass
class _ClipReq:
    clip: _Clip
    start: int
    count: int
    window: tuple[float, float, float, float]
    flip: bool


class Unreadable(Exception):
    """Some referenced files could not be read; `bad` maps each to the reason."""

    def __init__(self, bad: dict[str, str]):
        super().__init__(f"{len(bad)} unreadable files")
        self.bad = bad


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise OSError("empty file")
    return data


class TorchDecoder:
    """PIL decode + crop + bicubic antialiased resize (PIL's `resize(box=...)`), OpenCV for clips."""

    def __init__(self, cfg: LoaderConfig, src: _Source):
        self.cfg, self.size = cfg, cfg.size()
        self.memory_images, self.memory_clips = src.memory_images, src.memory_clips

    def _resize(self, img, window, flip) -> torch.Tensor:
        from PIL import Image

        y0, x0, y1, x1 = window
        w, h = img.size
        out = img.resize((self.size[1], self.size[0]), Image.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h))
        a = np.array(out, dtype=np.uint8)
        if flip:
            a = np.ascontiguousarray(a[:, ::-1])
        return torch.from_numpy(a).permute(2, 0, 1)

    def _open(self, ref: str):
        from PIL import Image

        if ref.startswith(_MEM):
            return self.memory_images[ref]
        img = Image.open(io.BytesIO(_read_bytes(ref)))
        img.load()
        return img.convert("RGB")

    def frames(self, reqs: list[_FrameReq]) -> torch.Tensor:
        out, bad = [], {}
        for r in reqs:
            if r.ref in bad:
                continue
            try:
                img = self._open(r.ref)
                out.append(self._resize(img, r.window, r.flip))
            except Exception as exc:  # any decoder error means an unusable file
                bad[r.ref] = f"{type(exc).__name__}: {exc}"
        if bad:
            raise Unreadable(bad)
        x = torch.stack(out) if out else torch.empty(0, 3, *self.size, dtype=torch.uint8)
        return x.float().div_(127.5).sub_(1.0)

    def _clip_frames(self, req: _ClipReq) -> list[np.ndarray]:
        if req.clip.ref.startswith(_MEM):
            arr = self.memory_clips[req.clip.ref]
            return list(arr[req.start : req.start + req.count])
        cv2 = optional_import("cv2")

        cap = cv2.VideoCapture(req.clip.ref)
        try:
            cap.set(cv2.CAP_PROP_POS_FRAMES, req.start)
            frames = []
            for _ in range(req.count):
                ok, f = cap.read()
                if not ok:
                    raise OSError(f"could not read frame {req.start + len(frames)}")
                frames.append(f[..., ::-1])
            return frames
        finally:
            cap.release()

    def clips(self, reqs: list[_ClipReq]) -> torch.Tensor:
        from PIL import Image

        out, bad = [], {}
        for r in reqs:
            try:
                frames = self._clip_frames(r)
                out.append(
                    torch.stack(
                        [self._resize(Image.fromarray(np.ascontiguousarray(f)), r.window, r.flip) for f in frames], 1
                    )
                )
            except Exception as exc:
                bad[r.clip.ref] = f"{type(exc).__name__}: {exc}"
        if bad:
            raise Unreadable(bad)
        return torch.stack(out).float().div_(127.5).sub_(1.0)


class DaliDecoder:
    """DALI decoders (`lavin_fast.data.pipelines`) fed with bytes, windows and flips."""

    def __init__(self, cfg: LoaderConfig, src: _Source, pools: dict[str, TaskPool], device: str):
        from lavin_fast.data.pipelines import DaliClipDecoder, DaliFrameDecoder

        self.cfg, self.size, self.device = cfg, cfg.size(), device
        max_frames, clip_len = 1, 0
        for p in pools.values():
            per_pair = p.in_frames + (p.out_frames if p.kind == "pairs" else 0)
            if p.kind == "clip":
                clip_len = p.in_frames + p.out_frames
            else:
                max_frames = max(max_frames, cfg.batch_size * (p.n_pairs + 1) * per_pair)
        self.frame_decoder = DaliFrameDecoder(self.size, max_frames, device, cfg.num_threads, cfg.seed)
        self.clip_decoder = None
        if clip_len:
            n_clip = cfg.batch_size * (cfg.video_n_pairs + 1)
            self.clip_decoder = DaliClipDecoder(self.size, clip_len, n_clip, device, cfg.num_threads, cfg.seed)

    def frames(self, reqs: list[_FrameReq]) -> torch.Tensor:
        from PIL import Image

        from lavin_fast.data.pipelines import DaliDecodeError

        enc, rois, flips, bad = [], [], [], {}
        for r in reqs:
            try:
                data = _read_bytes(r.ref)
                # header only: the size for the crop window, and an early check of the file
                Image.open(io.BytesIO(data)).size  # noqa: B018
            except Exception as exc:
                bad[r.ref] = f"{type(exc).__name__}: {exc}"
                continue
            enc.append(np.frombuffer(data, dtype=np.uint8))
            rois.append(r.window)
            flips.append(r.flip)
        if bad:
            raise Unreadable(bad)
        if not enc:
            return torch.empty(0, 3, *self.size)
        try:
            return self.frame_decoder(enc, np.array(rois, dtype=np.float32), flips)
        except DaliDecodeError as exc:
            raise Unreadable({reqs[i].ref: "DALI could not decode it" for i in exc.bad}) from None

    def clips(self, reqs: list[_ClipReq]) -> torch.Tensor:
        from lavin_fast.data.pipelines import DaliDecodeError

        enc, bad = [], {}
        for r in reqs:
            try:
                enc.append(np.frombuffer(_read_bytes(r.clip.ref), dtype=np.uint8))
            except Exception as exc:
                bad[r.clip.ref] = f"{type(exc).__name__}: {exc}"
        if bad:
            raise Unreadable(bad)
        try:
            return self.clip_decoder(
                enc,
                [r.start for r in reqs],
                np.array([r.window for r in reqs], dtype=np.float32),
                [r.flip for r in reqs],
            )
        except DaliDecodeError as exc:
            why = "DALI could not decode it" + (
                " (DALI's CPU video decoder reads MJPEG and VP9, not MPEG-4 or H.264/HEVC)"
                if self.device == "cpu"
                else ""
            )
            raise Unreadable({reqs[i].clip.ref: why for i in exc.bad}) from None


# ---------------------------------------------------------------------------------------------
# a batch from its plan


def _image_size(ref: str, src: _Source) -> tuple[int, int]:
    from PIL import Image

    if ref.startswith(_MEM):
        img = src.memory_images[ref]
        return img.height, img.width
    with Image.open(ref) as img:
        return img.height, img.width


class BatchMaker:
    """Turns batch index -> plan -> frames -> InContextBatch; picklable for DataLoader workers
    (the DALI decoder is created lazily in the process that uses it)."""

    def __init__(
        self,
        cfg: LoaderConfig,
        src: _Source,
        pools: dict[str, TaskPool],
        weights: dict[str, float],
        backend: str,
        device: str,
    ):
        self.cfg, self.src, self.pools, self.backend, self.device = cfg, src, pools, backend, device
        self.planner = Planner(pools, weights, cfg)
        self._decoder = None
        self._sizes: dict[str, tuple[int, int]] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_decoder"] = None
        return d

    @property
    def decoder(self):
        if self._decoder is None:
            if self.backend == "dali":
                self._decoder = DaliDecoder(self.cfg, self.src, self.pools, self.device)
            else:
                self._decoder = TorchDecoder(self.cfg, self.src)
        return self._decoder

    def _refs(self, pool: TaskPool, pair: PairPlan) -> list[str]:
        if pool.kind == "computed":
            return [pool.items[pair.item]]
        if pool.kind == "pairs":
            inp, tgt = pool.items[pair.item]
            s, k = pair.start, pool.in_frames
            return list(inp[s : s + k]) + list(tgt[s : s + k])
        return [pool.items[pair.item].ref]

    def _size(self, ref: str, pool: TaskPool, pair: PairPlan) -> tuple[int, int]:
        if pool.kind == "clip":
            c = pool.items[pair.item]
            return c.height, c.width
        if ref not in self._sizes:
            self._sizes[ref] = _image_size(ref, self.src)
        return self._sizes[ref]

    def make(self, index: int, known_bad: set[str] | None = None) -> tuple[InContextBatch, dict[str, str]]:
        """The batch at `index` and the files newly found unreadable while making it."""
        bad: dict[str, str] = {}
        known = set(known_bad or ())
        plans = self.planner.plan(index)
        attempts = [[0] * len(p.pairs) for p in plans]
        for _round in range(64):
            # substitute the pairs that touch a known-bad file (deterministic sequence per slot)
            for i, plan in enumerate(plans):
                pool = self.pools[plan.task]
                for j in range(len(plan.pairs)):
                    while any(r in known or r in bad for r in self._refs(pool, plan.pairs[j])):
                        if attempts[i][j] >= 256:
                            raise RuntimeError(
                                f"task {plan.task!r}: 256 substitutes in a row were unreadable; check the data"
                            )
                        plan.pairs[j] = self.planner.replacement(index, i, j, attempts[i][j], plan)
                        attempts[i][j] += 1
            try:
                return self._assemble(index, plans), bad
            except Unreadable as exc:
                bad.update(exc.bad)  # the loader warns once per file when it merges these
        raise RuntimeError(f"batch {index}: could not find readable substitutes after 64 rounds")

    def pair_tensors(self, index: int, plans: list[SamplePlan]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Pixels of every pair of every plan: per plan a list of (input [3, k, H, W], target
        [3, m, H, W]). Raises Unreadable naming the files that could not be read."""
        cfg = self.cfg
        frame_reqs: list[_FrameReq] = []
        clip_reqs: list[_ClipReq] = []
        # where each pair's pixels land: ("f", first frame index, n) or ("c", clip index)
        slots: list[list[tuple]] = []
        unreadable: dict[str, str] = {}
        for plan in plans:
            pool = self.pools[plan.task]
            row = []
            for pair in plan.pairs:
                refs = self._refs(pool, pair)
                try:
                    h, w = self._size(refs[0], pool, pair)
                except Exception as exc:  # the header does not parse: the file is unusable
                    unreadable[refs[0]] = f"{type(exc).__name__}: {exc}"
                    continue
                win = crop_window(h, w, pair.window, cfg)
                if pool.kind == "clip":
                    row.append(("c", len(clip_reqs)))
                    clip_reqs.append(
                        _ClipReq(pool.items[pair.item], pair.start, pool.in_frames + pool.out_frames, win, pair.flip)
                    )
                else:
                    row.append(("f", len(frame_reqs), len(refs)))
                    frame_reqs.extend(_FrameReq(r, win, pair.flip) for r in refs)
            slots.append(row)
        if unreadable:
            raise Unreadable(unreadable)
        dec = self.decoder
        bad: dict[str, str] = {}
        frames = clips = None
        try:
            frames = dec.frames(frame_reqs) if frame_reqs else None
        except Unreadable as exc:
            bad.update(exc.bad)
        try:
            clips = dec.clips(clip_reqs) if clip_reqs else None
        except Unreadable as exc:
            bad.update(exc.bad)
        if bad:
            raise Unreadable(bad)

        # computed tasks: degrade the decoded clean images, batched per task
        computed: dict[str, list[int]] = {}
        for plan, row in zip(plans, slots, strict=True):
            if self.pools[plan.task].kind == "computed":
                computed.setdefault(plan.task, []).extend(s[1] for s in row)
        made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for task, idx in computed.items():
            gen = torch.Generator().manual_seed(
                int(_rng(cfg.seed, cfg.shard_id, index, _task_key(task)).integers(2**62))
            )
            inp, tgt = build_pairs(task, frames[idx], gen)
            for n, f in enumerate(idx):
                made[f] = (inp[n], tgt[n])

        rows = []
        for plan, row in zip(plans, slots, strict=True):
            pool = self.pools[plan.task]
            items: list[tuple[torch.Tensor, torch.Tensor]] = []
            for s in row:
                if s[0] == "c":
                    c = clips[s[1]]
                    items.append((c[:, : pool.in_frames], c[:, pool.in_frames :]))
                elif pool.kind == "computed":
                    a, b = made[s[1]]
                    items.append((a[:, None], b[:, None]))
                else:
                    f = frames[s[1] : s[1] + s[2]]
                    k = s[2] // 2
                    items.append((f[:k].permute(1, 0, 2, 3), f[k:].permute(1, 0, 2, 3)))
            rows.append(items)
        return rows

    def _assemble(self, index: int, plans: list[SamplePlan]) -> InContextBatch:
        contexts, targets = [], []
        for items in self.pair_tensors(index, plans):
            ctx = [t for a, b in items[:-1] for t in (a, b)] + [items[-1][0]]
            contexts.append(torch.cat(ctx, 1))
            targets.append(items[-1][1])
        ctx_seg, tgt_seg = self.pools[plans[0].task].signature()
        return InContextBatch(
            context=torch.stack(contexts).contiguous(),
            target=torch.stack(targets).contiguous(),
            task=[p.task for p in plans],
            context_segments=ctx_seg,
            target_segments=tgt_seg,
            index=index,
        )


# ---------------------------------------------------------------------------------------------
# the loader


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, maker: BatchMaker, known_bad: set[str]):
        self.maker, self.known_bad = maker, known_bad

    def __getitem__(self, index: int):
        return self.maker.make(index, self.known_bad)

    def __len__(self) -> int:  # an endless stream: a large, finite length for the sampler's sake
        return 2**62


class _FromIndex(torch.utils.data.Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        i = self.start
        while True:
            yield i
            i += 1


def _first(x):
    return x


class InContextLoader:
    """An endless, resumable stream of InContextBatch (see the module docstring)."""

    def __init__(self, source: str | os.PathLike, cfg: LoaderConfig):
        cfg.validate()
        self.cfg = cfg
        backend = cfg.backend if cfg.backend != "auto" else ("torch" if str(source) == "demo" else "dali")
        device = cfg.device
        if device == "auto":
            device = "gpu" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = "gpu"
        if backend == "torch" and device == "gpu" and cfg.device not in ("auto",):
            raise ValueError("device: 'gpu' applies to the DALI backend; the torch backend decodes on the CPU")
        if backend == "dali" and cfg.num_workers:
            raise ValueError(
                f"num_workers: {cfg.num_workers} applies to the torch backend; DALI parallelises with num_threads"
            )
        if backend == "dali":
            from lavin_fast.data.pipelines import dali_available

            ok, why = dali_available()
            if not ok:
                raise RuntimeError(f"backend 'dali': {why}; use backend='torch'")
        if backend == "torch":
            device = "cpu"  # PIL decodes on the CPU; move batches with batch.to(...)
        self.backend, self.device, self.source = backend, device, str(source)
        self._src = _load_source(source, cfg, backend)
        pools, weights = _build_pools(self._src, cfg)
        self.pools, self.weights = pools, weights
        self.maker = BatchMaker(cfg, self._src, pools, weights, backend, device)
        self.skipped: dict[str, str] = dict(self._src.startup_skipped)
        """files skipped as unreadable: path -> reason"""
        self._next = 0
        self._it = None
        self._pool = None
        self._pending: dict[int, object] = {}

    @property
    def tasks(self) -> list[str]:
        return sorted(self.pools)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __iter__(self) -> InContextLoader:
        return self

    def _stream(self):
        if self.cfg.num_workers == 0:
            return None
        ds = _IndexDataset(self.maker, set(self.skipped))
        return iter(
            torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                sampler=_FromIndex(self._next),
                num_workers=self.cfg.num_workers,
                collate_fn=_first,
                persistent_workers=False,
                prefetch_factor=2,
            )
        )

    def _make_here(self, index: int):
        want, before = self.cfg.batch_threads, torch.get_num_threads()
        if want is None or want == before:
            return self.maker.make(index, set(self.skipped))
        torch.set_num_threads(want)
        try:
            return self.maker.make(index, set(self.skipped))
        finally:
            torch.set_num_threads(before)

    def _record(self, bad: dict[str, str]) -> None:
        for ref, why in bad.items():
            if ref not in self.skipped:
                _warn_skip(ref, why)
                self.skipped[ref] = why

    def _depth(self) -> int:
        if self.backend != "dali":
            return 0
        if self.cfg.prefetch is None:
            return 2 if self.device == "gpu" else 0
        return self.cfg.prefetch

    def _ahead(self) -> bool:
        return self._depth() > 0

    def _submit(self, index: int):
        """DALI backend: make `index` in the one background thread that owns the DALI pipelines.
        No thread-count switching there (torch's setting is global to the process)."""
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lavin-fast-data")
        return self._pool.submit(self.maker.make, index, set(self.skipped))

    def __next__(self) -> InContextBatch:
        if self._ahead():
            for i in range(self._next, self._next + 1 + self._depth()):
                if i not in self._pending:
                    self._pending[i] = self._submit(i)
            batch, bad = self._pending.pop(self._next).result()
        elif self.cfg.num_workers == 0:
            batch, bad = self._make_here(self._next)
        else:
            if self._it is None:
                self._it = self._stream()
            batch, bad = next(self._it)
        self._record(bad)
        self._next += 1
        return batch

    def batch_at(self, index: int) -> InContextBatch:
        """The batch at any position of the stream (does not move the stream)."""
        if self._ahead():
            fut = self._pending.get(index) or self._submit(index)
            batch, bad = fut.result()
        else:
            batch, bad = self._make_here(index)
        self._record(bad)
        return batch

    def close(self) -> None:
        """Stop the background thread / workers (also done when the loader is garbage-collected)."""
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def state_dict(self) -> dict:
        """Position of the stream (the next batch's index) and what identifies it."""
        return {
            "version": 1,
            "next_index": self._next,
            "seed": self.cfg.seed,
            "shard_id": self.cfg.shard_id,
            "num_shards": self.cfg.num_shards,
            "batch_size": self.cfg.batch_size,
            "tasks": {k: float(v) for k, v in sorted(self.weights.items())},
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position: the following batches equal those of the saved run."""
        if not isinstance(state, dict) or state.get("version") != 1 or "next_index" not in state:
            raise ValueError(
                f"state: expected a dict from InContextLoader.state_dict() (version 1), got {state!r:.200}"
            )
        mine = self.state_dict()
        for key in ("seed", "shard_id", "num_shards", "batch_size", "tasks"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"state: saved {key}={state.get(key)!r} differs from this loader's {mine[key]!r}; "
                    "the batches would differ"
                )
        self._next = int(state["next_index"])
        self.skipped.update(state.get("skipped", {}))
        self._it = None  # restart the workers at the new position
        self._pending = {i: f for i, f in self._pending.items() if i >= self._next}


def build_incontext_loader(
    source: str | os.PathLike = "demo",
    resolution: int | tuple[int, int] = 256,
    n_pairs: int = 4,
    batch_size: int = 8,
    tasks: Sequence[str] | dict[str, float] | None = None,
    seed: int = 0,
    shard_id: int = 0,
    num_shards: int = 1,
    backend: str = "auto",
    **kwargs,
) -> InContextLoader:
    """An in-context loader over `source` ("demo", a manifest file, or an image/clip directory).

    tasks: None (all the source provides), a list of names (equal weights) or {name: weight}.
    Further keyword arguments are LoaderConfig fields (device, num_workers, augment, ...)."""
    if tasks is not None and not isinstance(tasks, dict):
        if isinstance(tasks, str):
            tasks = [tasks]
        tasks = {str(t): 1.0 for t in tasks}
    unknown = [k for k in kwargs if k not in LoaderConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"build_incontext_loader: unknown options {unknown}; see LoaderConfig")
    cfg = LoaderConfig(
        resolution=resolution,
        n_pairs=n_pairs,
        batch_size=batch_size,
        tasks=tasks,
        seed=seed,
        shard_id=shard_id,
        num_shards=num_shards,
        backend=backend,
        **kwargs,
    )
    return InContextLoader(source, cfg)


ALL_TASKS: tuple[str, ...] = tuple(COMPUTED_TASKS) + IMAGE_TASKS + (FRAME_PREDICTION,) + VIDEO_TASKS
