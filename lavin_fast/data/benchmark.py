"""Data-loading benchmarks (used by `lavin-fast data --bench`, bench/cpu_data.py, bench/gpu_data.py).

- `bench_dali`: images/s of the DALI file pipeline (`build_image_iterator`: read, decode, random
  resized crop, bicubic antialiased resize, flip, normalise), CPU operators or mixed GPU decoding.
- `bench_pil`: the same work with PIL in a torch DataLoader (no torchvision): the baseline, with as
  many worker processes as DALI has threads, on the same files.
- `bench_incontext`: frames/s of the in-context loader (decode + computed tasks + assembly).
- `bench_tasks`: images/s of each computed task builder on a device.
- `bench_online`: images/s of online training's data path: the in-context loader (decode, random resized crop,
  flip, computed task) then the frozen ST-VAE encoding every frame (the one-frame fold for images).
Each measures after a warm-up batch (pipeline build and worker start-up excluded) for a time budget.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import random
import time

import numpy as np
import torch
from PIL import Image

from lavin_fast._optional import optional_import
from lavin_fast.data.demo_data import demo_image_paths
from lavin_fast.data.incontext.config import CROP_RATIO, CROP_SCALE
from lavin_fast.data.incontext.loader import build_incontext_loader
from lavin_fast.data.incontext.planner import random_resized_crop
from lavin_fast.data.pipelines import ImagePipelineConfig, build_image_iterator
from lavin_fast.data.tasks import COMPUTED_TASKS, build_pairs
from lavin_fast.models.vae import build_vae
from lavin_fast.models.vae_latents import encode_segments

ONLINE_BENCH_VAE = {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}
"""the ST-VAE of configs/tiny-cpu.yaml: the online rows' encoder unless one is given"""


def make_jpeg_set(out_dir: str | os.PathLike, n: int = 48, quality: int = 90) -> list[str]:
    """`n` JPEG files made from the demo photographs (cycled, each at its own size, re-encoded at
    `quality`), so that the benchmark needs no download."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = demo_image_paths()
    files = []
    for i in range(n):
        p = out / f"demo_{i:03d}.jpg"
        if not p.is_file():
            img = Image.open(src[i % len(src)]).convert("RGB")
            if i // len(src) % 2:  # vary the content a little between cycles
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            img.save(p, quality=quality)
        files.append(str(p))
    return files


class PilImageDataset(torch.utils.data.Dataset):
    """The baseline: PIL decode, random resized crop (area 0.5..1, aspect 3/4..4/3) folded into an
    antialiased bicubic resize (`resize(box=...)`), random flip, [-1, 1] CHW float tensor."""

    def __init__(self, files: list[str], resolution: int, seed: int = 0):
        self.files, self.res, self.seed = list(files), resolution, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = random.Random(self.seed * 1_000_003 + i)
        with open(self.files[i], "rb") as f:
            img = Image.open(io.BytesIO(f.read())).convert("RGB")
        w, h = img.size
        u = [rng.random() for _ in range(4)]
        y0, x0, y1, x1 = random_resized_crop(h, w, u, scale=CROP_SCALE, ratio=CROP_RATIO)
        img = img.resize((self.res, self.res), Image.BICUBIC, box=(x0 * w, y0 * h, x1 * w, y1 * h))
        a = np.array(img, dtype=np.uint8)
        if rng.random() < 0.5:
            a = np.ascontiguousarray(a[:, ::-1])
        return torch.from_numpy(a).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _epoch_files(files: list[str], batch_size: int, min_batches: int = 16) -> list[str]:
    """The file list repeated so that an epoch holds at least `min_batches` batches: with a short
    list, DALI's iterator would end an epoch (and drop its prefetched batches) every batch."""
    reps = max(1, math.ceil(min_batches * batch_size / max(1, len(files))))
    return list(files) * reps


def _timed(next_batch, seconds: float, images_per_batch) -> dict:
    first = next_batch()  # warm-up: pipeline build / worker start-up not counted
    if isinstance(first, torch.Tensor) and first.is_cuda:
        torch.cuda.synchronize()
    n_img, n_batches = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or n_batches < 2:
        b = next_batch()
        if isinstance(b, torch.Tensor) and b.is_cuda:
            torch.cuda.synchronize()
        n_img += images_per_batch(b)
        n_batches += 1
    dt = time.perf_counter() - t0
    # the 1-minute load average: on a shared machine the figures move with it
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"images_per_s": n_img / dt, "batches": n_batches, "seconds": round(dt, 2), "load1": round(load, 1)}


