"""The CPU path: which form of the J-DiT and the ST-VAE runs on a CPU (eager or compiled, float32 or bfloat16).

Public API:
- `CPU_PATHS`: the names a user may ask for ("auto", "eager", "compiled", "bf16", "compiled-bf16").
- `cpu_bf16_support() -> (bool, reason)`: whether this CPU has native bfloat16 matrix instructions
  (avx512_bf16 or AMX-BF16); without them oneDNN emulates bf16 and it is slower than float32.
- `resolve_cpu_path(name, device, *, expected_calls=None) -> CpuPath`: the concrete choice, checked before any
  work (bf16 on a CPU without it, or a CPU path asked for on another device, is an error that says so).
- `apply_cpu_path(path, dit=None, vae=None) -> str`: casts and compiles the models in place and returns the
  one line that says which path runs (`CpuPath.describe()`), for the caller to print or log.

What each part buys was measured with bench/cpu_dit.py (docs/cpu.md has the figures): compiling each J-DiT
block with Inductor's CPU backend fuses the RMSNorm / modulation / RoPE / residual chains between the GEMMs;
bfloat16 weights and activations run the GEMMs and SDPA's flash kernel on the CPU's bf16 units, with the
norms, softmax statistics and every accumulation in float32 (as the ops' references and oneDNN do), and the
model's output cast back to float32. Compilation costs seconds once per shape, so "auto" compiles only when the
caller expects enough model calls to pay it back (`AUTO_COMPILE_MIN_CALLS`), and never bf16 (it changes the
numbers: about 1% relative error against float32, docs/cpu.md).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

CPU_PATHS = ("auto", "eager", "compiled", "bf16", "compiled-bf16")

AUTO_COMPILE_MIN_CALLS = 10_000
"""model calls from which "auto" compiles: above the break-even of a COLD compile, what a fresh machine pays (Inductor's
on-disk cache empty). Measured on 2 idle cores (docs/cpu.md): the demo's training step compiled in 199 s, plus 81 s
when its shapes turned dynamic, and then saved 32 ms a step (7.8 against 6.3 steps/s): ~8,900 steps to pay back; a
3.4B-shaped forward compiled is no faster than the reworked eager path there. A caller that cannot say how many
calls it will make (expected_calls=None) gets eager. Where the C++ CPU kernels load (ops/cpu_fused.py), "auto" is eager
at any call count: with them the eager training step of the demo's J-DiT ran 11.05 steps/s against 10.16 for the
compiled blocks (warm cache; torch forms 7.71), measured side by side on 2 idle cores (docs/cpu.md)."""

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_support() -> tuple[bool, str]:
    """(supported, reason): native bfloat16 matrix instructions on this CPU (avx512_bf16 or AMX-BF16)."""
    override = os.environ.get("LAVIN_FAST_CPU_BF16")
    if override in ("0", "1"):
        return override == "1", f"LAVIN_FAST_CPU_BF16={override}"
    cap = torch.backends.cpu.get_cpu_capability()
    flags = _cpu_flags()
    have = [f for f in BF16_CPU_FLAGS if f in flags]
    if have:
        return True, f"CPU has {', '.join(have)} (torch capability {cap})"
    if not flags:
        return False, f"cannot read the CPU flags (/proc/cpuinfo); torch capability {cap}"
    return False, f"CPU has none of {', '.join(BF16_CPU_FLAGS)} (torch capability {cap}): bfloat16 would be emulated"


@dataclass(frozen=True)
class CpuPath:
    """A resolved CPU path: whether the models are compiled and whether they run in bfloat16."""

    name: str
    compile: bool
    bf16: bool
    why: str

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def describe(self) -> str:
        """One line: "CPU path: <name> (<precision>, <eager or compiled>; <why>)"."""
        prec = "bfloat16 weights and activations (float32 norms and accumulation)" if self.bf16 else "float32"
        kernels = ""
        if not self.compile and not self.bf16:  # compiled: Inductor fuses them; bf16: the torch forms
            from lavin_fast.ops import _cpu

            ok, why = _cpu.status()
            kernels = "; norms, SwiGLU, QK norm + RoPE in C++ kernels" if ok else f"; norms in torch ({why})"
        mode = "Inductor-compiled blocks" if self.compile else "eager"
        return f"CPU path: {self.name} ({prec}, {mode}; {self.why}{kernels})"


def resolve_cpu_path(name: str, device: torch.device | str, *, expected_calls: int | None = None) -> CpuPath:
    """The concrete path for `name` on `device`; expected_calls: model calls the run will make (for "auto")."""
    if name not in CPU_PATHS:
        raise ValueError(f"cpu path {name!r} is not one of {CPU_PATHS}")
    dev = torch.device(device)
    if dev.type != "cpu":
        if name != "auto":
            raise ValueError(
                f"cpu path {name!r} applies to CPU runs; the device is {dev} (its own kernels run there): use 'auto'"
            )
        return CpuPath("eager", False, False, f"device {dev}: the CPU path does not apply")
    if name == "auto":
        from lavin_fast.ops import _cpu

        if _cpu.library() is not None:
            return CpuPath("eager", False, False, "auto: the C++ CPU kernels outrun the compiled blocks")
        if expected_calls is not None and expected_calls >= AUTO_COMPILE_MIN_CALLS:
            return CpuPath("compiled", True, False, f"auto: {expected_calls} model calls pay back the compile time")
        why = "unknown number of calls" if expected_calls is None else f"{expected_calls} model calls"
        return CpuPath(
            "eager", False, False, f"auto: {why}, fewer than the {AUTO_COMPILE_MIN_CALLS} that pay back compiling"
        )
    bf16 = name in ("bf16", "compiled-bf16")
    if bf16:
        ok, reason = cpu_bf16_support()
        if not ok:
            raise ValueError(
                f"cpu path {name!r} needs native bfloat16 on the CPU: {reason}. Use 'eager' or 'compiled' (float32)"
            )
        why = f"asked for; {reason}"
    else:
        why = "asked for"
    return CpuPath(name, name.startswith("compiled"), bf16, why)


def compile_dit_blocks(model: nn.Module, backend: str | Callable = "inductor") -> int:
    """torch.compile each J-DiT block in place (the module's own compile: parameter names do not change);
    returns how many blocks were newly compiled. The rest of the forward (input checks, patchify, the
    segment bookkeeping) stays eager: compiling the whole model recompiled on every call (measured). Shapes are
    static at first and become dynamic after the first recompile (torch.compile's default): the training step splits
    its batch between the context and the null context at random, and static shapes recompiled for every split."""
    n = 0
    for blk in model.blocks:
        if getattr(blk, "_compiled_call_impl", None) is None:
            blk.compile(backend=backend)  # automatic dynamic shapes: a training batch split by null context
            n += 1
    return n


def compile_vae(vae: nn.Module, backend: str = "inductor") -> None:
    """torch.compile the ST-VAE's encoder and decoder in place. Correct (tests/test_cpu_path.py) but measured slower
    than eager on the CPU (docs/cpu.md): apply_cpu_path leaves the ST-VAE eager unless asked."""
    for part in (vae.encoder, vae.decoder):
        if getattr(part, "_compiled_call_impl", None) is None:
            part.compile(backend=backend)


def apply_cpu_path(
    path: CpuPath, dit: nn.Module | None = None, vae: nn.Module | None = None, *, compile_vae_too: bool = False
) -> str:
    """Cast (bf16) and compile the models in place as `path` says; returns the line naming the path.

    The ST-VAE stays float32 and eager (compiled only with compile_vae_too): compiled, its encode and decode ran
    several times slower than eager (docs/cpu.md). Since session 6's CPU decoder path a bfloat16 ST-VAE is 1.5-1.9x
    faster than float32 at a 1.2-1.7% relative error (bench/cpu_vae.py), but this path keeps float32 so that the
    pixels a user sees change only by the J-DiT's bfloat16 error; cast the ST-VAE yourself to trade that too."""
    if path.bf16 and dit is not None:
        dit.to(torch.bfloat16)
    if path.compile:
        if dit is not None:
            compile_dit_blocks(dit)
        if vae is not None and compile_vae_too:
            compile_vae(vae)
    line = path.describe()
    log.debug(line)  # the caller prints or logs it once
    return line
