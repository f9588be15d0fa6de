"""The costs the static model charges from the SASS (issue 25), each against a hand computation: a full wgmma wait,
BAR.SYNC, the softmax's shuffle chains, a load waited on in the iteration that issues it, MUFU as a per-SM pipe,
shared-memory bandwidth of SS/RS wgmma; and the public RMSNorm anchor kernel against its reference."""

from __future__ import annotations

import pytest
import torch

from lavin_fast.perf import sass_model as sm

H100 = sm.GPUS["h100"]
P = sm.Params(tensor_efficiency=0.8, issue_efficiency=1.0, warp_ipc=0.25, wait_clk=100.0, launch_us=0.0,
              hbm_efficiency=0.9, bar_clk=30.0, chain_clk=50.0, mem_latency_clk=1000.0, l2_latency_clk=600.0)  # fmt: skip


def _a(**kw) -> dict:
    a = {"mma_flops": 4 * 2 * 64 * 64 * 16, "hmma_flops": 0, "non_mma": 200, "mufu": 0, "waits": 1, "waits_full": 0,
         "global_bytes_in": 0, "global_bytes_out": 0, "has_loop": True, "outside_instructions": 0,
         "outside_global_bytes": 0, "bar_syncs": 0, "shfl": 0, "loads": {}, "hgmma_smem_bytes": 0}  # fmt: skip
    a.update(kw)
    return a


def _serial(a: dict, warps: int = 4) -> float:
    """One CTA's time per iteration by hand: tensor + its warps' issue (no overlap after a full wait)."""
    t_tensor = a["mma_flops"] * max(warps // 4, 1) / (sm.TENSOR_FLOP_PER_CLK_SM * P.tensor_efficiency)
    per_smsp = warps / min(4, warps)
    t_issue = a["non_mma"] * per_smsp / min(P.issue_efficiency, per_smsp * P.warp_ipc)
    t_mufu = a["mufu"] * warps * 32 / sm.MUFU_LANES_PER_CLK_SM
    return t_tensor + max(t_issue, t_mufu)


def test_each_full_wait_and_barrier_adds_its_stall_to_one_ctas_time():
    base = _a(waits_full=1)
    e0 = sm.estimate(base, 4, 1, H100, params=P)
    assert e0.cycles_per_iter == pytest.approx(_serial(base) + 100.0)
    ten = sm.estimate(_a(waits_full=10, waits=10), 4, 1, H100, params=P)  # ten drains cost ten times one
    assert ten.cycles_per_iter == pytest.approx(_serial(base) + 1000.0)
    bars = sm.estimate(_a(waits_full=1, bar_syncs=6), 4, 1, H100, params=P)
    assert bars.cycles_per_iter == pytest.approx(_serial(base) + 100.0 + 6 * 30.0)
    # two CTAs per SM overlap their stalls: half of one CTA's time per CTA-iteration (when not throughput-bound)
    two = sm.estimate(_a(waits_full=10, waits=10), 4, 2, H100, params=P)
    assert two.cycles_per_iter == pytest.approx((_serial(base) + 1000.0) / 2)


def test_softmax_chains_and_a_load_waited_on_at_once_are_charged():
    soft = _a(waits_full=1, mufu=20, shfl=8)
    e = sm.estimate(soft, 4, 1, H100, params=P)
    assert e.cycles_per_iter == pytest.approx(_serial(soft) + 100.0 + 50.0)
    loads = _a(loads={"UTMALDG": 2})
    one_stage = sm.estimate(loads, 4, 1, H100, num_stages=1, params=P)
    pipelined = sm.estimate(loads, 4, 1, H100, num_stages=3, params=P)
    assert one_stage.cycles_per_iter == pytest.approx(pipelined.cycles_per_iter + 600.0)


def test_mufu_is_a_per_sm_pipe_that_more_warps_do_not_widen():
    # the same softmax work per CTA: 4 warps with 40 MUFU each, or 8 warps with 20 each
    four = sm.estimate(_a(mufu=40, non_mma=10), 4, 1, H100, params=P)
    eight = sm.estimate(_a(mufu=20, non_mma=5), 8, 1, H100, params=P)
    assert four.terms["mufu"] == pytest.approx(eight.terms["mufu"]) == pytest.approx(40 * 4 * 32 / 16)


def test_shared_memory_bandwidth_of_ss_wgmma():
    ss = sm.count_block([sm.Insn(0, "HGMMA.64x64x16.F32.BF16", "R24, gdesc[UR8], R24")])
    rs = sm.count_block([sm.Insn(0, "HGMMA.64x64x16.F32.BF16", "R24, R152, gdesc[UR12], R24")])
    assert ss["hgmma_smem_bytes"] == 2 * 64 * 16 + 2 * 64 * 16  # A and B tiles from shared memory
    assert rs["hgmma_smem_bytes"] == 2 * 64 * 16  # only B
    # small-N SS wgmma: 4 of them per iteration, 2 warpgroups; the tensor term is 32 clk each, smem 32 clk
    a = _a(mma_flops=4 * 2 * 64 * 16 * 16, hgmma_smem_bytes=4 * (2 * 16 * 16 + 2 * 64 * 16), non_mma=4)
    e = sm.estimate(a, 8, 1, H100, params=P)
    assert e.terms["smem"] == pytest.approx(2 * 4 * (2 * 16 * 16 + 2 * 64 * 16) / 128)
    assert e.bound == "smem"


def test_rms_norm_anchor_matches_reference():
    from lavin_fast.perf.anchors import anchor_rms_norm, anchor_rms_norm_reference, rms_norm_settings

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 40, generator=g), torch.randn(40, generator=g)
    torch.testing.assert_close(anchor_rms_norm(x, w), anchor_rms_norm_reference(x, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="w \\[hidden\\]"):
        anchor_rms_norm(x, w[:10])
    assert rms_norm_settings(1024) == (1024, 4) and rms_norm_settings(2304) == (4096, 8)
    assert rms_norm_settings(8192) == (8192, 16) and rms_norm_settings(32768) == (32768, 32)