def bench_dali(
    files: list[str],
    resolution: int = 256,
    batch_size: int = 32,
    workers: int = 2,
    seconds: float = 10.0,
    device: str = "cpu",
    seed: int = 0,
) -> dict:
    cfg = ImagePipelineConfig(
        resolution=resolution, batch_size=batch_size, num_threads=workers, device=device, seed=seed
    )
    it = build_image_iterator(_epoch_files(files, batch_size), cfg)

    def next_batch():
        try:
            return next(it)[0]["images"]
        except StopIteration:
            it.reset()
            return next(it)[0]["images"]

    row = _timed(next_batch, seconds, lambda b: b.shape[0])
    return {"impl": f"DALI ({'mixed GPU decode' if device != 'cpu' else 'CPU'})", "workers": workers, **row}


def bench_dali_stages(
    files: list[str], resolution: int = 256, batch_size: int = 32, workers: int = 2, seconds: float = 3.0
) -> list[dict]:
    """images/s of the CPU DALI pipeline cut after each stage (raw `pipe.run()`, no torch
    conversion): where the time goes."""
    optional_import("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    def build(stage: str):
        @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=None, seed=0)
        def pipe():
            jpegs, _ = fn.readers.file(files=_epoch_files(files, batch_size), random_shuffle=True, seed=0)
            if stage == "decode":
                return fn.decoders.image(jpegs, output_type=types.RGB)
            img = fn.decoders.image_random_crop(
                jpegs, output_type=types.RGB, random_area=list(CROP_SCALE), random_aspect_ratio=list(CROP_RATIO)
            )
            if stage == "decode crop (ROI)":
                return img
            interp = types.INTERP_LINEAR if "linear" in stage else types.INTERP_CUBIC
            img = fn.resize(img, size=[resolution, resolution], interp_type=interp, antialias=True)
            if "flip" not in stage:
                return img
            img = fn.flip(img, horizontal=fn.random.coin_flip())
            return fn.crop_mirror_normalize(
                img, dtype=types.FLOAT, mean=[127.5] * 3, std=[127.5] * 3, output_layout="CHW"
            )

        p = pipe()
        p.build()
        return p

    rows = []
    for stage in (
        "decode",
        "decode crop (ROI)",
        "+ resize linear antialiased",
        "+ resize cubic antialiased",
        "+ resize cubic, flip, normalise",
    ):
        p = build(stage)
        row = _timed(lambda p=p: p.run(), seconds, lambda b: batch_size)
        rows.append({"impl": f"DALI CPU stages: {stage}", "workers": workers, **row})
        del p
    return rows


