"""The costs the static model charges from the SASS (issue 25), each against a hand computation: a full wgmma wait,
BAR.SYNC, the softmax's shuffle chains, a load waited on in the iteration that issues it, MUFU as a per-SM pipe,
shared-memory bandwidth of SS/RS wgmma; and the public RMSNorm anchor kernel against its reference."""

from __future__ import annotations

import math

import pytest
import torch

from lavin_fast.perf import sass_model as sm

H100 = sm.GPUS["h100"]
P = sm.Params(
    tensor_efficiency=0.8,
    issue_efficiency=1.0,
    warp_ipc=0.25,
    wait_clk=100.0,
    launch_us=0.0,
    hbm_efficiency=0.9,
    bar_clk=30.0,
    chain_clk=50.0,
    mem_latency_clk=1000.0,
    l2_latency_clk=600.0,
    limit_p=math.inf,
)  # fmt: skip  (each cost alone: the largest limit binds; the p-norm has its own test)


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
    # Liger's benchmark: bf16 x, an fp32 weight; x / rms rounded to bf16 before the weight ("llama" casting)
    xb = (torch.randn(5, 48, generator=g) * 3).bfloat16()
    got, ref = anchor_rms_norm(xb, w[:8].repeat(6)), anchor_rms_norm_reference(xb, w[:8].repeat(6))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    xf = xb.float()  # independent of both: the rounding of x / rms to bf16 happens before the weight
    by_hand = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16().float() * w[:8].repeat(6)
    torch.testing.assert_close(got.float(), by_hand.bfloat16().float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="w \\[hidden\\]"):
        anchor_rms_norm(x, w[:10])
    assert rms_norm_settings(1024) == (1024, 4) and rms_norm_settings(2304) == (4096, 8)
    assert rms_norm_settings(8192) == (8192, 16) and rms_norm_settings(32768) == (32768, 32)


