"""The EMA export (train/export.py): rank 0 writes the J-DiT file tensor by tensor, never the whole EMA at once."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lavin_fast.models.checkpoints import load_dit
from lavin_fast.models.dit import build_dit
from lavin_fast.train.config import load_config
from lavin_fast.train.export import write_safetensors_stream
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer, TrainingDiverged

BASE = {"batch_size": 2, "micro_batch_size": 2, "tensorboard": False, "progress": False, "ema_decay": 0.5}


def test_export_equals_the_gathered_ema_and_loads_as_a_dit(tmp_path):
    cfg = load_config(None, {**BASE, "steps": 2, "save_every": 100, "out_dir": str(tmp_path)})
    trainer = Trainer(
        cfg,
        model_factory=lambda c, d: build_dit("tiny", hidden_size=32, depth=2, num_heads=2),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=2),
    )
    trainer.fit()
    path = trainer.export_ema(tmp_path / "ema.safetensors")
    reference = trainer.ema_state_dict()  # the independent path: every tensor gathered into one dict
    written = load_file(path)  # safetensors' own reader
    assert written.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(written[k], v), k
    model = load_dit(path)
    assert model.cfg == trainer.model.cfg.replace(grad_checkpointing=model.cfg.grad_checkpointing)
    assert not (tmp_path / "ema.safetensors.tmp").exists()


def test_writer_holds_one_tensor_at_a_time(tmp_path):
    refs: list[weakref.ref] = []
    specs = [(f"t{i}", (64, 32), torch.float32) for i in range(5)]

    def produce():
        for i in range(5):
            gc.collect()
            # every tensor yielded before the previous one is gone: the writer keeps none of them
            assert all(r() is None for r in refs[:-1]), f"tensor {len(refs) - 2} still alive at {i}"
            t = torch.full((64, 32), float(i))
            refs.append(weakref.ref(t))
            yield t

    path = write_safetensors_stream(tmp_path / "x.safetensors", specs, produce(), metadata={"k": "v"})
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
        for i in range(5):
            assert torch.equal(f.get_tensor(f"t{i}"), torch.full((64, 32), float(i)))


def test_a_non_finite_tensor_leaves_no_file(tmp_path):
    specs = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    with pytest.raises(ValueError, match="b: holds non-finite"):
        write_safetensors_stream(tmp_path / "y.safetensors", specs, iter([torch.ones(2), torch.tensor([1.0, 1e40])]))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_finite_ema(tmp_path):
    cfg = load_config(None, {**BASE, "steps": 1, "save_every": 100, "out_dir": str(tmp_path)})
    trainer = Trainer(
        cfg,
        model_factory=lambda c, d: build_dit("tiny", hidden_size=32, depth=1, num_heads=2),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=2),
    )
    next(iter(trainer.ema.shadow.values())).view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="non-finite"):
        trainer.export_ema(tmp_path / "ema.safetensors")
    assert not (tmp_path / "ema.safetensors").exists()
