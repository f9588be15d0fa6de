"""The one resume step (train/resume.py): the whole model config is checked before any tensor is read, and a
resume on another number of processes continues the data at the same global sample (2 -> 1 and 1 -> 2)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from standin import standin_training_run

from lavin_fast.models.dit import build_dit
from lavin_fast.train.checkpoint_io import CheckpointError
from lavin_fast.train.config import load_config
from lavin_fast.train.resume import model_config_changes
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer

BASE = {
    "batch_size": 4,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.3,
    "ema_decay": 0.9,
}


def _trainer(tmp_path, steps: int, **model_kw) -> Trainer:
    cfg = load_config(None, {**BASE, "steps": steps, "save_every": 2, "out_dir": str(tmp_path)})
    return Trainer(
        cfg,
        model_factory=lambda c, d: build_dit("tiny", **{"hidden_size": 64, "depth": 2, "num_heads": 4, **model_kw}),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4, num_samples=8),
    )


def test_resume_refuses_a_model_config_change_that_keeps_every_shape(tmp_path):
    """num_heads 4 -> 8 at the same width keeps every tensor's shape (the old check compared shapes only and
    resumed); the model config check refuses it, naming the field, before loading anything."""
    _trainer(tmp_path, steps=2).fit()
    with pytest.raises(CheckpointError, match=r"num_heads: 4 -> 8") as info:
        _trainer(tmp_path, steps=3, num_heads=8)
    assert "hidden_size" not in str(info.value)  # only the fields that differ are listed
    # options that change how, not what, the model computes resume
    again = _trainer(tmp_path, steps=3, backend="torch", rope_in_attention=True)
    assert again.resumed_from is not None and again.step == 2


def test_model_config_changes_lists_each_differing_field():
    a = {"hidden_size": 64, "num_heads": 4, "kv_group": 1, "backend": "auto", "drop_path": 0.0}
    b = {**a, "num_heads": 8, "kv_group": 2, "backend": "torch", "drop_path": 0.1}
    assert model_config_changes(a, b) == ["kv_group: 1 -> 2", "num_heads: 4 -> 8"]
    assert model_config_changes(a, dict(a)) == []
    assert model_config_changes(None, b) == []


def test_synthetic_source_seek_is_the_global_sample_position():
    one = SyntheticLatentSource(micro_batch=4, world=1, num_samples=64)
    for _ in range(3):
        one.next_batch()
    halves = [SyntheticLatentSource(micro_batch=2, rank=r, world=2, num_samples=64) for r in range(2)]
    for h in halves:
        h.seek(12)
    x, c = one.next_batch()
    parts = [h.next_batch() for h in halves]
    assert torch.equal(torch.cat([p[1] for p in parts]), c) and torch.equal(torch.cat([p[0] for p in parts]), x)
    with pytest.raises(ValueError, match="not a whole number"):
        halves[0].seek(6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _elastic_worker(rank: int, world: int, ports: list[int], runs: list[tuple[dict, str]]) -> None:
    """One rank of a 2-process gloo run that trains each (overrides, result path) in turn, each run with its own
    process group."""
    torch.set_num_threads(1)
    for port, (overrides, result) in zip(ports, runs, strict=True):
        os.environ.update(
            {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
            | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        )
        standin_training_run(overrides, result, num_samples=32)


@pytest.mark.slow  # one spawn of 2 processes (two runs inside it)
def test_elastic_resume_continues_at_the_same_global_sample(tmp_path):
    """2 -> 1: two processes train steps 1-2, one process resumes for steps 3-4. 1 -> 2: the reverse. Both give
    the losses of one uninterrupted process (the synthetic samples are distinct over the 4 steps: a stream that
    restarted or skipped would see other samples and other losses)."""
    import torch.multiprocessing as mp

    kw = {**BASE, "micro_batch_size": 2, "save_every": 2, "warmup_steps": 1, "schedule": "cosine"}
    full = standin_training_run({**kw, "steps": 4, "out_dir": str(tmp_path / "full")}, num_samples=32)
    # 1 -> 2: the first half in this process
    first = standin_training_run({**kw, "steps": 2, "out_dir": str(tmp_path / "up")}, num_samples=32)
    runs = [
        ({**kw, "steps": 2, "out_dir": str(tmp_path / "down")}, str(tmp_path / "down.json")),
        ({**kw, "steps": 4, "out_dir": str(tmp_path / "up")}, str(tmp_path / "up.json")),
    ]
    mp.spawn(_elastic_worker, args=(2, [_free_port(), _free_port()], runs), nprocs=2, join=True)
    down_first = json.loads((tmp_path / "down.json").read_text())
    up_rest = json.loads((tmp_path / "up.json").read_text())
    # 2 -> 1: the second half in this process
    down_rest = standin_training_run({**kw, "steps": 4, "out_dir": str(tmp_path / "down")}, num_samples=32)
    assert up_rest["resumed"] and down_rest["resumed"]
    tol = dict(rel=1e-5, abs=1e-6)
    assert first["losses"] + up_rest["losses"] == pytest.approx(full["losses"], **tol)
    assert down_first["losses"] + down_rest["losses"] == pytest.approx(full["losses"], **tol)
    for name, values in full["ema"].items():
        assert up_rest["ema"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
        assert down_rest["ema"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
