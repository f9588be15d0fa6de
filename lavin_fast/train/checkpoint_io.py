"""Sharded training checkpoints through torch.distributed.checkpoint (DCP).

Layout of out_dir/checkpoints/:
    step_00001000/            one checkpoint: DCP shards of model, optimizer and EMA (each rank writes its own)
        trainer_rank{r}.pt    per-rank small state: step, LR schedule, data position, RNG states
    latest                    name of the newest complete checkpoint

A checkpoint is written to `step_N.tmp` and renamed when every rank has finished, so a crash mid-save never
leaves a half checkpoint as `latest`. The same files load into 1 process or N (DCP reshards), FSDP2 or DDP.
"""

from __future__ import annotations

import pathlib
import random
import shutil
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lavin_fast.train.distributed import DistContext, barrier
from lavin_fast.train.ema import EMA


class CheckpointError(RuntimeError):
    """A missing, incomplete or corrupt training checkpoint."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(root: str | pathlib.Path) -> pathlib.Path | None:
    root = pathlib.Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(
            f"{pointer} names {path.name}, which does not exist; delete {pointer} to start over, or point it at "
            f"one of {sorted(p.name for p in root.glob('step_*') if p.is_dir())}"
        )
    return path


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def save_checkpoint(
    root: str | pathlib.Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    keep_last: int = 2,
) -> pathlib.Path:
    """Write checkpoint `step` (collective: every rank calls it). Returns its folder."""
    root = pathlib.Path(root)
    name = f"step_{step:08d}"
    tmp, final = root / f"{name}.tmp", root / name
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    with warnings.catch_warnings():  # one process without a process group is a supported case, not a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(model, optimizer, ema), checkpoint_id=str(tmp))
    torch.save({**trainer_state, "rng": rng_state(), "world": ctx.world}, tmp / f"trainer_rank{ctx.rank}.pt")
    barrier(ctx)
    if ctx.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(name)
        (root / "latest.tmp").replace(root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def load_checkpoint(
    path: str | pathlib.Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    ctx: DistContext,
) -> dict[str, Any]:
    """Load model, optimizer and EMA in place (resharding as needed); returns this rank's trainer state with
    its RNG states already restored."""
    path = pathlib.Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no .metadata): it was interrupted while saving or is not a "
            "lavin-fast training checkpoint; resume from an older step_* folder (edit checkpoints/latest)"
        )
    state = _state(model, optimizer, ema)
    try:
        saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    except Exception as exc:
        raise CheckpointError(f"cannot read the metadata of checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    missing = [f"{part}.{k}" for part in ("model", "ema") for k in state.get(part, {}) if f"{part}.{k}" not in saved]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors of this model (e.g. {missing[:3]}): it comes from another "
            "model config; train into a fresh out_dir or set the config it was trained with"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            # partial: parameters that never received a gradient (the J-DiT's last-block context outputs, which
            # nothing reads) have no optimizer state in the checkpoint; they keep the zero state made here
            dcp.load(state, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
    except Exception as exc:
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}. It may be corrupt or come from another "
            "model config; train into a fresh out_dir or resume from an older step_* folder"
        ) from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    rank_file = path / f"trainer_rank{ctx.rank}.pt"
    if not rank_file.is_file():
        rank_file = path / "trainer_rank0.pt"  # a different world size: RNG of rank 0, data position re-derived
    try:
        trainer_state = torch.load(rank_file, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {rank_file}: {type(exc).__name__}: {exc}") from exc
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state
