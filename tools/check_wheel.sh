#!/usr/bin/env bash
# One wheel, any torch: build the isg wheel (or take ISG_WHEEL), install it into a fresh
# virtual environment that already holds a different torch (default 2.13.0, the CPU build,
# without torchvision), check that installing isg left that torch in place and pulled no
# torchvision / triton / nvidia-* packages, that the process maps one OpenMP runtime whichever
# of torch and isg._C loads first, then run the op tests from a copy of tests/ outside the
# source tree against the installed wheel. CI (.ci/run) runs it with ISG_CUDA=OFF.
#   ISG_WHEEL=path.whl              test this wheel instead of building one
#   ISG_CHECK_TORCH="torch==2.13.0" the torch the user already has
#   ISG_CHECK_TORCH_INDEX=URL       index for that torch (e.g. https://download.pytorch.org/whl/cpu)
#   ISG_CHECK_DIR=/tmp/...          work folder (default: a new temporary one, removed at the end)
#   ISG_CUDA=AUTO|ON|OFF            when building (default AUTO)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$PWD"
TORCH="${ISG_CHECK_TORCH:-torch==2.13.0}"
TESTS=(tests/test_shannon.py tests/test_attention_ops.py tests/test_lpips_loss.py)
if [ -n "${ISG_CHECK_DIR:-}" ]; then WORK="$ISG_CHECK_DIR"; mkdir -p "$WORK"; else WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT; fi
start=$SECONDS
step() { echo "== check_wheel [$((SECONDS - start)) s] $*"; }

if [ -n "${ISG_WHEEL:-}" ]; then
  WHEEL="$(realpath "$ISG_WHEEL")"
else
  step "building the wheel (ISG_CUDA=${ISG_CUDA:-AUTO})"
  python3 -m pip wheel "$SRC" --no-deps -w "$WORK/wheelhouse" -q
  WHEEL="$(ls "$WORK"/wheelhouse/isg-*.whl)"
fi

step "fresh venv with $TORCH"
python3 -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
# shellcheck disable=SC2086  # ISG_CHECK_TORCH may name several requirements
"$PY" -m pip install -q $TORCH ${ISG_CHECK_TORCH_INDEX:+--index-url "$ISG_CHECK_TORCH_INDEX"}
version() { "$PY" -W ignore -c 'import torch; print(torch.__version__)' 2>/dev/null; }
before="$(version)"

step "installing $(basename "$WHEEL")[test] beside torch $before"
"$PY" -m pip install -q "${WHEEL}[test]"
after="$(version)"
if [ "$before" != "$after" ]; then
  echo "check_wheel: FAILED: installing isg replaced torch $before with $after" >&2; exit 1
fi
pulled="$("$PY" -m pip list --format=freeze | grep -iE '^(torchvision|triton|nvidia-|lpips)' || true)"
if [ -n "$pulled" ] && [[ "$before" == *+cpu ]]; then
  echo "check_wheel: FAILED: installing isg beside a CPU torch pulled: $pulled" >&2; exit 1
fi

step "op tests of the installed wheel, from outside the source tree"
mkdir -p "$WORK/run" && cp -r "$SRC/tests" "$SRC/pyproject.toml" "$SRC/tools/check_openmp.py" "$WORK/run/"
cd "$WORK/run"
env -u PYTHONPATH -u ISG_EXT_PATH "$PY" check_openmp.py
env -u PYTHONPATH -u ISG_EXT_PATH ISG_REQUIRE_EXT=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" \
  "$PY" -c 'import isg, isg._C, pathlib, torch; assert "site-packages" in isg.__file__, isg.__file__; print("isg from", pathlib.Path(isg.__file__).parent, "with torch", torch.__version__)'
env -u PYTHONPATH -u ISG_EXT_PATH ISG_REQUIRE_EXT=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" \
  "$PY" -m pytest -q -p no:cacheprovider -m "not gpu" "${TESTS[@]}"
step "passed: torch $after kept, op tests pass on the installed wheel"
