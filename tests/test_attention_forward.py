"""lavin_fast.ops.attention, the warp-specialised forward candidate's register reallocation in the sm_90 machine
code (no GPU needed): the one way its code was suspected of hanging (docs/attention.md, *Warp specialisation*)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# per head dim: the CTA's warps, the launch registers per thread, and every USETMAXREG in address order
_SCRIPT = """
import importlib, json, re
from lavin_fast.perf.aot import inspect_cubin, triton_compile
A = importlib.import_module("lavin_fast.ops.attention")
got = {}
for spec in A._aot_specs():
    if getattr(spec.kernel, "fn", spec.kernel).__name__ != "attn_fwd_tma_kernel" or not spec.constexprs["WARP_SPECIALIZE"]:
        continue
    c = triton_compile(spec)
    info = inspect_cubin(c.asm["cubin"])
    pat = r"USETMAXREG\\.(DEALLOC|TRY_ALLOC)\\.CTAPOOL\\s+(?:UP\\d+\\s*,\\s*)?(0x[0-9a-fA-F]+)"
    seq = [[m.group(1), int(m.group(2), 16)] for m in re.finditer(pat, info["sass"])]
    got[str(spec.constexprs["HD"])] = {"num_warps": spec.num_warps, "cta_warps": c.metadata.num_warps,
                                       "regs": info["registers"], "seq": seq}
print(json.dumps(got))
"""


def test_warp_specialised_forward_register_reallocation_fits_the_launch_allocation():
    """`setmaxnreg` moves registers between a CTA's warps through a per-CTA pool, and a warp asking for more
    (USETMAXREG.TRY_ALLOC, retried until granted) spins for ever if the others never free enough. Triton 3.6
    builds the candidate as 12 warps launched at 168 registers: the default partition (the program's 4 warps,
    which issues the TMA loads) and two 4-warp consumer partitions (the wgmma and the softmax). The workers drop
    to 120 at entry and ask for 232 when given work; the default asks for 256 for its set-up and epilogue and
    drops to 40 while the workers run. In each phase the warps' registers must fit the launch allocation:
    set-up and epilogue 4 x 256 + 8 x 120 = 1984 <= 12 x 168 = 2016, the main loop 4 x 40 + 8 x 232 = 2016
    (exactly). The machine code is pinned, so that a compiler that changes any of these numbers fails here and
    the arithmetic is redone. A subprocess: the test session runs the interpreter."""
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert sorted(got) == ["128", "64", "72"]
    for hd, g in got.items():
        warps, regs, seq = g["cta_warps"], g["regs"], [tuple(x) for x in g["seq"]]
        default = g["num_warps"]  # the program's warps: the default partition
        workers = warps - default
        assert (default, workers, regs) == (4, 8, 168), (hd, g)
        # the dispatch of warps >= 4 (idle at 120, each partition asks for 232), then the default partition's code
        assert seq == [("DEALLOC", 120), ("TRY_ALLOC", 232), ("DEALLOC", 120), ("TRY_ALLOC", 232),
                       ("DEALLOC", 120), ("TRY_ALLOC", 256), ("DEALLOC", 40), ("TRY_ALLOC", 256)], (hd, seq)  # fmt: skip
        worker_idle, worker_busy = seq[0][1], seq[1][1]
        default_busy, default_loop = seq[5][1], seq[6][1]
        budget = warps * regs  # registers per thread summed over the warps: the CTA's pool at launch
        assert default * default_busy + workers * worker_idle <= budget  # set-up and epilogue
        assert default * default_loop + workers * worker_busy <= budget  # the main loop
        assert all(v % 8 == 0 and 24 <= v <= 256 for _, v in seq)  # setmaxnreg's legal values
