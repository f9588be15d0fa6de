"""One resume step: find the checkpoint to continue from, read it, check it against this run, apply it.

`resume(trainer)` is the only place that does this; `Trainer.__init__` calls it once, after the model, optimizer,
EMA, schedule and data source are built. In order:
1. `checkpoints/latest` names the checkpoint (none: a fresh run);
2. its files are checked against CHECKSUMS.json, then the tensor names and shapes (DCP's metadata) and this rank's
   small trainer state (JSON + safetensors, no pickle) are compared with this run *before* any tensor is loaded:
   the whole model config must be the same (`model_config_changes`: an architecture change that keeps every
   tensor shape, e.g. num_heads 4 -> 8 at the same width, is refused, listing the fields);
3. model, optimizer and EMA are loaded (DCP reshards to this run's ranks), RNG states restored;
4. step and schedule are restored; this run's optimizer hyper-parameters replace the saved ones (each change logged);
5. the data stream: the same number of data-parallel ranks continues each rank's saved stream; another number
   (elastic resume: 2 -> 1, 1 -> 2 processes, ...) seeks the new streams to the same *global* sample position
   (`samples_seen`) when the source can (`seek(samples)`), so no sample repeats and none is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

from lavin_fast.parallel.distributed import unwrap
from lavin_fast.train.checkpoint_io import CheckpointError, latest_checkpoint, load_checkpoint

Trainer = Any  # lavin_fast.train.trainer.Trainer (which imports this module): cfg, ctx, data_ctx, model, optimizer,
# ema, scheduler, source, ckpt_dir, step, samples_seen

log = logging.getLogger(__name__)

# config fields whose new values a resume applies to the restored optimizer and schedule
OPTIMIZER_FIELDS = ("lr", "min_lr", "warmup_steps", "schedule", "steps", "weight_decay", "betas", "eps")
# config fields that change what the data stream produces: a resume notes them
DATA_FIELDS = ("data", "latent_cache", "image_size", "num_pairs", "tasks", "micro_batch_size", "batch_size")
# model-config fields that change how, not what, the model computes: free to change on a resume
MODEL_EXECUTION_FIELDS = ("backend", "rope_in_attention", "grad_checkpointing")
# model-config fields that are training options (stochastic depth, null-context rate): applied, and logged
MODEL_TRAINING_FIELDS = ("drop_path", "uncond_ratio")


def model_config_of(model) -> dict[str, Any] | None:
    """The J-DiT's config as a plain dict (None for a model without a dataclass `cfg`, e.g. a test stand-in)."""
    cfg = getattr(unwrap(model), "cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None


def saved_model_config(state: dict[str, Any]) -> dict[str, Any] | None:
    """The model config a checkpoint was trained with: recorded since this module exists; for an older checkpoint,
    rebuilt from its TrainConfig (model + model_overrides) unless it started from a file (init_from)."""
    if isinstance(state.get("model_config"), dict):
        return state["model_config"]
    saved = state.get("config") or {}
    if not saved.get("model") or saved.get("init_from"):
        return None
    from lavin_fast.models.dit_configs import get_config

    try:
        return dataclasses.asdict(get_config(saved["model"], **dict(saved.get("model_overrides") or {})))
    except (TypeError, ValueError):
        return None


def model_config_changes(saved: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """`field: saved -> now` for every model-config field that differs, except the execution options
    (MODEL_EXECUTION_FIELDS) and the training options (MODEL_TRAINING_FIELDS). Unknown on either side: none."""
    if saved is None or now is None:
        return []
    skip = set(MODEL_EXECUTION_FIELDS) | set(MODEL_TRAINING_FIELDS)
    out = []
    for key in sorted((set(saved) | set(now)) - skip):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def check_resumable(path: pathlib.Path, state: dict[str, Any], trainer: Trainer) -> None:
    """Refuse a checkpoint whose model config differs from this run's (before any tensor is read)."""
    saved, now = saved_model_config(state), model_config_of(trainer.model)
    changes = model_config_changes(saved, now)
    if changes:
        raise CheckpointError(
            f"checkpoint {path} was trained with another model config; these fields differ (checkpoint -> this "
            f"run): {'; '.join(changes)}. Set the model config it was trained with, or train into a fresh out_dir"
        )
    if saved is None and now is not None:
        log.warning("%s records no model config: only tensor names and shapes were checked", path)
    for key in MODEL_TRAINING_FIELDS:
        if saved and now and key in saved and saved[key] != now.get(key):
            log.warning("resume from %s: model %s %r -> %r (applied)", path.name, key, saved[key], now.get(key))


def resume(trainer: Trainer) -> pathlib.Path | None:
    """Continue `trainer` from its out_dir's latest checkpoint (collective: every rank calls it). Returns the
    checkpoint's folder, or None when there is none (or cfg.resume is off)."""
    cfg = trainer.cfg
    if not cfg.resume:
        return None
    path = latest_checkpoint(trainer.ckpt_dir)
    if path is None:
        return None
    state = load_checkpoint(
        path,
        trainer.model,
        trainer.optimizer,
        trainer.ema,
        trainer.ctx,
        trust=cfg.trust_checkpoint,
        check=lambda st: check_resumable(path, st, trainer),
    )
    trainer.step = int(state["step"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    apply_config(trainer, path, state.get("config") or {})
    saved_batch = int((state.get("config") or {}).get("batch_size", cfg.batch_size))
    trainer.samples_seen = int(state.get("samples_seen", trainer.step * saved_batch))
    apply_data_position(trainer, path, state)
    return path


def apply_config(trainer: Trainer, path: pathlib.Path, saved: dict[str, Any]) -> None:
    """The restored optimizer and schedule take this run's hyperparameters (each change is logged); data
    changes are noted. Without this, the param_groups saved in the checkpoint would silently win."""
    cfg, optimizer, scheduler = trainer.cfg, trainer.optimizer, trainer.scheduler
    now = dataclasses.asdict(cfg)
    for k in (k for k in OPTIMIZER_FIELDS if k in saved and saved[k] != now[k]):
        log.warning("resume from %s: %s %r -> %r (applied)", path.name, k, saved[k], now[k])
    for k in (k for k in DATA_FIELDS if k in saved and saved[k] != now[k]):
        log.warning(
            "resume from %s: %s %r -> %r: the data stream continues from its saved position with the new value",
            path.name, k, saved[k], now[k],
        )  # fmt: skip
    decay = (cfg.weight_decay, 0.0)  # matrices, then norms/biases (see Trainer.__init__)
    for group, wd in zip(optimizer.param_groups, decay, strict=True):
        group.update(weight_decay=wd, betas=tuple(cfg.betas), eps=cfg.eps, initial_lr=cfg.lr)
    # the schedule function is rebuilt from this config; its base and the lr in force follow it
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def apply_data_position(trainer: Trainer, path: pathlib.Path, state: dict[str, Any]) -> None:
    """Same data-parallel world: each rank continues its saved stream. Another world: the source seeks to the
    global sample position when it can (`seek(samples_seen)`), else its streams restart (logged)."""
    world = trainer.data_ctx.world
    saved_world = int(state.get("data_world", state.get("world", world)))
    if saved_world == world:  # data-parallel ranks (processes / context_parallel)
        trainer.source.load_state_dict(state["data"])
        return
    seek = getattr(trainer.source, "seek", None)
    if seek is not None:
        seek(trainer.samples_seen)
        if trainer.ctx.is_main:
            log.info(
                "%s was written by %s data-parallel ranks, this run has %s: the data streams continue at global "
                "sample %d",
                path, saved_world, world, trainer.samples_seen,
            )  # fmt: skip
        return
    if trainer.ctx.is_main:
        log.warning(
            "%s was written by %s data-parallel ranks, this run has %s: model, optimizer, EMA and schedule are "
            "restored; this data source (%s) cannot seek to a global sample position, so its streams restart "
            "from their beginning",
            path, saved_world, world, type(trainer.source).__name__,
        )  # fmt: skip
