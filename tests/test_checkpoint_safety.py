"""Training state that cannot run code, checksums, a real "last good" checkpoint, and resume semantics."""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib
import pickle

import pytest
import torch
from standin import StandInVelocity

from lavin_fast.train.checkpoint_io import MANIFEST, _sha256, last_good_checkpoint
from lavin_fast.train.config import ConfigError, load_config
from lavin_fast.train.safe_state import CheckpointError, SafeLoadPlanner, load_tree, read_dcp_metadata, save_tree
from lavin_fast.train.sources import SyntheticLatentSource
from lavin_fast.train.trainer import Trainer, TrainingDiverged

BASE = {
    "batch_size": 4,
    "micro_batch_size": 4,
    "lr": 1e-3,
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.0,
    "ema_decay": 0.9,
    "save_every": 2,
}


def _trainer(out, model=None, **over) -> Trainer:
    cfg = load_config(None, {**BASE, "out_dir": str(out), **over})
    return Trainer(
        cfg,
        model_factory=lambda c, d: model() if model else StandInVelocity(),
        source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4, num_samples=8),
    )


class _Marker:
    """A pickle payload: unpickling it would create the marker file."""

    def __init__(self, path: pathlib.Path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _rehash(ckpt: pathlib.Path) -> None:
    """What an attacker with write access does: make the manifest agree with the planted files."""
    doc = json.loads((ckpt / MANIFEST).read_text())
    doc["files"] = {name: _sha256(ckpt / name) for name in doc["files"]}
    (ckpt / MANIFEST).write_text(json.dumps(doc))


def test_state_tree_round_trip_without_pickle(tmp_path):
    import random

    import numpy as np

    tree = {
        "step": 3,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        "data": {"position": 5, "skipped": {"bad.png": 1}, "weights": [0.5, 0.25], "none": None},
    }
    paths = save_tree(tmp_path / "state", tree)
    assert sorted(p.suffix for p in paths) == [".json", ".safetensors"]
    back = load_tree(tmp_path / "state")
    assert back["step"] == 3 and back["data"] == tree["data"]
    assert torch.equal(back["rng"]["torch"], tree["rng"]["torch"])
    assert back["rng"]["python"] == tree["rng"]["python"]  # nested tuples survive
    random.setstate(back["rng"]["python"])
    np.random.set_state(back["rng"]["numpy"])
    with pytest.raises(TypeError, match="cannot save a object"):
        save_tree(tmp_path / "bad", {"x": object()})


def test_payloads_in_rank_state_and_metadata_never_run(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit()
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    marker = tmp_path / "PWNED"

    # 1. an old-style pickled trainer state planted beside (checksums rewritten to match)
    for p in ckpt.glob("trainer_rank0.*"):
        p.unlink()
    torch.save({"step": _Marker(marker)}, ckpt / "trainer_rank0.pt")
    doc = json.loads((ckpt / MANIFEST).read_text())
    doc["files"] = {k: v for k, v in doc["files"].items() if not k.startswith("trainer_rank0")}
    doc["files"]["trainer_rank0.pt"] = ""
    (ckpt / MANIFEST).write_text(json.dumps(doc))
    _rehash(ckpt)
    with pytest.raises(CheckpointError, match="trainer_rank0.json is missing"):
        _trainer(tmp_path, steps=4)
    assert not marker.exists()

    # 2. a payload in DCP's .metadata pickle
    trainer = _trainer(tmp_path / "b", steps=2)
    trainer.fit()
    ckpt = tmp_path / "b" / "checkpoints" / "step_00000002"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(CheckpointError, match="sha256 differs"):  # the checksum catches it first ...
        _trainer(tmp_path / "b", steps=4)
    _rehash(ckpt)
    with pytest.raises(CheckpointError, match=r"pathlib\.Path\.touch|refers to pathlib"):  # ... and then the unpickler
        _trainer(tmp_path / "b", steps=4)
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        read_dcp_metadata(ckpt)
    assert not marker.exists()


def test_payload_in_a_dcp_bytes_item_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    buf = io.BytesIO()
    torch.save(_Marker(marker), buf)
    buf.seek(0)

    class Item:
        class dest_index:  # noqa: N801
            fqn = "optim.param_groups.lr"

    planner = SafeLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}
    with pytest.raises(CheckpointError, match="not plain data"):
        planner.load_bytes(Item, buf)
    assert not marker.exists()


def test_legacy_pickled_checkpoint_needs_trust(tmp_path):
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit()
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    state = load_tree(ckpt / "trainer_rank0")
    for p in ckpt.glob("trainer_rank0.*"):
        p.unlink()
    (ckpt / MANIFEST).unlink()
    torch.save(state, ckpt / "trainer_rank0.pt")  # the layout of lavin-fast <= 0.1
    with pytest.raises(CheckpointError, match="older lavin-fast.*--trust-checkpoint"):
        _trainer(tmp_path, steps=4)
    resumed = _trainer(tmp_path, steps=4, trust_checkpoint=True)
    assert resumed.step == 2


def test_corrupt_checkpoint_file_is_named(tmp_path):
    _trainer(tmp_path, steps=2).fit()
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    shard = next(ckpt.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the optimizer/model shard
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard.name}: sha256 differs"):
        _trainer(tmp_path, steps=4)


def test_orphaned_tmp_folders_are_removed_at_start(tmp_path):
    orphan = tmp_path / "checkpoints" / "step_00000007.tmp"
    orphan.mkdir(parents=True)
    (orphan / "__0_0.distcp").write_bytes(b"half")
    _trainer(tmp_path, steps=1)
    assert not orphan.exists()


def test_non_finite_parameters_are_never_saved_or_named(tmp_path):
    trainer = _trainer(tmp_path, steps=6, save_every=2)

    def poison(optimizer, args, kwargs):
        if trainer.step == 3:  # the update that makes step 4: one weight turns NaN (what --eps 0 did)
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("nan")

    trainer.optimizer.register_step_post_hook(poison)
    # the loss of step 4 was still finite (computed before the update): the state check at the save stops it
    with pytest.raises(TrainingDiverged, match=r"step 4: the parameters or the EMA hold non-finite.*step_00000002"):
        trainer.fit()
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000002"]
    assert last_good_checkpoint(root) == root / "step_00000002"


def test_parameters_beyond_the_limit_stop_the_save(tmp_path):
    trainer = _trainer(tmp_path, steps=4, save_every=1, lr=1e30, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match=r"step 1: .*values up to .*param_abs_limit.*no good checkpoint"):
        trainer.fit()
    assert not (tmp_path / "checkpoints" / "latest").exists()


def test_eps_zero_and_other_bad_values_are_refused_before_start(tmp_path):
    cases = {
        "eps": "0",
        "image_size": "65",
        "model": "7B",
        "weight_decay": "-1",
        "max_minutes": "-1",
        "t_mean": "nan",
        "lr": "inf",
    }
    for field, value in cases.items():
        with pytest.raises(ConfigError, match=f"'{field}'"):
            load_config(None, {"out_dir": str(tmp_path), field: value})


def test_unwritable_out_dir_fails_before_the_first_step(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="out_dir.*cannot write"):
        _trainer(blocker / "run", steps=2)


def test_changed_optimizer_settings_take_effect_on_resume(tmp_path, caplog):
    _trainer(tmp_path, steps=2, lr=1e-3, weight_decay=0.0).fit()
    with caplog.at_level(logging.WARNING, logger="lavin_fast.train.trainer"):
        resumed = _trainer(tmp_path, steps=4, lr=5e-4, weight_decay=0.05, betas=[0.8, 0.95])
    groups = resumed.optimizer.param_groups
    assert [g["lr"] for g in groups] == [5e-4, 5e-4]  # constant schedule: the new peak is in force at once
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(tuple(g["betas"]) == (0.8, 0.95) for g in groups)
    text = caplog.text
    assert "lr 0.001 -> 0.0005 (applied)" in text and "weight_decay 0.0 -> 0.05" in text
    result = resumed.fit()
    assert result.step == 4 and resumed.scheduler.get_last_lr() == [5e-4, 5e-4]


def test_other_model_shapes_are_refused_both_ways(tmp_path):
    from lavin_fast.models.dit import build_dit

    def tiny(**kw):
        return lambda: build_dit("tiny", hidden_size=32, num_heads=2, **kw)

    _trainer(tmp_path, model=tiny(depth=2), steps=2).fit()
    with pytest.raises(CheckpointError, match=r"another model: \d+ tensors in it are not in this model"):
        _trainer(tmp_path, model=tiny(depth=1), steps=4)  # shallower: would silently truncate
    with pytest.raises(CheckpointError, match=r"tensors of this model are not in it"):
        _trainer(tmp_path, model=tiny(depth=3), steps=4)  # deeper
    with pytest.raises(CheckpointError, match=r"differ in shape"):
        _trainer(tmp_path, model=lambda: build_dit("tiny", hidden_size=64, num_heads=2, depth=2), steps=4)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step_00000002"]  # nothing was overwritten
