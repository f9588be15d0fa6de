"""The dp_replicate x dp_shard x cp mesh (parallel/mesh.py): the auto rules, and 4 gloo processes as 2x2
(replicate x shard: HSDP) and as 2x1x2 (replicate x cp) giving the one-process losses and EMA."""

from __future__ import annotations

import faulthandler
import json
import os
import socket

import pytest
import torch

from lavin_fast.parallel.mesh import MeshShape, resolve_mesh

BASE = {
    "batch_size": 4,
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.3,
    "ema_decay": 0.9,
    "save_every": 100,
    "steps": 3,
}


def test_auto_shards_inside_a_node_and_replicates_across_nodes():
    assert resolve_mesh(16, per_node=8) == MeshShape(2, 8, 1)
    assert resolve_mesh(16, cp=2, per_node=8) == MeshShape(2, 4, 2)
    assert resolve_mesh(8, per_node=8) == MeshShape(1, 8, 1)  # one node: plain FSDP
    assert resolve_mesh(256, per_node=8) == MeshShape(32, 8, 1)
    assert resolve_mesh(16, dp_shard=16, per_node=8) == MeshShape(1, 16, 1)  # given degrees win
    assert resolve_mesh(16, dp_replicate=4, per_node=8) == MeshShape(4, 4, 1)
    assert resolve_mesh(12, cp=4, per_node=8) == MeshShape(3, 1, 4)
    shape = MeshShape(2, 2, 2)
    assert [shape.coordinates(r) for r in (0, 1, 2, 5, 7)] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)]
    with pytest.raises(ValueError, match="dp_shard 3 does not divide"):
        resolve_mesh(8, dp_shard=3)
    with pytest.raises(ValueError, match="= 8, but this run has 4"):
        resolve_mesh(4, dp_replicate=2, dp_shard=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(overrides: dict, result: str, export: str) -> None:
    from standin import _tiny_dit
    from torch.distributed.tensor import DTensor

    from lavin_fast.parallel.distributed import teardown
    from lavin_fast.train.config import load_config
    from lavin_fast.train.sources import SyntheticLatentSource
    from lavin_fast.train.trainer import Trainer

    cfg = load_config(None, overrides)
    trainer = Trainer(
        cfg,
        model_factory=lambda c, d: _tiny_dit(),
        source_factory=lambda c, ctx: SyntheticLatentSource(
            micro_batch=c.micro_batch_size, rank=ctx.rank, world=ctx.world, num_samples=8, device=ctx.device
        ),
    )
    weight = trainer.model.blocks[0].attn.qkv.weight if hasattr(trainer.model.blocks[0].attn, "qkv") else None
    weight = weight if weight is not None else next(p for p in trainer.model.blocks[0].parameters() if p.dim() == 2)
    assert isinstance(weight, DTensor)
    placements = [type(p).__name__ for p in weight.placements]
    losses = [loss for _, loss in trainer.fit().losses]
    path = trainer.export_ema(export)  # collective; rank 0 writes
    if trainer.ctx.is_main:
        out = {"losses": losses, "placements": placements, "mesh": trainer.mesh.describe(), "export": str(path)}
        with open(result, "w") as f:
            json.dump(out, f)
    teardown(trainer.ctx)


def _worker(rank: int, world: int, ports: list[int], runs: list[tuple[dict, str, str]]) -> None:
    faulthandler.dump_traceback_later(400, exit=True)  # a hung rank fails the test (with its stack)
    torch.set_num_threads(1)
    for port, (overrides, result, export) in zip(ports, runs, strict=True):
        os.environ.update(
            {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)}
            | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        )
        _run(overrides, result, export)


@pytest.mark.slow  # one spawn of 4 processes, two runs inside it
def test_hsdp_and_replicate_x_cp_match_one_process(tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    from standin import standin_training_run

    single = standin_training_run({**BASE, "micro_batch_size": 4, "out_dir": str(tmp_path / "one")}, model="tiny-dit")
    hsdp = {**BASE, "micro_batch_size": 1, "dp_replicate": 2, "dp_shard": 2, "out_dir": str(tmp_path / "hsdp")}
    rcp = {**BASE, "micro_batch_size": 2, "dp_replicate": 2, "context_parallel": 2, "out_dir": str(tmp_path / "rcp")}
    runs = [
        (hsdp, str(tmp_path / "hsdp.json"), str(tmp_path / "hsdp.safetensors")),
        (rcp, str(tmp_path / "rcp.json"), str(tmp_path / "rcp.safetensors")),
    ]
    mp.spawn(_worker, args=(4, [_free_port(), _free_port()], runs), nprocs=4, join=True)
    for name, mesh in (("hsdp", "dp_replicate 2 x dp_shard 2 x cp 1"), ("rcp", "dp_replicate 2 x dp_shard 1 x cp 2")):
        got = json.loads((tmp_path / f"{name}.json").read_text())
        assert got["mesh"] == mesh
        assert got["placements"] == ["Replicate", "Shard"], got["placements"]  # HSDP: 2-D (replicate, shard)
        assert got["losses"] == pytest.approx(single["losses"][:3], rel=1e-5, abs=1e-6), name
        ranks = [json.loads(line) for line in (tmp_path / name / "ranks.jsonl").read_text().splitlines()]
        assert [len(r["ranks"]) for r in ranks] == [4, 4, 4]  # every rank's step time, data wait, memory
        exported = load_file(got["export"])  # rank 0's streamed export of the sharded EMA
        for key, values in single["ema"].items():
            assert exported[key].flatten().tolist() == pytest.approx(values, rel=1e-4, abs=1e-5), (name, key)
