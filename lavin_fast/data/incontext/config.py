"""What the in-context loader is asked for (LoaderConfig, with its checks) and what it hands back (InContextBatch)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lavin_fast.media import IMAGE_SUFFIXES as IMAGE_EXTENSIONS  # noqa: F401  (the one list, media's)
from lavin_fast.media import MAX_IMAGE_PIXELS
from lavin_fast.media import VIDEO_SUFFIXES as VIDEO_EXTENSIONS  # noqa: F401

CROP_SCALE = (0.5, 1.0)
"""the random resized crop's area range (fraction of the image): the loader's default and the DALI pipelines'"""
CROP_RATIO = (3 / 4, 4 / 3)
"""the random resized crop's aspect range (width / height)"""


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
    """task -> sampling weight; None: every task the source provides, equally weighted (see `mixture`)"""
    mixture: str = "given"
    """"given": the weights of `tasks` as given (None: equal); "paper": weights proportional to the paper's sample
    counts per task (lavin_fast.data.mixture) over the tasks named in `tasks` (None: every task the source provides)"""
    seed: int = 0
    """seed of everything random (choice of tasks and examples, crops, flips, degradations)"""
    shard_id: int = 0
    """this rank (0 .. num_shards - 1): each rank reads its own part of every pool"""
    num_shards: int = 1
    """number of ranks"""
    elastic: bool = False
    """draw sample j of batch i from the whole pools, keyed by its *global* index
    ((i * num_shards + shard_id) * batch_size + j), so that any number of ranks recomputes its share of one global
    stream and `seek(samples)` continues it on another number of ranks (the trainer's elastic resume); False: each
    rank draws from its own part of every pool, keyed by (seed, shard, batch)"""
    layout_span: int | None = None
    """elastic: global samples that share one layout (images or videos): the trainer's global batch, so the layout
    of a sample does not depend on the number of ranks; a multiple of batch_size * num_shards. None: one global
    micro-batch (batch_size * num_shards)"""
    backend: str = "auto"
    """'dali', 'torch', or 'auto' (torch for source 'demo', dali otherwise)"""
    device: str = "auto"
    """DALI device: 'cpu', 'gpu' (mixed decoding), or 'auto' (gpu when CUDA is available)"""
    device_id: int | None = None
    """DALI device 'gpu': the CUDA device index to decode on (a rank's own GPU under torchrun); None: the current
    device of the thread that builds the loader. The loader's background thread binds it (CUDA's current device
    is per thread, and a new thread starts on device 0)"""
    num_workers: int = 0
    """torch backend: DataLoader worker processes (0: decode in the calling process)"""
    num_threads: int = 2
    """DALI backend: CPU threads"""
    augment: bool = True
    """random resized crop and horizontal flip (the same for an input and its target)"""
    crop_scale: tuple[float, float] = CROP_SCALE
    """range of the crop's area as a fraction of the image"""
    crop_ratio: tuple[float, float] = CROP_RATIO
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
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    """images (and video frames) over this many pixels (width x height, read from the header before decoding) are
    skipped and counted like corrupt files; None: no limit"""
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
        per = self.batch_size * self.num_shards
        if self.layout_span is not None and (self.layout_span < 1 or self.layout_span % per):
            raise ValueError(f"layout_span: expected a positive multiple of batch_size * num_shards = {per} (the "
                             f"global micro-batch), got {self.layout_span}")  # fmt: skip
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale: expected 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio: expected 0 < lo <= hi, got {self.crop_ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob: expected 0..1, got {self.flip_prob}")
        if self.backend not in ("auto", "dali", "torch"):
            raise ValueError(f"backend: expected 'auto', 'dali' or 'torch', got {self.backend!r}")
        if self.mixture not in ("given", "paper"):
            raise ValueError(f"mixture: expected 'given' or 'paper', got {self.mixture!r}")
        if self.device_id is not None and self.device_id < 0:
            raise ValueError(f"device_id: expected None or a CUDA device index >= 0, got {self.device_id}")
        if self.device not in ("auto", "cpu", "gpu", "cuda"):
            raise ValueError(f"device: expected 'auto', 'cpu' or 'gpu', got {self.device!r}")


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
