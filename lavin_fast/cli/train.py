"""Flow-matching training of the J-DiT from a YAML config, with `--field value` overrides of any config field.

  lavin-fast train tiny-cpu --steps 200 --lr 3e-4
  torchrun --nproc-per-node 8 -m lavin_fast.cli train 3.4B --latent-cache /data/latents
  lavin-fast train --list-fields            # every field with its description

A field's flag is its name in kebab case (micro_batch_size: --micro-batch-size); the snake_case spelling
(--micro_batch_size) still works for one release, with a note. --steps counts optimizer steps (sample's time-grid
points are --grid-points). Resumes from the newest checkpoint in out_dir/checkpoints (unless --resume false). At the
end the EMA weights are written to out_dir/ema.safetensors, which `lavin-fast sample --dit` loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from lavin_fast.cli.args import BOUNDS, add_deprecated_alias, device_arg
from lavin_fast.train.config import TrainConfig, field_docs


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "config", nargs="?", help="a YAML file, or a shipped config: tiny-cpu, 0.1B, 1.0B, 3.4B; default: the defaults"
    )
    p.add_argument("--list-fields", action="store_true", help="print every config field with its description and exit")
    p.add_argument("--max-memory", type=BOUNDS["max_memory"], metavar="GIB",
                   help="refuse to start when the arguments imply more than this many GiB (default: the free memory)")  # fmt: skip
    docs = field_docs()
    hints = typing.get_type_hints(TrainConfig)
    group = p.add_argument_group("config fields (override the YAML; see --list-fields)")
    for f in dataclasses.fields(TrainConfig):
        flag = flag_of(f.name)
        kw: dict = {"dest": f"cfg_{f.name}", "default": argparse.SUPPRESS, "help": docs.get(f.name, ""), "metavar": "V"}
        if hints[f.name] is bool:
            kw.update(nargs="?", const="true")
        if f.name == "device":
            kw.update(type=device_arg, metavar="{auto,cpu,cuda}")
        group.add_argument(flag, **kw)
        if "_" in f.name:
            add_deprecated_alias(group, f"--{f.name}", flag)


def flag_of(field_name: str) -> str:
    """The command-line flag of a config field: micro_batch_size -> --micro-batch-size."""
    return "--" + field_name.replace("_", "-")


def run(args: argparse.Namespace) -> int:
    """Errors end in one line `lavin-fast train: error: ...` and exit code 2 (cli/main.py; --debug: the traceback)."""
    if args.list_fields:
        defaults = TrainConfig()
        for name, doc in field_docs().items():
            print(f"{name} ({flag_of(name)}, default {getattr(defaults, name)!r}):\n    {doc}")
        return 0
    return _train(args)


def memory_parts(cfg) -> dict[str, float]:
    """A lower bound of one process's training memory from the config alone: weights, gradients and AdamW state of
    the J-DiT (fp32), and one micro-batch's saved block inputs."""
    from lavin_fast.models.dit_configs import get_config

    try:
        mc = get_config(cfg.model, **cfg.model_overrides)
    except (TypeError, ValueError):
        return {}
    params = 12 * mc.hidden_size**2 * mc.depth
    side = max(1, cfg.image_size // (8 * mc.patch_size))
    tokens = 2 * cfg.num_pairs * side * side
    return {
        "model and optimizer state": params * 4 * 4.0,
        "activations": float(cfg.micro_batch_size) * tokens * mc.hidden_size * mc.depth * 4,
        "pixels": float(cfg.micro_batch_size) * 2 * cfg.num_pairs * 3 * cfg.image_size**2 * 4,
    }


def _train(args: argparse.Namespace) -> int:
    from lavin_fast.preflight import check_memory
    from lavin_fast.runlock import run_lock
    from lavin_fast.train.config import load_config

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    cfg = load_config(args.config, overrides)
    check_memory(memory_parts(cfg), "train", args.max_memory)
    with run_lock(cfg.out_dir, "train"):  # a second run on this out_dir stops here, naming the first
        return _fit(cfg, show_config=not args.config)


def _fit(cfg, show_config: bool) -> int:
    from lavin_fast.parallel.distributed import abort, teardown
    from lavin_fast.train.config import to_yaml
    from lavin_fast.train.trainer import Trainer

    trainer = Trainer(cfg)
    ctx = trainer.ctx
    try:  # a failing rank leaves the group at once: no barrier on its failure path (parallel/distributed.py)
        if ctx.is_main:
            where = f"resuming from {trainer.resumed_from}" if trainer.resumed_from else "from scratch"
            print(
                f"training {cfg.model} on {ctx.world} process(es) ({ctx.device.type}, {cfg.parallel if ctx.world > 1 else 'single'}"
                f", {'bf16' if trainer.bf16 else 'fp32'}), {where}; gradient accumulation {trainer.accum}",
                flush=True,
            )
            if show_config:
                print(to_yaml(cfg), flush=True)
        result = trainer.fit()
        path = trainer.export_ema(trainer.out_dir / "ema.safetensors")
        if ctx.is_main:
            last = result.losses[-1][1] if result.losses else float("nan")
            print(
                f"step {result.step}, last loss {last:.4f}; checkpoint {result.checkpoint}; EMA weights {path}; "
                f"metrics {trainer.out_dir / 'metrics.jsonl'}"
            )
    except BaseException:
        abort(ctx)
        raise
    teardown(ctx)
    return 0
