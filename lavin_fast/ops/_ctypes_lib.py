"""Finding and loading the package's C ABI libraries with ctypes (the CUDA one, ops/_cuda.py; the CPU one,
ops/_cpu.py): where they are looked for, and the first candidate that loads with the expected ABI version."""

from __future__ import annotations

import ctypes
import pathlib
from collections.abc import Callable, Iterable

_PKG = pathlib.Path(__file__).resolve().parents[1]  # lavin_fast/


def package_lib_dirs() -> list[pathlib.Path]:
    """lavin_fast/lib/ of each folder of the package (an editable install may list more than one folder in
    __path__; setup.py copies the libraries into the checkout's lavin_fast/lib/)."""
    import lavin_fast

    dirs = [_PKG / "lib"] + [pathlib.Path(p) / "lib" for p in getattr(lavin_fast, "__path__", [])]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def load_first(
    candidates: Iterable[pathlib.Path], declare: Callable[[ctypes.CDLL], None], abi_symbol: str, abi_version: int
) -> tuple[ctypes.CDLL | None, str]:
    """(library, path) of the first candidate that loads, declares and reports ABI `abi_version` through
    `abi_symbol`; else (None, what was tried and why each failed)."""
    tried = []
    for path in candidates:
        if not path.is_file():
            tried.append(f"{path} absent")
            continue
        try:
            lib = ctypes.CDLL(str(path))
            declare(lib)
            abi = getattr(lib, abi_symbol)()
        except (OSError, AttributeError) as exc:
            tried.append(f"{path} does not load ({type(exc).__name__}: {exc})")
            continue
        if abi != abi_version:
            tried.append(f"{path} has ABI {abi}, this package needs {abi_version} (rebuild: pip install -e .)")
            continue
        return lib, str(path)
    return None, "; ".join(tried)
