"""Fused ops, one module each; every public function dispatches by backend (see dispatch.py).

The public functions share their module's name (ops.attention is a function defined in
ops/attention.py), so they are bound here eagerly, after each module is imported: a lazy
lookup would be shadowed by the submodule once anything imports it. Importing compiles
nothing and touches no GPU.
"""

from __future__ import annotations

import importlib
import pkgutil

from lavin_fast.ops.rope import apply_rope, rope_cos_sin, rope_split
from lavin_fast.ops.qk_norm_rope import qk_norm_rope, rms_norm_rope

# public name -> module under lavin_fast.ops that defines it (modules being written are bound
# when present; the list becomes plain imports once every op has landed)
_IN_PROGRESS = {
    "attention": "attention",
    "rms_norm_modulate": "sandwich_norm",
    "gated_rms_norm_residual": "sandwich_norm",
    "causal_conv3d": "causal_conv3d",
    "group_norm_stats": "causal_conv3d",
    "group_norm_silu": "group_norm_silu",
    "GroupNormSiLU": "group_norm_silu",
    "GroupNormStatsState": "group_norm_silu",
    "SpatialNormSiLU": "group_norm_silu",
}
for _name, _module in _IN_PROGRESS.items():
    try:
        globals()[_name] = getattr(importlib.import_module(f"{__name__}.{_module}"), _name)
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise
    except AttributeError:
        pass

__all__ = ["apply_rope", "rope_cos_sin", "rope_split", "qk_norm_rope", "rms_norm_rope", *_IN_PROGRESS]


def load_all_op_modules() -> list[str]:
    """Import every op module (each registers its dispatcher and ahead-of-time specs)."""
    loaded = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in ("dispatch", "aot", "kernels_cli"):
            continue
        importlib.import_module(f"{__name__}.{info.name}")
        loaded.append(info.name)
    return loaded
