"""Backwards-compatible names for user code: the model file loaders live in lavin_fast.models.checkpoints.

Nothing inside the package imports this module (tests/test_layering.py checks it).
"""

from lavin_fast.models.checkpoints import (  # noqa: F401
    CheckpointMismatch,
    check_state_dict,
    load_published_dit,
    load_published_vae,
)
