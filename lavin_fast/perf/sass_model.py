"""A static sm_90 performance model: read a kernel's SASS, find its inner loop, estimate its speed.

Three steps, each a plain function so that tests can feed them fixed inputs:
1. `parse_sass(text)` -> instructions; `find_loops` finds loop bodies by backward branches;
   `analyse_sass` counts, per iteration of the main inner loop (per warp): HGMMA by shape and
   operand source (SS: both operands in shared memory, RS: A in registers), wgmma arrive/wait,
   non-MMA instructions, MUFU by function, global loads by kind and width, shared-memory traffic.
2. `occupancy(...)`: CTAs per SM from registers, shared memory, warps and the CTA limit (sm_90),
   with the limiting resource named.
3. `estimate(...)`: cycles per CTA-iteration on one SM from the throughput terms (tensor, issue, MUFU, shared memory,
   L2 -> SM, HBM) and one CTA's serial time (its issue before each segment's first wgmma, the larger of the wgmma and
   the issue that runs beside them, and the stalls the SASS shows: full waits, BAR.SYNC, softmax shuffle chains,
   one-stage loads) over the CTAs per SM, combined as a p-norm (`combine`: limits that bind together add up);
   with the grid, the whole launch: launch latency, full waves and the last partial wave (the tail).
The constants are fitted on public anchors and validated out of sample (perf/anchors.py, perf/calibration.py);
docs/static_report.md gives the error and the band every row carries.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

from lavin_fast.ops._hopper import occupancy  # noqa: F401  (the machine's limits live with the kernels)
from lavin_fast.perf.gpus import DEFAULT_GPU, GPUS, Gpu  # noqa: F401  (re-exported: the model's machines)

# --------------------------------------------------------------------------- the machine (sm_90)
TENSOR_FLOP_PER_CLK_SM = 4096  # dense bf16/fp16 wgmma: 989 TFLOP/s = 132 SMs x 4096 x 1.83 GHz
ISSUE_PER_CLK_SM = 4  # 4 warp schedulers, one instruction each per clock
MUFU_LANES_PER_CLK_SM = 16  # exp2, rcp, rsqrt, sin, cos, lg2: 16 results per clock per SM
WARPGROUP = 4
HMMA_RATE = 0.65  # warp-level mma.sync (HMMA) reaches about 2/3 of the wgmma rate on Hopper (assumed)

SMEM_BYTES_PER_CLK_SM = 128  # shared-memory bandwidth; SS wgmma reads both operands from it, RS only B

# Fitted on the public anchors (perf/calibration.py, `lavin-fast kernels --report --op anchor`); rerun the fit and
# paste its result here when the model or the anchors change:
TENSOR_EFFICIENCY = 1.0  # the fraction of the tensor peak a stream of wgmma reaches
ISSUE_EFFICIENCY = 0.55  # of one instruction per clock per scheduler that a busy SM sustains (several warps)
WARP_IPC = 0.275  # instructions per clock one warp issues on its own (dependency stalls): serial code
LAUNCH_US = 5.5  # launch latency and ramp of every kernel, microseconds
HBM_EFFICIENCY = 0.9  # of the data-sheet bandwidth a streaming kernel reaches
WAIT_CLK = 256.0  # a full wgmma wait (WARPGROUP.DEPBAR.LE gsb0, 0x0): the tensor pipe drains, per wait
BAR_CLK = 0.0  # a BAR.SYNC: every warp of the CTA waits for the slowest
CHAIN_CLK = 400.0  # the softmax's row max and row sum: two dependent shuffle-reduction chains per iteration
MEM_LATENCY_CLK = 1600.0  # one dependent global-memory round trip, with what a CTA's start and end cost beside it
LIMIT_P = 8.0  # limits that bind together (throughput terms, one CTA's serial time, tensor vs issue): p-norm
# Assumed (no anchor runs a main loop with one pipeline stage):
L2_LATENCY_CLK = 600  # a load waited on in the iteration that issues it (one pipeline stage)


# --------------------------------------------------------------------------- SASS parsing
_INSN_RE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_FUNC_RE = re.compile(r"^\s*Function\s*:\s*(\S+)")
_PRED_RE = re.compile(r"^@!?U?P[T0-9]\s+")
# bf16 wgmma has two type suffixes (HGMMA.64x256x16.F32.BF16), fp16 one (HGMMA.64x64x16.F32)
_HGMMA_RE = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)\.(\w+)(?:\.(\w+))?")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4)}
_WIDTH_RE = re.compile(r"\.(8|16|32|64|128|U8|S8|U16|S16)\b")
_GSB_WAIT_RE = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-fA-F]+|\d+)")


@dataclass
class Insn:
    addr: int
    opcode: str  # full opcode with modifiers, e.g. "LDGSTS.E.BYPASS.128"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


def parse_sass(text: str) -> dict[str, list[Insn]]:
    """cuobjdump --dump-sass text -> {function name: instructions in address order}."""
    funcs: dict[str, list[Insn]] = {}
    current = funcs.setdefault("", [])
    for line in text.splitlines():
        fm = _FUNC_RE.match(line)
        if fm:
            current = funcs.setdefault(fm.group(1), [])
            continue
        m = _INSN_RE.match(line)
        if not m:
            continue
        body = _PRED_RE.sub("", m.group(2).strip())
        op, _, rest = body.partition(" ")
        current.append(Insn(int(m.group(1), 16), op, rest.strip()))
    return {k: v for k, v in funcs.items() if v}


def find_loops(insns: list[Insn]) -> list[tuple[int, int]]:
    """Loop bodies as (first index, last index), one per backward branch (BRA to an address at or
    before itself, except the `BRA self` that pads the end of every kernel)."""
    index = {ins.addr: i for i, ins in enumerate(insns)}
    loops = []
    for i, ins in enumerate(insns):
        if ins.base != "BRA":
            continue
        m = re.search(r"0x([0-9a-fA-F]+)", ins.operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target < ins.addr and target in index:
            loops.append((index[target], i))
    return loops


def innermost(loops: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Loops that contain no other loop."""
    return [a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops)]


