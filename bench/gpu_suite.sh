#!/usr/bin/env bash
# The one-shot GPU suite: device correctness of every kernel (bf16 included) and the kernel /
# model benchmarks, in under 8 minutes on an H200. Writes bench/results/<date>-<gpu>.{json,md}
# (and copies them to $OUT when run through the device tool), prints the table last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 LAVIN_FAST_GPU_TESTS=1
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
# the package from this checkout, without touching the image's torch/triton
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" || exit 1
mkdir -p bench/results
# 1. device correctness (gpu-marked tests), with a JSON summary for the report
timeout ${GPU_TEST_TIMEOUT:-200} $PY -m pytest -m gpu -q -p no:cacheprovider --junitxml=/tmp/gpu_tests.xml tests 2>&1 | tail -25
$PY - <<'PYEOF'
import json, xml.etree.ElementTree as ET
try:
    r = ET.parse("/tmp/gpu_tests.xml").getroot()
    s = r if r.tag == "testsuite" else r.find("testsuite")
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    json.dump({k: int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"failed": failed}, open("/tmp/gpu_tests.json", "w"))
except Exception as e:
    json.dump({"error": str(e)}, open("/tmp/gpu_tests.json", "w"))
PYEOF
# 2. benchmarks, within the remaining budget
timeout ${GPU_BENCH_TIMEOUT:-330} $PY -m bench.run_gpu --budget-s ${GPU_BENCH_BUDGET:-270} --tests /tmp/gpu_tests.json
rc=$?
if [ -n "${OUT:-}" ]; then cp bench/results/*.json bench/results/*.md "$OUT"/ 2>/dev/null; fi
exit $rc
