"""Re-sample a finished `lavin-fast demo` run with other sampling settings and print the demo's gaps.

Usage (after `lavin-fast demo --out RUN`; CPU, float32, eager):
    python bench/demo_sampling_sweep.py RUN [RUN2 ...] [--seeds 0 1] [--threads 1] [--raw] [--samples K]

For each run folder it loads the EMA J-DiT (dit_ema.safetensors) and the VAE the run used (vae.safetensors); with
--raw also the raw (non-EMA) weights of the run's last checkpoint. It then samples the demo's queries (the seen one
and the held-out ones, lavin_fast.cli.demo.sample_queries) for every setting below and sampling seed, and prints
the gaps of the prediction (one sample, or with --samples K the mean of K), i.e. the answer through the VAE minus
the prediction, both vs the answer (lower is better): per task the seen query's gap and the held-out queries' mean.
The demo's own figures are the row "uniform 5 (the demo's grid)" with sampling seed = the run's seed and
--samples 16 (lavin_fast.cli.demo.SAMPLES).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

from lavin_fast.cli.demo import DEFAULT_TASKS, sample_queries
from lavin_fast.flow.pipeline import SamplerOptions
from lavin_fast.flow.timesteps import time_grid
from lavin_fast.models.checkpoints import load_dit_file, load_vae_file


def shifted(grid: torch.Tensor, shift: float) -> torch.Tensor:
    """The time grid with the usual resolution shift (t = 0 noise, 1 data): shift > 1 spends more points near the
    noise end, < 1 near the data end; the noise level s = 1 - t maps to shift * s / (1 + (shift - 1) * s)."""
    s = 1.0 - grid
    return 1.0 - shift * s / (1.0 + (shift - 1.0) * s)


SETTINGS: list[tuple[str, dict]] = [
    ("guidance 1.5, published 20", {}),
    ("uniform 5 (the demo's grid)", {"num_points": 5, "grid": "uniform"}),
    ("guidance 1.0", {"guidance": 1.0}),
    ("guidance 2.0", {"guidance": 2.0}),
    ("guidance 3.0", {"guidance": 3.0}),
    ("published 30", {"num_points": 30}),
    ("published 40", {"num_points": 40}),
    ("uniform 2 (one Euler step: the mean)", {"num_points": 2, "grid": "uniform"}),
    ("uniform 3", {"num_points": 3, "grid": "uniform"}),
    ("uniform 10", {"num_points": 10, "grid": "uniform"}),
    ("uniform 20", {"num_points": 20, "grid": "uniform"}),
    ("uniform 40", {"num_points": 40, "grid": "uniform"}),
    ("uniform 20 shift 3", {"num_points": 20, "grid": ("uniform", 3.0)}),
    ("uniform 20 shift 0.33", {"num_points": 20, "grid": ("uniform", 1 / 3)}),
]


def raw_weights(run: pathlib.Path) -> pathlib.Path:
    """The run's last checkpoint's raw (non-EMA) J-DiT, written next to the EMA file as dit_raw.safetensors."""
    from lavin_fast.models.checkpoints import save_dit
    from lavin_fast.parallel.distributed import unwrap
    from lavin_fast.train.config import load_config
    from lavin_fast.train.trainer import Trainer

    dest = run / "dit_raw.safetensors"
    if not dest.exists():
        cfg = load_config(
            str(run / "run" / "config.yaml"),
            {"resume": True, "cpu_path": "eager", "progress": False, "out_dir": str(run / "run")},
        )
        trainer = Trainer(cfg)
        if trainer.resumed_from is None:
            raise SystemExit(f"{run}: no checkpoint to take the raw weights from")
        save_dit(unwrap(trainer.model), dest)
    return dest


def gaps(records: list[dict]) -> dict[str, float]:
    out = {}
    for task in DEFAULT_TASKS:
        for kind in ("seen", "held-out"):
            g = [r["gap_db"] for r in records if r["task"] == task and r["query"] == kind]
            out[f"{task}/{kind}"] = statistics.mean(g)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=pathlib.Path)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--raw", action="store_true", help="also the raw weights of the last checkpoint")
    p.add_argument("--only", nargs="*", default=None, help="setting names (prefixes) to run")
    p.add_argument(
        "--samples",
        type=int,
        default=1,
        help="the prediction: the mean of this many decoded samples "
        "(sampling seeds seed * samples + i, as the demo's --samples)",
    )
    p.add_argument("--json", type=pathlib.Path, default=None, help="write every result here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    for run in a.runs:
        vae = load_vae_file(run / "vae.safetensors").eval()
        weights = [("ema", run / "dit_ema.safetensors")] + ([("raw", raw_weights(run))] if a.raw else [])
        train = sorted(p for p in (run / "images" / "train").glob("*.png") if "_crop" not in p.stem)
        held = sorted((run / "images" / "held_out").glob("*.png"))
        for wname, wpath in weights:
            dit = load_dit_file(wpath).eval()
            for name, kw in SETTINGS:
                if a.only and not any(name.startswith(o) for o in a.only):
                    continue
                for seed in a.seeds:
                    kw2 = dict(kw)
                    grid = kw2.pop("grid", "published")
                    n = kw2.get("num_points", 20)
                    if isinstance(grid, tuple):
                        grid = shifted(time_grid(n, grid[0]), grid[1])
                    opts = SamplerOptions(grid=grid, seed=seed, batch=4, **kw2)
                    t0 = time.time()
                    _, _, _, records = sample_queries(
                        dit, vae, list(DEFAULT_TASKS), train, held, opts, seed, samples=a.samples
                    )
                    g = gaps(records)
                    results.append(
                        {"run": str(run), "weights": wname, "setting": name, "seed": seed, **g, "queries": records}
                    )
                    print(
                        f"{run.name:<14} {wname} {name:<38} seed {seed}: "
                        + "  ".join(f"{k} {v:5.2f}" for k, v in g.items())
                        + f"  ({time.time() - t0:.1f} s)",
                        flush=True,
                    )
    if a.json:
        a.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
