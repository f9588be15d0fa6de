"""torch.compile per block composed with FSDP2, selective activation checkpointing and context parallelism, on the
CPU (gloo): the losses equal eager's within a tolerance, with Inductor's CPU backend (about 2 minutes on 2 idle
cores), and graphs were compiled (an earlier version of this test passed with nothing compiled: a block whose
forward is the checkpoint ran eager under torch.compile)."""

from __future__ import annotations

import faulthandler
import json
import os
import socket

import pytest
import torch

BASE = {
    "batch_size": 4,
    "lr": 1e-3,
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.3,
    "ema_decay": 0.9,
    "steps": 2,
    "save_every": 100,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: dict, result: str) -> None:
    from standin import spawned_rank

    faulthandler.dump_traceback_later(600, exit=True)
    spawned_rank(rank, world, port, overrides, result, "tiny-dit")


@pytest.mark.slow  # one spawn of 2 processes, each compiling the blocks with Inductor (~2 minutes on 2 cores)
def test_compiled_blocks_with_fsdp2_checkpointing_and_cp_match_eager(tmp_path):
    import torch.multiprocessing as mp
    from standin import standin_training_run

    eager = standin_training_run({**BASE, "micro_batch_size": 4, "out_dir": str(tmp_path / "eager")}, model="tiny-dit")
    kw = {
        **BASE,
        "micro_batch_size": 4,  # cp 2 over 2 processes: one data rank
        "context_parallel": 2,
        "compile": True,
        "compile_backend": "inductor",
        "activation_checkpointing": "selective",
        "out_dir": str(tmp_path / "compiled"),
    }
    result = tmp_path / "compiled.json"
    mp.spawn(_worker, args=(2, _free_port(), kw, str(result)), nprocs=2, join=True)
    got = json.loads(result.read_text())
    assert got["compiled_graphs"] > 0, "torch.compile produced no graph: the run was eager"
    assert got["losses"] == pytest.approx(eager["losses"], rel=1e-4, abs=1e-6)
    for name, values in eager["ema"].items():
        assert got["ema"][name] == pytest.approx(values, rel=1e-3, abs=1e-5), name
    assert torch.isfinite(torch.tensor(got["losses"])).all() and os.path.isdir(tmp_path / "compiled")