def test_layer_norm_anchor_matches_reference():
    from lavin_fast.perf.anchors import anchor_layer_norm, anchor_layer_norm_reference

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 40, generator=g) * 3 + 1, torch.randn(40, generator=g), torch.randn(40, generator=g)
    torch.testing.assert_close(anchor_layer_norm(x, w, b), anchor_layer_norm_reference(x, w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="w and b"):
        anchor_layer_norm(x, w, b[:10])


def test_epilogue_bytes_are_exposed_only_when_one_cta_holds_the_sm():
    # the output tile's stores outside the main loop: with one CTA per SM nothing overlaps them, so each wave pays
    # them at the SM's share of HBM bandwidth; with two CTAs per SM the other CTA's loop hides them
    a = _a(outside_global_bytes=16 * 1024, waits_full=0)  # per warp: 64 KiB per 4-warp CTA
    share = H100.hbm_gbps * P.hbm_efficiency / (H100.sms * H100.clock_ghz)  # bytes per clock per SM
    hz = H100.clock_ghz * 1e9
    for k in (1, 2):
        bare = sm.estimate(_a(waits_full=0), 4, k, H100, programs=10 * k * H100.sms, iters=8, params=P)
        tile = sm.estimate(a, 4, k, H100, programs=10 * k * H100.sms, iters=8, params=P)
        exposed = 10 * 4 * 16 * 1024 / share / hz if k == 1 else 0.0  # 10 waves
        assert tile.seconds - bare.seconds == pytest.approx(exposed, abs=1e-12)


def test_host_bound_gemm_figures_are_left_out_and_the_kept_ones_are_above_the_floor():
    from lavin_fast.perf.anchors import ANCHORS, HOST_BOUND, MATMUL_3672, cube_time_us

    floor = [cube_time_us(n, tf) for n, tf in HOST_BOUND]
    # the left-out figures all stand for 80-90 us whatever the work (256^3 to 2816^3: 1300x the FLOPs)
    assert max(floor) / min(floor) < 1.15 and 75 < min(floor) and max(floor) < 95
    kept = [a for a in ANCHORS if a.source == MATMUL_3672]
    assert kept and all(cube_time_us(a.shape[0], a.published) > 1.15 * max(floor) for a in kept)
    assert not {a.shape[0] for a in kept} & {n for n, _ in HOST_BOUND}


def _row_compiled(anchors):
    from lavin_fast.perf.anchors import anchor_configs
    from lavin_fast.perf.calibration import Compiled

    out = {}
    for an in anchors:
        for label, _ in anchor_configs(an):
            per_warp = an.shape[1] * 2 * (4 if an.kernel == "layer_norm" else 2) / 4
            a = _a(mma_flops=0, waits=0, has_loop=False, non_mma=60, global_bytes_in=per_warp / 2,
                   global_bytes_out=per_warp / 2)  # fmt: skip
            out[label] = Compiled(a, 4, 8, 1)
    return out


def test_held_out_anchors_never_enter_the_fit():
    from dataclasses import replace

    from lavin_fast.perf import calibration
    from lavin_fast.perf.anchors import ANCHORS

    rows_fit = [a for a in ANCHORS if a.kernel == "rms_norm"][:4]
    held = next(a for a in ANCHORS if a.kernel == "relu_squared" and a.heldout)
    compiled = _row_compiled([*rows_fit, held])
    rows, full = calibration.leave_one_out(compiled, (*rows_fit, held))
    moved = replace(held, published=held.published * 3)  # a held-out figure 3x off changes no constant
    rows2, full2 = calibration.leave_one_out(compiled, (*rows_fit, moved))
    assert full2 == full
    assert [r["est"] for r in rows2] == [r["est"] for r in rows]
    h = rows[-1]
    assert h["heldout"] and h["est"] == h["est_in_sample"]
    assert rows2[-1]["oos_error"] == pytest.approx((1 + h["oos_error"]) * 3 - 1, abs=0.01)
    # a fitted figure moved does move the constants
    _, full3 = calibration.leave_one_out(compiled, (replace(rows_fit[0], published=rows_fit[0].published * 3),
                                                    *rows_fit[1:], held))  # fmt: skip
    assert full3 != full
    fam = calibration.family_errors(rows, "heldout")
    assert set(fam) == {"memory"} and fam["memory"][0] <= h["oos_error"] <= fam["memory"][1]


def test_sensitivity_reports_where_the_fit_is_flat():
    from lavin_fast.perf import calibration
    from lavin_fast.perf.anchors import ANCHORS

    rows_fit = [a for a in ANCHORS if a.kernel == "rms_norm"]
    compiled = _row_compiled(rows_fit)
    params = calibration.fit(rows_fit, compiled)
    sens = calibration.sensitivity(rows_fit, compiled, params)
    # no MMA in a row kernel: the wgmma wait, the barrier and the softmax chain cannot move its loss
    for name in ("wait_clk", "bar_clk", "chain_clk", "tensor_efficiency"):
        value, best, worst, near = sens[name]
        assert worst == pytest.approx(best) and near == (min(calibration.FREE[name]), max(calibration.FREE[name]))
    value, best, worst, near = sens["hbm_efficiency"]
    assert worst > 2 * best and near[0] <= value <= near[1]


def test_a_fit_that_wants_more_than_the_data_sheet_is_reported_past_its_bound():
    from dataclasses import replace

    from lavin_fast.perf import calibration
    from lavin_fast.perf.anchors import ANCHORS, published_rate

    rows_fit = [a for a in ANCHORS if a.kernel == "rms_norm" and not a.heldout]
    compiled = _row_compiled(rows_fit)
    params = calibration.fit(rows_fit, compiled)
    assert calibration.past_bound(rows_fit, compiled, params) == {}  # the published rates fit under the data sheet
    # the same figures 2x faster: more than the NVL's 3.9 TB/s, so hbm_efficiency would go past 1.0 (held at the
    # grid's top, the loss keeps falling past it); no MMA in these anchors, the tensor efficiency cannot move them
    fast = [replace(a, published=a.published / 2) for a in rows_fit]
    assert max(published_rate(a) for a in fast) > sm.GPUS["h100nvl"].hbm_gbps
    params_fast = calibration.fit(fast, compiled)
    past = calibration.past_bound(fast, compiled, params_fast)
    assert set(past) == {"hbm_efficiency"}
    value, loss, at_fit = past["hbm_efficiency"]
    assert value > 1.0 and loss < at_fit
    assert loss == pytest.approx(
        calibration._loss(fast, compiled, replace(params_fast, hbm_efficiency=value)), abs=1e-5
    )
    rows, _ = calibration.leave_one_out(compiled, tuple(fast))
    rows = [dict(r, label=r["name"], est_low=0.0, est_high=0.0, past_bound=past) for r in rows]
    text = calibration.format_anchor_table(rows)
    assert "at a physical bound" in text and "hbm_efficiency" in text


def test_a_thin_family_takes_the_widest_errors_and_no_band_passes_the_data_sheet():
    from lavin_fast.perf import kernel_report

    def anchor(fam, err):
        return {"family": fam, "family_error": err, "num_warps": 4, "ctas_per_sm": 2}

    anchors = [anchor("attention", (-0.2, 0.1))] * 4 + [anchor("gemm", (-0.01, 0.02))] * 2
    gemm = {"label": "conv", "mma_flops_per_iter": 1, "mufu_per_iter": 0, "est_tflops": 500.0, "num_warps": 4,
            "ctas_per_sm": 2}  # fmt: skip
    attn = dict(gemm, label="fwd", mufu_per_iter=8, est_tflops=900.0)
    kernel_report.add_bands([gemm, attn], anchors, H100)
    # two gemm figures agreeing within 2% are not trusted: the widest errors of every family apply
    assert gemm["est_low"] == pytest.approx(500 / 1.1, abs=0.06) and gemm["est_high"] == pytest.approx(
        500 / 0.8, abs=0.06
    )
    peak = H100.sms * sm.TENSOR_FLOP_PER_CLK_SM * H100.clock_ghz / 1e3
    assert attn["est_high"] == pytest.approx(peak, abs=0.06) and attn["est_low"] == pytest.approx(900 / 1.1, abs=0.06)
    anchors += [anchor("gemm", (-0.01, 0.02))] * 2  # four figures: the family's own errors
    kernel_report.add_bands([gemm], anchors, H100)
    assert gemm["est_high"] == pytest.approx(500 / 0.99, abs=0.06)


def _sass_lines(*lines: str) -> list:
    """Instructions at 16-byte steps, through the report's own parser (predicates dropped)."""
    text = "\tFunction : k\n" + "".join(f"        /*{16 * i:04x}*/   {t} ;\n" for i, t in enumerate(lines))
    return sm.parse_sass(text)["k"]


def test_libdevice_sin_cos_slow_path_is_not_counted():
    # a row kernel whose sin/cos slow path (a table walk: constant-table loads into local memory, behind a branch
    # taken only for huge arguments) sits beside the fast path: only the fast path and the rest count
    body = _sass_lines(
        "LDG.E.128 R4, desc[UR4][R2.64]",  # 0x00
        "FMUL R5, R4, R4",  # 0x10
        "BRA 0xa0",  # 0x20: the fast path jumps over the slow one
        "IMAD.MOV.U32 R8, RZ, RZ, RZ",  # 0x30: slow path
        "LDG.E.CONSTANT R7, desc[UR6][R6.64]",  # 0x40: loop: table word
        "IMAD.WIDE.U32 R4, R31, R7, R4",  # 0x50
        "STL [R3], R4",  # 0x60: into local memory
        "@P1 BRA 0x40",  # 0x70
        "LDL R3, [R7+0x14]",  # 0x80
        "FFMA R5, R3, R3, R5",  # 0x90
        "STG.E.128 desc[UR4][R2.64], R4",  # 0xa0
        "EXIT",  # 0xb0
    )
    assert sm.rare_paths(body) == [(3, 10)]
    a = sm.analyse_sass(body)
    assert a["rare_path_instructions"] == 7 and a["instructions"] == 5 and not a["has_loop"]
    assert a["global_bytes_in"] == 16 * 32  # the table loads are not traffic either
    # a trip-count guard over a loop with spills (local memory, but no constant table, and a store) stays counted
    guard = _sass_lines(
        "@!P0 BRA 0x70",
        "LDG.E.128 R4, desc[UR4][R2.64]",
        "STL [R1], R4",
        "LDL R4, [R1]",
        "STG.E.128 desc[UR4][R2.64], R4",
        "@P1 BRA 0x10",
        "NOP",
        "EXIT",
    )
    assert sm.rare_paths(guard) == [] and sm.analyse_sass(guard)["rare_path_instructions"] == 0


def test_a_warp_specialised_row_is_extrapolated():
    from lavin_fast.perf import kernel_report

    anchors = [{"family": "attention", "family_error": (-0.1, 0.1), "num_warps": 4, "ctas_per_sm": 2}] * 4
    plain = {"label": "fwd", "mma_flops_per_iter": 1, "mufu_per_iter": 8, "est_tflops": 400.0, "num_warps": 4,
             "ctas_per_sm": 2, "cta_warps": 4}  # fmt: skip
    ws = dict(plain, label="fwd ws", cta_warps=12)  # Triton's partitions: 12 warps compiled for num_warps=4
    kernel_report.add_bands([plain, ws], anchors, H100)
    assert not plain["extrapolated"] and ws["extrapolated"]
    assert ws["est_low"] == pytest.approx(400 / 1.15, abs=0.06) and plain["est_low"] == pytest.approx(
        400 / 1.1, abs=0.06
    )


def test_relu_squared_anchor_matches_reference():
    from lavin_fast.perf.anchors import ANCHORS, anchor_relu_squared, published_rate, row_kernel_bytes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=g)
    torch.testing.assert_close(anchor_relu_squared(x), torch.where(x > 0, x * x, torch.zeros_like(x)))
    with pytest.raises(ValueError, match="x \\[rows, cols\\]"):
        anchor_relu_squared(x[0])
    a = next(a for a in ANCHORS if a.kernel == "relu_squared" and a.shape == (4096, 16384))
    assert a.heldout and row_kernel_bytes(a) == 2 * 4096 * 16384 * 2  # x read and y written once, bf16
    assert published_rate(a) == pytest.approx(2 * 4096 * 16384 * 2 / 94.4e-6 / 1e9)  # 2843.6 GB/s


