"""Seeded random generators keyed by integers: the same draws on every process, micro-batch split and resume.

`keyed_generator(device, seed, step, index, purpose)` is how training (flow/loss.py), sampling and VAE
encoding get their randomness, so a draw depends only on its keys.
"""

from __future__ import annotations

import hashlib

import torch


def mix_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (stable across processes and Python runs, unlike hash())."""
    h = hashlib.blake2b(b",".join(str(int(k)).encode() for k in keys), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def keyed_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A fresh generator on `device` seeded by mix_seed(*keys)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mix_seed(*keys))
    return gen
