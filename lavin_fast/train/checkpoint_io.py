"""Sharded training checkpoints through torch.distributed.checkpoint (DCP), verified and free of code.

Layout of out_dir/checkpoints/:
    step_00001000/                  one checkpoint: DCP shards of model, optimizer and EMA (each rank writes its own)
        trainer_rank{r}.json/.safetensors   per-rank small state: step, LR schedule, data position, RNG states
        CHECKSUMS.json              sha256 of every file above, and the state check the trainer made before saving
    latest                          name of the newest complete checkpoint

A checkpoint is written to `step_N.tmp`, its files fsync'ed and hashed, the manifest written, and the folder renamed
when every rank has finished, so a crash mid-save never leaves a half checkpoint as `latest`; leftover `.tmp` folders
are removed at the next start. Loading verifies the checksums, reads DCP's metadata with a restricted unpickler and
the trainer state from JSON + safetensors (safe_state.py): nothing in a checkpoint folder can run code. The same
files load into 1 process or N (DCP reshards), FSDP2 or DDP.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import random
import shutil
import threading
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lavin_fast.parallel.distributed import DistContext, all_reduce_max, barrier
from lavin_fast.train.ema import EMA
from lavin_fast.train.safe_state import (
    CheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    load_tree,
    read_dcp_metadata,
    save_tree,
)

__all__ = [
    "CheckpointError",
    "last_good_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "remove_orphans",
    "save_checkpoint",
    "start_save",
]

log = logging.getLogger(__name__)
# one process without a process group is a supported case, not a warning (DCP's own save thread emits it too)
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
MANIFEST = "CHECKSUMS.json"
_CHUNK = 1 << 22


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
    try:
        name = pointer.read_bytes()[:256].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} is not a readable UTF-8 checkpoint name ({exc})") from None
    if pathlib.PurePath(name).name != name or not name.startswith("step_") or name.endswith(".tmp"):
        raise CheckpointError(  # an absolute or ../ name would resume another run's checkpoint
            f"{pointer} names {name!r}, not a step_* folder of {root}; delete it to start over, or write the name of "
            "one of that folder's step_* folders into it"
        )
    path = root / name
    if not path.is_dir() or path.is_symlink():
        raise CheckpointError(
            f"{pointer} names {path.name}, which does not exist; delete {pointer} to start over, or point it at "
            f"one of {sorted(p.name for p in root.glob('step_*') if p.is_dir())}"
        )
    return path


def _manifest(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None


def last_good_checkpoint(root: str | pathlib.Path) -> pathlib.Path | None:
    """The newest complete checkpoint whose state passed the trainer's check (finite, within the limit) at save."""
    root = pathlib.Path(root)
    for path in sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True):
        doc = _manifest(path)
        if doc is not None and doc.get("state_check", {}).get("passed") is True:
            return path
    return None


def remove_orphans(root: str | pathlib.Path) -> list[pathlib.Path]:
    """Delete `step_N.tmp` folders and a `latest.tmp` that a crash mid-save left behind (main rank, at start)."""
    root = pathlib.Path(root)
    gone = [p for p in root.glob("step_*.tmp")] + [p for p in (root / "latest.tmp",) if p.exists()]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted save", p)
    return gone


