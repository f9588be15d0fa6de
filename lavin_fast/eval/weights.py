"""Reading the user-supplied weight files of the LPIPS and FID networks (never downloaded)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_state_dict(path: Path, option: str) -> dict[str, torch.Tensor]:
    """Read a state-dict file (.safetensors, or a torch pickle loaded with weights_only=True); errors name `option`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: say which and why
        raise ValueError(f"{option}: cannot read a state dict from {path}: {exc}") from exc
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{option}: {path} does not hold a state dict (a mapping of names to tensors)")
    from lavin_fast.models.checkpoints import check_weight

    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):  # BatchNorm's step counter is an integer by design
            check_weight(k, v, f"{option} {path}")
    return dict(sd)
