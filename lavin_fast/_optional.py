"""Optional dependencies: import one, or fail with an ImportError that names the extra to install.

The core install is light (torch, triton, numpy, safetensors, pyyaml, pillow, tqdm); everything else is
an extra of pyproject.toml. Every import of an optional package goes through `optional_import`, e.g.
`cv2 = optional_import("cv2")` at the top of the function that needs it. This module imports nothing of
the package (it sits below every layer).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (distribution to install, extra of lavin-fast that brings it)
EXTRAS: dict[str, tuple[str, str]] = {
    "cv2": ("opencv-python-headless", "data"),
    "albumentations": ("albumentations", "data"),
    "nvidia.dali": ("nvidia-dali-cuda130 / nvidia-dali-cuda120, matching the driver's CUDA major", "dali-cu13"),
    "skimage": ("scikit-image", "demo"),
    "matplotlib": ("matplotlib", "demo"),
    "torch.utils.tensorboard": ("tensorboard", "demo"),
    "tensorboard": ("tensorboard", "demo"),
    "lpips": ("lpips", "eval"),
    "pytorch_fid": ("pytorch-fid", "eval"),
    "pytest_benchmark": ("pytest-benchmark", "bench"),
    "liger_kernel": ("liger-kernel", "bench"),
    "cupy": ("cupy-cuda13x", "cupy"),
    "torchao": ("torchao", "float8"),
}


def extra_for(name: str) -> tuple[str, str]:
    """(distribution, extra) for a module name or one of its submodules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        hit = EXTRAS.get(".".join(parts[:i]))
        if hit:
            return hit
    raise KeyError(f"{name!r} is not a declared optional dependency (known: {', '.join(sorted(EXTRAS))})")


def missing_message(name: str, cause: BaseException | None = None) -> str:
    dist, extra = extra_for(name)
    why = f" ({type(cause).__name__}: {str(cause).splitlines()[0]})" if cause and str(cause) else ""
    also = " (or [dali-cu12] for a CUDA 12 driver)" if extra == "dali-cu13" else ""
    return f"{name} is not importable{why}; it comes with `pip install 'lavin-fast[{extra}]'`{also} (package {dist})"


def optional_import(name: str) -> ModuleType:
    """Import `name` (a module of a declared extra) or raise ImportError naming the extra to install."""
    extra_for(name)  # a typo in the name is a KeyError here, not a misleading install hint
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ImportError(missing_message(name, exc)) from exc
