"""The GPU suite's failure paths, on CPU, with fake runners: bench/gpu_suite.sh must exit non-zero when a
stage fails or times out (and still run the later stages), bench/run_gpu.py must report a failing or
hung module, write its files as each module finishes, and emit the `kernels --measured` format."""

from __future__ import annotations

import json
import os
import pathlib
import stat
import subprocess
import sys
import textwrap
import time
import types

import pytest

from bench.run_gpu import gpu_tests_problem, measured_document, resolve_kernel_key, run_suite
from lavin_fast.perf.baseline import attach_measured, load_measured

ROOT = pathlib.Path(__file__).resolve().parents[1]
KNOWN = [
    "rms_norm_modulate/_modulate_fwd_kernel/3.4B D=2304 bf16, 16k tokens, 16 rows/program",
    "rms_norm_modulate/_modulate_fwd_kernel/1.0B D=1024 bf16, 16k tokens, 8 rows/program",
    "attention/attn_fwd_tma_kernel/fwd hd72 pre-rotated TMA M128 N64",
    "attention/attn_fwd_tma_kernel/fwd hd72 pre-rotated TMA M128 N64 warp_specialize",
]


def _module(run, weight=1.0, title="fake"):
    return types.SimpleNamespace(run=run, BUDGET_WEIGHT=weight, TITLE=title)


def test_kernel_keys_resolve_exactly_or_by_a_unique_label_fragment():
    assert resolve_kernel_key(KNOWN[2], KNOWN) == KNOWN[2]
    assert resolve_kernel_key("rms_norm_modulate/_modulate_fwd_kernel/D=2304 bf16, 16k tokens", KNOWN) == KNOWN[0]
    assert resolve_kernel_key("attention/attn_fwd_tma_kernel/hd72", KNOWN) is None  # two rows match: ambiguous
    assert resolve_kernel_key("attention/attn_fwd_kernel/hd72", KNOWN) is None  # no such kernel


