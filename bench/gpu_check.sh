#!/usr/bin/env bash
# The first minutes on a GPU: every GPU test and GPU benchmark row, in < 5 minutes on one GPU, with
# the results as JSON under bench/results/ (ISG_BENCH_OUT) and a summary in gpu_check.json.
#   bash bench/gpu_check.sh          # on a GPU machine: fails unless isg's CUDA kernels are usable
#   bash bench/gpu_check.sh --dry    # anywhere (CI): collects every step's tests, checks the CLI flags,
#                                    # runs nothing on a device; keeps this script from rotting
# Steps (each under its own time limit; a failed step is recorded and the script fails at the end):
#   cuda       isg info + the reason when isg's CUDA kernels are unusable
#   tests      python -m pytest -m gpu tests          (every GPU test)
#   attention  bench/bench_attention.py -m gpu        (fused vs eager vs torch.compile, fwd+bwd, memory)
#   shannon    bench/bench_shannon.py -k gpu          (GB/s vs the measured memory bandwidth)
#   decode     bench/bench_io.py                      (cuCIM / DALI GPU decode among the readers)
#   preprocess python -m isg preprocess --device cuda (one synthetic slide, end to end)
#   efficiency bench/bench_efficiency.py, ISG_BENCH_DEVICE=cuda, full size (ISG_BENCH_SIZE=16384)
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
OUT="${ISG_BENCH_OUT:-bench/results}"
mkdir -p "$OUT"
export ISG_BENCH_OUT="$OUT" OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" ISG_REQUIRE_EXT="${ISG_REQUIRE_EXT:-1}"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/gpu_check.json"
declare -a NAMES=() CODES=() SECONDS_TAKEN=()
COLLECT=""
[ "$DRY" = 1 ] && COLLECT="--collect-only -q"

# limits sum to 300 s on a GPU; the dry run only collects, but imports are slow on shared CI cores
SLACK=1
[ "$DRY" = 1 ] && SLACK=4
step() {  # step NAME LIMIT_S COMMAND...
  local name="$1" limit="$(($2 * SLACK))"; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=INT "$limit" "$@"
  local code=$?
  NAMES+=("$name"); CODES+=("$code"); SECONDS_TAKEN+=("$((SECONDS - start))")
  echo "== $name: exit $code in $((SECONDS - start))s"
}

if [ "$DRY" = 1 ]; then
  step cuda 20 "$PY" -c "from isg import _ext; print('isg CUDA kernels usable:', *_ext.cuda_status())"
else
  step cuda 20 "$PY" -c "
from isg import _ext
import sys
ok, why = _ext.cuda_status()
print('isg CUDA kernels usable:', ok, why)
sys.exit(0 if ok else 1)"
fi
step tests 80 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests $COLLECT
step attention 50 env ISG_BENCH_QUICK=1 "$PY" -m pytest -q -p no:cacheprovider -s --benchmark-enable -m gpu \
  bench/bench_attention.py $COLLECT
step shannon 25 "$PY" -m pytest -q -p no:cacheprovider -s --benchmark-enable -k gpu bench/bench_shannon.py $COLLECT
step decode 30 env ISG_BENCH_IO_SIZE=8192 ISG_BENCH_IO_REPEAT=2 "$PY" -m pytest -q -p no:cacheprovider -s \
  --benchmark-enable bench/bench_io.py $COLLECT
if [ "$DRY" = 1 ]; then
  step preprocess 35 bash -c "'$PY' -m isg preprocess --help | grep -q -- '--device' && '$PY' -m isg synth --help | grep -q -- '--size'"
else
  step preprocess 35 bash -c "
set -e
tmp=\$(mktemp -d)
'$PY' -m isg synth --out \"\$tmp/cohort\" --slides 1 --size 8192 >/dev/null
'$PY' -m isg preprocess \"\$tmp\"/cohort/slides/* --out \"\$tmp/out\" --device cuda
rm -rf \"\$tmp\""
fi
step efficiency 60 env ISG_BENCH_DEVICE=cuda ISG_BENCH_SIZE=16384 ISG_BENCH_SLIDES=1 "$PY" -m pytest -q -p no:cacheprovider -s \
  --benchmark-enable bench/bench_efficiency.py $COLLECT

failed=0
{
  echo "{\"dry\": $([ "$DRY" = 1 ] && echo true || echo false), \"steps\": ["
  for i in "${!NAMES[@]}"; do
    [ "${CODES[$i]}" != 0 ] && failed=1
    sep=","; [ "$i" = "$((${#NAMES[@]} - 1))" ] && sep=""
    echo "  {\"step\": \"${NAMES[$i]}\", \"exit\": ${CODES[$i]}, \"seconds\": ${SECONDS_TAKEN[$i]}}$sep"
  done
  echo "]}"
} > "$SUMMARY.tmp" && mv "$SUMMARY.tmp" "$SUMMARY"
echo "summary: $SUMMARY (total ${SECONDS}s)"
exit $failed
