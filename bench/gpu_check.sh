#!/usr/bin/env bash
# The first minutes on a GPU: a bare, offline GPU runner (python3 with a CUDA torch, nvcc, cmake, ninja, pybind11,
# pytest, pytest-benchmark, h5py, tifffile, scikit-image, opencv, pandas, rich, tqdm; no imagecodecs, dask, cuCIM,
# OpenSlide or DALI) builds isg._C and checks and times its CUDA kernels in <= 6 minutes.
#   bash bench/gpu_check.sh              # on the GPU machine; results in $OUT (else build/gpu_check_results)
#   bash bench/gpu_check.sh --rehearse   # on a CPU machine (CI): a clean venv with exactly the runner's packages
#                                        # (CPU torch), every step that needs no device, and an import guard that
#                                        # fails a step which imports anything else
#   bash bench/gpu_check.sh --plan       # prints the steps and their time limits (tests/test_gpu_check.py)
# Steps, in order (each under `timeout -k`; the limits shrink to what is left of ISG_GPU_CHECK_BUDGET seconds):
#   build        tools/dev_build.sh for sm_90 only                          stop here if it fails
#   cuda         isg's CUDA kernels usable (driver, device, CUDA build)     stop here if it fails (GPU run)
#   word-path    Shannon word path GPU vs CPU: 256 px RGB, RGBA view, grey, width 255, misaligned origins, grids
#   op-tests     pytest -m gpu on the op tests
#   shannon      Shannon GPU bench: GB/s and % of the measured copy bandwidth (asserts >= 50 %)
#   attention    attention bench at the paper's shape, one torch.compile object per shape and dtype
#   memcheck     compute-sanitizer memcheck of both kernel families        allowed to fail (message kept)
#   racecheck    compute-sanitizer racecheck of the histogram kernel       allowed to fail
#   ncu          Nsight Compute on the histogram kernel                    allowed to fail
#   io-device    pytest -m gpu tests/test_io*.py, only where nvidia.nvimgcodec imports (carried wheel; docs/cuda.md)
# Output: $OUT/gpu_check.tar.gz (every log, the benchmark JSON, ptxas report) + $OUT/summary.txt + $OUT/summary.json.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
MODE=gpu
case "${1:-}" in
  --rehearse) MODE=rehearse ;;
  --plan) MODE=plan ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--rehearse|--plan]" >&2; exit 2 ;;
esac

# name|limit seconds|kind (required: stop after a failure; allowed: may fail; normal)
PLAN=(
  "build|100|required" "cuda|30|required" "word-path|40|normal" "op-tests|60|normal" "shannon|30|normal"
  "attention|85|normal" "memcheck|40|allowed" "racecheck|40|allowed" "ncu|40|allowed" "io-device|30|normal"
)
# Expected on the H200 (16 cores): build ~40 s (attention_cuda.cu is the longest file, ~15 s of nvcc for sm_90),
# cuda ~10, word-path ~15, op-tests ~40, shannon ~20, attention ~80 (8 torch.compile objects), the tools ~30 each:
# the first six steps' limits sum to the budget, the tools run on what those leave.
BUDGET="${ISG_GPU_CHECK_BUDGET:-345}"     # seconds for all steps on the GPU machine (6 minutes, with a margin)
if [ "$MODE" = plan ]; then
  printf '%s\n' "${PLAN[@]}"
  echo "budget|$BUDGET|total"
  exit 0
fi
limit_of() { local entry; for entry in "${PLAN[@]}"; do [ "${entry%%|*}" = "$1" ] && { entry="${entry#*|}"; echo "${entry%%|*}"; return; }; done; }
kind_of() { local entry; for entry in "${PLAN[@]}"; do [ "${entry%%|*}" = "$1" ] && { echo "${entry##*|}"; return; }; done; }