def bench_pil(
    files: list[str],
    resolution: int = 256,
    batch_size: int = 32,
    workers: int = 2,
    seconds: float = 10.0,
    seed: int = 0,
) -> dict:
    ds = PilImageDataset(_epoch_files(files, batch_size), resolution, seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    state = {"it": iter(dl)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(dl)
            return next(state["it"])

    try:
        row = _timed(next_batch, seconds, lambda b: b.shape[0])
    finally:
        # stop the workers now: left prefetching, they would compete with the next measurement
        shutdown = getattr(state["it"], "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        state.clear()
    return {"impl": "PIL + torch DataLoader", "workers": workers, **row}


def bench_incontext(
    source,
    backend: str,
    resolution: int = 64,
    batch_size: int = 8,
    n_pairs: int = 4,
    seconds: float = 10.0,
    device: str = "cpu",
    num_workers: int = 0,
    tasks=None,
) -> dict:
    loader = build_incontext_loader(
        source,
        resolution=resolution,
        n_pairs=n_pairs,
        batch_size=batch_size,
        backend=backend,
        device=device,
        num_workers=num_workers,
        tasks=tasks,
    )

    def frames(b) -> int:
        return b.context.shape[0] * (b.context.shape[2] + b.target.shape[2])

    try:
        row = _timed(lambda: next(loader), seconds, frames)
    finally:
        loader.close()
    name = f"in-context loader, {backend}" + (f" ({device})" if backend == "dali" else f", {num_workers} workers")
    return {"impl": name, "frames_per_s": row.pop("images_per_s"), **row}


def bench_tasks(
    device: str = "cpu", resolution: int = 256, batch_size: int = 16, seconds: float = 1.0, threads: int | None = 1
) -> list[dict]:
    """images/s of each task builder on random images; on the CPU with `threads` intra-op threads
    (1: as the in-process loader runs them)."""
    before = torch.get_num_threads()
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        x = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
        rows = []
        for task in COMPUTED_TASKS:
            gen = torch.Generator().manual_seed(0)
            row = _timed(lambda task=task, gen=gen: build_pairs(task, x, gen)[0], seconds, lambda b: b.shape[0])
            rows.append({"impl": f"task {task}", "device": device, "resolution": resolution, **row})
        return rows
    finally:
        torch.set_num_threads(before)


def bench_online(
    source,
    backend: str = "torch",
    device: str = "cpu",
    vae=None,
    resolution: int = 64,
    batch_size: int = 8,
    n_pairs: int = 2,
    seconds: float = 10.0,
    tasks=None,
    encode_device: str | None = None,
) -> dict:
    """images/s of online training's data path: decode + augment + computed task (the in-context loader; DALI on
    `device` "cpu" or "gpu" = mixed decoding) + ST-VAE encoding of every frame (posterior mode) on `encode_device`
    (None: CUDA for device "gpu", else the CPU). vae: the frozen ST-VAE (default: ONLINE_BENCH_VAE with random
    weights; the cost does not depend on the weights)."""
    dev = torch.device(encode_device or ("cuda" if device == "gpu" else "cpu"))
    if vae is None:
        vae = build_vae(device=dev, **ONLINE_BENCH_VAE).eval()
    loader = build_incontext_loader(
        source,
        resolution=resolution,
        n_pairs=n_pairs,
        batch_size=batch_size,
        backend=backend,
        device=device if backend == "dali" else "auto",
        tasks=tasks,
    )

    def step():
        b = next(loader)
        encode_segments(vae, b.context.to(dev), tuple(b.context_segments), None)
        encode_segments(vae, b.target.to(dev), tuple(b.target_segments), None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return b.context.shape[0] * (b.context.shape[2] + b.target.shape[2])

    try:
        row = _timed(step, seconds, lambda frames: frames)
    finally:
        loader.close()
    where = f"DALI {'mixed GPU decode' if device == 'gpu' else 'CPU'}" if backend == "dali" else "torch decode"
    vae_dev = "GPU" if dev.type == "cuda" else "CPU"
    return {"impl": f"online path: {where} + augment + VAE encode ({vae_dev})", "workers": 0, **row}


def synthetic_cache_index(n_items: int, shard_size: int = 1024) -> dict:
    """A latent cache index.json (no shard files) of `n_items` pairs over the tasks of the paper's Table 2, split by
    the table's counts: what `bench_plan` plans from."""
    from lavin_fast.data.mixture import PAPER_SAMPLES

    video = {"frame_prediction", "video_depth_estimation", "depth_to_video", "video_normal_estimation"}
    total = sum(PAPER_SAMPLES.values())
    tasks, counts = {}, {}
    for task, n in sorted(PAPER_SAMPLES.items()):
        rows = max(1, n_items * n // total)
        shards = [shard_size] * (rows // shard_size) + ([rows % shard_size] if rows % shard_size else [])
        frames = (5, 5) if task in video else (1, 1)
        lat = (2, 2) if task in video else (1, 1)
        tasks[task] = {"count": rows, "shards": [f"{task}-s0-{k:05d}.safetensors" for k in range(len(shards))]}
        tasks[task].update(shard_counts=shards, input_frames=lat[0], target_frames=lat[1])
        tasks[task].update(pixel_frames=list(frames), latent_shape=[16, lat[0], 32, 32])
        counts[task] = rows
    return {"version": 1, "resolution": [256, 256], "encoder": "synthetic", "counts": counts, "tasks": tasks}


def bench_plan(
    n_items: int = 10_000_000,
    batch_size: int = 8,
    n_pairs: int = 4,
    micro_batches: int = 2000,
    rank: int = 0,
    world: int = 1,
) -> list[dict]:
    """The latent cache's planning at scale, from a synthetic index of `n_items` pairs (the Table 2 tasks):
    host memory of the index (index.json parsed, this rank's pools, the planner: traced allocations, per cached
    pair) and the time to plan one micro-batch (`batch_size` sequences of `n_pairs` + 1 draws) and find every
    drawn row's shard file and row."""
    import json
    import tracemalloc

    from lavin_fast.data.incontext.config import LoaderConfig
    from lavin_fast.data.incontext.planner import Planner
    from lavin_fast.data.latent_cache import cache_pools
    from lavin_fast.data.mixture import paper_task_weights

    text = json.dumps(synthetic_cache_index(n_items))
    n = sum(json.loads(text)["counts"].values())
    tracemalloc.start()
    try:
        index = json.loads(text)
        weights = paper_task_weights(sorted(index["tasks"]))
        cfg = LoaderConfig(n_pairs=n_pairs, batch_size=batch_size, tasks=weights, shard_id=rank, num_shards=world)
        cfg.augment = False
        pools, shards = cache_pools(index, weights, cfg, lambda name: 0)
        planner = Planner(pools, weights, cfg)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()

    def locate(task, item):
        names, cum = shards[task]
        g = pools[task].items[item]
        s = int(np.searchsorted(cum, g, side="right"))
        return names[s], g - (int(cum[s - 1]) if s else 0)

    times = []
    for i in range(micro_batches):
        t0 = time.perf_counter()
        for plan in planner.plan(i):
            for p in plan.pairs:
                locate(plan.task, p.item)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    shape = f"{batch_size} x {n_pairs + 1} draws"
    return [
        {
            "impl": f"cache plan + locate, {n / 1e6:.1f}M items ({shape}, rank {rank} of {world})",
            "ms_per_micro_batch": float(np.median(ms)),
            "p99_ms": float(np.percentile(ms, 99)),
            "micro_batches": micro_batches,
            "load1": round(load, 1),
        },
        {
            "impl": f"cache index host memory, {n / 1e6:.1f}M items",
            "bytes_per_item": held / n,
            "index_mb": held / 1e6,
            "shards": sum(len(v[0]) for v in shards.values()),
        },
    ]


def bench_shards(
    files: list[str],
    resolution: int = 256,
    batch_size: int = 32,
    workers: int = 2,
    seconds: float = 8.0,
    shard_mb: float = 4.0,
    out_dir: str | os.PathLike | None = None,
) -> list[dict]:
    """images/s of the shard readers on the same files written as tar shards (`build_shards`): DALI's webdataset
    reader (CPU decoding, `workers` threads, random resized crop, flip, resize) and the Python reader with PIL in
    the calling process; the PIL DataLoader on the loose files is `bench_pil`."""
    import tempfile

    from lavin_fast.data.shard_loader import DaliShardImages, TorchShardImages
    from lavin_fast.data.shards import build_shards

    out = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="lavin_fast_bench_shards_"))
    folder = out / "files"
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(_epoch_files(files, batch_size)):  # enough files for several batches, as bench_pil reads
        link = folder / f"{k:05d}{pathlib.Path(f).suffix}"
        if not link.exists():
            link.symlink_to(os.path.abspath(f))
    build_shards(str(folder), out / "shards", target_bytes=int(shard_mb * 1e6))
    common = dict(rank=0, world=1, batch_size=batch_size, resolution=(resolution, resolution), buffer=256)
    rows = []
    dali = DaliShardImages(out / "shards", device="cpu", num_threads=workers, **common)
    rows.append(
        {"impl": "shards: DALI webdataset reader (CPU)", "workers": workers, **_timed(lambda: next(dali), seconds, len)}
    )
    dali.close()
    torch_reader = TorchShardImages(out / "shards", **common)
    row = _timed(lambda: next(torch_reader), seconds, len)
    rows.append({"impl": "shards: Python reader + PIL (in process)", "workers": 0, **row})
    torch_reader.close()
    return rows


def bench_cache_reads(
    rows: int = 512, shard_size: int = 256, batch_size: int = 8, n_pairs: int = 4, seconds: float = 4.0, out_dir=None
) -> list[dict]:
    """Micro-batches/s of LatentCacheLoader (plan + read, in the calling thread) from the same synthetic latents
    ([16, 1, 32, 32] float32 per item, as for 256 px images: 128 KiB per pair) written as safetensors shards and as
    tar shards (in `out_dir`, else a temporary folder removed afterwards)."""
    import tempfile

    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="lavin_fast_bench_cache_") as tmp:
            return bench_cache_reads(rows, shard_size, batch_size, n_pairs, seconds, tmp)
    import json

    from safetensors.torch import save_file

    from lavin_fast.data.latent_cache import LatentCacheLoader
    from lavin_fast.data.latent_shards import write_latent_tar

    out = pathlib.Path(out_dir)
    gen = torch.Generator().manual_seed(0)
    counts = [min(shard_size, rows - s) for s in range(0, rows, shard_size)]
    result = []
    for fmt in ("safetensors", "shards"):
        root = out / fmt
        root.mkdir(parents=True, exist_ok=True)
        info = {"count": rows, "shards": [], "shard_counts": counts, "input_frames": 1, "target_frames": 1}
        info.update(pixel_frames=[1, 1], latent_shape=[16, 1, 32, 32])
        for k, n in enumerate(counts):
            a = torch.randn(n, 16, 1, 32, 32, generator=gen)
            b = torch.randn(n, 16, 1, 32, 32, generator=gen)
            if fmt == "shards":
                name = f"colorization-s0-{k:05d}.tar"
                info.setdefault("tar_layouts", []).append(write_latent_tar(root / name, a, b, "colorization"))
            else:
                name = f"colorization-s0-{k:05d}.safetensors"
                save_file({"input": a, "target": b}, str(root / name))
            info["shards"].append(name)
        index = {"version": 1, "format": fmt, "resolution": [256, 256], "counts": {"colorization": rows}}
        index["tasks"] = {"colorization": info}
        (root / "index.json").write_text(json.dumps(index))
        loader = LatentCacheLoader(root, n_pairs=n_pairs, batch_size=batch_size, seed=0)
        row = _timed(lambda loader=loader: next(loader), seconds, lambda b: 1)
        row["micro_batches_per_s"] = row.pop("images_per_s")
        result.append({"impl": f"latent cache reads, {fmt} ({batch_size} x {n_pairs + 1} rows, {rows} items)", **row})
    return result
