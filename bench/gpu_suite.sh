#!/usr/bin/env bash
# The one-shot GPU suite: device correctness of every kernel (bf16 included) and the kernel /
# model benchmarks, in under 8 minutes on an H200. Writes bench/results/<date>-<gpu>.{json,md} and
# <date>-<gpu>-measured.json (the figures `lavin-fast kernels --report --measured FILE` reads), copies
# them to $OUT when run through the device tool, prints the table last.
#
# Fails loudly: every stage's exit status is kept, the suite goes on to the next stage after a failure
# (a red test must not hide the benchmarks) and exits non-zero if any stage failed, naming it.
#   GPU_TEST_TIMEOUT      seconds for the whole pytest stage (default 200; SIGINT first, so pytest
#                         still writes its summary and junit XML)
#   GPU_PER_TEST_TIMEOUT  seconds per test (default 90; tests/conftest.py fails the test that runs past it)
#   GPU_BENCH_TIMEOUT / GPU_BENCH_BUDGET / GPU_MODULE_TIMEOUT   the benchmark stage, its budget, per module
#   DALI_WHEEL            a carried nvidia-dali wheel to install first (no network on the device machine)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 LAVIN_FAST_GPU_TESTS=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
RESULTS=${GPU_RESULTS_DIR:-bench/results}
WORK=$(mktemp -d)
# the package from this checkout, without touching the image's torch/triton
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

# 0. environment
if ! $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"; then
    echo "FAILED stage env: torch/triton/CUDA not usable" >&2
    exit 1
fi
mkdir -p "$RESULTS"
if [ -n "${DALI_WHEEL:-}" ]; then
    # the DALI-marked tests skip, saying why, when DALI is absent; a carried wheel makes them run
    $PY -m pip install --no-index --no-deps -q "$DALI_WHEEL" || failed+=("dali-install")
fi
$PY -c "import nvidia.dali" 2>/dev/null || echo "note: nvidia.dali is not installed: the DALI GPU tests will skip (set DALI_WHEEL to a carried wheel)" >&2

# 1. device correctness (gpu-marked tests), each test under its own limit, with a JSON summary for the report
export LAVIN_FAST_TEST_TIMEOUT=${GPU_PER_TEST_TIMEOUT:-90}
timeout -s INT -k 30 "${GPU_TEST_TIMEOUT:-200}" $PY -m pytest -m gpu -q -p no:cacheprovider \
    --junitxml="$WORK/gpu_tests.xml" tests >"$WORK/gpu_tests.log" 2>&1
rc_tests=$?
tail -40 "$WORK/gpu_tests.log"
case $rc_tests in
    0) ;;
    124|130|137) failed+=("tests (timed out after ${GPU_TEST_TIMEOUT:-200} s, rc $rc_tests)") ;;
    *) failed+=("tests (pytest rc $rc_tests)") ;;
esac
$PY - "$WORK/gpu_tests.xml" "$WORK/gpu_tests.json" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
src, dst = sys.argv[1], sys.argv[2]
try:
    r = ET.parse(src).getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    json.dump({k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed}, open(dst, "w"))
except Exception as e:
    json.dump({"error": f"{type(e).__name__}: {e}"}, open(dst, "w"))
PYEOF
[ $? -eq 0 ] || failed+=("test summary")

# 2. benchmarks, within the remaining budget; results written as each module finishes
timeout -s INT -k 30 "${GPU_BENCH_TIMEOUT:-330}" $PY -m bench.run_gpu --budget-s "${GPU_BENCH_BUDGET:-270}" \
    --module-timeout-s "${GPU_MODULE_TIMEOUT:-150}" --tests "$WORK/gpu_tests.json" --out-dir "$RESULTS"
rc_bench=$?
case $rc_bench in
    0) ;;
    1) failed+=("benchmarks (a module or the gpu tests failed: see the report)") ;;
    124|130|137) failed+=("benchmarks (timed out after ${GPU_BENCH_TIMEOUT:-330} s; finished modules are in $RESULTS)") ;;
    *) failed+=("benchmarks (rc $rc_bench)") ;;
esac

if [ -n "${OUT:-}" ]; then cp "$RESULTS"/*.json "$RESULTS"/*.md "$WORK/gpu_tests.log" "$OUT"/ 2>/dev/null; fi
if [ ${#failed[@]} -gt 0 ]; then
    for f in "${failed[@]}"; do echo "FAILED stage: $f" >&2; done
    exit 1
fi
echo "GPU suite: every stage passed" >&2
exit 0
