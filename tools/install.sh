#!/usr/bin/env bash
# One-step install of isg and everything it uses, in the order that keeps the
# chosen torch build in place (lpips and cucim declare dependencies that would
# replace torch or pull 1.75 GB of CUDA libraries, so they go in --no-deps).
#   ISG_TORCH="torch==2.14.1 torchvision==0.29.1"  torch pins (override for your CUDA)
#   ISG_CUDA=AUTO|ON|OFF                             build the CUDA kernels
#   ISG_SKIP_DALI=1                                  skip the optional DALI backend
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
TORCH="${ISG_TORCH:-torch==2.14.1 torchvision==0.29.1}"

if ! python3 -c "import torch, torchvision" 2>/dev/null; then
  $PIP install $TORCH
fi
# build backend + the rest of the dependencies, then isg itself (editable)
$PIP install "scikit-build-core>=0.10" "pybind11>=2.12" ninja
$PIP install -e ".[all]"
# backends with heavy or torch-swapping declared dependencies
$PIP install --no-deps "cucim-cu13>=25.10" "lpips==0.1.4" lazy-loader
if [ "${ISG_SKIP_DALI:-0}" != "1" ]; then
  $PIP install nvidia-dali-cuda130 || echo "warning: DALI could not be installed; the DALI tile path stays off" >&2
fi
python3 -m isg info
