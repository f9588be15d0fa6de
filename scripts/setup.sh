#!/usr/bin/env bash
# Create .venv with everything lavin-fast needs (idempotent). torch 2.13.0 is the CPU build on
# this kind of machine's disk; on a GPU cluster install your CUDA torch first and skip this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q "torch==2.13.0" "triton==3.6.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import lavin_fast, torch, triton; print('lavin-fast', lavin_fast.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
