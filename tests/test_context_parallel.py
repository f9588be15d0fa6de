"""Context parallelism (Ulysses, ring, hybrid) on CPU gloo processes against one process.

Each multi-process test spawns its ranks once and checks several cases inside them (start-up dominates).
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import socket

import pytest
import torch

from lavin_fast.parallel.context_parallel import _split, resolve_mode


def _free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1"}
    )
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=3))


def _slices(t: torch.Tensor, n: int, r: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Rank r's padded slice of t [B, L, ...] (tensor_split sizes) and every rank's real positions."""
    sizes = _split(t.shape[1], n)
    pad = -(-t.shape[1] // n)
    start = sum(sizes[:r])
    local = torch.zeros(t.shape[0], pad, *t.shape[2:], dtype=t.dtype)
    local[:, : sizes[r]] = t[:, start : start + sizes[r]]
    return local, [list(range(s)) for s in sizes]


def _attention_cases(rank: int, world: int) -> None:
    import torch.distributed as dist

    from lavin_fast.ops.attention import attention, reference_attention
    from lavin_fast.ops.rope import apply_rope
    from lavin_fast.parallel import cp_attention as cpa
    from lavin_fast.parallel.context_parallel import setup_context_parallel
    from lavin_fast.parallel.distributed import DistContext

    ctx = DistContext(rank, world, rank, torch.device("cpu"), True)
    modes = ["ulysses", "ring"] + (["hybrid"] if world == 4 else [])
    # (L, Hq, Hkv, hd, grid): L not divisible by the degree, Hkv < degree, a RoPE grid, MHA
    cases = [(13, 4, 1, 16, None), (2 * 3 * 3, 4, 2, 24, (2, 3, 3)), (world * 3, 4, 4, 16, None)]
    for mode in modes:
        cp = setup_context_parallel(ctx, world, mode, num_heads=4, ulysses=2 if mode == "hybrid" else 0)
        for L, hq, hkv, hd, grid in cases:
            g = torch.Generator().manual_seed(L * 100 + hkv)
            q = torch.randn(2, L, hq, hd, generator=g)
            k = torch.randn(2, L, hkv, hd, generator=g)
            v = torch.randn(2, L, hkv, hd, generator=g, requires_grad=True)
            w = torch.randn(2, L, hq, hd, generator=g)
            ref = attention(q, k, v, rope_grid=grid, backend="torch")
            assert torch.allclose(ref, reference_attention(q, k, v, rope_grid=grid), atol=1e-5)
            # gradients are checked w.r.t. the rotated q, k (the CP functions take RoPE already applied)
            qr, kr = ((apply_rope(t, grid) if grid else t).clone().requires_grad_(True) for t in (q, k))
            (attention(qr, kr, v, backend="torch") * w).sum().backward()
            ql, valid = _slices(qr.detach(), world, rank)
            kl, _ = _slices(kr.detach(), world, rank)
            vl, _ = _slices(v.detach(), world, rank)
            for t in (ql, kl, vl):
                t.requires_grad_(True)
            out = cp.attention(ql, kl, vl, None if L % world == 0 else valid, hd**-0.5, "torch")
            n_here = len(valid[rank])
            start = sum(len(x) for x in valid[:rank])
            rows = slice(start, start + n_here)
            err = (out[:, :n_here] - ref[:, rows]).abs().max().item()
            assert err < 2e-5, (mode, L, hkv, "output", err)
            (out[:, :n_here] * w[:, rows]).sum().backward()
            for name, local, full in (("dq", ql, qr), ("dk", kl, kr), ("dv", vl, v)):
                grad = torch.zeros_like(full)
                grad[:, rows] = local.grad[:, :n_here]
                dist.all_reduce(grad)
                err = (grad - full.grad).abs().max().item()
                assert err < 2e-5, (mode, L, hkv, name, err)
    # the differentiable gather keeps this rank's share of the gradient
    x = torch.full((1, 2), float(rank), requires_grad=True)
    y = cpa.GatherSequence.apply(x, None)
    assert y[:, 0, 0].tolist() == [float(r) for r in range(world)]
    (y * 3).sum().backward()
    assert x.grad.tolist() == [[3.0, 3.0]]


def _model_cases(rank: int, world: int) -> None:
    """The tiny GQA J-DiT (hd 72, 4 q heads, 1 kv head): forward, guided (two segments), parameter gradients."""
    import torch.distributed as dist

    from lavin_fast.flow.sampler import sample_latents
    from lavin_fast.models.dit import build_dit
    from lavin_fast.parallel.context_parallel import attach, setup_context_parallel
    from lavin_fast.parallel.distributed import DistContext

    ctx = DistContext(rank, world, rank, torch.device("cpu"), True)
    torch.manual_seed(0)
    model = build_dit("tiny-gqa", depth=2, backend="torch")
    with torch.no_grad():  # non-zero modulations and output projection, so every path carries signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 1, 6, 6, generator=g)  # 3 x 3 tokens per frame: 9 target, 27 context tokens
    c = torch.randn(2, 16, 3, 6, 6, generator=g)
    t = torch.rand(2, generator=g)
    w = torch.randn(2, 16, 1, 6, 6, generator=g)
    ref = model(x, t, c, rope_t_offset=5)
    (ref * w).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    ref_guided = model.guided(x, t, c, scale=1.5)  # null context of 2 frames: two packed segments
    ref_sampled = sample_latents(model, c, tuple(x.shape), num_points=3, grid="uniform", guidance=1.5)
    modes = ["ulysses", "ring"] + (["hybrid"] if world == 4 else [])
    for mode in modes:
        model.zero_grad()
        attach(model, setup_context_parallel(ctx, world, mode, num_heads=4, ulysses=2 if mode == "hybrid" else 0))
        out = model(x, t, c, rope_t_offset=5)
        assert (out - ref).abs().max() < 1e-5, (mode, "forward", (out - ref).abs().max().item())
        (out * w).sum().backward()
        for n, p in model.named_parameters():
            if n in ref_grads:
                grad = p.grad.clone()
                dist.all_reduce(grad)  # per-rank shares sum to the gradient of the one loss
                # float32 sums in another order: bounded by the gradient's own scale (elements near 0 have no
                # relative precision); 1e-4 of the largest entry still fails any 1% systematic error
                err = (grad - ref_grads[n]).abs().max().item()
                assert err <= 1e-4 * ref_grads[n].abs().max().item() + 1e-7, (mode, n, err)
        guided = model.guided(x, t, c, scale=1.5)
        assert (guided - ref_guided).abs().max() < 1e-5, (mode, "guided")
        sampled = sample_latents(model, c, tuple(x.shape), num_points=3, grid="uniform", guidance=1.5)
        assert (sampled - ref_sampled).abs().max() < 1e-4, (mode, "sampler")
        if mode == "ring":  # activation checkpointing replays the ring (its collectives) in the backward
            model.zero_grad()
            model.configure(grad_checkpointing=True)
            (model(x, t, c, rope_t_offset=5) * w).sum().backward()
            model.configure(grad_checkpointing=False)
            grad = model.blocks[0].attn.x_qkv.weight.grad.clone()
            dist.all_reduce(grad)
            assert torch.allclose(grad, ref_grads["blocks.0.attn.x_qkv.weight"], rtol=1e-4, atol=1e-6), "ckpt"
        attach(model, None)


def test_resolve_mode():
    assert resolve_mode("auto", 8, 32) == ("ulysses", 8)
    assert resolve_mode("auto", 64, 32) == ("hybrid", 32)
    assert resolve_mode("auto", 3, 32) == ("ring", 1)
    assert resolve_mode("ring", 4, 4) == ("ring", 1)
    with pytest.raises(ValueError, match="query heads"):
        resolve_mode("ulysses", 3, 32)
    with pytest.raises(ValueError, match="context_parallel_mode"):
        resolve_mode("zigzag", 2, 4)


def test_context_parallel_needs_a_process_group():
    from lavin_fast.parallel.context_parallel import setup_context_parallel
    from lavin_fast.parallel.distributed import DistContext

    one = DistContext(0, 1, 0, torch.device("cpu"), False)
    assert setup_context_parallel(one, 1, num_heads=4) is None
    with pytest.raises(ValueError, match="context_parallel 2 needs a process group"):
        setup_context_parallel(one, 2, num_heads=4)


BASE = {
    "batch_size": 4,
    "lr": 1e-3,
    "tensorboard": False,
    "progress": False,
    "log_every": 1,
    "null_prob": 0.3,
    "ema_decay": 0.9,
    "keep_last": 5,
}


def _worker(rank: int, world: int, ports: list[int], overrides: dict, result_path: str) -> None:
    """One rank: the attention and model cases over all `world` ranks, then a tiny-J-DiT training run."""
    import torch.distributed as dist
    from standin import spawned_rank

    faulthandler.dump_traceback_later(300, exit=True)  # a hung rank fails the test (with its stack) instead
    _init(rank, world, ports[0])
    _attention_cases(rank, world)
    _model_cases(rank, world)
    dist.barrier()
    dist.destroy_process_group()
    # the training run makes its own process group: on a fresh port (rank 0's old store may still be closing)
    spawned_rank(rank, world, ports[1], overrides, result_path, "tiny-dit")


@pytest.mark.slow  # two spawns (4 then 2 processes); one spawn per world size, since start-up dominates
def test_context_parallel_matches_one_process(tmp_path):
    """With 4 and then 2 processes: Ulysses, ring (and with 4, hybrid) attention and the tiny GQA J-DiT give the
    one-process outputs and gradients. Then training: 4 processes (dp_shard 2 x cp 2, FSDP2 over all 4) give the
    one-process losses, and their DCP checkpoint resumes in 2 processes with cp 1 (dp_shard 2), which continue
    with the one-process losses and EMA."""
    import torch.multiprocessing as mp
    from standin import standin_training_run

    single = standin_training_run(
        {**BASE, "steps": 4, "micro_batch_size": 4, "out_dir": str(tmp_path / "one")}, model="tiny-dit"
    )
    kw = {**BASE, "micro_batch_size": 2, "out_dir": str(tmp_path / "cp"), "save_every": 100}
    result = tmp_path / "cp.json"
    four_kw = {**kw, "steps": 3, "context_parallel": 2}
    mp.spawn(_worker, args=(4, _free_ports(2), four_kw, str(result)), nprocs=4, join=True)
    four = json.loads(result.read_text())
    assert four["losses"] == pytest.approx(single["losses"][:3], rel=1e-5, abs=1e-6)
    assert (tmp_path / "cp" / "checkpoints" / "step_00000003" / "trainer_rank3.json").is_file()
    two_kw = {**kw, "steps": 4, "context_parallel": 1}
    mp.spawn(_worker, args=(2, _free_ports(2), two_kw, str(result)), nprocs=2, join=True)
    two = json.loads(result.read_text())
    assert two["resumed"] and two["step"] == 4
    assert two["losses"] == pytest.approx(single["losses"][3:], rel=1e-5, abs=1e-6)
    for name, values in single["ema"].items():
        assert two["ema"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name


def test_block_attention_paths_agree_and_merge_to_full_attention():
    """The ring's building blocks in one process: CPU flash and the float32 math fallback give the same block
    output, logsumexp and (with the merged lse) gradients; merging two blocks by lse is full attention."""
    from lavin_fast.parallel import cp_attention as cpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 16, generator=g) for _ in range(3))
    scale = 0.3
    o, lse = cpa.block_forward(q, k, v, scale)
    mo, mlse = cpa.math_block_forward(q, k, v, scale)
    assert torch.allclose(o, mo, atol=1e-5) and torch.allclose(lse, mlse, atol=1e-5)
    # two key blocks merged by their logsumexp = attention over all keys
    (o1, l1), (o2, l2) = (
        cpa.block_forward(q, k[:, :, :4], v[:, :, :4], scale),
        cpa.block_forward(q, k[:, :, 4:], v[:, :, 4:], scale),
    )
    full = torch.logaddexp(l1, l2)
    merged = o1 * (l1 - full).exp()[..., None] + o2 * (l2 - full).exp()[..., None]
    assert torch.allclose(merged, o, atol=1e-5) and torch.allclose(full, lse, atol=1e-5)
    # per-block gradients with the merged out / lse sum to the full gradients
    do = torch.randn(o.shape, generator=g)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    torch.softmax(qq @ kk.transpose(-1, -2) * scale, -1).matmul(vv).backward(do)
    for fn in (cpa.block_backward, cpa.math_block_backward):
        dq1, dk1, dv1 = fn(do, q, k[:, :, :4].contiguous(), v[:, :, :4].contiguous(), o, lse, scale)
        dq2, dk2, dv2 = fn(do, q, k[:, :, 4:].contiguous(), v[:, :, 4:].contiguous(), o, lse, scale)
        assert torch.allclose(dq1 + dq2, qq.grad, atol=1e-5), fn.__name__
        assert torch.allclose(torch.cat([dk1, dk2], 2), kk.grad, atol=1e-5), fn.__name__
        assert torch.allclose(torch.cat([dv1, dv2], 2), vv.grad, atol=1e-5), fn.__name__


def test_context_parallel_must_divide_the_processes(tmp_path):
    from lavin_fast.train.config import ConfigError, load_config
    from lavin_fast.train.sources import SyntheticLatentSource
    from lavin_fast.train.trainer import Trainer

    cfg = load_config(None, {**BASE, "micro_batch_size": 4, "context_parallel": 2, "out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="'context_parallel': 2 does not divide the 1 processes"):
        Trainer(cfg, source_factory=lambda c, ctx: SyntheticLatentSource(micro_batch=4))
    with pytest.raises(ConfigError, match="context_parallel_mode"):
        load_config(None, {"context_parallel_mode": "zigzag"})
