"""`lavin-fast plan` (train/plan.py): the memory model against measured peaks of tiny training steps on the CPU
(within 20%), the mesh and policy choices, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from memprobe import LiveBytes

from lavin_fast.cli.main import main
from lavin_fast.models.dit import build_dit
from lavin_fast.ops.dispatch import use_backend
from lavin_fast.parallel.mesh import MeshShape
from lavin_fast.train.activation_checkpointing import apply_activation_checkpointing
from lavin_fast.train.ema import EMA
from lavin_fast.train.metrics import dit_shape_of, dit_train_flops
from lavin_fast.train.plan import LLAMA31_8B, PlanInput, memory, plan, published_state_check, sequence_tokens


def _measured_peak(hidden, depth, heads, hw, batch, policy) -> tuple[int, object]:
    """Peak live bytes of the second of two training steps (model, EMA, AdamW all made inside the probe), on the
    reference implementation (the torch forms, which the memory model's coefficients describe: the C++ CPU kernels
    keep 1-4% less at these peaks)."""
    torch.manual_seed(0)
    with LiveBytes() as probe, use_backend("torch"):
        m = build_dit("tiny", hidden_size=hidden, depth=depth, num_heads=heads).train()
        apply_activation_checkpointing(list(m.blocks), policy, 2)
        ema = EMA(m, 0.9)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for step in range(2):
            opt.zero_grad(set_to_none=True)
            x, cond, t = torch.randn(batch, 16, 1, hw, hw), torch.randn(batch, 16, 3, hw, hw), torch.rand(batch)
            m(x, t, cond).square().mean().backward()
            opt.step()
            ema.update(m)
            if step == 0:
                probe.peak = probe.live  # the steady state: the second step's peak
    return probe.peak, m.cfg


@pytest.mark.parametrize(
    "hidden,depth,heads,hw,batch,policy",
    [(64, 4, 4, 8, 2, "none"), (128, 3, 4, 16, 2, "none"), (96, 4, 2, 16, 2, "selective"), (64, 6, 4, 16, 4, "full")],
)
def test_memory_model_within_20_percent_of_the_measured_peak(hidden, depth, heads, hw, batch, policy):
    peak, cfg = _measured_peak(hidden, depth, heads, hw, batch, policy)
    inp = PlanInput(model=cfg, micro_batch=batch, resolution=8 * hw, num_pairs=1, value_bytes=4)
    assert sum(sequence_tokens(cfg, inp)) == 4 * (hw // 2) ** 2  # 3 context frames + 1 target, patch 2
    est = memory(cfg, inp, MeshShape(1, 1, 1), policy, cuda=False)["total"] * 2**30
    assert 0.8 < est / peak < 1.2, (est / peak, est, peak)


def test_plan_recommends_hsdp_across_nodes_and_the_fastest_fitting_choice():
    p = plan(PlanInput(model="3.4B", gpus=64, resolution=256, batch=256))
    assert p.mesh == MeshShape(8, 8, 1) and p.accum == 1 and p.fits
    assert p.comm_gb["dp_replicate"] > 0 and p.comm_gb["cp"] == 0
    big = plan(PlanInput(model="3.4B", gpus=64, resolution=512, batch=256))
    assert big.fits and big.tokens == 4 * p.tokens
    # the choice is the fastest fitting (micro-batch, policy): no other candidate that fits is faster
    for b in (1, 2, 4):
        for ac in ("none", "selective", "every", "full"):
            other = plan(PlanInput(model="3.4B", gpus=64, resolution=512, batch=256, micro_batch=b, ac=ac))
            assert not other.fits or other.step_s >= big.step_s
    # the policies order the activation memory the same way as the measured probe
    by = {ac: plan(PlanInput(model="3.4B", gpus=64, resolution=512, batch=256, micro_batch=4, ac=ac)) for ac in
          ("none", "selective", "every", "full")}  # fmt: skip
    acts = [by[a].memory_gib["activations"] for a in ("none", "every", "selective", "full")]
    assert acts == sorted(acts, reverse=True)
    assert by["full"].step_s > by["none"].step_s  # recomputation costs time
    # MFU uses the model FLOPs of the training metrics (not the recomputation)
    one = plan(PlanInput(model="0.1B", gpus=1, resolution=256, batch=4, micro_batch=4, ac="full"))
    shape = dit_shape_of(build_dit("0.1B", device="meta"))
    lc, lx = sequence_tokens(build_dit("0.1B", device="meta").cfg, one.input)
    assert one.mfu == pytest.approx(dit_train_flops(shape, lc, lx, 4) / (one.step_s * 989.4e12), rel=1e-9)
    with pytest.raises(ValueError, match="not a multiple"):
        plan(PlanInput(model="0.1B", gpus=8, batch=12, micro_batch=1))


def test_plan_command(capsys):
    assert main(["plan", "3.4B", "--gpus", "64", "--resolution", "512", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["mesh"] == {"dp_replicate": 8, "dp_shard": 8, "cp": 1} and doc["fits"]
    assert main(["plan", "3.4B", "--gpus", "8", "--resolution", "256"]) == 0
    assert "estimated MFU" in capsys.readouterr().out
    assert main(["plan", "9B"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["plan", "3.4B", "--gpus", "0"])
    assert exc.value.code == 2


def test_memory_model_against_published_fsdp_figures():
    """torchtitan's published reserved memory per GPU of Llama 3.1 8B (local batch 2, 8192 tokens, selective AC) on
    8 and on 128 H100s (pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3): the runs
    differ only in the FSDP degree, so their difference is the sharded state, which the planner models with no
    J-DiT-specific term. The planner's difference is within 5% of each published one; its old max(activations,
    gradients) rule was 23-25% short (why CUDA now sums them)."""
    published = {"FSDP": 82.4 - 67.0, "FSDP + torch.compile": 77.0 - 62.0, "FSDP + torch.compile + float8": 76.8 - 61.8}
    assert LLAMA31_8B[0] == 8_030_261_248  # Llama 3.1 8B: 8.03 B parameters
    rows = {r["technique"]: r for r in published_state_check()}
    old = {r["technique"]: r for r in published_state_check(cuda_rule=False)}
    for technique, diff in published.items():
        assert rows[technique]["published_gib"] == pytest.approx(diff)
        # independent figure: 16 B per parameter (float32 weights, gradients, Adam) over 8 less over 128, +10% slack
        assert rows[technique]["planned_gib"] == pytest.approx(1.1 * 16 * LLAMA31_8B[0] * (1 / 8 - 1 / 128) / 2**30)
        assert abs(rows[technique]["planned_gib"] / diff - 1) < 0.05, technique
        assert old[technique]["planned_gib"] / diff - 1 < -0.2
    # H200, 32 vs 64 GPUs (benchmarks/llama3_8b_h200_2025-06_torchtitan.md): published 0.99 GiB apart, the planner
    # 2.06 (+108%): a difference at the allocator's noise; the absolute error is 1.1 GiB of a 47 GiB total
    h200 = rows["FSDP + torch.compile + float8 (float8 all-gather)"]
    assert h200["published_gib"] == pytest.approx(47.96 - 46.97) and abs(h200["planned_gib"] - 0.99) < 1.2


def test_memory_model_keeps_the_published_context_parallel_invariance():
    """torchtitan's published Llama 3.1 8B runs on 8 H100s with FSDP x CP = 8 and sequence / CP = 32768 tokens per GPU
    (benchmarks/llama3_h100_202412_torchtitan.md, Table 2: 83.9, 84.2, 84.0, 84.5 GiB for CP 1, 2, 4, 8) stay within
    0.7% of each other; so does the planner (the state is sharded over FSDP x CP, the activations follow the
    tokens per GPU). Counting the state over FSDP alone would put the CP 8 row 115 GiB higher."""
    from lavin_fast.models.dit_configs import DiTConfig

    published = {1: 83.9, 2: 84.2, 4: 84.0, 8: 84.5}
    cfg = DiTConfig(hidden_size=4096, depth=32, num_heads=32, kv_group=4)
    totals = {}
    for cp in published:  # 8 items (3 pairs, query, target) of 4096 tokens x cp frames: 32768 x cp tokens
        inp = PlanInput(model=cfg, micro_batch=1, resolution=1024, frames=cp, num_pairs=3, ema=False, ac="full")
        assert sum(sequence_tokens(cfg, inp)) == 32768 * cp
        totals[cp] = memory(cfg, inp, MeshShape(1, 8 // cp, cp), "full", params=LLAMA31_8B)["total"]
    spread = max(totals.values()) / min(totals.values()) - 1
    assert spread <= max(published.values()) / min(published.values()) - 1 + 0.01
