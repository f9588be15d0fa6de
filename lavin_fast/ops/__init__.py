"""Fused ops, one module each; every public function dispatches by backend (see dispatch.py).

Names resolve lazily so that `import lavin_fast.ops` stays cheap and touches no GPU.
"""

from __future__ import annotations

import importlib
import pkgutil

# public name -> module under lavin_fast.ops that defines it
_EXPORTS = {
    "qk_norm_rope": "qk_norm_rope",
    "rms_norm_rope": "qk_norm_rope",
    "rope_split": "rope",
    "rope_cos_sin": "rope",
    "apply_rope": "rope",
    "attention": "attention",
    "rms_norm_modulate": "sandwich_norm",
    "gated_rms_norm_residual": "sandwich_norm",
    "causal_conv3d": "causal_conv3d",
    "group_norm_stats": "causal_conv3d",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_all_op_modules() -> list[str]:
    """Import every op module (each registers its dispatcher and ahead-of-time specs)."""
    loaded = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name in ("dispatch", "aot"):
            continue
        importlib.import_module(f"{__name__}.{info.name}")
        loaded.append(info.name)
    return loaded
