"""J-DiT sizes: the three published ones (the paper's Table 1) and small test sizes.

Field names follow the published constructor (`hidden_size`, `depth`, `num_heads`, `kv_group`,
`drop_path`, `uncond_ratio`), so `build_dit("3.4B", hidden_size=144, num_heads=2, ...)` reads like it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of one J-DiT."""

    hidden_size: int
    """Model width D."""
    depth: int
    """Number of joint blocks."""
    num_heads: int
    """Query heads H; the head dim is hidden_size // num_heads."""
    kv_group: int = 1
    """Query heads per key/value head (published meaning): kv heads = num_heads // kv_group."""
    in_channels: int = 16
    """Latent channels of the ST-VAE."""
    patch_size: int = 2
    """Square patch side in latent pixels."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block (linear from 0 at the first block); training only."""
    uncond_ratio: float = 0.1
    """Probability with which training replaces the context by the null context (read by the trainer)."""
    post_norm: bool = True
    """Sandwich norm: RMSNorm of each branch's output before its gate (Table 1 of the paper: "S-Norm." of the 1.0B and
    3.4B models); False gives `s + gate * branch`, the 0.1B model's "Extra norm: -". RMSNorm without weights: the
    checkpoint's tensor names are the same either way."""
    rope_in_attention: bool = False
    """Apply the 3D RoPE inside the attention op instead of in the QK-norm op (the GPU benchmark decides)."""
    grad_checkpointing: bool = False
    """Recompute each block in the backward pass (activation checkpointing) while training."""
    backend: str = "auto"
    """Backend passed to every lavin_fast.ops call ("auto", "torch", "triton", "cuda"); see ops/dispatch.py."""
    eps: float = 1e-6
    """Epsilon of every RMSNorm (sandwich norms, QK norms, final norm)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "depth", "num_heads", "kv_group", "in_channels", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {v!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.num_heads % self.kv_group:
            raise ValueError(
                f"DiTConfig: num_heads {self.num_heads} is not divisible by kv_group {self.kv_group} "
                "(kv_group = query heads per key/value head)"
            )
        if self.head_dim % 2:
            raise ValueError(f"DiTConfig: head dim {self.head_dim} must be even for the 3D RoPE")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"DiTConfig.drop_path must be in [0, 1), got {self.drop_path}")
        if not 0.0 <= self.uncond_ratio <= 1.0:
            raise ValueError(f"DiTConfig.uncond_ratio must be in [0, 1], got {self.uncond_ratio}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads // self.kv_group

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU width, as published: int((4 * D * 2 / 3) / 64) * 64."""
        return int((4 * self.hidden_size * 2 / 3) / 64) * 64

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.patch_size**2

    def replace(self, **overrides: Any) -> DiTConfig:
        known = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown J-DiT option(s) {bad}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DIT_CONFIGS: dict[str, DiTConfig] = {
    # published (Table 1 of the paper); parameter counts checked against the manifest in the tests
    "0.1B": DiTConfig(hidden_size=512, depth=12, num_heads=8, kv_group=1, drop_path=0.0, post_norm=False),
    "1.0B": DiTConfig(hidden_size=1024, depth=28, num_heads=16, kv_group=1, drop_path=0.1),
    "3.4B": DiTConfig(hidden_size=2304, depth=22, num_heads=32, kv_group=4, drop_path=0.1),
    # test sizes: head dim 16 (torch backend only), and 72 with GQA (the 3.4B head shape)
    "tiny": DiTConfig(hidden_size=64, depth=2, num_heads=4, kv_group=1),
    "tiny-gqa": DiTConfig(hidden_size=288, depth=2, num_heads=4, kv_group=4),
}

PUBLISHED_PARAMS = {"0.1B": 100_709_952, "1.0B": 935_095_360, "3.4B": 3_398_976_064}


def get_config(name: str | DiTConfig, **overrides: Any) -> DiTConfig:
    """The config called `name` (or a DiTConfig) with `overrides` applied."""
    if isinstance(name, DiTConfig):
        base = name
    elif name in DIT_CONFIGS:
        base = DIT_CONFIGS[name]
    else:
        raise ValueError(f"unknown J-DiT size {name!r}; known: {sorted(DIT_CONFIGS)}")
    return base.replace(**overrides) if overrides else base
