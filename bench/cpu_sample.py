"""CPU row of the sampling benchmark: the demo's tiny models (J-DiT "tiny", hidden 128, depth 4; the demo's
tiny ST-VAE), 64 px, 4 context pairs, the 20-point published grid, CFG 1.5, VAE included, float32, eager.

    python -m bench.cpu_sample [--json] [--size 64]

The GPU rows (3.4B at 512 px) are bench/gpu_sample.py; this row shows the pipeline's fixed cost on CPU.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.gpu_sample import build_models, time_predict

TINY_VAE = {"block_out_channels": (16, 32, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    dit, vae = build_models("tiny", TINY_VAE, "cpu", torch.float32, torch.float32, hidden_size=128, depth=4)
    s = time_predict(dit, vae, args.size, repeats=3)
    row = {
        "case": f"tiny J-DiT + tiny VAE, {args.size} px, 4 pairs, 20 points, CFG 1.5",
        "threads": torch.get_num_threads(),
        "s_per_query": round(s, 3),
    }
    print(json.dumps(row) if args.json else f"{row['case']}: {s:.3f} s per query ({row['threads']} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
