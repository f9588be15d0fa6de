"""CPU attention forward + backward at the demo J-DiT's shapes: torch's SDPA (the torch backend's kernel) against
the GEMM formulation of bench.gemm_attention, side by side.

    python -m bench.cpu_attention [--rounds 2] [--lengths 24 64 128 256 384]

Inputs as the J-DiT passes them (q, k, v: [B, L, H, hd] transposes of one head-major tensor; B 8, 2 heads of
32), one thread, thread CPU time (time.thread_time: less sensitive to other processes on a loaded machine than
the wall clock), the two contenders alternating per round. Prints ms per forward + backward for each round.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _time(fn, B: int, H: int, L: int, hd: int, n: int) -> float:
    base = torch.randn(B, 3 * H, L, hd, requires_grad=True)
    g = torch.randn(B, L, H, hd)

    def once():
        q, k, v = (t.transpose(1, 2) for t in base.split([H, H, H], dim=1))
        fn(q, k, v).backward(g)

    for _ in range(3):
        once()
    t0 = time.thread_time()
    for _ in range(n):
        once()
    return (time.thread_time() - t0) / n * 1e3


def run(lengths: list[int], rounds: int, batch: int = 8, heads: int = 2, head_dim: int = 32) -> list[dict]:
    from bench.gemm_attention import small_attention

    def gemm(q, k, v):
        return small_attention(q, k, v, head_dim**-0.5)

    torch.set_num_threads(1)
    rows = []
    for L in lengths:
        n = max(5, 2000 // L)
        for r in range(rounds):
            sdpa_ms = _time(_sdpa, batch, heads, L, head_dim, n)
            gemm_ms = _time(gemm, batch, heads, L, head_dim, n)
            rows.append({"L": L, "round": r, "SDPA ms": round(sdpa_ms, 3), "GEMM ms": round(gemm_ms, 3),
                         "GEMM / SDPA": round(gemm_ms / sdpa_ms, 2)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lengths", type=int, nargs="+", default=[24, 64, 128, 256, 384])
    a = ap.parse_args(argv)
    from bench.cpu_dit import _table

    print(f"attention forward + backward, 1 thread, batch 8, 2 heads of 32, torch {torch.__version__}")
    print(_table(run(a.lengths, a.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