def test_suite_reports_failing_and_hung_modules_and_keeps_finished_results(tmp_path):
    seen_on_disk: list[list[str]] = []

    def good(budget_s):
        return [
            {"case": "modulate fwd N=16384 D=2304", "impl": "triton", "ms": 0.1, "gbps": 2900.0,
             "kernel_key": "rms_norm_modulate/_modulate_fwd_kernel/D=2304 bf16, 16k tokens"},
            {"case": "fwd hd72", "impl": "ours", "ms": 1.0, "tflops": 410.0, "kernel_key": KNOWN[2]},
            {"case": "no figure", "impl": "ours", "kernel_key": KNOWN[1]},
        ]  # fmt: skip

    def boom(budget_s):
        raise RuntimeError("illegal memory access")

    def hang(budget_s):
        try:  # a module's own `except Exception` must not swallow the time limit
            time.sleep(30)
        except Exception:
            pass
        return [{"case": "never"}]

    def reader(budget_s):  # runs after the others: their results must already be on disk
        doc = json.loads((tmp_path / "run.json").read_text())
        seen_on_disk.append(sorted(doc["benchmarks"]))
        return [{"case": "ok"}]

    mods = {"gpu_a_good": _module(good), "gpu_b_boom": _module(boom), "gpu_c_hang": _module(hang),
            "gpu_d_reader": _module(reader)}  # fmt: skip

    def load(name):
        if name == "gpu_e_typo":
            raise SyntaxError("invalid syntax (gpu_e_typo.py, line 3)")
        return mods[name]

    report = {"gpu": "Fake GPU", "date": "2026-12-07", "gpu_tests": {"tests": 5, "failures": 0, "errors": 0}}
    t0 = time.time()
    rc = run_suite(sorted([*mods, "gpu_e_typo"]), load, report, tmp_path, "run", budget_s=60.0,
                   module_timeout_s=1.0, known_keys=KNOWN, log=lambda s: None)  # fmt: skip
    assert time.time() - t0 < 20  # the hung module was cut at its limit
    assert rc == 1
    doc = json.loads((tmp_path / "run.json").read_text())
    errors = {n: e.get("error", "") for n, e in doc["benchmarks"].items()}
    assert errors["gpu_a_good"] == "" and errors["gpu_d_reader"] == ""
    assert "illegal memory access" in errors["gpu_b_boom"]
    assert "ModuleTimeout" in errors["gpu_c_hang"]
    assert "SyntaxError" in errors["gpu_e_typo"]
    assert doc["status"]["failed_modules"] == ["gpu_b_boom", "gpu_c_hang", "gpu_e_typo"]
    assert seen_on_disk == [["gpu_a_good", "gpu_b_boom", "gpu_c_hang"]]
    md = (tmp_path / "run.md").read_text()
    assert "FAILED: RuntimeError: illegal memory access" in md and "FAILED: ModuleTimeout" in md

    # the measured figures, in the format `lavin-fast kernels --report --measured` reads
    measured = load_measured(tmp_path / "run-measured.json")
    assert measured["kernels"] == {
        KNOWN[0]: {"gbps": 2900.0, "module": "gpu_a_good", "case": "modulate fwd N=16384 D=2304", "impl": "triton"},
        KNOWN[2]: {"tflops": 410.0, "module": "gpu_a_good", "case": "fwd hd72", "impl": "ours"},
    }
    assert [u["kernel_key"] for u in measured["unmatched"]] == [KNOWN[1]]
    op, kernel, label = KNOWN[2].split("/")
    results = [{"op": op, "kernel": kernel, "label": label, "est_tflops": 451.0}]
    assert attach_measured(results, measured) == 1
    assert results[0]["measured_tflops"] == 410.0 and results[0]["measured_error"] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize(
    "summary,bad",
    [
        ({"tests": 12, "failures": 0, "errors": 0, "skipped": 1, "failed": []}, None),
        ({"tests": 12, "failures": 1, "errors": 0, "failed": ["t::a"]}, "1 gpu test(s) failed: t::a"),
        ({"tests": 12, "failures": 0, "errors": 2, "failed": ["t::a", "t::b"]}, "2 gpu test(s) failed"),
        ({"tests": 0, "failures": 0, "errors": 0}, "no gpu test ran"),
        ({"error": "ParseError: no element found"}, "no test report"),
    ],
)
def test_failed_gpu_tests_fail_the_benchmark_stage(tmp_path, summary, bad):
    why = gpu_tests_problem(summary)
    assert (why is None) if bad is None else (bad in why)
    report = {"gpu": "Fake GPU", "date": "d", "gpu_tests": summary}
    rc = run_suite(["gpu_ok"], lambda n: _module(lambda b: [{"case": "x"}]), report, tmp_path, "r", 10.0,
                   known_keys=[], log=lambda s: None)  # fmt: skip
    assert rc == (0 if bad is None else 1)
    if bad:
        assert "GPU TESTS FAILED" in (tmp_path / "r.md").read_text()


def test_measured_document_without_a_static_baseline_keeps_exact_keys():
    report = {"gpu": "g", "benchmarks": {"m": {"rows": [{"kernel_key": "a/b/c", "gbps": 1.5}, {"case": "plain"}]}}}
    assert measured_document(report, [])["kernels"] == {"a/b/c": {"gbps": 1.5, "module": "m", "case": None,
                                                                   "impl": None}}  # fmt: skip


# ------------------------------------------------------------------------------------------------ the shell part

