"""Analytic cost model of context parallelism at the 3.4B J-DiT shape (docs/training.md prints its tables).

    python -m bench.cp_cost_model            # markdown tables
    python -m bench.cp_cost_model --json

Counts bytes each GPU sends per layer (bf16 activations, as lavin_fast.parallel.cp_attention moves them: the ring's
dk/dv accumulators travel in float32) and compares the transfer time with the compute time it can hide behind.
Bandwidths are per GPU and one direction: NVLink 900 GB/s (H100/H200 NVLink 4, all 18 links), InfiniBand
50 GB/s (one 400 Gb/s NIC per GPU). The attention rate is an assumed 450 TFLOP/s of bf16 flash attention;
the GEMM rate 600 TFLOP/s. These are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import json
import math

SHAPE = {"hidden": 2304, "depth": 22, "heads": 32, "kv_heads": 8, "head_dim": 72, "mlp": 6144}
LINKS = {"NVLink": 900e9, "InfiniBand": 50e9}
ATTN_FLOPS, GEMM_FLOPS = 450e12, 600e12
HBM = 4.8e12  # H200 memory bandwidth, B/s: the layout copies around an all-to-all, the ring's merges
HOP_FIXED_S = 20e-6  # assumed launch / synchronisation cost of one ring hop (several small kernels)
BF16, FP32 = 2, 4


def ulysses_bytes(L: int, n: int, s=SHAPE) -> tuple[float, float]:
    """(forward, backward) bytes one GPU sends per layer: all-to-all of q, k, v in and o out (backward: do in,
    dq, dk, dv out); each keeps 1/n of its slice. kv heads repeated to lcm(Hkv, n) when n > Hkv."""
    rep = n // math.gcd(s["kv_heads"], n)
    per_token = (2 * s["heads"] + 2 * s["kv_heads"] * rep) * s["head_dim"] * BF16
    one_way = per_token * (L / n) * (n - 1) / n
    return one_way, one_way


def ring_bytes(L: int, n: int, s=SHAPE) -> tuple[float, float]:
    """(forward, backward) bytes one GPU sends per layer: its k/v block passes n - 1 hops; in the backward the
    k/v pass again and the float32 dk/dv accumulators n hops."""
    kv = 2 * s["kv_heads"] * s["head_dim"] * (L / n)
    return kv * BF16 * (n - 1), kv * BF16 * (n - 1) + kv * FP32 * n


def layer_flops(L: int, n: int, s=SHAPE) -> tuple[float, float]:
    """(GEMM, attention) forward FLOPs one GPU does per layer for its L/n tokens (each token in one stream)."""
    D, hd = s["hidden"], s["head_dim"]
    gemm = 2 * (D * (s["heads"] + 2 * s["kv_heads"]) * hd + s["heads"] * hd * D + 3 * D * s["mlp"])
    attn = 4 * L * s["heads"] * hd
    return gemm * L / n, attn * L / n


def hybrid_bytes(L: int, n: int, u: int, s=SHAPE) -> tuple[float, float, float, float]:
    """(Ulysses fwd, Ulysses bwd, ring fwd, ring bwd) bytes per GPU and layer of the hybrid: Ulysses over u ranks,
    then a ring over n / u groups whose blocks are L / (n / u) tokens of the rank's kv heads."""
    r = n // u
    rep = u // math.gcd(s["kv_heads"], u)
    uf, ub = ulysses_bytes(L * u // n, u, s) if u > 1 else (0.0, 0.0)
    kv = 2 * (s["kv_heads"] * rep // u) * s["head_dim"] * (L / r)
    return uf, ub, kv * BF16 * (r - 1), kv * BF16 * (r - 1) + kv * FP32 * r


def exposed_seconds(mode: str, L: int, n: int, bw: float, u: int = 1, bw_inner: float = 0.0) -> float:
    """Forward communication time per layer that compute does not hide: an all-to-all is on the critical path;
    each ring hop hides behind one block of attention (its queries x the block's keys). hybrid: Ulysses over u
    ranks at bw_inner, ring over n / u groups at bw."""
    H, hd = SHAPE["heads"], SHAPE["head_dim"]
    if mode == "ulysses":
        sent = ulysses_bytes(L, n)[0]
        return sent / bw + 4 * sent * n / (n - 1) / HBM  # + a contiguous copy on each side, read and write
    if mode == "ring":
        u, bw_inner = 1, bw
    uf, _, rf, _ = hybrid_bytes(L, n, u)
    r = n // u
    a2a = uf / bw_inner + (4 * uf * u / (u - 1) / HBM if u > 1 else 0.0)
    if r == 1:
        return a2a
    hop = rf / (r - 1) / bw
    block = 4 * (L / r) ** 2 * (H / u) * hd / ATTN_FLOPS
    merge = (L / n) * u * (H / u) * hd * (2 * FP32 + BF16) / HBM  # out accumulator read + write, block read
    return a2a + (r - 1) * (max(0.0, hop - block) + HOP_FIXED_S + merge)


SCENARIOS = [  # (name, gpus, [(mode, Ulysses degree)], bandwidth of the ring / all-to-all, of the inner Ulysses)
    ("8 GPUs, one node (NVLink)", 8, [("ulysses", 8), ("ring", 1)], LINKS["NVLink"], LINKS["NVLink"]),
    ("8 GPUs, 8 nodes (InfiniBand)", 8, [("ulysses", 8), ("ring", 1)], LINKS["InfiniBand"], LINKS["InfiniBand"]),
    ("64 GPUs, 8 nodes x 8", 64, [("hybrid", 8), ("ring", 1)], LINKS["InfiniBand"], LINKS["NVLink"]),
]


def crossover(n: int, modes, bw: float, bw_inner: float) -> int | None:
    """Smallest L (multiple of 1024) from which the second mode exposes less communication than the first."""
    (m0, u0), (m1, u1) = modes
    for L in range(1024, 4 * 2**20 + 1, 1024):
        if exposed_seconds(m1, L, n, bw, u1, bw_inner) < exposed_seconds(m0, L, n, bw, u0, bw_inner):
            return L
    return None


def memory_gib(L: int, n: int, world: int, checkpointing: bool, s=SHAPE) -> float:
    """Per-GPU estimate: fp32 params, grads, Adam moments, EMA (20 B/param) sharded over `world` (FSDP2 over
    dp_shard x cp) plus activations of L/n tokens: 34 D bytes per token and layer (bf16, flash attention), or
    with activation checkpointing the fp32 block inputs (4 D) of every layer plus one block recomputed."""
    params = 3_398_976_064
    act_layer = 34 * s["hidden"] * L / n
    act = (4 * s["hidden"] * L / n * s["depth"] + act_layer) if checkpointing else act_layer * s["depth"]
    return (20 * params / world + act) / 2**30


def tables() -> dict:
    rows = []
    for name, n, modes, bw, bw_inner in SCENARIOS:
        for L in (10_240, 65_536, 262_144, 1_048_576):
            gemm, attn = layer_flops(L, n)
            row = {"scenario": name, "L": L, "compute_ms": (3 * gemm / GEMM_FLOPS + 3 * attn / ATTN_FLOPS) * 1e3}
            for mode, u in modes:
                if mode == "ulysses":
                    f, b = ulysses_bytes(L, n)
                else:
                    uf, ub, rf, rb = hybrid_bytes(L, n, u)
                    f, b = uf + rf, ub + rb
                row[f"{mode}_MB"] = (f + b) / 1e6
                row[f"{mode}_exposed_ms"] = 3 * exposed_seconds(mode, L, n, bw, u, bw_inner) * 1e3
            row["mem_GiB_ckpt"] = memory_gib(L, n, n, True)
            row["mem_GiB_no_ckpt"] = memory_gib(L, n, n, False)
            rows.append(row)
    cross = {
        f"{name}: {modes[1][0]} exposes less than {modes[0][0]} from L": crossover(n, modes, bw, bw_inner)
        for name, n, modes, bw, bw_inner in SCENARIOS
    }
    return {"rows": rows, "crossover": cross}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = tables()
    if args.json:
        print(json.dumps(out, indent=1))
        return
    for name, *_ in SCENARIOS:
        rows = [r for r in out["rows"] if r["scenario"] == name]
        keys = [k for k in rows[0] if k != "scenario"]
        print(f"{name}\n\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for r in rows:
            print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
        print()
    for k, v in out["crossover"].items():
        print(f"- {k} = {v}")


if __name__ == "__main__":
    main()
