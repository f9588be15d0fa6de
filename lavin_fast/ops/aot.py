"""What an op module declares for the ahead-of-time report: `AotSpec`s, registered with `@register_aot`.

Only the declaration lives with the kernels; compiling, reading the SASS and the static performance model are
tooling, in lavin_fast.perf (which imports this, never the other way round)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ANCHOR_OP = "anchor"  # the calibration kernels of lavin_fast/perf/anchors.py


@dataclass
class AotSpec:
    """One kernel in one configuration to compile ahead of time.

    op: the public op this kernel serves.
    kernel: the @triton.jit function.
    signature: argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr", ...).
    constexprs: values of the constexpr arguments.
    label: what the configuration stands for (shape, block sizes).
    num_warps / num_stages: launch options, as the autotuner would pick.
    aligned: integer arguments known to be multiples of 16 (pointers are always marked aligned),
        as Triton's launcher specialises them at run time.
    expect_hgmma: a matrix kernel that must use Hopper's wgmma.
    hot: a kernel on a hot path, which must not spill.

    Optional, for the static performance model (perf/sass_model.py); leave at None when unknown:
    programs: the grid size (programs launched) at the problem shape the spec stands for; gives
        the wave quantisation and, with iters_per_program, the time of the whole launch.
    iters_per_program: trip count of the kernel's main (inner) loop per program at that shape.
    useful_flops: the useful FLOPs of the whole launch (e.g. 4*B*H*L*L*hd for attention), so that
        padding (hd 72 computed as 64+16) and masked-off work count as lost time.
    useful_bytes: the bytes a memory-bound launch must move to or from HBM (reads + writes once).
    l2_bytes: the bytes the whole launch moves between L2 and the SMs by TMA (tile loads and reductions per
        CTA-iteration x iterations x programs): TMA's bytes are not in the SASS, pointer loads' are.
    """

    op: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    label: str = ""
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()
    expect_hgmma: bool = False
    hot: bool = True
    programs: int | None = None
    iters_per_program: int | None = None
    useful_flops: float | None = None
    useful_bytes: float | None = None
    l2_bytes: float | None = None


_SPEC_FACTORIES: list[Callable[[], list[AotSpec]]] = []


def register_aot(factory: Callable[[], list[AotSpec]]) -> Callable[[], list[AotSpec]]:
    """Decorator for a function returning the AotSpecs of an op module (called lazily)."""
    _SPEC_FACTORIES.append(factory)
    return factory


def registered_specs() -> list[AotSpec]:
    """The specs of every registered factory (of the modules imported so far)."""
    return [s for factory in _SPEC_FACTORIES for s in factory()]
