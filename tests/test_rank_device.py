"""One device per rank at every entry point, and failure paths that do not hang (issue 27).

- `rank_device` / `setup` with a fake device count: rank r binds cuda:(r mod n) with set_device before anything
  else runs (Triton launches on the current device).
- The entry points (sample batch mode, data build-cache, eval) bind it before their first CUDA work.
- gloo, 2 processes: a build-cache rank that raises leaves the group at once; the other rank's next collective
  fails instead of being matched with a barrier on the failing rank's failure path.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pathlib
import socket

import pytest
import torch

from lavin_fast.parallel import distributed


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch sees `n` CUDA devices (set by the test: fake_cuda(n)); set_device calls are recorded."""
    calls: list[torch.device] = []

    def install(n: int) -> list[torch.device]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
        return calls

    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return install


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_rank_binds_local_rank_mod_device_count(fake_cuda, monkeypatch, count):
    calls = fake_cuda(count)
    for local_rank in range(10):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        calls.clear()
        for name in ("auto", "cuda"):
            ctx = distributed.setup(name)  # WORLD_SIZE unset: one process, no group; the binding is the same
            want = torch.device("cuda", local_rank % count)
            assert ctx.device == want
            assert calls[-1] == want
        assert distributed.rank_device("cuda") == torch.device("cuda", local_rank % count)