FAKE_PYTHON = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    # a stand-in for python3 in bench/gpu_suite.sh: no GPU, scripted outcomes
    case "$1" in
      -c) echo "torch fake triton fake Fake GPU"; exit 0 ;;
      -) exec "$REAL_PYTHON" "$@" ;;
      -m)
        case "$2" in
          pytest)
            for a in "$@"; do case $a in --junitxml=*) xml=${a#--junitxml=} ;; esac; done
            echo "per-test limit: $LAVIN_FAST_TEST_TIMEOUT" >> "$FAKE_LOG"
            case "${FAKE_PYTEST:-pass}" in
              pass) echo '<testsuite tests="3" failures="0" errors="0" skipped="0"/>' > "$xml"; echo "3 passed"; exit 0 ;;
              fail) echo '<testsuite tests="3" failures="1" errors="0" skipped="0"><testcase classname="t" name="x"><failure/></testcase></testsuite>' > "$xml"
                    echo "1 failed, 2 passed"; exit 1 ;;
              hang) exec sleep 120 ;;
            esac ;;
          bench.run_gpu)
            echo "bench ran: $*" >> "$FAKE_LOG"
            exit "${FAKE_BENCH_RC:-0}" ;;
          pip) exit 0 ;;
        esac ;;
    esac
    echo "fake python: unexpected arguments $*" >&2
    exit 99
    """
)


def _run_suite_sh(tmp_path, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "fake.log"
    log.touch()
    full_env = {**os.environ, "PYTHON": str(fake), "REAL_PYTHON": sys.executable, "FAKE_LOG": str(log),
                "GPU_RESULTS_DIR": str(tmp_path / "results"), **env}  # fmt: skip
    full_env.pop("OUT", None)
    t0 = time.time()
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh")], env=full_env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    return out, log.read_text(), time.time() - t0


def test_suite_script_passes_when_every_stage_passes(tmp_path):
    out, log, _ = _run_suite_sh(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "every stage passed" in out.stderr
    assert "per-test limit: 90" in log and "bench ran" in log and "--module-timeout-s" in log
    assert (tmp_path / "results").is_dir()


def test_suite_script_fails_on_a_failing_test_and_still_runs_the_benchmarks(tmp_path):
    out, log, _ = _run_suite_sh(tmp_path, FAKE_PYTEST="fail")
    assert out.returncode == 1
    assert "FAILED stage: tests (pytest rc 1)" in out.stderr
    assert "1 failed, 2 passed" in out.stdout  # pytest's summary is shown
    assert "bench ran" in log


def test_suite_script_fails_on_a_test_timeout_and_still_runs_the_benchmarks(tmp_path):
    out, log, seconds = _run_suite_sh(tmp_path, FAKE_PYTEST="hang", GPU_TEST_TIMEOUT="2")
    assert out.returncode == 1
    assert "FAILED stage: tests (timed out after 2 s" in out.stderr
    assert "bench ran" in log and seconds < 60


def test_suite_script_fails_when_the_benchmark_stage_fails(tmp_path):
    out, _, _ = _run_suite_sh(tmp_path, FAKE_BENCH_RC="1")
    assert out.returncode == 1 and "FAILED stage: benchmarks" in out.stderr


def test_per_test_timeout_fails_the_hung_test_and_the_run_goes_on(tmp_path):
    """tests/conftest.py's LAVIN_FAST_TEST_TIMEOUT, which the suite sets: the hung test fails, the next one runs,
    and pytest writes its summary."""
    (tmp_path / "test_hang.py").write_text(
        "import time\n\ndef test_hangs():\n    time.sleep(60)\n\ndef test_after():\n    assert True\n"
    )
    env = {**os.environ, "LAVIN_FAST_TEST_TIMEOUT": "1", "PYTHONPATH": str(ROOT / "tests")}
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stdout
    assert "TimeoutError" in out.stdout and "1 failed, 1 passed" in out.stdout
    assert time.time() - t0 < 50


def test_sandwich_norm_benchmark_tags_name_single_static_kernels():
    """The forward rows of bench/gpu_sandwich_norm.py carry kernel_key tags: each must pick one kernel of the
    committed static baseline, or the first GPU run's figures would land in `unmatched`."""
    from bench.gpu_sandwich_norm import WIDTHS
    from bench.run_gpu import static_keys

    known = static_keys()
    assert known
    for op in ("rms_norm_modulate/_modulate_fwd_kernel", "gated_rms_norm_residual/_gated_fwd_kernel"):
        for D in WIDTHS:
            assert resolve_kernel_key(f"{op}/D={D} bf16, 16k tokens", known), (op, D)
