"""Data once per context-parallel group (issue 27): under context parallelism the cp ranks of a group train on the
same samples, so one rank makes each batch (decode, degradations, VAE encode) and the others receive it.

gloo, 2 processes, context_parallel 2 (one group): the tiny J-DiT trains 3 steps twice in the same processes,
once with the shared source and once with every rank making its own batches (the old way). Same losses; the
inner source's batches are counted per rank.
"""

from __future__ import annotations

import faulthandler
import json
import os

import pytest
import torch

STEPS = 3


def _worker(rank: int, world: int, port: int, overrides: dict, result_path: str) -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank fails the test (with its stack)
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    )  # fmt: skip
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    from lavin_fast.parallel.distributed import teardown

    out = {mode: _run(mode, overrides) for mode in ("shared", "every rank")}
    with open(f"{result_path}.{rank}", "w") as f:
        json.dump({k: v for k, (v, _) in out.items()}, f)
    teardown(out["shared"][1])


def _run(mode: str, overrides: dict):
    """(losses, batches made by this rank's inner source, data state) of a short run, and the DistContext."""
    from standin import _tiny_dit

    from lavin_fast.train import trainer as trainer_mod
    from lavin_fast.train.config import load_config
    from lavin_fast.train.sources import SyntheticLatentSource

    made = []

    class Counting(SyntheticLatentSource):
        def next_batch(self):
            made.append(self.position)
            return super().next_batch()

    if mode == "every rank":  # the old wiring: each cp rank runs the source itself
        trainer_mod.share_in_cp_group = lambda make, cp, ctx: make()
    cfg = load_config(None, {**overrides, "out_dir": f"{overrides['out_dir']}/{mode.replace(' ', '_')}"})
    tr = trainer_mod.Trainer(
        cfg,
        model_factory=lambda c, d: _tiny_dit(),
        source_factory=lambda c, ctx: Counting(
            micro_batch=c.micro_batch_size, rank=ctx.rank, world=ctx.world, num_samples=8, device=ctx.device
        ),
    )
    losses = []
    tr.fit(on_step=lambda step, loss: losses.append(loss))
    state = tr.source.state_dict()  # collective in the shared mode: the leader's position on every rank
    return {"losses": losses, "made": len(made), "state": state}, tr.ctx


@pytest.mark.slow  # one spawn of 2 gloo processes, two short training runs in each (~20-40 s on 2 loaded cores)
def test_one_rank_per_cp_group_decodes_and_the_losses_do_not_change(tmp_path):
    import torch.multiprocessing as mp
    from test_context_parallel import BASE, _free_ports

    kw = {**BASE, "micro_batch_size": 2, "steps": STEPS, "context_parallel": 2, "save_every": 100}
    kw["out_dir"] = str(tmp_path / "runs")
    result = tmp_path / "result"
    mp.spawn(_worker, args=(2, _free_ports(1)[0], kw, str(result)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2))
    old, new = r0["every rank"], r0["shared"]
    accum = BASE["batch_size"] // (kw["micro_batch_size"] * 1)  # one data-parallel rank (2 processes / cp 2)
    # the old way: both ranks of the group made every batch; now rank 0 alone
    assert old["made"] == r1["every rank"]["made"] == STEPS * accum
    assert new["made"] == STEPS * accum and r1["shared"]["made"] == 0
    # the same samples reach both ranks: the losses are those of the old wiring (bitwise: same values, same order)
    assert len(new["losses"]) == STEPS
    assert new["losses"] == old["losses"] and r1["shared"]["losses"] == r1["every rank"]["losses"]
    # the data position the checkpoint keeps: the leader's, on every rank
    assert r1["shared"]["state"] == new["state"] == old["state"]
