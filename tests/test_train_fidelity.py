"""Fidelity switches (post_norm, loss, uncond_ratio, the last block's frozen context outputs) and a training loop
that reads the device only at logging steps."""

from __future__ import annotations

import json

import pytest
import torch
from standin import StandInVelocity

from lavin_fast.flow.loss import LOSSES, per_sample_loss
from lavin_fast.models.dit import build_dit
from lavin_fast.train.config import load_config
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer, TrainingDiverged

BASE = {"batch_size": 4, "micro_batch_size": 4, "tensorboard": False, "progress": False, "save_every": 100}


def _trainer(tmp_path, model=None, **over):
    cfg = load_config(None, {**BASE, "out_dir": str(tmp_path), **over})
    return Trainer(
        cfg,
        model_factory=(lambda c, d: model()) if model else (lambda c, d: StandInVelocity()),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4, num_samples=8, size=4),
    )


def test_0p1b_has_no_post_norm_and_the_same_parameters():
    with torch.device("meta"):
        small = build_dit("0.1B")
    assert small.cfg.post_norm is False and build_dit("tiny").cfg.post_norm is True
    assert sum(p.numel() for p in small.parameters()) == 100_709_952  # the published count: RMSNorm has no weights


def test_block_without_post_norm_is_gate_times_branch():
    torch.manual_seed(0)
    with_norm = build_dit("tiny", depth=1).eval()
    with torch.no_grad():  # random everything (zero-initialised gates and final layer would hide the difference)
        for p in with_norm.parameters():
            p.normal_(std=0.3)
    without = build_dit("tiny", depth=1, post_norm=False).eval()
    without.load_state_dict(with_norm.state_dict())
    blk = without.blocks[0]
    r, h, gate = torch.randn(2, 5, 64), torch.randn(2, 5, 64) * 3, torch.randn(2, 64)
    assert torch.allclose(blk._residual(r, h, gate), r + torch.tanh(gate)[:, None] * h)
    assert not torch.allclose(with_norm.blocks[0]._residual(r, h, gate), r + torch.tanh(gate)[:, None] * h)
    x, t, c = torch.randn(1, 16, 1, 4, 4), torch.rand(1), torch.randn(1, 16, 3, 4, 4)
    assert not torch.allclose(with_norm(x, t, c), without(x, t, c))


def test_mse_plus_l1_loss():
    pred, target = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    d = (pred - target).flatten(1)
    assert torch.allclose(per_sample_loss(pred, target), d.pow(2).mean(1))
    assert torch.allclose(per_sample_loss(pred, target, LOSSES["mse+l1"]), d.pow(2).mean(1) + 0.1 * d.abs().mean(1))


def test_uncond_ratio_drives_the_null_context_probability(tmp_path):
    model = lambda: build_dit("tiny", depth=1, uncond_ratio=0.7)  # noqa: E731
    assert _trainer(tmp_path / "a", model=model).null_prob == 0.7
    assert _trainer(tmp_path / "b", model=model, null_prob=0.2).null_prob == 0.2  # an explicit run setting wins


def test_last_block_context_outputs_are_frozen_and_exported(tmp_path):
    model = build_dit("tiny", depth=2)
    last = model.blocks[-1]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        f"blocks.1.{n}" for n, _ in last.named_parameters() if n.startswith(("attn.cond_proj", "cond_mlp"))
    }
    assert all(p.requires_grad for p in model.blocks[0].parameters())
    trainer = _trainer(tmp_path, model=lambda: build_dit("tiny", depth=2), steps=2, null_prob=0.0)
    trainer.fit()
    assert all(p.grad is None for n, p in trainer.model.named_parameters() if n in frozen)
    path = trainer.export_ema(tmp_path / "ema.safetensors")  # the frozen weights are exported as they are
    assert path.is_file()


def test_device_is_read_only_at_logging_steps(tmp_path):
    trainer = _trainer(tmp_path, steps=8, log_every=4, save_every=8)
    checks = []
    step = trainer.train_step

    def spy(check=True):
        checks.append(check)
        return step(check=check)

    trainer.train_step = spy
    result = trainer.fit()
    assert checks == [False, False, False, True] * 2
    assert [s for s, _ in result.losses] == list(range(1, 9))  # every step's loss, read in two batches
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8] and all(0 <= r["data_wait_frac"] < 1 for r in rows)


def test_a_nan_between_logging_steps_is_found_and_never_saved(tmp_path):
    trainer = _trainer(tmp_path, steps=9, log_every=3, save_every=3)

    def poison(optimizer, args, kwargs):
        if trainer.step == 3:  # the update of step 4 makes the weights NaN: steps 5 and 6 run unchecked
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("nan")

    trainer.optimizer.register_step_post_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"step 5: .*found at the next logging step.*step_00000003"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000003"
