"""Runs every GPU benchmark module (bench/gpu_*.py) and writes bench/results/<date>-<gpu>.{json,md}
and <date>-<gpu>-measured.json.

Contract for a benchmark module bench/gpu_<name>.py:
    TITLE = "..."                          # a heading for its table
    BUDGET_WEIGHT = 1.0                     # optional: its share of the total budget, relative to others
    def run(budget_s: float) -> list[dict]  # rows; keep within budget_s seconds
Each row is a flat dict of JSON-able values; common keys: case, impl, ms, tflops, gbps, peak_mib,
speedup (vs the row's baseline, measured in the same run), note. A row that times exactly one kernel
of the static report (`lavin-fast kernels --report`) in the same configuration may name it with
`kernel_key`: "op/kernel/label", or "op/kernel/" + a fragment of the label that picks one row of the
committed static baseline; its tflops or gbps then goes into the -measured.json file, in the format
that `lavin-fast kernels --report --measured FILE` reads, so the first GPU run puts measured figures
beside the static estimates.

Failure is loud: a module that fails to import, raises, or runs past --module-timeout-s is reported as
failed, the others still run, and the exit status is 1 (also when the gpu-marked tests given by
--tests failed, errored or never reported). The files are rewritten after every module, so a run killed
from outside keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pathlib
import platform
import sys
import time
import traceback
from collections.abc import Callable

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


class ModuleTimeout(BaseException):
    """A benchmark module ran past its time limit (a BaseException, so the modules' own `except Exception`
    around one implementation cannot swallow it)."""


def time_limit(seconds: float | None, name: str):
    """ModuleTimeout in the main thread after `seconds` (lavin_fast.testing.time_limit)."""
    from lavin_fast.testing import time_limit as limit

    return limit(seconds, lambda: ModuleTimeout(f"{name} ran past its limit of {seconds:g} s"))


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def static_keys() -> list[str]:
    """The kernel keys of the committed static baseline ([] when it cannot be read)."""
    try:
        from lavin_fast.perf.baseline import DEFAULT_BASELINE, load_baseline

        return sorted(load_baseline(DEFAULT_BASELINE)["kernels"])
    except Exception:
        return []


def resolve_kernel_key(key: str, known: list[str]) -> str | None:
    """`key` itself if it is a known kernel key; else the one known key with the same op/kernel whose
    label contains key's label part; else None (unknown or ambiguous)."""
    if key in known:
        return key
    op_kernel, _, fragment = key.rpartition("/")
    hits = [k for k in known if k.startswith(op_kernel + "/") and fragment in k[len(op_kernel) + 1 :]]
    return hits[0] if len(hits) == 1 else None


def measured_document(report: dict, known: list[str]) -> dict:
    """The run's kernel figures in the --measured format: {"gpu", "kernels": {key: {"tflops"|"gbps": x}}}."""
    doc: dict = {"gpu": report.get("gpu"), "date": report.get("date"), "kernels": {}, "unmatched": []}
    for name, entry in report["benchmarks"].items():
        for row in entry.get("rows") or []:
            key = row.get("kernel_key")
            if not key:
                continue
            figures = {u: float(row[u]) for u in ("tflops", "gbps") if isinstance(row.get(u), (int, float))}
            resolved = resolve_kernel_key(key, known) if known else key
            if not figures or resolved is None:
                doc["unmatched"].append({"module": name, "kernel_key": key, "why": "no figure" if not figures else
                                         "no single static-report kernel matches"})  # fmt: skip
                continue
            doc["kernels"][resolved] = {**figures, "module": name, "case": row.get("case"), "impl": row.get("impl")}
    return doc


def gpu_tests_problem(summary: dict | None) -> str | None:
    """Why the gpu-marked test run counts as failed, or None if it passed."""
    if summary is None:
        return None
    if "error" in summary:
        return f"no test report: {summary['error']}"
    bad = int(summary.get("failures", 0)) + int(summary.get("errors", 0))
    if bad:
        return f"{bad} gpu test(s) failed: {', '.join(summary.get('failed', [])[:10])}"
    if int(summary.get("tests", 0)) == 0:
        return "no gpu test ran"
    return None


