"""The J-DiT (dit.py) and the ST-VAE (vae.py). Names resolve lazily."""

import importlib

_EXPORTS = {"build_dit": "dit", "JDiT": "dit", "DIT_CONFIGS": "dit", "build_vae": "vae", "STVAE": "vae"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
