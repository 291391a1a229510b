#!/usr/bin/env bash
# One-step install of isg and everything it uses, keeping the chosen torch build in place:
# torch goes first, and nothing installed afterwards may replace it (isg needs only torch>=2.4;
# torchvision is optional, for the HE2RNA baseline; LPIPS is part of isg, and the lpips package, the
# reference it is checked against and `--lpips-impl lpips`, goes in with --no-deps).
#   ISG_TORCH="torch==2.14.1 torchvision==0.29.1"  torch pins (default; CUDA 13 build, runs on CPU too)
#   ISG_TORCH=cpu                                  CPU-only torch (ISG_TORCH_CPU, default torch==2.13.0+cpu,
#                                                  from ISG_TORCH_CPU_INDEX), no torchvision, no cuCIM/DALI,
#                                                  no CUDA kernels (ISG_CUDA=OFF unless set):
#                                                  a 1.7 GB venv instead of 6.8 GB (docs/install.md)
#   ISG_CUDA=AUTO|ON|OFF                           build the CUDA kernels
#   ISG_SKIP_DALI=1                                skip the optional DALI backend
# An existing torch is never replaced: uninstall it first to change builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-python3 -m pip}"
CPU_ONLY=0
if [ "${ISG_TORCH:-}" = "cpu" ]; then
  CPU_ONLY=1
  CPU_INDEX="${ISG_TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}"
  export ISG_CUDA="${ISG_CUDA:-OFF}"  # no CUDA kernels beside a CPU torch (set ISG_CUDA=AUTO to build them anyway)
fi

if python3 -c "import torch" 2>/dev/null; then
  echo "tools/install.sh: keeping torch $(python3 -c 'import torch; print(torch.__version__)')" >&2
elif [ "$CPU_ONLY" = 1 ]; then
  # shellcheck disable=SC2086  # ISG_TORCH_CPU may name several requirements
  $PIP install ${ISG_TORCH_CPU:-torch==2.13.0+cpu} ${CPU_INDEX:+--extra-index-url "$CPU_INDEX"}
else
  # shellcheck disable=SC2086  # ISG_TORCH names several requirements
  $PIP install ${ISG_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
# build backend + the rest of the dependencies, then isg itself (editable)
$PIP install "scikit-build-core>=0.10" "pybind11>=2.12" ninja
command -v cmake >/dev/null || $PIP install "cmake>=3.18"  # the kernel-emulation tests build with it
$PIP install -e ".[all]"
if [ "$CPU_ONLY" = 0 ]; then
  # cuCIM's declared cupy would pull 1.75 GB of CUDA libraries isg does not use
  $PIP install --no-deps "cucim-cu13>=25.10" "lazy-loader>=0.4"
  # the lpips package declares torch/torchvision pins that would swap torch; it needs only what is here
  $PIP install --no-deps "lpips==0.1.4"
  # nvImageCodec: the nvimgcodec backend (tiles decoded on the GPU; its CPU backend runs the equality tests)
  $PIP install --no-deps nvidia-nvimgcodec-cu13 || echo "warning: nvImageCodec could not be installed; the nvimgcodec backend stays off" >&2
  if [ "${ISG_SKIP_DALI:-0}" != "1" ]; then
    $PIP install nvidia-dali-cuda130 || echo "warning: DALI could not be installed; the DALI tile path stays off" >&2
  fi
fi
python3 -m isg info
