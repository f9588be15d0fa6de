"""The training device mesh: dp_replicate x dp_shard x cp (HSDP composed with context parallelism).

Global rank = (replicate_index * dp_shard + shard_index) * cp + cp_index, so the cp ranks of one sequence are
neighbours, then the shard group, then the replicas (the layout `context_parallel.py` already uses: data rank =
rank // cp). FSDP2 shards parameters, gradients and optimizer state over dp_shard x cp (the cp ranks hold the same
parameters, so they share the shards as in torchtitan) and replicates them over dp_replicate: `fully_shard` on a
2-D mesh (replicate, shard) is HSDP. A step then all-gathers / reduce-scatters inside a shard group (inside a node
with the auto rule) and all-reduces each gradient shard across the replicas (across nodes) once.

auto (0): shard inside a node, replicate across nodes: dp_shard = ranks per node / cp (LOCAL_WORLD_SIZE, which
torchrun sets), dp_replicate = the rest. One node is plain FSDP over all its ranks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class MeshShape:
    """dp_replicate x dp_shard x cp = the number of processes."""

    dp_replicate: int
    dp_shard: int
    cp: int

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel ranks (each sees its own samples)."""
        return self.dp_replicate * self.dp_shard

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(replicate index, shard index, cp index) of a global rank."""
        dp, c = divmod(rank, self.cp)
        r, s = divmod(dp, self.dp_shard)
        return r, s, c

    def describe(self) -> str:
        return f"dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} x cp {self.cp}"


def local_world_size(world: int) -> int:
    """Processes per node: torchrun's LOCAL_WORLD_SIZE, else every process on one node."""
    try:
        n = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        n = world
    return max(1, min(n, world))


def resolve_mesh(
    world: int, cp: int = 1, dp_replicate: int = 0, dp_shard: int = 0, per_node: int | None = None
) -> MeshShape:
    """The mesh of `world` processes. 0 means auto (module docstring); a given degree is kept and the other derived.
    ValueError naming the config fields when the degrees do not multiply to the world."""
    if cp < 1 or world % cp:
        raise ValueError(f"context_parallel {cp} does not divide the {world} processes")
    if dp_replicate < 0 or dp_shard < 0:
        raise ValueError(f"dp_replicate / dp_shard: expected >= 0 (0: auto), got {dp_replicate} / {dp_shard}")
    dp = world // cp
    node = per_node if per_node is not None else local_world_size(world)
    if dp_shard == 0 and dp_replicate == 0:
        dp_shard = math.gcd(dp, max(node // cp, 1))  # the shard group stays inside a node
        dp_replicate = dp // dp_shard
    elif dp_shard == 0:
        if dp % dp_replicate:
            raise ValueError(f"dp_replicate {dp_replicate} does not divide the {dp} data-parallel ranks "
                             f"({world} processes / context_parallel {cp})")  # fmt: skip
        dp_shard = dp // dp_replicate
    elif dp_replicate == 0:
        if dp % dp_shard:
            raise ValueError(f"dp_shard {dp_shard} does not divide the {dp} data-parallel ranks "
                             f"({world} processes / context_parallel {cp})")  # fmt: skip
        dp_replicate = dp // dp_shard
    shape = MeshShape(dp_replicate, dp_shard, cp)
    if shape.world != world:
        raise ValueError(
            f"dp_replicate {dp_replicate} x dp_shard {dp_shard} x context_parallel {cp} = {shape.world}, but this run "
            f"has {world} processes"
        )
    return shape


def fsdp_mesh(shape: MeshShape, device_type: str):
    """The DeviceMesh FSDP2 shards over: 1-D (dp_shard x cp) without replicas, else 2-D (dp_replicate,
    dp_shard_cp), which makes `fully_shard` HSDP. Collective: every rank calls it."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = shape.dp_shard * shape.cp
    if shape.dp_replicate == 1:
        return init_device_mesh(device_type, (shard,), mesh_dim_names=("dp_shard_cp",))
    return init_device_mesh(device_type, (shape.dp_replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard_cp"))
