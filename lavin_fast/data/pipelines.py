"""NVIDIA DALI pipelines: decode, crop, resize (bicubic, antialiased), flip, scale to [-1, 1].

Two kinds:
- `DaliFrameDecoder` / `DaliClipDecoder`: the in-context loader's decoders. Python decides what to
  read and every random number (so that batches are reproducible, resumable and identical for an
  input and its target); DALI receives the encoded bytes through `external_source` plus, per
  frame, a relative crop window and a flip flag, and does all the pixel work, with `device="mixed"`
  decoding (nvJPEG / NVDEC) when a GPU is used and the CPU operators otherwise.
- `DaliDecoder`: the in-context loader's DALI backend over those two (the torch backend's interface:
  frame and clip requests in, pixels out, Unreadable naming the files DALI could not decode).
- `build_image_iterator`: a self-contained file-reader pipeline (reader sharding, random resized
  crop, flip) wrapped in DALI's `DALIGenericIterator`, yielding `{"images": [B, 3, H, W]}` torch
  tensors in [-1, 1]; used by `lavin-fast data --bench` and for plain image streams.

CPU notes (DALI 2.4): `fn.decoders.image` reads JPEG/PNG/...; `fn.decoders.video` (and
`fn.experimental.readers.video`) decode MJPEG and VP9 on the CPU (checked), not MPEG-4 Part 2
(checked) nor H.264/HEVC, which need the GPU (NVDEC); `fn.readers.video` is GPU-only.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lavin_fast._optional import missing_message, optional_import
from lavin_fast.data.incontext.config import CROP_RATIO, CROP_SCALE, LoaderConfig
from lavin_fast.data.incontext.decoders import Unreadable, _ClipReq, _FrameReq, _read_bytes
from lavin_fast.data.incontext.sources import TaskPool, _Source
from lavin_fast.media import check_pixels, clip_info

_MEAN = [127.5, 127.5, 127.5]


def dali_available() -> tuple[bool, str]:
    """(usable, why not)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        return False, missing_message("nvidia.dali", exc)
    return True, ""


def _device_args(device: str, device_id: int | None = None) -> tuple[int | None, str]:
    """(device_id, decoder device) for "cpu" or "gpu"/"cuda"; device_id None: the calling thread's current
    CUDA device."""
    if device == "cpu":
        return None, "cpu"
    if device in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for but no CUDA device is available; use device='cpu'")
        return (torch.cuda.current_device() if device_id is None else int(device_id)), "mixed"
    raise ValueError(f"device: expected 'cpu' or 'gpu', got {device!r}")


def _to_torch(tl, device_id: int | None = None) -> torch.Tensor:
    """A DALI TensorList (uniform shapes) -> a torch tensor on the same device (GPU: `device_id`, None: the current
    one). The GPU copy is enqueued on the calling thread's *current* stream: in the loader's look-ahead thread that
    is the thread's own stream (lavin_fast.streams), never the training step's, so the copy does not queue behind
    the step's kernels and the batch's consumer waits on the look-ahead's hand-over event."""
    t = tl.as_tensor()
    if hasattr(tl, "as_cpu") and type(tl).__name__.endswith("GPU"):
        optional_import("nvidia.dali")
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dev = torch.device("cuda", torch.cuda.current_device() if device_id is None else device_id)
        out = torch.empty(t.shape(), dtype=torch.float32, device=dev)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev))
        return out
    return torch.from_numpy(np.array(t))


class DaliDecodeError(RuntimeError):
    """DALI failed on a batch; `bad` lists the positions of the samples that fail on their own."""

    def __init__(self, message: str, bad: list[int]):
        super().__init__(message)
        self.bad = bad