def run_suite(
    names: list[str],
    load: Callable[[str], object],
    report: dict,
    out_dir: pathlib.Path,
    stem: str,
    budget_s: float,
    module_timeout_s: float | None = None,
    known_keys: list[str] | None = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> int:
    """Run the modules `names` (loaded by `load`), rewriting <stem>.json, .md and -measured.json in out_dir
    after each one; returns the exit status (0 all ran and the tests passed, 1 otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    known = static_keys() if known_keys is None else known_keys
    modules, failed_imports = {}, {}
    for name in names:
        try:
            modules[name] = load(name)
        except Exception as exc:
            failed_imports[name] = f"{type(exc).__name__}: {exc}"
    weights = {n: float(getattr(m, "BUDGET_WEIGHT", 1.0)) for n, m in modules.items()}
    report.setdefault("benchmarks", {})
    md_head = [f"# GPU suite: {report.get('gpu')}, {report.get('date')}", ""]
    why_tests = gpu_tests_problem(report.get("gpu_tests"))
    if why_tests:
        md_head += [f"**GPU TESTS FAILED**: {why_tests}", ""]
    md = list(md_head)
    t_suite = time.time()

    def flush() -> None:
        failed = [n for n, e in report["benchmarks"].items() if "error" in e]
        report["status"] = {"failed_modules": failed, "tests": why_tests or "passed",
                            "finished": len(report["benchmarks"]), "of": len(names)}  # fmt: skip
        _write_atomic(out_dir / f"{stem}.json", json.dumps(report, indent=1))
        _write_atomic(out_dir / f"{stem}.md", "\n".join(md))
        _write_atomic(out_dir / f"{stem}-measured.json", json.dumps(measured_document(report, known), indent=1))

    for name in names:
        t0 = time.time()
        entry: dict = {"title": name}
        try:
            if name in failed_imports:
                raise ImportError(failed_imports[name])
            mod = modules[name]
            entry["title"] = getattr(mod, "TITLE", name)
            # what is left of the total, shared by weight among the modules still to run
            left = max(budget_s - (time.time() - t_suite), 5.0)
            todo = [n for n in names[names.index(name) :] if n in weights]
            entry["budget_s"] = round(left * weights[name] / sum(weights[n] for n in todo), 1)
            with time_limit(module_timeout_s, name):
                entry["rows"] = mod.run(entry["budget_s"])
        except (Exception, ModuleTimeout) as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
        entry["seconds"] = round(time.time() - t0, 1)
        report["benchmarks"][name] = entry
        md += [f"## {entry['title']} ({entry['seconds']} s)", ""]
        md += [f"FAILED: {entry['error']}" if "error" in entry else markdown_table(entry["rows"]), ""]
        flush()
        log(f"[{name}] {'FAILED' if 'error' in entry else 'done'} in {entry['seconds']} s")
    if not names:
        flush()
    failed = report["status"]["failed_modules"]
    if failed:
        log(f"FAILED benchmark modules: {', '.join(failed)}")
    if why_tests:
        log(f"FAILED gpu tests: {why_tests}")
    return 1 if failed or why_tests else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="module names (without gpu_) to run")
    ap.add_argument("--budget-s", type=float, default=300.0, help="total seconds for all benchmarks")
    ap.add_argument("--module-timeout-s", type=float, default=None, help="hard limit per module (default: none)")
    ap.add_argument("--tests", default=None, help="JSON summary of the gpu-marked pytest run to include")
    ap.add_argument("--out-dir", default=str(HERE / "results"), help="where the result files go")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmarks need one", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0)
    names = sorted(p.stem for p in HERE.glob("gpu_*.py"))
    if args.only:
        names = [n for n in names if n.removeprefix("gpu_") in args.only]
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
    if args.tests:
        p = pathlib.Path(args.tests)
        report["gpu_tests"] = json.loads(p.read_text()) if p.exists() else {"error": f"{p} was not written"}
    stem = f"{report['date']}-{gpu.replace(' ', '_').replace('/', '_')}"
    out_dir = pathlib.Path(args.out_dir)
    rc = run_suite(
        names,
        lambda n: importlib.import_module(f"bench.{n}"),
        report,
        out_dir,
        stem,
        args.budget_s,
        args.module_timeout_s,
    )
    print((out_dir / f"{stem}.md").read_text())
    return rc


if __name__ == "__main__":
    sys.exit(main())
