"""Build driver of lavin-fast: setuptools with one CMake extension (the pattern of vLLM's setup.py).

The project's metadata (name, version, dependencies, extras, entry point) is PEP 621 in pyproject.toml; this file
only builds. `pip install .`, `pip wheel .`, `python -m build` and installs from the sdist run CMakeLists.txt,
which compiles csrc/ with nvcc alone (no torch headers: a C ABI loaded with ctypes, so one wheel serves every
torch and every Python 3) into lavin_fast/lib/liblavin_fast_cuda.so, next to cuda_build.json, the record of
what happened (`lavin-fast info` prints it). The same CMake run builds the CPU kernels (csrc/cpu_fused.cpp) with
the system C++ compiler and OpenMP into lavin_fast/lib/liblavin_fast_cpu.so, next to cpu_build.json; without a
compiler the torch forms run instead. A failed CUDA build is retried without CUDA, so the CPU library still comes.

Environment:
  LAVIN_FAST_SKIP_CUDA_BUILD=1  no CMake at all: a pure py3-none-any wheel (cuda_build.json says so), no CPU
                                library either
  LAVIN_FAST_SKIP_CPU_BUILD=1   no CPU library (CMake still builds the CUDA one)
  LAVIN_FAST_CUDA_ARCHS         CMake's architecture list, e.g. "80;90" (PTX of the newest added) or "90-real"
  TORCH_CUDA_ARCH_LIST          torch's spelling, used when LAVIN_FAST_CUDA_ARCHS is unset: "8.0 8.6 9.0+PTX",
                                "9.0a", "Ampere;Hopper"; entries below sm_80 are dropped (the kernels need bf16)
  MAX_JOBS                      parallel compile jobs (default: the CPU count)
  CMAKE_ARGS                    extra arguments for CMake's configure step
A CUDA build that fails never fails the install: the wheel is built without the library and cuda_build.json
records the reason (rerun with `pip install -v .` to see the compiler's output). Without nvcc, CMake skips the
library and says why; the wheel then carries csrc/ alone (for the CuPy/NVRTC path), and is pure when no CPU
library was built either.

Editable installs (`pip install -e .`) map the `lavin_fast` package to this checkout (setuptools' finder), so
new and changed Python files are seen without a reinstall; the library is copied into the checkout's
lavin_fast/lib/ (ignored by git). Reinstall after editing csrc/ or CMakeLists.txt.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

try:  # setuptools >= 70.1 carries bdist_wheel; older ones take it from the wheel package
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    from wheel.bdist_wheel import bdist_wheel

ROOT = pathlib.Path(__file__).resolve().parent
LIBRARY = "liblavin_fast_cuda.so"
RECORD = "cuda_build.json"
CPU_LIBRARY = "liblavin_fast_cpu.so"  # csrc/cpu_fused.cpp, built by the same CMake run with the C++ compiler
CPU_RECORD = "cpu_build.json"
OUTPUTS = (LIBRARY, RECORD, CPU_LIBRARY, CPU_RECORD)
MIN_ARCH = 80  # bf16 conversions in the kernels
# torch's architecture names (torch.utils.cpp_extension) that this library can build
NAMED_ARCHS = {"ampere": ["8.0", "8.6"], "ada": ["8.9"], "hopper": ["9.0"], "blackwell": ["10.0", "12.0"]}
_BUILT: dict[str, bool] = {"library": False}


def _skip_requested() -> bool:
    return os.environ.get("LAVIN_FAST_SKIP_CUDA_BUILD", "").strip().lower() not in ("", "0", "false", "no", "off")


def torch_arch_list_to_cmake(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST ("8.0 8.6 9.0+PTX", "9.0a", "Ampere;Hopper") -> CMake's list ("80-real;86-real;
    90-real;90-virtual"): machine code for each entry, PTX only where an entry says +PTX, as torch builds it.
    Entries below sm_80 are dropped with a note; a list with none left, or an entry that is not an architecture,
    is a ValueError naming it."""
    entries: list[str] = []
    for raw in re.split(r"[;,\s]+", value.strip()):
        if not raw:
            continue
        ptx = raw.upper().endswith("+PTX")
        name = raw[:-4] if ptx else raw
        expanded = NAMED_ARCHS.get(name.lower(), [name])
        for arch in expanded:
            m = re.fullmatch(r"(\d+)\.(\d)([af]?)", arch)
            if not m:
                raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {raw!r} (expected e.g. '8.0 8.6 9.0+PTX')")
            number = int(m.group(1)) * 10 + int(m.group(2))
            if number < MIN_ARCH:
                print(f"lavin-fast: TORCH_CUDA_ARCH_LIST entry {raw} is below sm_80: not built", file=sys.stderr)
                continue
            code = f"{number}{m.group(3)}"
            entries.append(f"{code}-real")
            if ptx:
                entries.append(f"{code}-virtual")
    if not entries:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={value!r} names no architecture >= sm_80")
    return ";".join(dict.fromkeys(entries))