def _width_bits(opcode: str) -> int:
    for mod in reversed(opcode.split(".")[1:]):
        if mod in ("128", "64", "32", "16", "8"):
            return int(mod)
        if mod in ("U8", "S8"):
            return 8
        if mod in ("U16", "S16"):
            return 16
    return 32


def count_block(insns: list[Insn]) -> dict:
    """Instruction counts of a straight run of SASS (per warp, one pass)."""
    hgmma: Counter[str] = Counter()
    mufu: Counter[str] = Counter()
    loads: Counter[str] = Counter()
    mma_flops = hmma_flops = n_hmma = 0
    waits = waits_full = arrives = bars = lds = sts = ldsm = shfl = 0
    hgmma_smem = 0  # bytes the wgmma of one warpgroup read from shared memory (SS: A and B, RS: B)
    gbytes_in = gbytes_out = 0
    n_hgmma = 0
    for ins in insns:
        b, op = ins.base, ins.opcode
        if b == "HGMMA":
            m = _HGMMA_RE.match(op)
            if m:
                mm, nn, kk = (int(g) for g in m.groups()[:3])
                src = "RS" if re.match(r"R\d+\s*,\s*R\d+", ins.operands) else "SS"
                hgmma[f"{mm}x{nn}x{kk}.{src}"] += 1
                mma_flops += 2 * mm * nn * kk
                hgmma_smem += 2 * nn * kk + (2 * mm * kk if src == "SS" else 0)
                n_hgmma += 1
            continue
        if b == "HMMA":
            mm, nn, kk = _HMMA_SHAPES.get(op.split(".")[1] if "." in op else "", (16, 8, 16))
            hmma_flops += 2 * mm * nn * kk
            n_hmma += 1
            continue
        if op.startswith("WARPGROUP.ARRIVE"):
            arrives += 1
        elif op.startswith("WARPGROUP.DEPBAR"):
            waits += 1
            m = _GSB_WAIT_RE.search(f"{op} {ins.operands}")
            if m and int(m.group(1), 0) == 0:
                waits_full += 1
        elif b == "MUFU":
            mufu[op.split(".")[1] if "." in op else "?"] += 1
        elif b == "BAR":
            bars += 1
        elif b == "SHFL":
            shfl += 1
        elif b == "UTMALDG":
            loads["UTMALDG"] += 1
        elif b == "LDGSTS":
            w = _width_bits(op)
            loads[f"LDGSTS.{w}"] += 1
            gbytes_in += w // 8 * 32
        elif b == "LDG":
            w = _width_bits(op)
            loads[f"LDG.{w}"] += 1
            gbytes_in += w // 8 * 32
        elif b in ("STG", "RED", "ATOMG", "ATOM"):
            w = _width_bits(op)
            loads[f"{b}.{w}"] += 1
            gbytes_out += w // 8 * 32
        elif b == "UTMASTG":
            loads["UTMASTG"] += 1
        elif b == "LDS":
            lds += 1
        elif b == "STS":
            sts += 1
        elif b == "LDSM":
            ldsm += 1
    return {
        "instructions": len(insns),
        "hgmma": n_hgmma,
        "hgmma_shapes": dict(hgmma),
        "mma_flops": mma_flops,
        "hmma": n_hmma,
        "hmma_flops": hmma_flops,
        "arrives": arrives,
        "waits": waits,
        "waits_full": waits_full,
        "non_mma": len(insns) - n_hgmma - n_hmma,
        "mufu": sum(mufu.values()),
        "mufu_kinds": dict(mufu),
        "loads": dict(loads),
        "bar_syncs": bars,
        "shfl": shfl,
        "hgmma_smem_bytes": hgmma_smem,
        "lds": lds,
        "sts": sts,
        "ldsm": ldsm,
        "global_bytes_in": gbytes_in,
        "global_bytes_out": gbytes_out,
    }