def _as_roi(rois: np.ndarray, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rois = np.asarray(rois, dtype=np.float32)
    if rois.shape != (n, 4):
        raise ValueError(f"rois: expected shape ({n}, 4) (y0, x0, y1, x1 relative), got {rois.shape}")
    return [r[:2].copy() for r in rois], [r[2:].copy() for r in rois]


class _ExternalDecoder:
    """Shared machinery: build once, feed a batch, run, and find bad samples when DALI fails."""

    names: tuple[str, ...] = ()

    def __init__(self, max_batch: int, device: str, num_threads: int, seed: int, device_id: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.device = device
        self.device_id, self.decoder_device = _device_args(device, device_id)
        self.num_threads = num_threads
        self.seed = seed
        self.pipe = self._build()
        self.pipe.build()

    def _build(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _run(self, feeds: dict[str, list]) -> torch.Tensor:
        for name, data in feeds.items():
            self.pipe.feed_input(name, data)
        (out,) = self.pipe.run()
        return _to_torch(out, self.device_id)

    def run(self, feeds: dict[str, list]) -> torch.Tensor:
        n = len(next(iter(feeds.values())))
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"batch: expected 1..{self.max_batch} samples, got {n}")
        try:
            return self._run(feeds)
        except RuntimeError as exc:
            # find the culprits: run each sample alone (rare; the pipeline stays usable)
            bad = []
            for i in range(n):
                try:
                    self._run({k: [v[i]] for k, v in feeds.items()})
                except RuntimeError:
                    bad.append(i)
            if not bad:
                raise
            raise DaliDecodeError(f"DALI could not decode {len(bad)} of {n} samples: {str(exc)[:300]}", bad) from None


class DaliFrameDecoder(_ExternalDecoder):
    """Images (encoded bytes) -> [M, 3, H, W] float32 in [-1, 1] on the CPU or the GPU.

    Per frame: `rois[i] = (y0, x0, y1, x1)` the crop window relative to the image (0..1), resized
    to `size` with an antialiased bicubic filter (the ROI is part of the resize, no intermediate
    copy), then mirrored horizontally when `flips[i]`.
    """

    def __init__(
        self,
        size: tuple[int, int],
        max_batch: int,
        device: str = "cpu",
        num_threads: int = 2,
        seed: int = 0,
        device_id: int | None = None,
    ):
        self.size = (int(size[0]), int(size[1]))
        super().__init__(max_batch, device, num_threads, seed, device_id)

    def _build(self):
        optional_import("nvidia.dali")
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=self.seed,
            # fed one batch at a time (feed_input, then run): a depth d would need d batches fed before the first
            # run; the loader's thread and the trainer's data thread run whole batches ahead instead
            prefetch_queue_depth=1,
        )
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            r0 = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            r1 = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            img = fn.decoders.image(enc, device=self.decoder_device, output_type=types.RGB)
            img = fn.resize(
                img,
                size=list(self.size),
                interp_type=types.INTERP_CUBIC,
                antialias=True,
                roi_start=r0,
                roi_end=r1,
                roi_relative=True,
            )
            img = fn.flip(img, horizontal=flip)
            return fn.crop_mirror_normalize(img, dtype=types.FLOAT, mean=_MEAN, std=_MEAN, output_layout="CHW")

        return pipe()

    def __call__(self, encoded: Sequence[np.ndarray], rois: np.ndarray, flips: Sequence[bool]) -> torch.Tensor:
        n = len(encoded)
        r0, r1 = _as_roi(rois, n)
        out = self.run(
            {
                "enc": [np.frombuffer(e, dtype=np.uint8) if isinstance(e, bytes) else e for e in encoded],
                "roi_start": r0,
                "roi_end": r1,
                "flip": [np.array(int(f), dtype=np.int32) for f in flips],
            }
        )
        return out.clamp_(-1, 1)


class DaliClipDecoder(_ExternalDecoder):
    """Clips (encoded container bytes: MJPEG / VP9 on the CPU; H.264 / HEVC need the GPU) ->
    [M, 3, T, H, W] float32 in [-1, 1]: `frames` consecutive frames from `starts[i]`, one crop
    window and flip per clip (the same for all its frames)."""

    def __init__(
        self,
        size: tuple[int, int],
        frames: int,
        max_batch: int,
        device: str = "cpu",
        num_threads: int = 2,
        seed: int = 0,
        device_id: int | None = None,
    ):
        if frames < 1:
            raise ValueError(f"frames: expected >= 1, got {frames}")
        self.size = (int(size[0]), int(size[1]))
        self.frames = frames
        super().__init__(max_batch, device, num_threads, seed, device_id)

    def _build(self):
        optional_import("nvidia.dali")
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(
            batch_size=self.max_batch,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=self.seed,
            # fed one batch at a time (feed_input, then run): a depth d would need d batches fed before the first
            # run; the loader's thread and the trainer's data thread run whole batches ahead instead
            prefetch_queue_depth=1,
        )
        def pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
            start = fn.external_source(name="start", dtype=types.INT32, ndim=0)
            r0 = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            r1 = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            flip = fn.external_source(name="flip", dtype=types.INT32, ndim=0)
            vid = fn.decoders.video(enc, device=self.decoder_device, start_frame=start, sequence_length=self.frames)
            vid = fn.resize(
                vid,
                size=list(self.size),
                interp_type=types.INTERP_CUBIC,
                antialias=True,
                roi_start=r0,
                roi_end=r1,
                roi_relative=True,
            )
            vid = fn.flip(vid, horizontal=flip)
            return fn.crop_mirror_normalize(vid, dtype=types.FLOAT, mean=_MEAN, std=_MEAN, output_layout="CFHW")

        return pipe()

    def __call__(
        self, encoded: Sequence[np.ndarray], starts: Sequence[int], rois: np.ndarray, flips: Sequence[bool]
    ) -> torch.Tensor:
        n = len(encoded)
        r0, r1 = _as_roi(rois, n)
        out = self.run(
            {
                "enc": [np.frombuffer(e, dtype=np.uint8) if isinstance(e, bytes) else e for e in encoded],
                "start": [np.array(int(s), dtype=np.int32) for s in starts],
                "roi_start": r0,
                "roi_end": r1,
                "flip": [np.array(int(f), dtype=np.int32) for f in flips],
            }
        )
        return out.clamp_(-1, 1)


@dataclass
class ImagePipelineConfig:
    """The file-reader image pipeline of `build_image_iterator`."""

    resolution: int = 256
    """output height and width"""
    batch_size: int = 32
    """images per batch"""
    num_threads: int = 2
    """DALI CPU worker threads"""
    device: str = "cpu"
    """'cpu' (CPU operators, device_id=None) or 'gpu' (mixed nvJPEG decoding, GPU resize)"""
    seed: int = 0
    """seed of the reader's shuffling and of the random crop / flip"""
    shard_id: int = 0
    """this rank's shard"""
    num_shards: int = 1
    """number of ranks"""
    random_crop: bool = True
    """random resized crop (area 0.5..1, aspect 3/4..4/3) and flip; else the whole image resized"""
    prefetch_queue_depth: int = 2
    """batches DALI runs ahead of the consumer (its own prefetching: the reader feeds itself, so every stage of the
    next batches runs while this one is used)"""


def build_image_iterator(files: Sequence[str], config: ImagePipelineConfig):
    """DALIGenericIterator over `files` (this shard's part), yielding dicts `{"images": tensor}` of
    [B, 3, H, W] float32 in [-1, 1] (on the GPU with device='gpu'). One pass is one epoch
    (the last, partial batch is dropped); iterate again after `reset()`. Files are not checked:
    use the in-context loader for data that may contain corrupt files."""
    optional_import("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    files = [str(f) for f in files]
    if not files:
        raise ValueError("files: expected at least one image file, got none")
    if not 0 <= config.shard_id < config.num_shards:
        raise ValueError(f"shard_id: expected 0 <= shard_id < num_shards={config.num_shards}, got {config.shard_id}")
    if config.prefetch_queue_depth < 1:
        raise ValueError(f"prefetch_queue_depth: expected >= 1, got {config.prefetch_queue_depth}")
    device_id, dec = _device_args(config.device)
    res = config.resolution

    @pipeline_def(
        batch_size=config.batch_size,
        num_threads=config.num_threads,
        device_id=device_id,
        seed=config.seed,
        prefetch_queue_depth=config.prefetch_queue_depth,
    )
    def pipe():
        jpegs, _ = fn.readers.file(
            files=files,
            random_shuffle=True,
            shard_id=config.shard_id,
            num_shards=config.num_shards,
            seed=config.seed,
            name="reader",
        )
        if config.random_crop:
            img = fn.decoders.image_random_crop(
                jpegs,
                device=dec,
                output_type=types.RGB,
                random_area=list(CROP_SCALE),
                random_aspect_ratio=list(CROP_RATIO),
            )
            img = fn.resize(img, size=[res, res], interp_type=types.INTERP_CUBIC, antialias=True)
            img = fn.flip(img, horizontal=fn.random.coin_flip())
        else:
            img = fn.decoders.image(jpegs, device=dec, output_type=types.RGB)
            img = fn.resize(img, size=[res, res], interp_type=types.INTERP_CUBIC, antialias=True)
        return fn.crop_mirror_normalize(img, dtype=types.FLOAT, mean=_MEAN, std=_MEAN, output_layout="CHW")

    p = pipe()
    p.build()
    return DALIGenericIterator(
        [p], ["images"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=False
    )


class DaliDecoder:
    """The in-context loader's DALI backend: DaliFrameDecoder / DaliClipDecoder fed with bytes, windows and flips."""

    def __init__(self, cfg: LoaderConfig, src: _Source, pools: dict[str, TaskPool], device: str):
        self.cfg, self.size, self.device = cfg, cfg.size(), device
        max_frames, clip_len = 1, 0
        for p in pools.values():
            per_pair = p.in_frames + (p.out_frames if p.kind == "pairs" else 0)
            if p.kind == "clip":
                clip_len = p.in_frames + p.out_frames
            else:
                max_frames = max(max_frames, cfg.batch_size * (p.n_pairs + 1) * per_pair)
        dev_id = cfg.device_id  # the rank's GPU, not whichever device this thread started on
        self.frame_decoder = DaliFrameDecoder(self.size, max_frames, device, cfg.num_threads, cfg.seed, dev_id)
        self.clip_decoder = None
        if clip_len:
            n_clip = cfg.batch_size * (cfg.video_n_pairs + 1)
            self.clip_decoder = DaliClipDecoder(self.size, clip_len, n_clip, device, cfg.num_threads, cfg.seed, dev_id)

    def frames(self, reqs: list[_FrameReq]) -> torch.Tensor:
        from PIL import Image

        enc, rois, flips, bad = [], [], [], {}
        for r in reqs:
            try:
                data = _read_bytes(r.ref)
                # header only: an early check of the file, and of its size before DALI decodes it
                with Image.open(io.BytesIO(data)) as im:
                    check_pixels(*im.size, r.ref, self.cfg.max_image_pixels)
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
        enc, bad = [], {}
        for r in reqs:
            try:
                _, h, w = clip_info(r.clip.ref)
                check_pixels(w, h, r.clip.ref, self.cfg.max_image_pixels)
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
