"""Runs every GPU benchmark module (bench/gpu_*.py) and writes bench/results/<date>-<gpu>.{json,md}.

Contract for a benchmark module bench/gpu_<name>.py:
    TITLE = "..."                          # a heading for its table
    BUDGET_WEIGHT = 1.0                     # optional: its share of the total budget, relative to others
    def run(budget_s: float) -> list[dict]  # rows; keep within budget_s seconds
Each row is a flat dict of JSON-able values; common keys: case, impl, ms, tflops, gbps, peak_mib,
speedup (vs the row's baseline, measured in the same run), note. A module that raises is
reported as failed and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import pathlib
import platform
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="module names (without gpu_) to run")
    ap.add_argument("--budget-s", type=float, default=300.0, help="total seconds for all benchmarks")
    ap.add_argument("--tests", default=None, help="JSON summary of the gpu-marked pytest run to include")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks need one", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    names = sorted(p.stem for p in HERE.glob("gpu_*.py"))
    if args.only:
        names = [n for n in names if n.removeprefix("gpu_") in args.only]
    modules, failed_imports = {}, {}
    for name in names:
        try:
            modules[name] = importlib.import_module(f"bench.{name}")
        except Exception as exc:
            failed_imports[name] = f"{type(exc).__name__}: {exc}"
    weights = {n: float(getattr(m, "BUDGET_WEIGHT", 1.0)) for n, m in modules.items()}
    t_suite = time.time()
    report = {
        "date": datetime.date.today().isoformat(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "benchmarks": {},
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        pass
    if args.tests and pathlib.Path(args.tests).exists():
        report["gpu_tests"] = json.loads(pathlib.Path(args.tests).read_text())
    md = [f"# GPU suite: {gpu}, {report['date']}", ""]
    for name in names:
        t0 = time.time()
        entry = {"title": name}
        try:
            if name in failed_imports:
                raise ImportError(failed_imports[name])
            mod = modules[name]
            entry["title"] = getattr(mod, "TITLE", name)
            # what is left of the total, shared by weight among the modules still to run
            left = max(args.budget_s - (time.time() - t_suite), 5.0)
            todo = [n for n in names[names.index(name) :] if n in weights]
            entry["budget_s"] = round(left * weights[name] / sum(weights[n] for n in todo), 1)
            entry["rows"] = mod.run(entry["budget_s"])
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        entry["seconds"] = round(time.time() - t0, 1)
        report["benchmarks"][name] = entry
        md += [f"## {entry['title']} ({entry['seconds']} s)", ""]
        md += [f"FAILED: {entry['error']}" if "error" in entry else markdown_table(entry["rows"]), ""]
        print(f"[{name}] done in {entry['seconds']} s", file=sys.stderr, flush=True)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    stem = f"{report['date']}-{gpu.replace(' ', '_').replace('/', '_')}"
    (out_dir / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
