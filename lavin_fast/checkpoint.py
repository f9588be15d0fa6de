"""Checkpoint loading: the published J-DiT (safetensors) and ST-VAE (torch pickle) files, and our own.

`load_published_dit` and `load_published_vae` live with their models (models/dit.py, models/vae.py)
and are re-exported here; the strict state-dict check they share is `check_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class CheckpointMismatch(ValueError):
    """A state dict that does not match the model: lists every missing, unexpected or mis-shaped tensor."""


def check_state_dict(
    expected: Mapping[str, tuple[int, ...] | torch.Size],
    found: Mapping[str, torch.Tensor | tuple[int, ...]],
    source: str = "checkpoint",
) -> None:
    """Raise one CheckpointMismatch listing all differences between expected and found names/shapes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = []
    for name in sorted(set(expected) & set(found)):
        got = found[name]
        got_shape = tuple(got.shape) if hasattr(got, "shape") else tuple(got)
        if tuple(expected[name]) != got_shape:
            shapes.append(f"{name}: expected {tuple(expected[name])}, found {got_shape}")
    if missing or unexpected or shapes:
        parts = [f"{source} does not match the model:"]
        if missing:
            parts.append(
                f"  missing ({len(missing)}): " + ", ".join(missing[:50]) + (" ..." if len(missing) > 50 else "")
            )
        if unexpected:
            parts.append(
                f"  unexpected ({len(unexpected)}): "
                + ", ".join(unexpected[:50])
                + (" ..." if len(unexpected) > 50 else "")
            )
        if shapes:
            parts.append(f"  wrong shape ({len(shapes)}):\n    " + "\n    ".join(shapes[:50]))
        raise CheckpointMismatch("\n".join(parts))


def __getattr__(name: str):
    if name == "load_published_dit":
        from lavin_fast.models.dit import load_published_dit

        return load_published_dit
    if name == "load_published_vae":
        from lavin_fast.models.vae import load_published_vae

        return load_published_vae
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