def _is_full_wait(ins: Insn) -> bool:
    m = _GSB_WAIT_RE.search(f"{ins.opcode} {ins.operands}") if ins.opcode.startswith("WARPGROUP.DEPBAR") else None
    return bool(m) and int(m.group(1), 0) == 0


def wait_segments(insns: list[Insn]) -> list[dict]:
    """A loop body cut at its full wgmma waits (cyclically: the last wait's segment runs on into the next
    iteration's first), per warp: `exposed`, the non-MMA instructions from a full wait up to the segment's first
    HGMMA (nothing is in flight after a full wait: the tensor pipe idles while they issue, e.g. the softmax between
    QK^T's wait and P V's issue), `overlapped`, those after it (they issue while the segment's wgmma run, e.g. P V
    in flight through the loop's tail and the next QK^T's issue, up to the wait that drains both; the wait itself
    counts here), and the segment's HGMMA FLOPs (one warpgroup). [] for a loop without a full wait."""
    full = [i for i, ins in enumerate(insns) if _is_full_wait(ins)]
    segs = []
    for j, w in enumerate(full):
        end = full[(j + 1) % len(full)]
        idx = list(range(w + 1, end + 1)) if end > w else list(range(w + 1, len(insns))) + list(range(end + 1))
        seg = {"exposed": 0, "overlapped": 0, "mma_flops": 0}
        for k in idx:
            ins = insns[k]
            if ins.base == "HGMMA":
                m = _HGMMA_RE.match(ins.opcode)
                if m:
                    mm, nn, kk = (int(g) for g in m.groups()[:3])
                    seg["mma_flops"] += 2 * mm * nn * kk
                    continue
            if ins.base == "HMMA":
                continue
            seg["overlapped" if seg["mma_flops"] else "exposed"] += 1
        segs.append(seg)
    return segs


def load_kind(loads: dict[str, int]) -> str:
    """The kind of global load that dominates: TMA, cp.async (LDGSTS) or LDG, with width."""
    if not loads:
        return "-"
    for kind in ("UTMALDG", "LDGSTS", "LDG"):
        found = {k: v for k, v in loads.items() if k.split(".")[0] == kind}
        if found:
            return "+".join(sorted(found, key=lambda k: -found[k]))
    return "-"


def _branch_target(ins: Insn) -> int | None:
    m = re.search(r"0x([0-9a-fA-F]+)", ins.operands)
    return int(m.group(1), 16) if ins.base == "BRA" and m else None


