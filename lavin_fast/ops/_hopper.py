"""sm_90 (Hopper) resource limits and the occupancy they allow: facts of the machine that kernels (launch sizing)
and the static performance model (lavin_fast.perf) both use."""

from __future__ import annotations

import math

SM90_MAX_CTAS_PER_SM = 32
SM90_MAX_WARPS_PER_SM = 64
SM90_REGS_PER_SMSP = 16384  # 64K registers per SM, a warp's registers live in one of 4 sub-partitions
SM90_REG_ALLOC_UNIT = 8  # registers per thread are allocated in multiples of 8 (256 per warp)
SM90_SMEM_PER_SM = 233472  # 228 KiB shared memory per SM
SM90_SMEM_PER_CTA_RESERVED = 1024  # the driver reserves 1 KiB per CTA
SM90_SMEM_ALLOC_UNIT = 128


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> tuple[int, str]:
    """CTAs per SM on sm_90 and the resource that limits them ("registers", "shared memory",
    "warps" or "CTA slots")."""
    if num_warps < 1:
        raise ValueError(f"num_warps must be >= 1, got {num_warps}")
    regs = max(1, math.ceil(max(registers, 1) / SM90_REG_ALLOC_UNIT) * SM90_REG_ALLOC_UNIT)
    warps_per_smsp = SM90_REGS_PER_SMSP // (regs * 32)
    by_regs = (warps_per_smsp * 4) // num_warps
    smem = math.ceil(shared_bytes / SM90_SMEM_ALLOC_UNIT) * SM90_SMEM_ALLOC_UNIT + SM90_SMEM_PER_CTA_RESERVED
    by_smem = SM90_SMEM_PER_SM // smem
    by_warps = SM90_MAX_WARPS_PER_SM // num_warps
    limits = {
        "registers": by_regs,
        "shared memory": by_smem,
        "warps": by_warps,
        "CTA slots": SM90_MAX_CTAS_PER_SM,
    }
    n = min(limits.values())
    return max(0, n), "+".join(k for k, v in limits.items() if v == n)
