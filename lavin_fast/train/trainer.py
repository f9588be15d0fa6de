"""The flow-matching trainer (the paper's Algorithm 1 at scale).

One optimizer step: `accum` micro-batches per process (gradient accumulation, gradient sync only on the
last), each drawing its times / noise / null-context decisions from generators keyed by (seed, step,
micro-batch, global sample index); AdamW (fused on CUDA); gradient clipping; EMA in float32; LR schedule.
Every rank computes the same global loss (all-reduced) and stops together on a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from lavin_fast.flow.loss import LOSSES, draw_flow_randomness, flow_matching_loss
from lavin_fast.models.checkpoints import dit_file_metadata, load_dit_file
from lavin_fast.models.cpu_path import resolve_cpu_path
from lavin_fast.models.dit import build_dit
from lavin_fast.parallel.distributed import (
    DistContext,
    all_reduce_max,
    all_reduce_mean,
    blocks_of,
    set_grad_sync,
    setup,
    unwrap,
    wrap_model,
)
from lavin_fast.parallel.mesh import fsdp_mesh, resolve_mesh
from lavin_fast.seeding import mix_seed
from lavin_fast.train.activation_checkpointing import apply_activation_checkpointing, resolve_policy
from lavin_fast.train.checkpoint_io import checkpoint_group, last_good_checkpoint, remove_orphans, start_save
from lavin_fast.train.config import ConfigError, TrainConfig, to_yaml
from lavin_fast.train.ema import EMA, clean_param_name
from lavin_fast.train.export import global_shape, stream_full_tensors, write_safetensors_stream
from lavin_fast.train.fused_versions import bump_versions_after_step
from lavin_fast.train.metrics import (
    MetricsWriter,
    device_peak_tflops,
    dit_shape_of,
    dit_train_flops,
    gather_rank_stats,
    peak_memory_gb,
    rank_summary,
    stragglers,
)
from lavin_fast.train.resume import model_config_of, resume
from lavin_fast.train.schedule import build_scheduler
from lavin_fast.train.sources import LatentSource, build_source, pop_task_counts, share_in_cp_group

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss, the gradient norm or the parameters became non-finite (or absurdly large); nothing of that state
    was saved."""