def rare_paths(insns: list[Insn]) -> list[tuple[int, int]]:
    """Regions (first index, one past the last) that a forward branch skips and that hold a loop reading a constant
    table from global memory (`LDG.E.CONSTANT`) into local memory (`STL`), with no MMA and no global store: the
    signature of libdevice's sin/cos slow path (Payne-Hanek range reduction, taken only for |x| > 105615, e.g. never
    for RoPE angles of positions below that). Merged where they overlap. A loop a trip-count guard skips (its
    spills are STL too) has no constant-table load in local memory and stores or multiplies matrices."""
    index = {ins.addr: i for i, ins in enumerate(insns)}
    found = []
    for i, ins in enumerate(insns):
        target = _branch_target(ins)
        if target is None or target <= ins.addr or target not in index:
            continue
        region = insns[i + 1 : index[target]]
        if not region or any(r.base in ("HGMMA", "HMMA", "STG", "UTMASTG") for r in region):
            continue
        first = region[0].addr
        for r in region:
            t = _branch_target(r)
            if t is None or not first <= t <= r.addr:
                continue
            body = [b for b in region if t <= b.addr <= r.addr]
            if any(b.base == "STL" for b in body) and any(b.base == "LDG" and ".CONSTANT" in b.opcode for b in body):
                found.append((i + 1, index[target]))
                break
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(found):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def analyse_sass(insns: list[Insn]) -> dict:
    """The main loop's per-iteration counts (per warp), and the code outside it.

    With MMA: the innermost loop with the most MMA FLOPs. Without: the loop (nested loops included,
    the smallest on a tie) moving the most global bytes per iteration, if that is at least half
    of what the code outside it moves: a row kernel's straight-line body is its work, and a small
    loop beside it (libdevice's sin/cos range reduction reading its table) is not; a loop over
    rows is. Without a main loop, the whole kernel is one pass (each loop body counted once)."""
    insns = [i for i in insns if not (i.base == "BRA" and f"0x{i.addr:x}" in i.operands.lower())]
    rare = rare_paths(insns)  # never executed at the shapes the kernels serve: not counted
    skipped = {k for lo, hi in rare for k in range(lo, hi)}
    rare_count = len(skipped)
    insns = [ins for k, ins in enumerate(insns) if k not in skipped]
    loops = find_loops(insns)
    main = None

    def gbytes(c):
        return c["global_bytes_in"] + c["global_bytes_out"]

    if loops:
        inner = [(lp, count_block(insns[lp[0] : lp[1] + 1])) for lp in innermost(loops)]
        lp, c = max(inner, key=lambda t: (t[1]["mma_flops"] + t[1]["hmma_flops"], gbytes(t[1]), t[1]["instructions"]))
        if c["mma_flops"] or c["hmma_flops"]:
            main = lp
        else:
            counted = [(lp, count_block(insns[lp[0] : lp[1] + 1])) for lp in loops]
            lp, c = max(counted, key=lambda t: (gbytes(t[1]), -(t[0][1] - t[0][0])))
            outside = count_block(insns[: lp[0]] + insns[lp[1] + 1 :])
            if gbytes(c) and 2 * gbytes(c) >= gbytes(outside):
                main = lp
    if main:
        body = count_block(insns[main[0] : main[1] + 1])
        body["wait_segments"] = wait_segments(insns[main[0] : main[1] + 1]) if body["hgmma"] else []
        outside = count_block(insns[: main[0]] + insns[main[1] + 1 :])
    else:
        body = count_block(insns)
        outside = count_block([])
    body["has_loop"] = main is not None
    body["loops"] = len(loops)
    body["outside_instructions"] = outside["instructions"]
    body["outside_global_bytes"] = gbytes(outside)
    body["total_hgmma"] = body["hgmma"] + outside["hgmma"]
    body["rare_path_instructions"] = rare_count
    return body


# --------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    cycles_per_iter: float  # per CTA-iteration on one SM, all overlap included
    bound: str
    terms: dict[str, float] = field(default_factory=dict)
    est_tflops: float | None = None
    est_gbps: float | None = None
    seconds: float | None = None  # the whole launch (when the spec gives the grid)


@dataclass(frozen=True)
class Params:
    """The model's constants: fitted on the public anchors (perf/calibration.py) or assumed (see the docs)."""

    tensor_efficiency: float = TENSOR_EFFICIENCY
    issue_efficiency: float = ISSUE_EFFICIENCY
    warp_ipc: float = WARP_IPC
    wait_clk: float = WAIT_CLK
    launch_us: float = LAUNCH_US
    hbm_efficiency: float = HBM_EFFICIENCY
    bar_clk: float = BAR_CLK
    chain_clk: float = CHAIN_CLK
    mem_latency_clk: float = MEM_LATENCY_CLK
    l2_latency_clk: float = L2_LATENCY_CLK
    limit_p: float = LIMIT_P


DEFAULT_PARAMS = Params()


def combine(values, p: float) -> float:
    """Limits that bind together: the p-norm (sum of a^p)^(1/p) of the non-negative `values`; max() at p = inf.
    Two equal limits cost 2^(1/p) times one (each queues behind the other), a limit far below the largest costs
    nothing."""
    vals = [v for v in values if v > 0]
    if not vals:
        return 0.0
    top = max(vals)
    if math.isinf(p):
        return top
    return top * sum((v / top) ** p for v in vals) ** (1.0 / p)