def cmake_archs(env: dict[str, str]) -> str | None:
    """The architecture list for CMake: LAVIN_FAST_CUDA_ARCHS as written, else TORCH_CUDA_ARCH_LIST mapped,
    else None (CMakeLists.txt's default: 80;86;89;90 plus PTX of 90)."""
    if env.get("LAVIN_FAST_CUDA_ARCHS", "").strip():
        return env["LAVIN_FAST_CUDA_ARCHS"].strip()
    if env.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return torch_arch_list_to_cmake(env["TORCH_CUDA_ARCH_LIST"])
    return None


def write_record(folder: pathlib.Path, status: str, detail: str) -> None:
    """cuda_build.json in CMake's format, for the outcomes CMake does not see (skipped before it ran, failed)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = {"status": status, "detail": detail, "archs": [], "nvcc_version": ""}
    (folder / RECORD).write_text(json.dumps(record) + "\n")


class CMakeExtension(Extension):
    """A library built by CMake (no Python C API): `name` is where its files go, as a module path."""

    def __init__(self, name: str, source_dir: pathlib.Path = ROOT):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class cmake_build_ext(build_ext):
    """Configure, build and install CMakeLists.txt into the extension's package folder; on failure, a record."""

    def _lib_dir(self, ext: Extension) -> pathlib.Path:
        """The extension's folder under build_lib (an editable install copies from there into the checkout)."""
        return pathlib.Path(self.build_lib, *ext.name.split(".")[:-1])

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        out = self._lib_dir(ext)
        for stale in OUTPUTS:
            (out / stale).unlink(missing_ok=True)
        try:
            self._cmake(ext, out)
        except (OSError, subprocess.CalledProcessError, ValueError) as exc:
            if isinstance(exc, subprocess.CalledProcessError):  # most likely nvcc: retry for the CPU library alone
                try:
                    self._cmake(ext, out, ["-DLAVIN_FAST_CUDA_BUILD_FAILED=ON"])
                except (OSError, subprocess.CalledProcessError, ValueError):
                    pass
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if isinstance(exc, subprocess.CalledProcessError):
                reason = f"`{' '.join(exc.cmd[:3])} ...` exited with {exc.returncode}"
            print(f"lavin-fast CUDA build: failed ({reason}); building the wheel without the library",
                  file=sys.stderr)  # fmt: skip
            (out / LIBRARY).unlink(missing_ok=True)
            write_record(out, "skipped", f"the CUDA build failed ({reason}); rerun `pip install -v .` to see the "
                                         "compiler's error")  # fmt: skip
        _BUILT["library"] = (out / LIBRARY).is_file() or (out / CPU_LIBRARY).is_file()

    def _cmake(self, ext: CMakeExtension, out: pathlib.Path, extra: list[str] | None = None) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found (pip install cmake, or put it on PATH)")
        build = pathlib.Path(self.build_temp).resolve() / "cmake"
        stage = pathlib.Path(self.build_temp).resolve() / "cmake-install"
        shutil.rmtree(stage, ignore_errors=True)
        env = dict(os.environ)
        archs = cmake_archs(env)
        args = [f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}", "-DLAVIN_FAST_LIB_DEST=lib",
                f"-DCMAKE_INSTALL_PREFIX={stage}"]  # fmt: skip
        if archs is not None:
            env["LAVIN_FAST_CUDA_ARCHS"] = archs
        if shutil.which("ninja") and not (build / "CMakeCache.txt").is_file():
            args += ["-G", "Ninja"]
        args += shlex.split(env.get("CMAKE_ARGS", "")) + list(extra or [])
        jobs = int(env.get("MAX_JOBS") or os.cpu_count() or 1)
        subprocess.run([cmake, "-S", str(ext.source_dir), "-B", str(build), *args], check=True, env=env)
        subprocess.run([cmake, "--build", str(build), "-j", str(jobs)], check=True, env=env)
        subprocess.run([cmake, "--install", str(build)], check=True, env=env)
        record = json.loads((stage / "lib" / RECORD).read_text())
        print(f"lavin-fast CUDA build: {record['status']}: {record['detail']}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            if (stage / "lib" / name).is_file():
                shutil.copy2(stage / "lib" / name, out / name)

    def copy_extensions_to_source(self) -> None:
        """Editable installs: the library and its record into the checkout's lavin_fast/lib/."""
        for ext in self.extensions:
            built = self._lib_dir(ext)
            dest = ROOT / pathlib.Path(*ext.name.split(".")[:-1])
            dest.mkdir(parents=True, exist_ok=True)
            for name in OUTPUTS:
                (dest / name).unlink(missing_ok=True)
                if (built / name).is_file():
                    shutil.copy2(built / name, dest / name)

    def get_outputs(self) -> list[str]:
        outs = []
        for ext in self.extensions:
            outs += [str(self._lib_dir(ext) / n) for n in OUTPUTS if (self._lib_dir(ext) / n).is_file()]
        return outs

    def get_output_mapping(self) -> dict[str, str]:
        """Build-folder file -> the file it becomes in an editable install's checkout."""
        mapping = {}
        for ext in self.extensions:
            dest = ROOT / pathlib.Path(*ext.name.split(".")[:-1])
            for name in OUTPUTS:
                if (self._lib_dir(ext) / name).is_file():
                    mapping[str(self._lib_dir(ext) / name)] = str(dest / name)
        return mapping


class record_build_py(build_py):
    """Python files and package data; with LAVIN_FAST_SKIP_CUDA_BUILD (no CMake run) the record says so."""

    def run(self) -> None:
        super().run()
        if _skip_requested() and not self.editable_mode:
            write_record(
                pathlib.Path(self.build_lib) / "lavin_fast" / "lib", "skipped", "LAVIN_FAST_SKIP_CUDA_BUILD is set"
            )


class tagged_bdist_wheel(bdist_wheel):
    """py3-none-<platform> with the library (ctypes: any Python 3), py3-none-any without it."""

    def get_tag(self) -> tuple[str, str, str]:
        plat = super().get_tag()[2]
        self.root_is_pure = not _BUILT["library"]
        return ("py3", "none", plat) if _BUILT["library"] else ("py3", "none", "any")


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for its helpers
    setup(
        # csrc/ ships inside the package (lavin_fast/csrc) for the CuPy/NVRTC path, which compiles it at first use
        packages=find_packages(include=["lavin_fast", "lavin_fast.*"]) + ["lavin_fast.csrc"],
        package_dir={"lavin_fast.csrc": "csrc"},
        package_data={
            "lavin_fast": ["py.typed", "configs/*.yaml", "perf/*.json", "data/*.safetensors"],
            "lavin_fast.csrc": ["*.cu", "*.cuh", "*.h"],
        },
        # a module path whose folder is lavin_fast/lib: the library and cuda_build.json go there
        ext_modules=[] if _skip_requested() else [CMakeExtension("lavin_fast.lib._cuda")],
        cmdclass={"build_ext": cmake_build_ext, "build_py": record_build_py, "bdist_wheel": tagged_bdist_wheel},
    )
