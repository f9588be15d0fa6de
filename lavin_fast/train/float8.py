"""float8 training of the J-DiT block linears through torchao (opt-in: `float8: true`).

torchao's `convert_to_float8_training` swaps each chosen `nn.Linear` for a `Float8Linear`: inputs, weights and
output gradients are cast to float8 with dynamic tensor-wise scales and the three matrix multiplies of a linear run
on float8 tensor cores. Under FSDP2 the weights are all-gathered in float8 (`enable_fsdp_float8_all_gather`), half
the bytes of bf16; their scales are precomputed once per step after the optimizer (`after_optimizer_step`).

Only the linears inside the J-DiT blocks with both dimensions multiples of 16 are converted (the embedders, the
final layer and the small modulation MLPs stay in bf16, as torchtitan leaves its output layer).

Status: not run on a GPU yet, so off by default. Refused (ConfigError) on the CPU and on GPUs without float8
(compute capability below 8.9). `emulate=True` (tests only) runs torchao's float8 emulation on any device.
"""

from __future__ import annotations

import torch
from torch import nn

from lavin_fast._optional import optional_import
from lavin_fast.train.config import ConfigError


def float8_refusal(device: torch.device) -> str | None:
    """Why float8 training cannot run on `device` (None: it can)."""
    if device.type != "cuda":
        return (
            f"float8 training needs a CUDA GPU with float8 tensor cores (compute capability 8.9 or newer: L4, L40S, "
            f"H100, H200, B200); this run is on {device.type}"
        )
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"float8 training needs compute capability 8.9 or newer; {name} has {cap[0]}.{cap[1]}"
    return None


def _block_linear(module: nn.Module, fqn: str) -> bool:
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("blocks.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_to_float8(model: nn.Module, device: torch.device, *, fsdp_all_gather: bool = True, emulate: bool = False):
    """Convert the J-DiT's block linears in place (before FSDP wrapping and compile). Returns the converted names."""
    if not emulate:
        why = float8_refusal(device)
        if why is not None:
            raise ConfigError(f"config field 'float8': {why}; set float8: false")
    optional_import("torchao")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    chosen = [name for name, m in model.named_modules() if _block_linear(m, name)]
    if not chosen:
        raise ConfigError("config field 'float8': the model has no block linears to convert (J-DiT blocks.*)")
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=fsdp_all_gather, emulate=emulate)
    convert_to_float8_training(model, config=config, module_filter_fn=_block_linear)
    return chosen


def after_optimizer_step(model: nn.Module) -> None:
    """Precompute the float8 scales of the FSDP2-sharded weights for the next all-gather (torchao's recipe)."""
    optional_import("torchao")
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