def test_attention_anchors_are_compiled_in_their_sources_autotune_list():
    """tritonbench's figures are the best of tritonbench's own list at the figures' commit (BN 64/128, and 128 x 128
    with 8 warps), not the tutorial's (BN 32/64, 4 warps only): each anchor's estimate is the best of its own list,
    and every configuration of every anchor is compiled."""
    from lavin_fast.perf.anchors import ANCHORS, TRITONBENCH, _aot_specs, anchor_configs

    tb = [a for a in ANCHORS if a.source == TRITONBENCH]
    assert len(tb) == 6
    for a in tb:
        labels = [label for label, _ in anchor_configs(a)]
        assert "attention bf16 128x128x8x3 hd128" in labels and "attention bf16 64x128x4x3 hd128" in labels
        eight_warps = [lb for lb in labels if "x8x" in lb]
        assert not any("x32x" in lb for lb in labels) and all("128x128x8" in lb for lb in eight_warps)
    compiled = {s.label for s in _aot_specs()}
    assert all(label in compiled for a in ANCHORS for label, _ in anchor_configs(a))


def test_each_source_weighs_once_in_the_fit():
    """Three sizes of one benchmark run are one measurement campaign: listing a source's figure three times (or three
    figures of one run) must not pull the constants three times as hard as a source with one figure."""
    from dataclasses import replace

    from lavin_fast.perf import calibration
    from lavin_fast.perf.anchors import ANCHORS

    a = next(x for x in ANCHORS if x.kernel == "rms_norm" and x.shape == (2048, 8192))
    b = replace(a, name="b", source="another run", published=a.published * 1.3)  # 30% slower elsewhere
    compiled = _row_compiled([a])
    one = calibration.fit([a, b], compiled)
    three = calibration.fit([a, b, replace(b, name="b2"), replace(b, name="b3")], compiled)
    assert three == one
    # the estimate sits between the two sources, not next to the one listed three times
    est, _ = calibration.anchor_estimate(a, compiled, three)
    from lavin_fast.perf.anchors import published_rate

    assert published_rate(b) < est < published_rate(a)
    assert abs(est / published_rate(a) - 1) == pytest.approx(abs(est / published_rate(b) - 1), rel=0.35)