def check_writable(folder: pathlib.Path, what: str) -> None:
    """Create `folder` and write a probe file in it, so that a read-only or full location fails before any
    step is trained rather than at the first save."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe"):
            pass
    except OSError as exc:
        raise ConfigError(f"config field {what!r}: cannot write to {folder}: {exc.strerror or exc}") from None


@dataclass
class TrainResult:
    """What `Trainer.fit` returns.

    losses: (step, global mean loss) of every step this run made (1-based step numbers).
    step: the step count reached. checkpoint: the last checkpoint written (None if none).
    stopped_early: True when max_minutes ended the run before `steps`.
    """

    losses: list[tuple[int, float]] = field(default_factory=list)
    step: int = 0
    checkpoint: pathlib.Path | None = None
    stopped_early: bool = False


ModelFactory = Callable[[TrainConfig, torch.device], nn.Module]
SourceFactory = Callable[[TrainConfig, DistContext], LatentSource]


def default_model_factory(cfg: TrainConfig, device: torch.device) -> nn.Module:
    overrides = dict(cfg.model_overrides)
    overrides["grad_checkpointing"] = cfg.grad_checkpointing
    if cfg.init_from:
        path = pathlib.Path(cfg.init_from)
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"init_from: {path} {what} (give a J-DiT .safetensors file)")
        # our files carry their config (model / model_overrides do not apply); published ones take cfg.model
        model = load_dit_file(path, cfg.model, device=device, dtype=torch.float32)
        runtime = {k: v for k, v in cfg.model_overrides.items() if k in model.RUNTIME_OPTIONS}
        return model.configure(**runtime, grad_checkpointing=cfg.grad_checkpointing).train()
    return build_dit(cfg.model, device=device, **overrides)


class Trainer:
    """Builds everything from a TrainConfig and trains with `fit()`.

    model_factory(cfg, device) -> the J-DiT (default: build_dit(cfg.model, **cfg.model_overrides)).
    source_factory(cfg, ctx) -> the latent source (default: the demo data through the VAE, or the cache).
    ctx: the distributed context (default: from torchrun's environment).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model_factory: ModelFactory | None = None,
        source_factory: SourceFactory | None = None,
        ctx: DistContext | None = None,
    ):
        self.cfg = cfg
        self.ctx = ctx or setup(cfg.device, cfg.dist_backend)
        dev = self.ctx.device
        # context parallelism: the cp ranks of a group share their samples; data is split over world / cp groups
        if self.ctx.world % cfg.context_parallel:
            raise ConfigError(
                f"config field 'context_parallel': {cfg.context_parallel} does not divide the {self.ctx.world} processes"
            )
        try:  # the mesh: dp_replicate x dp_shard x cp (parallel/mesh.py)
            self.mesh = resolve_mesh(self.ctx.world, cfg.context_parallel, cfg.dp_replicate, cfg.dp_shard)
        except ValueError as exc:
            raise ConfigError(f"config fields dp_replicate / dp_shard / context_parallel: {exc}") from None
        if cfg.parallel == "ddp" and self.mesh.dp_replicate > 1 and (cfg.dp_replicate or cfg.dp_shard):
            raise ConfigError("config fields dp_replicate / dp_shard: they shape FSDP2's mesh; parallel 'ddp' "
                              "replicates over every rank (leave them at 0)")  # fmt: skip
        dp_world = self.ctx.world // cfg.context_parallel
        self.data_ctx = dataclasses.replace(self.ctx, rank=self.ctx.rank // cfg.context_parallel, world=dp_world)
        g = cfg.micro_batch_size * dp_world
        if cfg.batch_size % g:
            raise ConfigError(
                f"config field 'batch_size': {cfg.batch_size} is not a multiple of micro_batch_size x processes = "
                f"{cfg.micro_batch_size} x {dp_world} = {g}"
                + (f" (processes / context_parallel {cfg.context_parallel})" if cfg.context_parallel > 1 else "")
            )
        self.accum = cfg.batch_size // g
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
        try:  # CPU path (models/cpu_path.py): compiled blocks and/or bf16 autocast on CPUs that have bf16
            calls = cfg.steps * self.accum if cfg.max_minutes is None else None  # forward+backward per micro-step
            self.cpu_path = resolve_cpu_path(cfg.cpu_path, dev, expected_calls=calls)
        except ValueError as exc:
            raise ConfigError(f"config field 'cpu_path': {exc}") from None
        if cfg.compile and not self.cpu_path.compile:  # the config field compile asks for it on any device
            self.cpu_path = dataclasses.replace(self.cpu_path, compile=True, why="config field compile")
        self.bf16 = self.bf16 or self.cpu_path.bf16
        compile_blocks = self.cpu_path.compile
        self.out_dir = pathlib.Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.ctx.is_main:
            check_writable(self.out_dir, "out_dir")
            check_writable(self.ckpt_dir, "out_dir")
            remove_orphans(self.ckpt_dir)

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = (model_factory or default_model_factory)(cfg, dev).to(dev)
        self.shape = dit_shape_of(model)
        # the published field: the model's uncond_ratio, unless the run sets null_prob
        model_cfg = getattr(model, "cfg", None)
        self.null_prob = cfg.null_prob if cfg.null_prob is not None else getattr(model_cfg, "uncond_ratio", 0.1)
        self.cp = None
        if cfg.context_parallel > 1:
            from lavin_fast.parallel.context_parallel import attach, setup_context_parallel

            heads = getattr(model_cfg, "num_heads", 0)
            self.cp = setup_context_parallel(
                self.ctx,
                cfg.context_parallel,
                cfg.context_parallel_mode,
                num_heads=heads,
                ulysses=cfg.context_parallel_ulysses,
            )
            attach(model, self.cp)
        self.ac_policy = resolve_policy(cfg.activation_checkpointing, cfg.grad_checkpointing)
        own = getattr(model_cfg, "grad_checkpointing", False)  # the J-DiT checkpoints every block itself
        if own and self.ac_policy != "full" and hasattr(model, "configure"):
            model.configure(grad_checkpointing=False)  # the policy below is applied per block instead
        if cfg.float8:
            from lavin_fast.train.float8 import convert_to_float8

            convert_to_float8(model, dev)
        checkpointed: list[int] = []
        if self.ac_policy != "none" and not (own and self.ac_policy == "full"):
            checkpointed = apply_activation_checkpointing(
                blocks_of(model),
                self.ac_policy,
                cfg.activation_checkpointing_every,
                compile_backend=cfg.compile_backend if compile_blocks else None,  # compiled inside the checkpoint
            )
        if dev.type == "cpu" and self.ctx.is_main:
            log.info(self.cpu_path.describe())
        if compile_blocks:
            for i, block in enumerate(blocks_of(model)):
                if i not in checkpointed:
                    block.compile(backend=cfg.compile_backend)
        mesh = None
        if self.ctx.world > 1 and cfg.parallel == "fsdp":
            mesh = fsdp_mesh(self.mesh, dev.type)
            if self.ctx.is_main:
                log.info("mesh: %s (FSDP2 %s)", self.mesh.describe(), "HSDP" if self.mesh.dp_replicate > 1 else "")
        self.model = wrap_model(model, self.ctx, parallel=cfg.parallel, bf16=self.bf16, mesh=mesh)
        self.model.train()
        self.ema = EMA(self.model, cfg.ema_decay)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            fused=_fused_optimizer(dev, decay + no_decay),
        )
        if self.optimizer.defaults.get("fused"):  # fused steps leave the version counters (train/fused_versions.py)
            bump_versions_after_step(self.optimizer)
        self.scheduler = build_scheduler(
            self.optimizer,
            steps=cfg.steps,
            warmup_steps=cfg.warmup_steps,
            schedule=cfg.schedule,
            lr=cfg.lr,
            min_lr=cfg.min_lr,
        )
        # under context parallelism one rank per cp group decodes and encodes, and shares the batch
        make_source = functools.partial(source_factory or default_source_factory, cfg, self.data_ctx)
        self.source = share_in_cp_group(make_source, self.cp, self.ctx)
        self.step = 0
        self._pending: list[tuple[int, torch.Tensor]] = []  # steps whose loss / grad norm the host has not read
        self._flushed: list[tuple[int, float, float]] = []  # read, not yet logged
        # per-data-rank stream for drop path / dropout (the cp ranks of one sequence draw the same)
        torch.manual_seed(mix_seed(cfg.seed, self.data_ctx.rank, 7))
        self._pending_save = None
        self._ckpt_group = checkpoint_group(self.ctx) if cfg.async_checkpoint else None
        self.samples_seen = 0  # global samples consumed (the data position an elastic resume seeks to)
        self.resumed_from: pathlib.Path | None = resume(self)

    # ------------------------------------------------------------------ state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "data": self.source.state_dict(),
            "data_world": self.data_ctx.world,
            "samples_seen": self.samples_seen,
            "config": dataclasses.asdict(self.cfg),
            "model_config": model_config_of(self.model),
        }

    def _check_state(self) -> dict[str, Any]:
        """Every parameter and EMA value finite and within param_abs_limit, over all ranks; raises
        TrainingDiverged (naming the last good checkpoint) otherwise. Returns what goes into the manifest."""
        bad, absmax = torch.zeros((), device=self.ctx.device), torch.zeros((), device=self.ctx.device)
        for t in [*self.model.parameters(), *self.ema.shadow.values()]:
            local = (t.to_local() if hasattr(t, "to_local") else t).detach()
            if local.numel() == 0:
                continue
            finite = torch.isfinite(local)
            bad = torch.maximum(bad, (~finite).any().float())
            absmax = torch.maximum(absmax, local.abs().masked_fill(~finite, 0).max().float())
        bad_v, absmax_v = all_reduce_max(self.ctx, torch.stack([bad, absmax])).tolist()
        limit = self.cfg.param_abs_limit
        if bad_v > 0 or absmax_v > limit:
            last = self._last_good()
            where = f"the last good checkpoint is {last}" if last else "no good checkpoint was written yet"
            what = "non-finite values" if bad_v > 0 else f"values up to {absmax_v:.3g} (param_abs_limit {limit:g})"
            raise TrainingDiverged(
                f"step {self.step}: the parameters or the EMA hold {what}; this state was not saved ({where}). "
                "Resume from it with a lower --lr, a longer --warmup-steps or --grad-clip 1.0; check --eps and the "
                "data for NaN/Inf."
            )
        return {"passed": True, "finite": True, "param_abs_max": absmax_v, "param_abs_limit": limit}

    def save(self) -> pathlib.Path:
        """Checkpoint this step (collective). With async_checkpoint the files are written in the background and
        the returned folder exists once `wait_for_save()` returns (the next save and the end of `fit` wait)."""
        check = self._check_state()
        self.wait_for_save()
        self._pending_save = start_save(
            self.ckpt_dir,
            self.step,
            self.model,
            self.optimizer,
            self.ema,
            self._trainer_state(),
            self.ctx,
            self.cfg.keep_last,
            state_check=check,
            background=self.cfg.async_checkpoint,
            group=self._ckpt_group,
        )
        return self._pending_save.final

    def wait_for_save(self) -> pathlib.Path | None:
        """Wait for the checkpoint being written (re-raising its failure); its folder, or None if none was."""
        pending, self._pending_save = self._pending_save, None
        return pending.wait() if pending is not None else None

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        use = self.bf16 and not (self.ctx.world > 1 and self.cfg.parallel == "fsdp")  # FSDP2 casts itself
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=use)

    def train_step(self, check: bool = True) -> int:
        """One optimizer step; returns the global tokens. Its [global mean loss, gradient norm before clipping] join
        `self._pending` on the device. With `check`, every pending step's values are read on the host at once,
        before this step's update (one device sync), into `self._flushed` (step, loss, norm), and a non-finite value
        stops the run: this step's update is not applied. Without it nothing waits for the device."""
        cfg, ctx = self.cfg, self.data_ctx  # data coordinates: the cp ranks of a group share samples
        b = cfg.micro_batch_size
        loss_scale = 1.0 if self.cp is None else self.cp.loss_scale
        self.optimizer.zero_grad(set_to_none=True)
        local_loss = torch.zeros((), device=ctx.device)
        tokens = 0
        for k in range(self.accum):
            t_wait = time.perf_counter()
            x1, cond = self.source.next_batch()
            self._data_wait_s += time.perf_counter() - t_wait
            g0 = k * b * ctx.world  # sample index k * G + rank * b + i within the step's global batch
            draws = draw_flow_randomness(
                seed=cfg.seed,
                step=self.step,
                indices=range(g0 + ctx.rank * b, g0 + (ctx.rank + 1) * b),
                group=range(g0, g0 + b * ctx.world),
                latent_shape=x1.shape[1:],
                null_prob=self.null_prob,
                device=ctx.device,
                t_mean=cfg.t_mean,
                t_std=cfg.t_std,
            )
            with set_grad_sync(self.model, k == self.accum - 1), self._autocast():
                loss, _ = flow_matching_loss(self.model, x1, cond, draws, l1_weight=LOSSES[cfg.loss])
                (loss * (loss_scale / self.accum)).backward()
            local_loss += loss.detach() / self.accum
            p = getattr(self.shape, "patch", 2)
            per_frame = (x1.shape[3] // p) * (x1.shape[4] // p)
            tokens += b * (cond.shape[2] + x1.shape[2]) * per_frame
            self._last_shapes = (cond.shape[2] * per_frame, x1.shape[2] * per_frame, b * self.accum * ctx.world)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        stats = all_reduce_mean(self.ctx, torch.stack([local_loss.float(), norm.float().to(ctx.device)]))
        self._pending.append((self.step + 1, stats))
        if check:
            t_read = time.perf_counter()
            values = torch.stack([s for _, s in self._pending]).tolist()  # the interval's one device sync
            self._blocked_s += time.perf_counter() - t_read
            steps = [st for st, _ in self._pending]
            self._pending.clear()
            for st, (loss_v, norm_v) in zip(steps, values, strict=True):
                if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise self._diverged(st, loss_v, norm_v, applied=st < steps[-1])
                self._flushed.append((st, loss_v, norm_v))
        self.optimizer.step()
        if cfg.float8 and self.ctx.world > 1 and cfg.parallel == "fsdp":
            from lavin_fast.train.float8 import after_optimizer_step

            after_optimizer_step(self.model)
        self.scheduler.step()
        self.ema.update(self.model)
        self.step += 1
        self.samples_seen += cfg.batch_size
        return tokens * ctx.world

    def _last_good(self) -> pathlib.Path | None:
        """The last good checkpoint, once the one being written (if any) is finished."""
        try:
            self.wait_for_save()
        except Exception as exc:  # noqa: BLE001 - reported, and the older checkpoint named
            log.error("the checkpoint being written failed: %s: %s", type(exc).__name__, exc)
        return last_good_checkpoint(self.ckpt_dir)

    def _diverged(self, step: int, loss: float, norm: float, applied: bool) -> TrainingDiverged:
        last = self._last_good()
        where = f"the last good checkpoint is {last}" if last else "no good checkpoint was written yet"
        what = "the update was not applied and nothing was saved" if not applied else (
            "it was found at the next logging step (the steps between were applied in memory) and nothing was saved"
        )  # fmt: skip
        return TrainingDiverged(
            f"step {step}: loss {loss} / gradient norm {norm} is not finite; {what} ({where}). Resume from it with "
            "a lower --lr, a longer --warmup-steps or --grad-clip 1.0; check the data for NaN/Inf."
        )

    # ------------------------------------------------------------------ loop
    def fit(self, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
        """Train to cfg.steps (or max_minutes). The host reads the losses only at logging, saving and final steps
        (each buffered step's values at once): between them nothing waits for the device. The time limit is
        checked (and agreed over ranks) at those steps too."""
        cfg, ctx = self.cfg, self.ctx
        result = TrainResult(step=self.step)
        if ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        metrics = MetricsWriter(self.out_dir, enabled=ctx.is_main, tensorboard=cfg.tensorboard)
        if ctx.is_main:
            metrics.truncate_after(self.step)  # steps logged after the checkpoint we resumed from are redone
        peak = cfg.peak_tflops
        if peak is None and ctx.device.type == "cuda":
            peak = device_peak_tflops(torch.cuda.get_device_name(ctx.device))
        bar = None
        if ctx.is_main and cfg.progress:
            # a run bounded by time has no meaningful step total: show the count and the rate only
            total = None if cfg.max_minutes is not None else cfg.steps
            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        start = time.time()
        last_saved = self.step
        interval_start, interval_tokens, steps_in_interval = time.perf_counter(), 0, 0
        self._data_wait_s, self._blocked_s, self._pending, self._flushed = 0.0, 0.0, [], []
        try:
            while self.step < cfg.steps:
                nxt = self.step + 1
                flush = nxt % cfg.log_every == 0 or nxt % cfg.save_every == 0 or nxt == cfg.steps
                interval_tokens += self.train_step(check=flush)
                steps_in_interval += 1
                if bar is not None:
                    bar.update(1)
                if not flush:
                    continue
                now = time.perf_counter()
                dt = (now - interval_start) / steps_in_interval
                for step, loss, _ in self._flushed:
                    result.losses.append((step, loss))
                    if on_step is not None:
                        on_step(step, loss)
                _, loss, norm = self._flushed[-1]  # the logged row shows this step's values
                self._flushed.clear()
                row = {
                    "loss": loss,
                    "grad_norm": norm,
                    "lr": self.scheduler.get_last_lr()[0],
                    "steps_per_s": 1.0 / dt,
                    "tokens_per_s": interval_tokens / (now - interval_start),
                    "data_wait_frac": self._data_wait_s / (now - interval_start),
                }
                mfu = self._mfu(interval_tokens // steps_in_interval, dt, peak)
                if mfu is not None:
                    row["mfu"] = mfu
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", it_s=f"{1 / dt:.2f}", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    span = now - interval_start
                    per_rank = gather_rank_stats(
                        ctx, [span, span - self._blocked_s, self._data_wait_s, peak_memory_gb(ctx.device)]
                    )
                    row.update(rank_summary(per_rank))
                    metrics.write_ranks(self.step, per_rank)
                    slow = stragglers(per_rank, cfg.straggler_pct)
                    row["stragglers"] = len(slow)
                    for rank, work, above in slow if ctx.is_main else []:
                        log.warning(
                            "step %d: straggler: rank %d worked %.3f s (own work + data wait) over the last %d "
                            "step(s), %.0f%% above the median of the %d ranks",
                            self.step, rank, work, steps_in_interval, above, len(per_rank),
                        )  # fmt: skip
                    counts = pop_task_counts(self.source, ctx)  # summed over the data-parallel ranks
                    drawn = sum(counts.values())
                    for task, n in sorted(counts.items()):  # the drawn share per task since the last row
                        row[f"task_share/{task}"] = n / drawn
                    metrics.write(self.step, row)
                interval_start, interval_tokens, steps_in_interval = time.perf_counter(), 0, 0
                self._data_wait_s, self._blocked_s = 0.0, 0.0
                out_of_time = cfg.max_minutes is not None and time.time() - start > 60 * cfg.max_minutes
                if ctx.initialized:  # every rank stops at the same step
                    flag = all_reduce_max(ctx, torch.tensor([float(out_of_time)], device=ctx.device))
                    out_of_time = bool(flag.item() > 0)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps or out_of_time:
                    result.checkpoint = self.save()
                    last_saved = self.step
                if out_of_time and self.step < cfg.steps:
                    result.stopped_early = True
                    break
        except BaseException:
            try:  # the checkpoint being written is the one to resume from: let it finish
                self.wait_for_save()
            except Exception as exc:  # noqa: BLE001 - the training error is the one to raise
                log.error("the checkpoint being written failed too: %s: %s", type(exc).__name__, exc)
            raise
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
            if hasattr(self.source, "close"):  # stop a data thread working ahead (restarted on demand)
                self.source.close()
        if last_saved != self.step:
            result.checkpoint = self.save()
        self.wait_for_save()
        result.step = self.step
        return result

    def _mfu(self, tokens: int, dt: float, peak: float | None) -> float | None:
        """Model FLOPs utilisation of a step that took dt seconds (GPU only; see metrics.py for the FLOP count)."""
        if peak is None or self.shape is None or self.ctx.device.type != "cuda":
            return None
        last = self._last_shapes
        if last is None:
            return None
        lc, lx, samples = last
        flops = dit_train_flops(self.shape, lc, lx, samples)
        return flops / dt / (peak * 1e12 * self.ctx.world)

    _last_shapes: tuple[int, int, int] | None = None
    _data_wait_s: float = 0.0
    _blocked_s: float = 0.0

    # ------------------------------------------------------------------ export
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """Full (gathered) float32 EMA weights on CPU (collective under FSDP: call on every rank)."""
        out = {}
        for name, t in self.ema.shadow.items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            out[name] = full.detach().cpu()
        # frozen parameters (the J-DiT's last-block context outputs, which nothing reads) have no EMA: they never change
        for name, p in unwrap(self.model).named_parameters():
            key = clean_param_name(name)
            if not p.requires_grad and key not in out:
                full = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[key] = full.detach().float().cpu()
        return out

    def _ema_named(self) -> list[tuple[str, torch.Tensor]]:
        """(name, EMA tensor) of every parameter, sharded as trained; frozen parameters (the J-DiT's last-block
        context outputs, which nothing reads) have no EMA and are exported as they are. Sorted by name."""
        named = dict(self.ema.shadow)
        for name, p in unwrap(self.model).named_parameters():
            key = clean_param_name(name)
            if not p.requires_grad and key not in named:
                named[key] = p.detach()
        return sorted(named.items())

    def export_ema(self, path: str | pathlib.Path) -> pathlib.Path | None:
        """Write the EMA weights as a J-DiT file loadable by load_dit / `lavin-fast sample --dit` (collective:
        every rank calls it; rank 0 writes and returns the path, the others None). Rank 0 holds one gathered
        tensor on the host at a time (train/export.py); a non-finite EMA is refused on every rank before."""
        path = pathlib.Path(path)
        named = self._ema_named()
        local_bad = [k for k, t in named if not torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()]
        flag = all_reduce_max(self.ctx, torch.tensor([float(bool(local_bad))], device=self.ctx.device))
        if flag.item() > 0:
            raise TrainingDiverged(
                f"the EMA weights hold non-finite values ({local_bad[:3] or 'on another rank'}); {path} was not written"
            )
        model = unwrap(self.model)
        if not hasattr(model, "cfg"):  # a model without a J-DiT config (test stand-ins): a plain tensor dict
            sd = dict(zip([k for k, _ in named], stream_full_tensors(named, keep=True), strict=True))
            if self.ctx.is_main:
                torch.save(sd, path)
            return path if self.ctx.is_main else None
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_dit(model.cfg).state_dict().items()}
        found = {k: global_shape(t) for k, t in named}
        if found != expected:
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            raise RuntimeError(f"EMA does not match the J-DiT: missing {missing[:5]}, unexpected {extra[:5]}")
        specs = [(k, found[k], torch.float32) for k, _ in named]
        stream = stream_full_tensors(named, keep=self.ctx.is_main)
        if not self.ctx.is_main:
            for _ in stream:  # join every gather
                pass
            return None
        return write_safetensors_stream(path, specs, stream, metadata=dit_file_metadata(model.cfg))


def default_source_factory(cfg: TrainConfig, ctx: DistContext) -> LatentSource:
    return build_source(cfg, ctx)


def _fused_optimizer(dev: torch.device, params: list[torch.Tensor]) -> bool:
    """AdamW's fused kernel on CUDA, and on the CPU for plain (unsharded) tensors: one pass over each parameter
    instead of a dozen small ops (the demo ST-VAE fit: 7.5 -> 1.5 ms an Adam step, measured); FSDP2's DTensor
    shards on the CPU keep the for-loop form."""
    if dev.type == "cuda":
        return True
    return dev.type == "cpu" and all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in params)
