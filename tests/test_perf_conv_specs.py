"""The causal-conv AotSpecs carry the grid size, trip count and useful FLOPs of the ST-VAE shape each stands
for (issue 25): without them every conv shape got the loop's steady-state ceiling."""

from __future__ import annotations

import math
import re

from lavin_fast.perf import sass_model as sm


def _conv_specs():
    import lavin_fast.ops.causal_conv3d  # noqa: F401  (registers its specs)
    from lavin_fast.ops.aot import registered_specs

    return [s for s in registered_specs() if s.op == "causal_conv3d" and s.expect_hgmma]


def test_every_conv_gemm_spec_has_the_grid_and_trip_count_of_its_shape():
    specs = _conv_specs()
    assert len(specs) >= 10
    for s in specs:
        # recompute from the label, independently of the factory: "C256->512 1x1x1 ... at T5x32x32"
        m = re.search(r"at T(\d+)x(\d+)x(\d+)$", s.label)
        assert m, s.label
        positions = math.prod(int(g) for g in m.groups())
        chans = re.search(r"(\d+)->(\d+)", s.label) or re.search(r"C(\d+)", s.label)
        cin, cout = (int(chans.group(1)), int(chans.group(2))) if chans.lastindex == 2 else (int(chans.group(1)),) * 2
        taps = s.constexprs["KT"] * s.constexprs["KH"] * s.constexprs["KW"]
        bm, bn, bk = (s.constexprs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        assert s.programs == math.ceil(positions / bm) * math.ceil(cout / bn), s.label
        assert s.iters_per_program == taps * math.ceil(cin / bk), s.label
        assert s.useful_flops == 2 * positions * cin * cout * taps, s.label
    labels = " ".join(s.label for s in specs)
    assert "at T17x256x256" in labels and "at T1x64x64" in labels  # the clip and the 512 px image


def test_a_small_grid_rates_below_the_steady_state():
    """A tensor-bound loop (wgmma overlapped, no full wait) at a grid of one partial wave and few iterations
    loses the idle SMs and the prologue/epilogue; the steady state (no grid) is the ceiling."""
    a = {"mma_flops": 2 * 64 * 256 * 16 * 4, "hmma_flops": 0, "global_bytes_in": 0, "global_bytes_out": 0,
         "non_mma": 60, "mufu": 0, "waits_full": 0, "waits": 1, "has_loop": True, "outside_instructions": 300,
         "outside_global_bytes": 0, "bar_syncs": 0}  # fmt: skip
    steady = sm.estimate(a, 8, 1, sm.GPUS["h100"]).est_tflops
    full = sm.estimate(a, 8, 1, sm.GPUS["h100"], programs=132 * 40, iters=216).est_tflops
    small = sm.estimate(a, 8, 1, sm.GPUS["h100"], programs=80, iters=72).est_tflops
    assert small < 0.6 * steady  # 80 of 132 SMs busy: at most 61% of the steady state
    assert small < full <= steady