def test_l2_traffic_caps_a_loop_that_reads_many_tiles_per_flop():
    # a tensor-light loop whose CTA-iterations each move 256 KiB from L2: bound by the chip's L2 -> SM bandwidth
    # (gpu.l2_gbps shared by every SM), so the launch takes l2_bytes / l2_gbps whatever its tensor time
    a = _a(waits_full=0, non_mma=10)
    programs, iters = 4 * H100.sms, 50
    l2 = float(programs * iters * 256 * 1024)
    flops = a["mma_flops"] * programs * iters
    e = sm.estimate(a, 4, 2, H100, programs=programs, iters=iters, useful_flops=flops, l2_bytes=l2, params=P)
    assert e.bound == "l2"
    # two full waves of 2 CTAs per SM, each with its prologue/epilogue round trips (2 x mem_latency_clk); launch 0
    t = l2 / (H100.l2_gbps * 1e9) + 2 * 2 * P.mem_latency_clk / (H100.clock_ghz * 1e9)
    assert e.seconds == pytest.approx(t, rel=1e-6)
    assert e.est_tflops == pytest.approx(flops / t / 1e12, rel=1e-6)
    # without l2_bytes, the SASS's global loads per CTA-iteration stand for the L2 traffic (pointer loads)
    ldg = _a(waits_full=0, non_mma=10, global_bytes_in=256 * 1024 // 4)  # per warp, 4 warps
    e2 = sm.estimate(ldg, 4, 2, H100, programs=programs, iters=iters, useful_flops=flops, params=P)
    assert e2.bound == "l2" and e2.seconds == pytest.approx(e.seconds, rel=1e-6)
    # the same loop with a hundredth of the traffic (62 clocks of L2 per CTA-iteration, 160 of tensor) is not
    light = sm.estimate(a, 4, 2, H100, programs=programs, iters=iters, useful_flops=flops, l2_bytes=l2 / 100, params=P)
    assert light.bound != "l2" and light.est_tflops > 5 * e.est_tflops


def test_the_l2_bandwidth_is_the_measured_figure_not_a_data_sheet_guess():
    # gpu-benches' gpu-l2-cache, H200 (GH100, 132 SMs): 9.7-10.0 TB/s for 10-40 MB; the model uses 9.7 TB/s for
    # every GH100 part with 132 SMs, about 2.9x the H100 SXM's HBM
    for g in ("h100", "h200", "h100nvl"):
        assert sm.GPUS[g].l2_gbps == pytest.approx(9700.0)
    assert 2.5 < sm.GPUS["h100"].l2_gbps / sm.GPUS["h100"].hbm_gbps < 3.2


def test_occupancy_of_a_warp_specialised_cta_counts_all_its_warps():
    # Triton's warp-specialised forward: num_warps=4 in the spec, 12 warps in the compiled CTA at 168 registers:
    # 12 x 32 x 168 = 64512 of the SM's 65536 registers, so one CTA per SM (counting 4 warps gave 3)
    from lavin_fast.ops.aot import AotSpec
    from lavin_fast.perf.aot import AotResult, apply_model

    spec = AotSpec("attention", None, {}, {}, num_warps=4, num_stages=2)
    sass = "        /*0000*/                   MOV R1, c[0x0][0x28] ;\n"
    ws = AotResult("attention", "k", "ws", num_warps=4, num_stages=2, registers=168, shared_bytes=50000, cta_warps=12)
    apply_model(ws, sass, spec)
    assert ws.ctas_per_sm == 1 and ws.occupancy_limit == "registers"
    plain = AotResult("attention", "k", "plain", num_warps=4, num_stages=2, registers=168, shared_bytes=50000,
                      cta_warps=4)  # fmt: skip
    apply_model(plain, sass, spec)
    assert plain.ctas_per_sm == 65536 // (168 * 32 * 4)  # 3: registers again


def test_attention_specs_l2_bytes_are_each_programs_k_and_v_read_once():
    # counted another way than the spec (per program, not per iteration): every forward program (BLOCK_M query rows
    # of one head) reads its kv head's whole k and v once, at the head dim as tiled (hd 72: 64 + a 16-wide tail)
    from lavin_fast.ops.attention import _AOT_HEADS, _AOT_L, _at_shape

    for hd, width in ((64, 64), (72, 80), (128, 128)):
        hq, _ = _AOT_HEADS[hd]
        for bm, bn in ((128, 64), (64, 64), (64, 32)):
            s = _at_shape(hd, "fwd", bm, bn)
            assert s["l2_bytes"] == (_AOT_L // bm) * hq * (2 * _AOT_L * width * 2)
        # dK/dV: every program (BLOCK_N keys of one kv head) reads q and dO of its GROUP query heads once, and lse
        # and delta (fp32) per query row; the fused dQ adds an fp32 dQ tile per query block
        hq, hkv = _AOT_HEADS[hd]
        only = _at_shape(hd, "dkdv", 64, 64)["l2_bytes"]
        fused = _at_shape(hd, "dkdv+dq", 64, 64)["l2_bytes"]
        per_program = hq // hkv * _AOT_L * (2 * width * 2 + 8)
        assert only == (_AOT_L // 64) * hkv * per_program
        assert fused - only == (_AOT_L // 64) * hkv * (hq // hkv) * _AOT_L * width * 4


def test_the_rms_norm_anchor_reads_the_fp32_weight_of_ligers_benchmark():
    # Liger's benchmark_rms_norm.py (at the figures' commit) builds LigerRMSNorm(hidden_size=N) with its default fp32
    # torch.ones weight and feeds it bf16 x: the weight row is read in fp32, which sets the registers (16384 columns:
    # 84 per thread, 1 CTA per SM, against 64 and 2 with a bf16 weight) and so the structure the figure measures
    from lavin_fast.ops.aot import ANCHOR_OP
    from lavin_fast.perf.anchors import ANCHORS, LIGER, anchor_configs
    from lavin_fast.perf.aot import collect_specs

    specs = {s.label: s for s in collect_specs([ANCHOR_OP]) if s.label.startswith("rms_norm ")}
    liger = [a for a in ANCHORS if a.source == LIGER]
    assert len(liger) == 6 and all(a.weight_dtype == "fp32" for a in liger)
    for a in (a for a in ANCHORS if a.kernel == "rms_norm"):
        (label, _), *_ = anchor_configs(a)
        s = specs[label]
        assert s.signature["x_ptr"] == "*bf16" and s.signature["y_ptr"] == "*bf16"
        assert s.signature["w_ptr"] == f"*{a.weight_dtype}", a.name
    # the held-out Megatron figures: the same kernel with the module cast to bf16 (weight included)
    assert {a.weight_dtype for a in ANCHORS if a.kernel == "rms_norm" and a.heldout} == {"bf16"}


def test_a_row_alone_on_its_sm_waits_for_its_loads_through_the_sms_port():
    # a memory pass: one round trip, then the rest of its loads arrive through the SM's port at its share of the
    # chip's L2 -> SM bandwidth before the row's reduction can finish; one CTA per SM cannot overlap that with its
    # own arithmetic, several CTAs per SM overlap each other's. Liger's RMSNorm at 16384 columns: 16 warps, per warp
    # 12 LDG.128 (bf16 x and the fp32 weight, which hits L2) and 4 STG.128; HBM moves x and y only
    nvl, warps, bytes_in, bytes_out = sm.GPUS["h100nvl"], 16, 12 * 512, 4 * 512
    p = sm.Params(**{**P.__dict__, "issue_efficiency": 0.5, "warp_ipc": 0.275, "mem_latency_clk": 1600.0})
    a = _a(mma_flops=0, non_mma=367, global_bytes_in=bytes_in, global_bytes_out=bytes_out, has_loop=False,
           loads={"LDG.128": 12, "STG.128": 4}, bar_syncs=2)  # fmt: skip
    rows, useful = nvl.sms, nvl.sms * 2 * 16384 * 2.0  # one wave of one row per SM
    port = bytes_in * warps / (nvl.l2_gbps / (nvl.sms * nvl.clock_ghz))
    issue = 367 * (warps / 4) / min(p.issue_efficiency, warps / 4 * p.warp_ipc)
    serial = p.mem_latency_clk + port + issue + 2 * p.bar_clk
    hbm = 2 * 16384 * 2 / (nvl.hbm_gbps * p.hbm_efficiency / (nvl.sms * nvl.clock_ghz))
    alone = sm.estimate(a, warps, 1, nvl, programs=rows, useful_bytes=useful, params=p)
    assert alone.terms["serial"] == pytest.approx(serial, abs=0.1)
    assert alone.terms["memory"] == pytest.approx(hbm, abs=0.1) and serial > 1.4 * hbm  # the serial phases bind
    assert alone.cycles_per_iter == pytest.approx(serial, abs=0.1) and alone.bound == "memory"
    assert alone.seconds == pytest.approx(serial / (nvl.clock_ghz * 1e9), rel=1e-6)  # launch_us 0 in P
    four = sm.estimate(a, warps, 4, nvl, programs=4 * rows, useful_bytes=4 * useful, params=p)  # overlapped
    assert four.cycles_per_iter == pytest.approx(hbm, abs=0.1) and four.bound == "memory"


def _attention_loop(softmax: int, tail: int, wait_after_pv: bool) -> list:
    """A forward's loop in the shape of the anchors' SASS: QK^T issued and fully waited, the softmax, P V issued
    (in flight through the tail, the loop's back edge and the next QK^T, drained by the next full wait), or, with
    `wait_after_pv`, P V waited on at once so that nothing is in flight while the tail issues."""
    soft = ["MUFU.EX2 R3, R3" if i % 5 == 0 else "FMNMX R2, R2, R3, !PT" for i in range(softmax)]
    pv_wait = ["WARPGROUP.DEPBAR.LE gsb0, 0x0"] if wait_after_pv else []
    return _sass_lines(
        "WARPGROUP.ARRIVE",
        "HGMMA.64x64x16.F32.BF16 R88, gdesc[UR12], RZ, !UPT, gsb0",  # QK^T: 2 x 64 x 64 x 16 FLOPs
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        *soft,
        "WARPGROUP.ARRIVE",
        "HGMMA.64x128x16.F32.BF16 R24, R120, gdesc[UR8].tnspB, R24, gsb0",  # P V: 2 x 64 x 128 x 16
        *pv_wait,
        *["FADD R4, R4, R5"] * tail,
        "BRA 0x0",
        "EXIT",
    )


def test_wgmma_in_flight_overlaps_the_instructions_issued_after_it():
    # after a full wait nothing is in flight: the softmax issues with the tensor pipe idle; P V then runs while the
    # tail, the back edge and the next QK^T issue, up to the wait that drains both. The iteration costs the
    # softmax's issue plus the larger of the wgmma time and the tail's issue (not their sum)
    a = sm.analyse_sass(_attention_loop(softmax=20, tail=10, wait_after_pv=False))
    # exposed: the softmax and P V's arrive; overlapped: the tail, BRA, the next arrive and the wait
    assert a["wait_segments"] == [{"exposed": 21, "overlapped": 13, "mma_flops": 2 * 64 * 64 * 16 + 2 * 64 * 128 * 16}]
    per_insn = 1 / P.warp_ipc  # 4 warps, one per scheduler: one warp's issue at warp_ipc (P: issue_efficiency 1)
    tensor = (2 * 64 * 64 * 16 + 2 * 64 * 128 * 16) / (sm.TENSOR_FLOP_PER_CLK_SM * P.tensor_efficiency)  # 120 clk
    assert 13 * per_insn < tensor
    serial = 21 * per_insn + tensor + P.wait_clk
    e = sm.estimate(a, 4, 1, H100, params=P)
    assert e.terms["serial"] == pytest.approx(serial)
    assert e.terms["serial"] < tensor + a["non_mma"] * per_insn + P.wait_clk - 50  # the no-overlap sum: 52 clk more
    # a tail longer than the wgmma: the tail's issue binds the overlapped part
    long = sm.analyse_sass(_attention_loop(softmax=20, tail=60, wait_after_pv=False))
    assert sm.estimate(long, 4, 1, H100, params=P).terms["serial"] == pytest.approx(
        21 * per_insn + 63 * per_insn + P.wait_clk
    )
    # a loop that waits on P V at once keeps (all but the waits' own issue of) the serial sum: its tail issues with
    # nothing in flight
    waited = sm.analyse_sass(_attention_loop(softmax=20, tail=10, wait_after_pv=True))
    # (the tail, BRA and QK^T's arrive are exposed; each wait issues while its own wgmma runs)
    assert [(s["exposed"], s["overlapped"]) for s in waited["wait_segments"]] == [(21, 1), (12, 1)]
    assert waited["non_mma"] == 21 + 1 + 12 + 1
    assert sm.estimate(waited, 4, 1, H100, params=P).terms["serial"] == pytest.approx(
        (21 + 12) * per_insn + tensor + 2 * P.wait_clk
    )


def test_limits_that_bind_together_cost_more_than_the_larger():
    # two equal limits: 2^(1/p) times one; one far below: nothing; p = inf: max()
    assert sm.combine((100.0, 100.0), 8.0) == pytest.approx(100.0 * 2 ** (1 / 8))
    assert sm.combine((100.0, 10.0), 8.0) == pytest.approx(100.0 * (1 + 0.1**8) ** (1 / 8))
    assert sm.combine((100.0, 94.0, 0.0), math.inf) == 100.0
    # a memory pass, 2 CTAs per SM, whose serial time per CTA-slot and HBM share are within 6% (Liger's RMSNorm at
    # 8192 columns on the NVL): the SM spends more than either, each phase queues behind the other
    nvl = sm.GPUS["h100nvl"]
    p = sm.Params(
        **{**P.__dict__, "issue_efficiency": 0.5, "warp_ipc": 0.275, "limit_p": 8.0, "mem_latency_clk": 1600.0}
    )
    a = _a(mma_flops=0, non_mma=200, global_bytes_in=6 * 512, global_bytes_out=2 * 512, has_loop=False,
           loads={"LDG.128": 6, "STG.128": 2})  # fmt: skip
    e = sm.estimate(a, 16, 2, nvl, programs=2 * nvl.sms, useful_bytes=2 * nvl.sms * 2 * 8192 * 2.0, params=p)
    hbm = 2 * 8192 * 2 / (nvl.hbm_gbps * p.hbm_efficiency / (nvl.sms * nvl.clock_ghz))
    port = 6 * 512 * 16 / (nvl.l2_gbps / (nvl.sms * nvl.clock_ghz))
    issue = 200 * 4 / min(p.issue_efficiency, 4 * p.warp_ipc)
    serial = p.mem_latency_clk + port + issue
    assert e.terms["memory"] == pytest.approx(hbm, abs=0.1) and e.terms["serial"] == pytest.approx(serial / 2, abs=0.1)
    assert 0.8 < hbm / (serial / 2) < 1.25  # near-equal limits
    # the other throughput terms (issue: 16 warps x 200 / 2 per clk = 1600 clk) bind together with them too
    expect = (hbm**8 + (serial / 2) ** 8 + e.terms["issue"] ** 8) ** (1 / 8)
    assert e.cycles_per_iter == pytest.approx(expect, rel=1e-6)
    assert e.cycles_per_iter > 1.05 * max(hbm, serial / 2)
    # the launch: one full wave of 2 CTAs per SM pays the combined time, not the larger
    assert e.seconds == pytest.approx(2 * expect / (nvl.clock_ghz * 1e9), rel=1e-6)