OUT_DIR="${OUT:-$ROOT/build/gpu_check_results}"
mkdir -p "$OUT_DIR"
WORK="$(mktemp -d)"
LOGS="$WORK/gpu_check"
mkdir -p "$LOGS/results"
trap 'rm -rf "$WORK"' EXIT
trap 'exit 143' INT TERM     # the EXIT trap removes the work folder then too
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" ISG_REQUIRE_EXT=1 ISG_BENCH_OUT="$LOGS/results" PYTHONUNBUFFERED=1
BUILD="$ROOT/build/gpu_check"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" ISG_EXT_PATH="$BUILD"   # carried wheels (PYTHONPATH) stay visible
start=$SECONDS
SLACK=1
declare -a NAMES=() STATUS=() TAKEN=()
STOPPED=""

note() { echo "== [$((SECONDS - start)) s] $*"; }

# step NAME COMMAND...: runs under timeout -k within what is left of the budget; records ok / failed / skipped.
step() {
  local name="$1"; shift
  local kind limit left code status log="$LOGS/$(printf '%02d' "${#NAMES[@]}")-$name.log"
  kind="$(kind_of "$name")"; limit="$(($(limit_of "$name") * SLACK))"
  left=$((BUDGET - (SECONDS - start)))
  NAMES+=("$name")
  if [ -n "$STOPPED" ]; then
    STATUS+=("skipped: stopped after $STOPPED failed"); TAKEN+=(0); note "$name: skipped (stopped after $STOPPED)"; return
  fi
  if [ "$left" -lt 5 ]; then
    STATUS+=("skipped: no time left of the ${BUDGET} s budget"); TAKEN+=(0); note "$name: skipped (budget spent)"; return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  note "$name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  code=$?
  tail -n 25 "$log"
  case $code in
    0) status=ok ;;
    124|137) status="failed: time limit ${limit} s" ;;
    *) status="failed: exit $code" ;;
  esac
  if [ "$code" != 0 ]; then
    if [ "$kind" = allowed ]; then
      status="$status (allowed: $(grep -m1 -iE 'error|not supported|fail|refused|denied' "$log" | cut -c1-160))"
    elif [ "$kind" = required ]; then
      STOPPED="$name"
    fi
  fi
  STATUS+=("$status"); TAKEN+=($((SECONDS - t0)))
  note "$name: $status in $((SECONDS - t0)) s"
}

skip() {  # skip NAME REASON
  NAMES+=("$1"); STATUS+=("skipped: $2"); TAKEN+=(0); note "$1: skipped ($2)"
}

# ------------------------------------------------------------------------------------------ rehearsal venv
# The runner's packages, CPU torch 2.13.0; nothing else. The guard (sitecustomize on PYTHONPATH) fails any Python
# process of a step that loaded a module from an installed package outside these import names (the runner's list
# and their dependencies that the runner has too).
RUNNER_PACKAGES=(torch==2.13.0 cmake ninja pybind11 scikit-build-core pytest pytest-benchmark h5py tifffile scikit-image
                 opencv-python-headless pandas rich tqdm)
ALLOWED="torch torchgen functorch numpy scipy cv2 h5py tifffile skimage pandas rich tqdm pytest _pytest py pluggy iniconfig
packaging pytest_benchmark cpuinfo pybind11 cmake ninja scikit_build_core PIL networkx imageio lazy_loader dateutil pytz
tzdata six markdown_it mdurl pygments typing_extensions sympy mpmath filelock fsspec jinja2 markupsafe yaml triton
nvidia _distutils_hack setuptools pkg_resources"
PY=python3
if [ "$MODE" = rehearse ]; then
  VENV="$WORK/venv"
  note "rehearsal venv: ${RUNNER_PACKAGES[*]}"
  t0=$SECONDS
  if ! { python3 -m venv "$VENV" && "$VENV/bin/python" -m pip install -q --no-compile --disable-pip-version-check \
           "${RUNNER_PACKAGES[@]}"; } > "$LOGS/00-venv.log" 2>&1; then
    tail -n 30 "$LOGS/00-venv.log"; echo "gpu_check --rehearse: could not build the venv" >&2; exit 1
  fi
  note "venv ready in $((SECONDS - t0)) s (not counted in the budget)"
  start=$SECONDS
  SLACK=3                  # 2 shared CPU cores build and import several times slower than the runner's 16
  BUDGET=$((BUDGET * SLACK))
  export PATH="$VENV/bin:$PATH"
  mkdir -p "$WORK/guard"
  cat > "$WORK/guard/sitecustomize.py" <<EOF