def estimate(
    a: dict,
    num_warps: int,
    ctas_per_sm: int,
    gpu: Gpu,
    programs: int | None = None,
    iters: int | None = None,
    useful_flops: float | None = None,
    useful_bytes: float | None = None,
    num_stages: int = 3,
    params: Params = DEFAULT_PARAMS,
    l2_bytes: float | None = None,
) -> Estimate:
    """Cycles per CTA-iteration and the resulting TFLOP/s (MMA kernels) or GB/s (the rest);
    `a` is analyse_sass's output (per-warp counts). With the grid (`programs`, and `iters` for a kernel with a main
    loop) the figure is the whole launch's: launch latency, full waves, and the last partial wave (the tail).
    `l2_bytes`: the bytes the whole launch moves between L2 and the SMs (TMA tile loads per CTA-iteration x
    iterations x CTAs, from the spec's tiles; TMA's bytes are not in the SASS); without it an MMA kernel's L2 traffic
    is its SASS global loads and stores (LDG, LDGSTS, STG). A per-chip pipe shared by all SMs: `gpu.l2_gbps`."""
    P = params
    k = max(ctas_per_sm, 1)
    groups = max(num_warps // WARPGROUP, 1)
    hmma = a.get("hmma_flops", 0) * num_warps  # mma.sync: per warp
    flops = a["mma_flops"] * groups + hmma  # every warpgroup runs the loop's wgmma
    bytes_ = (a["global_bytes_in"] + a["global_bytes_out"]) * num_warps
    hbm_per_clk_sm = gpu.hbm_gbps * P.hbm_efficiency / (gpu.sms * gpu.clock_ghz)
    # throughput terms: one CTA-iteration's use of the SM's shared pipes
    t_tensor = (flops - hmma + hmma / HMMA_RATE) / (TENSOR_FLOP_PER_CLK_SM * P.tensor_efficiency)
    t_issue = a["non_mma"] * num_warps / (ISSUE_PER_CLK_SM * P.issue_efficiency)
    t_mufu = a["mufu"] * num_warps * 32 / MUFU_LANES_PER_CLK_SM  # a per-SM pipe: more warps do not widen it
    smem = (
        a.get("hgmma_smem_bytes", 0) * groups
        + (a.get("ldsm", 0) * 512 + (a.get("lds", 0) + a.get("sts", 0)) * 128) * num_warps
    )
    t_smem = smem / SMEM_BYTES_PER_CLK_SM
    launch = bool(programs) and (iters is not None or not a["has_loop"])
    per_iter = max(iters or 1, 1) if a["has_loop"] else 1
    # HBM traffic: the spec's useful bytes when given (loads that hit L2, such as a weight row every
    # CTA reads, are not HBM traffic), else every global byte of the SASS
    hbm_bytes = useful_bytes / programs / per_iter if launch and useful_bytes else bytes_
    t_mem = hbm_bytes / hbm_per_clk_sm if not flops else 0.0
    # L2 -> SM traffic of an MMA kernel: the tiles every CTA-iteration loads (most hit L2: k/v and GEMM operand
    # tiles are read by many CTAs); memory kernels are bound by HBM first (L2 is ~2-3x faster)
    l2_per_clk_sm = gpu.l2_gbps / (gpu.sms * gpu.clock_ghz)
    l2_iter = l2_bytes / programs / per_iter if launch and l2_bytes else bytes_
    t_l2 = l2_iter / l2_per_clk_sm if flops else 0.0
    # one CTA alone: its warps' issue (a lone warp issues warp_ipc per clock), the special-function pipe, and the
    # stalls nothing inside the CTA hides: a full wgmma wait drains the tensor pipe, a BAR.SYNC locks the warps
    # (both warpgroups) together, the softmax row max and row sum are dependent shuffle chains, and with one
    # pipeline stage every load is waited on in the iteration that issues it
    smsps = min(ISSUE_PER_CLK_SM, num_warps)
    per_smsp = num_warps / smsps  # the CTA's warps sharing one scheduler
    t_issue_cta = a["non_mma"] * per_smsp / min(P.issue_efficiency, per_smsp * P.warp_ipc)
    t_other = combine((t_issue_cta, t_mufu), P.limit_p)
    stalls = a["waits_full"] * P.wait_clk + a.get("bar_syncs", 0) * P.bar_clk
    if flops and a.get("shfl", 0) and a.get("mufu", 0):
        stalls += P.chain_clk
    loads_in_loop = bool(a.get("loads"))
    if flops and loads_in_loop and num_stages <= 1:
        stalls += P.l2_latency_clk
    if flops:
        # wgmma runs beside the next instructions unless a wait empties its queue; mma.sync does not. With full
        # waits, each segment between two of them (the SASS's, `wait_segments`) costs the instructions issued before
        # its first HGMMA (nothing in flight) plus the larger of its wgmma time and the instructions issued while
        # they run; without the segments (a hand-made analysis) every instruction after a full wait is serial
        segs = a.get("wait_segments") or []
        if a["mma_flops"] > 0 and a["waits_full"] == 0:
            serial = combine((t_tensor, t_other), P.limit_p) + stalls
        elif segs and a["non_mma"]:
            per_insn = t_other / a["non_mma"]  # one CTA's issue (or MUFU) time per instruction of one warp
            per_flop = groups / (TENSOR_FLOP_PER_CLK_SM * P.tensor_efficiency)
            t_hmma = hmma / HMMA_RATE / (TENSOR_FLOP_PER_CLK_SM * P.tensor_efficiency)
            serial = (
                t_hmma
                + stalls
                + sum(
                    s["exposed"] * per_insn
                    + combine((s["mma_flops"] * per_flop, s["overlapped"] * per_insn), P.limit_p)
                    for s in segs
                )
            )
        else:
            serial = t_tensor + t_other + stalls
    else:
        # one dependent memory round trip per pass, then the rest of the pass's loads arriving through the SM's
        # port (its share of the chip's L2 -> SM bandwidth: a row's reduction waits for its last byte; weight rows
        # that hit L2 cross the port too), then the arithmetic. Several CTAs per SM overlap each other's transfers;
        # a CTA alone on its SM (a long row) cannot overlap its own
        t_port = a["global_bytes_in"] * num_warps / l2_per_clk_sm
        serial = (P.mem_latency_clk + t_port if bytes_ else 0.0) + t_other + stalls
    thr = {"tensor": t_tensor, "issue": t_issue, "mufu": t_mufu, "smem": t_smem, "l2": t_l2, "memory": t_mem}
    terms = {**thr, "serial": serial / k}
    cycles = combine(terms.values(), P.limit_p)
    bound = max(thr, key=lambda n: thr[n])
    if terms["serial"] > max(thr.values()):
        # latency-bound: name the part of one CTA's serial time that is largest
        parts = {"tensor": t_tensor if flops else 0.0, "issue": t_issue_cta, "mufu": t_mufu, "stall": stalls}
        if not flops and bytes_:
            parts["memory"] = P.mem_latency_clk + t_port
        bound = max(parts, key=lambda n: parts[n])
    est = Estimate(cycles, bound, {n: round(v, 1) for n, v in terms.items()})
    hz = gpu.clock_ghz * 1e9
    if launch:
        # the code outside the main loop, once per CTA: its instructions, the prologue's and epilogue's round trips,
        # and its global bytes (the prologue's loads, the epilogue's stores of the output tile) at the SM's share of
        # HBM bandwidth when one CTA per SM is all the SM holds (nothing hides it); with several CTAs per SM their
        # epilogues fall at different times and overlap the others' main loops
        outside = (
            a["outside_instructions"] * num_warps / ISSUE_PER_CLK_SM + 2 * P.mem_latency_clk if a["has_loop"] else 0.0
        )
        outside_bytes = a["outside_global_bytes"] * num_warps if a["has_loop"] and k == 1 else 0.0
        thr_cta = combine(thr.values(), P.limit_p)

        def wave(j: int) -> float:  # j CTAs on every SM: they share the pipes, their stalls overlap
            return per_iter * combine((j * thr_cta, serial), P.limit_p) + outside + outside_bytes / hbm_per_clk_sm

        slots = gpu.sms * k
        full, rest = divmod(programs, slots)
        cycles_total = full * wave(k) + (wave(math.ceil(rest / gpu.sms)) if rest else 0.0)
        seconds = cycles_total / hz + P.launch_us * 1e-6
        est.seconds = seconds
        total_flops = flops * per_iter * programs
        total_bytes = (bytes_ * per_iter + a["outside_global_bytes"] * num_warps) * programs
        if flops:
            est.est_tflops = (useful_flops or total_flops) / seconds / 1e12
        else:
            est.est_gbps = (useful_bytes or total_bytes) / seconds / 1e9
    elif flops:
        est.est_tflops = flops / cycles * gpu.sms * hz / 1e12
    elif bytes_:
        est.est_gbps = bytes_ / cycles * gpu.sms * hz / 1e9
    return est
