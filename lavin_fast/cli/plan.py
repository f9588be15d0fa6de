"""Plan a J-DiT training run before booking GPUs: the mesh, memory per GPU by part and activation checkpointing
policy, step time from the FLOPs and the static sm_90 kernel estimates, communication per mesh dimension, MFU.

Every figure is an estimate from a model (lavin_fast/train/plan.py states it), not a measurement.
Example: `lavin-fast plan 3.4B --gpus 64 --gpu h100 --resolution 512`.
"""

from __future__ import annotations

import argparse
import json

from lavin_fast.bounds import BOUNDS


def configure(p: argparse.ArgumentParser) -> None:
    from lavin_fast.perf.gpus import GPUS
    from lavin_fast.train.config import AC_POLICIES as POLICIES

    p.add_argument("model", help="J-DiT size: 0.1B, 1.0B or 3.4B (or a tiny test size)")
    p.add_argument("--gpus", type=BOUNDS["gpus"], default=8, help="number of GPUs (default 8)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="GPU kind (default h100)")
    p.add_argument("--gpus-per-node", type=BOUNDS["gpus_per_node"], default=8)
    p.add_argument("--batch", type=BOUNDS["global_batch"], default=256, help="global batch (sequences)")
    p.add_argument("--micro-batch", type=BOUNDS["micro_batch"], default=0,
                   help="sequences per GPU per forward/backward; 0 (default): the largest that fits")  # fmt: skip
    p.add_argument("--resolution", type=BOUNDS["resolution"], default=512, help="pixels (square)")
    p.add_argument("--frames", type=BOUNDS["latent_frames"], default=1, help="latent frames per item (1: images)")
    p.add_argument("--num-pairs", type=BOUNDS["num_pairs"], default=4, help="in-context example pairs")
    p.add_argument("--cp", type=BOUNDS["cp_degree"], default=1, help="context-parallel degree")
    p.add_argument("--ac", choices=("auto", *POLICIES), default="auto",
                   help="activation checkpointing policy; auto: the cheapest that fits")  # fmt: skip
    p.add_argument("--ac-every", type=BOUNDS["ac_every"], default=2)
    p.add_argument("--dp-replicate", type=BOUNDS["dp_degree"], default=0, help="0: auto")
    p.add_argument("--dp-shard", type=BOUNDS["dp_degree"], default=0, help="0: auto")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from lavin_fast.models.dit_configs import DIT_CONFIGS
    from lavin_fast.train.plan import PlanInput, as_dict, format_plan, plan

    if args.model not in DIT_CONFIGS:
        print(f"error: model: expected one of {sorted(DIT_CONFIGS)}, got {args.model!r}")
        return 2
    inp = PlanInput(
        model=args.model, gpus=args.gpus, gpu=args.gpu, gpus_per_node=args.gpus_per_node, batch=args.batch,
        micro_batch=args.micro_batch, resolution=args.resolution, frames=args.frames, num_pairs=args.num_pairs,
        cp=args.cp, ac=args.ac, ac_every=args.ac_every, dp_replicate=args.dp_replicate, dp_shard=args.dp_shard,
    )  # fmt: skip
    try:
        result = plan(inp)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(as_dict(result), indent=1) if args.json else format_plan(result))
    return 0