# Import guard of bench/gpu_check.sh --rehearse: a module loaded from a package the GPU runner may lack fails the
# process at exit. Judged by file: site-packages/<top>/... (or <top>.py, <top>.*.so) must name an allowed package.
import atexit, os, sys
_allowed = set("""$ALLOWED""".split())
_site = os.sep + "site-packages" + os.sep
def _check():
    foreign = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or _site not in path or not os.path.isfile(path):
            continue  # built in, the standard library, the repo (tests, bench, isg), synthetic modules
        top = path.split(_site, 1)[1].split(os.sep)[0].split(".")[0]
        if top not in _allowed:
            foreign.add(f"{top} ({path})")
    if foreign:
        sys.stderr.write("gpu_check import guard: imported outside the GPU runner's packages: " + ", ".join(sorted(foreign)) + "\n")
        sys.stderr.flush()
        os._exit(86)
atexit.register(_check)
EOF
  export PYTHONPATH="$WORK/guard:$ROOT"
  export ISG_CUDA=AUTO   # nvcc, where the machine has it, compiles the sm_90 kernels (nothing runs them)
else
  export ISG_CUDA=ON
fi

# ------------------------------------------------------------------------------------------ steps
rm -rf "$BUILD"   # a clean build (a folder left by another machine or venv names other compilers)
step build env ISG_CUDA_ARCHS=90-real ISG_CUDA_FLAGS="-Xptxas -v" bash tools/dev_build.sh "$BUILD"

CUDA_CHECK='
from isg import _ext
import sys
ok, why = _ext.cuda_status()
print("isg CUDA kernels usable:", ok, "-", why)
if ok:  # and a launch: kernels built for this architecture, histograms equal to the CPU kernel
    import torch
    from isg.ops import shannon
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
          f"torch {torch.__version__}")
    x = torch.randint(0, 256, (4, 64, 64, 3), dtype=torch.uint8)
    ok = torch.equal(shannon.shannon_histogram(x.cuda()).cpu(), shannon.shannon_histogram(x))
    print("a histogram launch on the device equals the CPU kernel:", ok)
elif sys.argv[1:] == ["--rehearse"]:
    print("(no device: the expected answer in the rehearsal)")
    sys.exit(0)
sys.exit(0 if ok else 1)'
step cuda "$PY" -c "$CUDA_CHECK" $([ "$MODE" = rehearse ] && echo --rehearse)

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
step word-path "${PYTEST[@]}" -m gpu tests/test_shannon.py -k word_path
step op-tests "${PYTEST[@]}" -m gpu tests/test_shannon.py tests/test_attention_ops.py
# (the rehearsal adds the CPU model test: it builds the same tiles, from files that must be on the runner)
step shannon "${PYTEST[@]}" -s --benchmark-enable -k "gpu_throughput$([ "$MODE" = rehearse ] && echo ' or conflicts')" \
  bench/bench_shannon.py
step attention env ISG_BENCH_QUICK=1 "${PYTEST[@]}" -s --benchmark-enable -m gpu bench/bench_attention.py

