#!/usr/bin/env bash
# Create .venv with everything the README's commands need (idempotent): torch (the CUDA build when a GPU is
# present, the CPU build otherwise: scripts/install_torch.sh), then lavin-fast in editable mode with the
# extras [dev] (tests, linters, demo, data, bench) and the DALI wheel matching the driver's CUDA major.
# The [eval] extra is installed without its dependencies (lpips and pytorch-fid need torchvision, whose wheel would
# pull its own torch build over the one above); the tests that prove our LPIPS/FID equal theirs use them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pipq() { .venv/bin/python -m pip install -q "$@" 2> >(grep -v "Location '.*' is ignored" >&2); }
bash scripts/install_torch.sh .venv/bin/python

dali=dali-cu13
if cuda_major=$(nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9]*" | grep -o "[0-9]*$") && [ "$cuda_major" = 12 ]; then
  dali=dali-cu12
fi
# Reinstall only when what the install builds from has changed (the CUDA library compiles in ~10 s per arch set);
# the editable install maps lavin_fast/ to this checkout, so Python files added or edited need no reinstall.
stamp=.venv/.lavin_fast_install
want="$(cat pyproject.toml setup.py CMakeLists.txt csrc/* | sha256sum | cut -c1-16) $dali"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c "import lavin_fast" 2>/dev/null; then
  pipq -e ".[dev,$dali]"
  pipq --no-deps "lpips==0.1.4" "pytorch-fid==0.3.0" "torchvision==0.28.0"
  echo "$want" > "$stamp"
fi
.venv/bin/python -c "import lavin_fast, torch, triton; print('lavin-fast', lavin_fast.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
# The CUDA and CPU builds' outcomes (built / skipped and why), as the install left them:
.venv/bin/python -m lavin_fast.cli info | sed -n '/^cuda library:/,/^dali:/p' | grep -v '^dali:'
