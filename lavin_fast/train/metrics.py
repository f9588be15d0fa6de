"""Training metrics on rank 0: tqdm progress bar, JSON-lines file, TensorBoard scalars, and MFU.

MFU (model FLOPs utilisation) = model FLOPs per second / the device's dense bf16 peak. Model FLOPs of a
training step are 3x the forward FLOPs (backward = 2x forward), counting every matrix multiply of the J-DiT
(embedders, q/k/v/o projections, attention scores and values, SwiGLU, modulations, final layer; not the last
block's context-stream outputs, which nothing reads) but not the recomputation
of activation checkpointing (that is hardware FLOPs, not model FLOPs), nor norms, RoPE or elementwise work.
"""

from __future__ import annotations

import json
import logging
import pathlib
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from lavin_fast._optional import optional_import
from lavin_fast.parallel.distributed import DistContext

# dense bf16 peak TFLOP/s per device, by substring of the device name (vendor figures, no sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}


def device_peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return peak
    return None


@dataclass
class DiTShape:
    """The numbers the J-DiT's FLOPs depend on."""

    hidden: int
    depth: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_hidden: int
    patch: int = 2
    channels: int = 16


def dit_forward_flops(shape: DiTShape, lc: int, lx: int, *, attention: bool = True) -> float:
    """Forward FLOPs of one sequence with lc context and lx target tokens (2 FLOPs per multiply-add).

    attention=False leaves out the scores and weighted values (what torch's FlopCounterMode sees when
    attention is a custom op; the tests compare against it).
    """
    d, l = shape.hidden, lc + lx
    qkv = d * (shape.heads + 2 * shape.kv_heads) * shape.head_dim
    out = shape.heads * shape.head_dim * d
    mlp = 3 * d * shape.mlp_hidden
    attn = 2 * l * shape.heads * shape.head_dim if attention else 0  # scores and weighted values, per query
    patch_dim = shape.patch * shape.patch * shape.channels
    macs = shape.depth * l * (qkv + out + mlp + attn)
    macs -= lc * (out + mlp)  # the last block's context stream needs only its keys and values
    if attention:
        macs -= lc * attn
    macs += l * patch_dim * d + lx * d * patch_dim  # embedders, final projection
    # per sequence (not per token): time MLP, the two streams' modulations per block, the final modulation
    macs += 256 * d + d * d + shape.depth * 2 * d * 4 * d + d * d
    return 2.0 * macs


def dit_train_flops(shape: DiTShape, lc: int, lx: int, batch: int) -> float:
    return 3.0 * batch * dit_forward_flops(shape, lc, lx)


def dit_shape_of(model: Any) -> DiTShape | None:
    """Read the shape from a J-DiT's `cfg` (None for models without one, e.g. test stand-ins)."""
    model = getattr(model, "module", model)  # DDP
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return None
    try:
        hidden = cfg.hidden_size
        heads = cfg.num_heads
        head_dim = getattr(cfg, "head_dim", hidden // heads)
        kv_heads = getattr(cfg, "num_kv_heads", None) or heads // max(getattr(cfg, "kv_group", 1) or 1, 1)
        mlp = (
            getattr(cfg, "mlp_hidden", None) or getattr(cfg, "ffn_hidden", None) or int((4 * hidden * 2 / 3) / 64) * 64
        )
        return DiTShape(
            hidden=hidden,
            depth=cfg.depth,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            mlp_hidden=mlp,
            patch=getattr(cfg, "patch_size", 2),
            channels=getattr(cfg, "in_channels", 16),
        )
    except AttributeError:
        return None


class MetricsWriter:
    """JSON lines (out_dir/metrics.jsonl) and TensorBoard (out_dir/tensorboard); a no-op off rank 0."""

    def __init__(self, out_dir: str | pathlib.Path, *, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.path = pathlib.Path(out_dir) / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:  # without the [demo] extra: one warning, and metrics.jsonl alone
                try:
                    optional_import("tensorboard")
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as exc:
                    logging.getLogger(__name__).warning("TensorBoard scalars off (metrics.jsonl has them): %s", exc)
                else:
                    self.tb = SummaryWriter(str(pathlib.Path(out_dir) / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def write_ranks(self, step: int, per_rank: list[list[float]]) -> None:
        """One JSON line per logging step in ranks.jsonl: each rank's RANK_FIELDS."""
        if not self.enabled:
            return
        rows = [dict(zip(RANK_FIELDS, r, strict=True)) for r in per_rank]
        with (self.path.parent / "ranks.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "ranks": rows}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop JSON lines of steps after `step` (a resumed run redoes them)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
    p = pathlib.Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- per-rank metrics
RANK_FIELDS = ("interval_s", "busy_s", "data_wait_s", "memory_gb")
"""What each rank reports at a logging step: the interval's wall time, the part not spent blocked in the interval's
one device read (the rank's own work: a straggler is the rank the others wait for), the part spent waiting for
data, and its peak memory (CUDA: max allocated; CPU: the process's peak resident set)."""


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gather_rank_stats(ctx: DistContext, values: list[float]) -> list[list[float]]:
    """Every rank's `values` (RANK_FIELDS), on every rank: one all_gather of a few floats, at logging steps only."""
    local = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    if not ctx.initialized or ctx.world == 1:
        return [local.tolist()]
    import torch.distributed as dist

    out = [torch.empty_like(local) for _ in range(ctx.world)]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


def stragglers(per_rank: list[list[float]], pct: float) -> list[tuple[int, float, float]]:
    """(rank, its busy + data-wait seconds, percent above the median of the ranks) for each rank more than `pct`
    percent above the median."""
    work = [r[1] + r[2] for r in per_rank]
    med = statistics.median(work)
    if med <= 0:
        return []
    return [(i, w, 100.0 * (w / med - 1)) for i, w in enumerate(work) if w > med * (1 + pct / 100)]


def rank_summary(per_rank: list[list[float]]) -> dict[str, float]:
    """Scalars for the metrics row: the max and min over ranks of each field."""
    out = {}
    for j, name in enumerate(RANK_FIELDS[1:], start=1):
        col = [r[j] for r in per_rank]
        out[f"rank_{name}_max"], out[f"rank_{name}_min"] = max(col), min(col)
    return out