# A small program that runs each kernel family once (word and generic histogram paths, both attention forms).
KERNELS='
import torch
from isg.ops import attention, shannon
x = torch.randint(0, 256, (8, 64, 64, 4), dtype=torch.uint8, device="cuda")
shannon.shannon_histogram(x[..., :3]); shannon.shannon_histogram(x.transpose(1, 2))
for small in ((64, 1, 16), (64, 32, 1)):
    q, k, v = (torch.randn(s, device="cuda", requires_grad=True) for s in (small, (64, 32, 16), (64, 32, 16)))
    attention.gated_hadamard(q, k, v, fused=True).sum().backward()
    l = torch.randn(small[:2] + (16,), device="cuda", requires_grad=True)
    attention.softmax_spatial_sum(l, v, fused=True).sum().backward()
torch.cuda.synchronize()
print("kernels ran")'
if [ "$MODE" = gpu ]; then
  if command -v compute-sanitizer > /dev/null; then
    step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -c "$KERNELS"
    step racecheck compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 3 \
      --kernel-name regex:histogram_kernel "$PY" -c "$KERNELS"
  else
    skip memcheck "compute-sanitizer not on PATH"; skip racecheck "compute-sanitizer not on PATH"
  fi
  if command -v ncu > /dev/null; then
    step ncu ncu --clock-control none --kernel-name regex:histogram_kernel --launch-skip 0 --launch-count 2 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy "$PY" -c "$KERNELS"
  else
    skip ncu "ncu not on PATH"
  fi
else
  for tool in memcheck racecheck ncu; do skip "$tool" "needs a device (rehearsal)"; done
fi

if "$PY" -c "import nvidia.nvimgcodec" > /dev/null 2>&1; then
  step io-device "${PYTEST[@]}" -m gpu $(ls tests/test_io*.py)
else
  skip io-device "nvidia.nvimgcodec not importable (carry its wheel: docs/cuda.md)"
fi

# ------------------------------------------------------------------------------------------ summary
failed=0
{
  echo "isg bench/gpu_check.sh ($MODE) on $(hostname), $(date -u +%FT%TZ), $((SECONDS - start)) s of a ${BUDGET} s budget"
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  for i in "${!NAMES[@]}"; do printf '%-10s %4s s  %s\n' "${NAMES[$i]}" "${TAKEN[$i]}" "${STATUS[$i]}"; done
  grep -h "^shannon_gpu:\|^attention_gpu_" "$LOGS"/*.log 2>/dev/null
  echo "ptxas (sm_90): $(grep -c 'Used [0-9]* registers' "$LOGS"/*-build.log 2>/dev/null) kernels, with spills:"
  grep -h -B2 -E ' [1-9][0-9]* bytes spill stores' "$LOGS"/*-build.log 2>/dev/null | grep -o "Function properties for \S*" | sort -u
} > "$LOGS/summary.txt"
{
  echo "{\"mode\": \"$MODE\", \"seconds\": $((SECONDS - start)), \"budget\": $BUDGET, \"steps\": ["
  for i in "${!NAMES[@]}"; do
    case "${STATUS[$i]}" in ok*|skipped*) ;; *"(allowed"*) ;; *) failed=1 ;; esac
    sep=","; [ "$i" = "$((${#NAMES[@]} - 1))" ] && sep=""
    printf '  {"step": "%s", "seconds": %s, "status": "%s"}%s\n' "${NAMES[$i]}" "${TAKEN[$i]}" "${STATUS[$i]//\"/\'}" "$sep"
  done
  echo "]}"
} > "$LOGS/summary.json"
[ -n "$STOPPED" ] && failed=1
tar -czf "$OUT_DIR/gpu_check.tar.gz.tmp" -C "$WORK" gpu_check && mv "$OUT_DIR/gpu_check.tar.gz.tmp" "$OUT_DIR/gpu_check.tar.gz"
cp "$LOGS/summary.txt" "$LOGS/summary.json" "$OUT_DIR/"
echo
cat "$LOGS/summary.txt"
echo "results: $OUT_DIR/{summary.txt,summary.json,gpu_check.tar.gz}"
exit $failed
