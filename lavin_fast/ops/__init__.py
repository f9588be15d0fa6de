"""Fused ops, one module each; every public function dispatches by backend (see dispatch.py).

The public functions share their module's name (ops.attention is a function defined in
ops/attention.py), so they are bound here eagerly, after each module is imported: a lazy
lookup would be shadowed by the submodule once anything imports it. Importing compiles
nothing and touches no GPU.
"""

from __future__ import annotations

import importlib
import pkgutil

from lavin_fast.ops.attention import attention
from lavin_fast.ops.causal_conv3d import causal_conv3d, group_norm_stats
from lavin_fast.ops.dispatch import BackendUnavailable, use_backend
from lavin_fast.ops.group_norm_silu import GroupNormSiLU, GroupNormStatsState, SpatialNormSiLU, group_norm_silu
from lavin_fast.ops.qk_norm_rope import qk_norm_rope, rms_norm_rope
from lavin_fast.ops.rope import apply_rope, rope_cos_sin, rope_split
from lavin_fast.ops.sandwich_norm import gated_rms_norm_residual, rms_norm_modulate

__all__ = [
    "attention",
    "causal_conv3d",
    "group_norm_stats",
    "group_norm_silu",
    "GroupNormSiLU",
    "GroupNormStatsState",
    "SpatialNormSiLU",
    "qk_norm_rope",
    "rms_norm_rope",
    "apply_rope",
    "rope_cos_sin",
    "rope_split",
    "rms_norm_modulate",
    "gated_rms_norm_residual",
    "use_backend",
    "BackendUnavailable",
]


def load_all_op_modules() -> list[str]:
    """Import every op module (each registers its dispatcher and ahead-of-time specs)."""
    loaded = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in ("dispatch", "aot"):
            continue
        importlib.import_module(f"{__name__}.{info.name}")
        loaded.append(info.name)
    return loaded
