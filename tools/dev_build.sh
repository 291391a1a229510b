#!/usr/bin/env bash
# Fast development build of isg._C without reinstalling:
#   tools/dev_build.sh [BUILD_DIR] [KERNELS]    e.g. tools/dev_build.sh build/dev "shannon"
# then run with ISG_EXT_PATH=BUILD_DIR so isg loads that build.
#   ISG_CUDA=AUTO|ON|OFF        CUDA kernels when nvcc is found / required / never
#   ISG_CUDA_ARCHS="90-real"    architectures (default: Turing to Blackwell; bench/gpu_check.sh builds sm_90 only)
#   ISG_CUDA_FLAGS="-Xptxas -v" extra nvcc flags (e.g. the registers and spills of every kernel)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${1:-build/dev}"
KERNELS="${2:-shannon;attention}"
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DISG_KERNELS="$KERNELS" -DISG_CUDA="${ISG_CUDA:-AUTO}" -DISG_CUDA_ARCHS="${ISG_CUDA_ARCHS:-75-real;80-real;90;100-real;120-real}" -DCMAKE_CUDA_FLAGS="${ISG_CUDA_FLAGS:-}" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" >/dev/null
cmake --build "$BUILD" -j "$(nproc)"
echo "built: $(ls "$BUILD"/_C*.so)  -> use ISG_EXT_PATH=$BUILD"
