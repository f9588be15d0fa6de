#!/usr/bin/env bash
# Install torch + triton into the environment of $1 (a python executable), unless torch is already there:
# the CUDA build when a GPU is present (nvidia-smi lists one), the CPU build otherwise. Run it BEFORE installing
# lavin-fast: pip keeps an installed torch that meets the bounds, so a CPU machine never downloads the ~3 GB of
# CUDA wheels that a plain `pip install torch` resolves to on Linux.
#   TORCH_SPEC       what to install on a GPU machine (default: the tested range of pyproject.toml)
#   TORCH_CPU_INDEX  the index of CPU-only torch wheels (default: PyTorch's CPU index)
set -euo pipefail
PY=${1:?usage: install_torch.sh PYTHON}
pipq() { "$PY" -m pip install -q "$@" 2> >(grep -v "Location '.*' is ignored" >&2); }
if "$PY" -c "import torch" 2>/dev/null; then
  if nvidia-smi -L >/dev/null 2>&1 && "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
    echo "install_torch: a GPU is present but the installed torch is a CPU build; reinstall it with" \
      "'$PY -m pip install --force-reinstall torch' to run the GPU tests" >&2
  fi
  exit 0
fi
if nvidia-smi -L >/dev/null 2>&1; then
  echo "install_torch: GPU found ($(nvidia-smi -L | head -1)): installing the CUDA build of torch"
  # shellcheck disable=SC2086
  pipq ${TORCH_SPEC:-"torch>=2.11,<2.14" "triton>=3.6,<3.7"}
else
  echo "install_torch: no GPU: installing the CPU build of torch"
  # a CPU wheel on a configured index or find-links (this project's CI machines keep one), else PyTorch's CPU index
  pipq "torch==2.13.0+cpu" "triton==3.6.0" 2>/dev/null ||
    pipq --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" "torch>=2.11,<2.14" "triton>=3.6,<3.7"
fi