def _sha256(path: pathlib.Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": msd, "optim": osd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def _own_files(folder: pathlib.Path, rank: int) -> list[pathlib.Path]:
    """The files rank `rank` wrote: its DCP shards (__{rank}_*.distcp) and its trainer state."""
    return sorted(p for p in folder.iterdir() if p.name.startswith((f"__{rank}_", f"trainer_rank{rank}.")))


def save_checkpoint(
    root: str | pathlib.Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    keep_last: int = 2,
    state_check: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write checkpoint `step` (collective: every rank calls it) and wait for it. Returns its folder.

    state_check: what the caller verified about the state (recorded in the manifest; `last_good_checkpoint` only
    names checkpoints whose check passed)."""
    return start_save(root, step, model, optimizer, ema, trainer_state, ctx, keep_last, state_check).wait()


class PendingSave:
    """A checkpoint being written: `wait()` returns its folder once every rank has finished it (re-raising what
    failed). Until then the folder is `step_N.tmp` and `latest` names the previous checkpoint."""

    def __init__(self, final: pathlib.Path, thread: threading.Thread | None = None):
        self.final, self._thread, self.error = final, thread, None

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> pathlib.Path:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            err, self.error = self.error, None
            raise err
        return self.final


def checkpoint_group(ctx: DistContext):
    """The process group of background saves: gloo (DCP's async save needs a CPU backend) and apart from the
    training collectives, so that the save thread's collectives never interleave with the step's. Collective."""
    if not ctx.initialized:
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def start_save(
    root: str | pathlib.Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    trainer_state: dict[str, Any],
    ctx: DistContext,
    keep_last: int = 2,
    state_check: dict[str, Any] | None = None,
    *,
    background: bool = False,
    group=None,
) -> PendingSave:
    """Begin checkpoint `step` (collective). The state is copied to host memory before this returns (pinned on
    CUDA), so training may go on; with `background`, DCP writes it (dcp.async_save) and each rank hashes and fsyncs
    its files in a thread, which then agrees with the other ranks over `group` (checkpoint_group) and renames the
    folder. Without it, all of that happens before this returns. A crash at any point leaves `step_N.tmp`, removed
    at the next start, and `latest` on the previous checkpoint."""
    root = pathlib.Path(root)
    name = f"step_{step:08d}"
    tmp, final = root / f"{name}.tmp", root / name
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    save_tree(tmp / f"trainer_rank{ctx.rank}", {**trainer_state, "rng": rng_state(), "world": ctx.world})
    state = _state(model, optimizer, ema)
    finish = functools.partial(_finish_save, root, tmp, final, step, ctx, keep_last, state_check)
    with warnings.catch_warnings():  # one process without a process group is a supported case, not a warning
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if not background:
            dcp.save(state, checkpoint_id=str(tmp))
            finish(None, None)
            return PendingSave(final)
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        pinned = torch.cuda.is_available() and any(t.is_cuda for t in _tensors(state))
        stager = DefaultStager(  # a synchronous copy to host memory: training may change the state after this
            StagingOptions(
                use_pinned_memory=pinned, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
            )
        )
        future = dcp.async_save(
            state, checkpoint_id=str(tmp), process_group=group, async_stager=stager, no_dist=not ctx.initialized
        )
    pending = PendingSave(final)

    def run() -> None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                finish(future, group)
        except BaseException as exc:  # noqa: BLE001 - handed to wait(), which re-raises it in the training thread
            pending.error = exc
        finally:
            stager.close()

    pending._thread = threading.Thread(target=run, name=f"checkpoint-{name}", daemon=True)
    pending._thread.start()
    return pending


def _tensors(tree: Any):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _tensors(v)


def _finish_save(root, tmp, final, step, ctx, keep_last, state_check, future, group) -> None:
    """After the DCP files are written: hash (and fsync) this rank's files, then the main rank writes the manifest,
    renames the folder, moves `latest` and prunes old checkpoints; barriers on `group` (None: the default)."""
    import torch.distributed as dist

    def sync() -> None:
        if ctx.initialized:
            dist.barrier(group=group)

    if future is not None:
        future.result()
    # each rank hashes (and fsyncs) what it wrote, in parallel; the main rank merges the lists
    own = {p.name: _sha256(p, fsync=True) for p in _own_files(tmp, ctx.rank)}
    (tmp / f".sums_rank{ctx.rank}.json").write_text(json.dumps(own))
    sync()
    if ctx.is_main:
        files = {".metadata": _sha256(tmp / ".metadata", fsync=True)}
        for part in sorted(tmp.glob(".sums_rank*.json")):
            files.update(json.loads(part.read_text()))
            part.unlink()
        doc = {"format": 1, "step": step, "world": ctx.world, "files": files, "state_check": state_check or {}}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        (root / "latest.tmp").write_text(final.name)
        (root / "latest.tmp").replace(root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    sync()


def _verify(path: pathlib.Path, ctx: DistContext, trust: bool) -> bool:
    """Check every file against the manifest (files shared round-robin over ranks). Returns False for a legacy
    checkpoint (pickled trainer state, no manifest) loaded with trust=True."""
    doc = _manifest(path)
    legacy = doc is None and any(path.glob("trainer_rank*.pt"))
    if doc is None:
        if legacy and trust:
            log.warning(
                "%s: a checkpoint of an older lavin-fast, loaded unverified because trust_checkpoint is set", path
            )
            return False
        if legacy:
            raise CheckpointError(
                f"{path} was written by an older lavin-fast: its trainer state is a pickle (which can run code when "
                "loaded) and it has no checksums. Resume with --trust-checkpoint true only if you trust where it "
                "came from"
            )
        raise CheckpointError(f"{path} has no readable {MANIFEST}: it is incomplete or not a lavin-fast checkpoint")
    problems = []
    for i, (name, digest) in enumerate(sorted(doc["files"].items())):
        if i % ctx.world != ctx.rank:
            continue
        f = path / name
        if pathlib.Path(name).name != name or not f.is_file():
            problems.append(f"{name}: missing")
        elif _sha256(f) != digest:
            problems.append(f"{name}: sha256 differs from {MANIFEST}")
    flag = all_reduce_max(ctx, torch.tensor([float(bool(problems))], device=ctx.device))
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: " + "; ".join(problems))
    if flag.item() > 0:
        raise CheckpointError(f"checkpoint {path} is corrupt (another rank found a file that fails its checksum)")
    return True


def _shape_problems(state: dict[str, Any], saved: dict[str, Any], path: pathlib.Path) -> None:
    """Refuse a checkpoint of another model: missing, unexpected or differently shaped model/EMA tensors."""
    ours = {f"{part}.{k}": v for part in ("model", "ema") for k, v in state.get(part, {}).items()}
    theirs = {k: v for k, v in saved.items() if k.split(".", 1)[0] in ("model", "ema")}
    if "ema" not in state:
        theirs = {k: v for k, v in theirs.items() if not k.startswith("ema.")}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = [
        f"{k}: checkpoint {tuple(theirs[k].size)} vs model {tuple(ours[k].shape)}"
        for k in sorted(set(ours) & set(theirs))
        if isinstance(theirs[k], TensorStorageMetadata) and tuple(theirs[k].size) != tuple(ours[k].shape)
    ]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"{len(missing)} tensors of this model are not in it (e.g. {missing[:4]})")
        if unexpected:
            lines.append(f"{len(unexpected)} tensors in it are not in this model (e.g. {unexpected[:4]})")
        if shapes:
            lines.append(f"{len(shapes)} tensors differ in shape (e.g. {shapes[:4]})")
        raise CheckpointError(
            f"checkpoint {path} comes from another model: " + "; ".join(lines) + ". Train into a fresh out_dir, or "
            "set the model config it was trained with"
        )


def load_checkpoint(
    path: str | pathlib.Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
    ctx: DistContext,
    trust: bool = False,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load model, optimizer and EMA in place (resharding as needed); returns this rank's trainer state with
    its RNG states already restored. `trust` admits a legacy checkpoint (pickled trainer state, unverified).
    `check(trainer_state)` runs after the checksums and the tensor-shape check, before any tensor is loaded (it
    raises to refuse)."""
    path = pathlib.Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no .metadata): it was interrupted while saving or is not a "
            "lavin-fast training checkpoint; resume from an older step_* folder (edit checkpoints/latest)"
        )
    verified = _verify(path, ctx, trust)
    trainer_state = _read_trainer_state(path, ctx.rank, legacy=not verified)
    state = _state(model, optimizer, ema)
    _shape_problems(state, read_dcp_metadata(path).state_dict_metadata, path)
    if check is not None:  # e.g. the whole model config (a change that keeps every shape)
        check(trainer_state)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                state,
                storage_reader=SafeFileSystemReader(str(path)),
                planner=SafeLoadPlanner(),
            )
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # CheckpointException derives from BaseException
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}. It may be corrupt or come from another "
            "model config; train into a fresh out_dir or resume from an older step_* folder"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    if not isinstance(trainer_state.get("rng"), dict) or not {"torch", "python", "numpy"} <= set(trainer_state["rng"]):
        raise CheckpointError(f"{path}: its trainer state has no complete 'rng' entry (torch, python, numpy)")
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state


def _read_trainer_state(path: pathlib.Path, rank: int, legacy: bool) -> dict[str, Any]:
    suffix = ".pt" if legacy else ".json"
    stem = path / f"trainer_rank{rank}"
    if not stem.with_suffix(suffix).is_file():
        stem = path / "trainer_rank0"  # a different world size: RNG of rank 0, data position re-derived
    if not legacy:
        return load_tree(stem)
    try:  # only with trust_checkpoint: the user vouched for this pickle
        return torch.load(stem.with_suffix(".pt"), weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read {stem.with_suffix('.pt')}: {type(exc).__name__}: {exc}") from exc