def test_explicit_device_and_cpu(fake_cuda, monkeypatch):
    calls = fake_cuda(4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.rank_device("cuda:1") == torch.device("cuda", 1) and calls == [torch.device("cuda", 1)]
    calls.clear()
    assert distributed.rank_device("cpu") == torch.device("cpu") and calls == []


def _sample_args(tmp_path: pathlib.Path, **over) -> argparse.Namespace:
    from PIL import Image

    from lavin_fast.cli.main import build_parser

    (tmp_path / "task").mkdir(exist_ok=True)
    for name in ("a_input.png", "a_target.png"):  # one example pair: the memory pre-flight reads the task folder
        Image.new("RGB", (16, 16)).save(tmp_path / "task" / name)
    argv = ["sample", "--dit", "d", "--vae", "v", "--task-dir", str(tmp_path / "task"), "--query", "q.png"]
    argv += ["--out-dir", str(tmp_path / "out")]
    args = build_parser(full=True).parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_sample_batch_mode_binds_the_rank_device_before_any_work(fake_cuda, monkeypatch, tmp_path):
    """`torchrun ... sample --out-dir`: rank 3 of 2 visible GPUs works on cuda:1, made current before the batch
    mode starts (the old code passed cuda:3 and never called set_device: Triton ran on GPU 0)."""
    from lavin_fast.cli import sample

    calls = fake_cuda(2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    seen = {}

    def fake_batch_mode(args, device, bf16, batch, size):
        seen["device"], seen["bound"] = device, list(calls)
        return 0

    monkeypatch.setattr(sample, "_batch_mode", fake_batch_mode)
    assert sample.run(_sample_args(tmp_path)) == 0
    assert seen["device"] == torch.device("cuda", 1)
    assert seen["bound"] == [torch.device("cuda", 1)]


def test_eval_binds_the_rank_device(fake_cuda, monkeypatch):
    from lavin_fast.cli import eval as cli_eval

    calls = fake_cuda(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli_eval._device("auto") == "cuda:1"
    assert calls == [torch.device("cuda", 1)]


def _cache_args(out: pathlib.Path) -> argparse.Namespace:
    return argparse.Namespace(
        device="cpu", vae="vae.safetensors", seed=0, sources=["demo"], out=str(out), resolution=16, tasks=None,
        copies=1, augment=None, encode_batch=1, shard_size=1, backend="torch", no_progress=True, max_memory=None,
        format="shards",
    )  # fmt: skip


def test_build_cache_binds_the_rank_device_before_loading_the_vae(fake_cuda, monkeypatch, tmp_path):
    from lavin_fast.cli import data as cli_data
    from lavin_fast.data import latent_cache
    from lavin_fast.models import checkpoints

    calls = fake_cuda(2)
    monkeypatch.setenv("LOCAL_RANK", "5")
    seen = {}

    def fake_load(path, device):
        seen["device"], seen["bound"] = torch.device(device), list(calls)
        raise RuntimeError("stop here")

    monkeypatch.setattr(checkpoints, "load_vae_file", fake_load)
    monkeypatch.setattr(latent_cache, "VAECacheEncoder", lambda *a, **k: None)
    args = _cache_args(tmp_path / "cache")
    args.device = "auto"
    with pytest.raises(RuntimeError, match="stop here"):
        cli_data._build_cache(args)
    assert seen["device"] == torch.device("cuda", 1) and seen["bound"] == [torch.device("cuda", 1)]


# ---------------------------------------------------------------------------------------------------------------
# gloo: a failing rank must not hang (or fool) the others


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failing_build_cache_rank(rank: int, port: int, out: str, log_dir: str) -> None:
    """One rank of `data build-cache` under a 2-process gloo group; rank 1 fails between two barriers.
    Rank 0 writes what it got through to log_dir/rank0.json."""
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    )  # fmt: skip
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from lavin_fast.cli import data as cli_data
    from lavin_fast.data import latent_cache
    from lavin_fast.models import checkpoints

    passed: list[str] = []

    def record() -> None:
        if rank == 0:
            pathlib.Path(log_dir, "rank0.json").write_text(json.dumps(passed))

    def fake_build(*args, **kwargs):  # the shape of build_latent_cache: barrier, shards, barrier, index, barrier
        dist.barrier()
        passed.append("settings")
        record()
        if rank == 1:
            raise RuntimeError("rank 1: a shard failed")
        dist.barrier()  # rank 1 never reaches this one: rank 0 must not get past it
        passed.append("shards")
        record()
        dist.barrier()
        passed.append("index")
        record()
        return {"counts": {}, "skipped": {}, "encoder_sha256": "0" * 64}

    checkpoints.load_vae_file = lambda path, device: None
    latent_cache.VAECacheEncoder = lambda *a, **k: None
    latent_cache.build_latent_cache = fake_build
    cli_data._build_cache(_cache_args(pathlib.Path(out)))


@pytest.mark.slow  # 2 spawned processes (start-up ~5-10 s on the shared 2-core machine)
def test_failing_build_cache_rank_does_not_hang_or_fool_the_others(tmp_path):
    mp = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        mp.Process(target=_failing_build_cache_rank, args=(r, port, str(tmp_path / "cache"), str(tmp_path)))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert not hung, f"rank(s) {hung} still running 120 s after rank 1 failed"
    assert procs[1].exitcode != 0
    passed = json.loads((tmp_path / "rank0.json").read_text())
    # rank 0 must fail at the barrier rank 1 never reached (the old teardown's barrier in `finally` matched it)
    assert passed == ["settings"], f"rank 0 got through {passed} although rank 1 failed after 'settings'"
    assert procs[0].exitcode != 0


def test_abort_on_nccl_aborts_instead_of_flushing(monkeypatch):
    """NCCL's destroy_process_group flushes pending collectives (and hangs on an unmatched one): a failing rank
    aborts the communicators instead; gloo and others destroy the group."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a: calls.append("destroy"))
    monkeypatch.setattr(c10d, "_abort_process_group", lambda *a: calls.append("abort"), raising=False)
    ctx = distributed.DistContext(0, 2, 0, torch.device("cpu"), True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    distributed.abort(ctx)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    distributed.abort(ctx)
    assert calls == ["abort", "destroy"]


def test_train_cli_failure_leaves_the_group_without_a_barrier(monkeypatch, tmp_path):
    """`lavin-fast train`: a rank whose training raises aborts (no teardown barrier), then the error propagates."""
    from lavin_fast.cli import train as cli_train
    from lavin_fast.cli.main import build_parser
    from lavin_fast.train import trainer as trainer_mod

    calls = []

    class Failing:
        def __init__(self, cfg):
            self.ctx = distributed.DistContext(1, 2, 1, torch.device("cpu"), True)
            self.resumed_from, self.bf16, self.accum = None, False, 1

        def fit(self):
            raise RuntimeError("a step failed")

    monkeypatch.setattr(trainer_mod, "Trainer", Failing)
    monkeypatch.setattr(distributed, "abort", lambda ctx: calls.append("abort"))
    monkeypatch.setattr(distributed, "teardown", lambda ctx: calls.append("teardown"))
    args = build_parser(full=True).parse_args(["train", "--out-dir", str(tmp_path), "--device", "cpu", "--debug"])
    with pytest.raises(RuntimeError, match="a step failed"):
        cli_train.run(args)
    assert calls == ["abort"]
