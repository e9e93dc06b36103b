#!/usr/bin/env bash
# One-command validation of idid_kernels on a CUDA GPU:  benchmarks/gpu_validate.sh OUT_DIR
#
# Builds the CUDA extension against the installed CUDA torch, records the machine, then runs the
# backend check, the GPU-only test files, the gpu-goals benchmark and the whole test suite
# natively, each step with its own log under OUT_DIR and its exit status in OUT_DIR/summary.txt.
# A failing step does not stop the run; the script exits 1 if any step failed (or ran out of time).
# The whole run fits a time budget (GPU_VALIDATE_BUDGET_S, default 540 s = 9 minutes): every step
# has a cap, and none runs past the budget (the test suite gets what is left).
#
# Without a CUDA GPU it says so and exits 2 at once, writing nothing.
#
# Environment: PYTHON (default python), GPU_VALIDATE_BUDGET_S, MAX_JOBS (nvcc jobs, default: cores).
# The tests run with IDID_KERNELS_TRITON_MAX_CONFIGS=1 (one autotune config per Triton kernel: no
# tuning, so compile time dominates); the benchmark tunes normally.
set -u

usage() { echo "usage: $0 OUT_DIR" >&2; exit 64; }
[ $# -eq 1 ] || usage
OUT=$1
PY=${PYTHON:-python}
BUDGET=${GPU_VALIDATE_BUDGET_S:-540}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1 \
   || ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1; then
  echo "gpu_validate: no CUDA GPU here (nvidia-smi missing or failing, or torch.cuda.is_available() is False);" \
       "nothing was run. Run this on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
  exit 2
fi

mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
cd "$ROOT" || exit 2
FAILED=0
START=$SECONDS

# step NAME CAP_S LOG CMD...: run CMD (from the repository root) with its output in OUT/LOG, for at
# most CAP_S seconds and never past the budget; record "NAME exit=RC SECONDS LOG" in summary.txt.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START) - 5))
  if [ "$left" -lt 15 ]; then
    printf '%-16s exit=skip  time budget (%ss) spent\n' "$name" "$BUDGET" >> "$SUMMARY"
    FAILED=1
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local t0=$SECONDS
  echo "== $name (at most ${cap}s): $*"
  timeout --kill-after=10 "$cap" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (timed out after ${cap}s)"
  printf '%-16s exit=%-4s %4ss  %s%s\n' "$name" "$rc" "$((SECONDS - t0))" "$log" "$note" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=1
}

ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')")
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

step nvidia-smi 30 nvidia-smi.txt nvidia-smi
step build 240 build.log env IDID_KERNELS_CUDA_ARCH="$ARCH" \
  "$PY" -m pip install --no-build-isolation -e ".[test]"
step info 60 info.txt "$PY" -m idid_kernels info
step check 120 check.log env IDID_KERNELS_TRITON_MAX_CONFIGS=1 "$PY" -m idid_kernels check --device cuda
# First the GPU kernels alone: the GPU-only files, then the cuda and triton parametrizations of the
# per-op conformance suites (the same files CI runs emulated and interpreted), natively.
GPU_TEST_FILES="tests/test_triton_gpu.py tests/test_cuda_backend.py tests/test_cm_margin.py tests/test_idid_loss.py"
GPU_TEST_FILES="$GPU_TEST_FILES tests/test_class_density.py tests/test_norm_contraction.py tests/test_pairwise_cosine.py tests/test_margin_heads.py"
# shellcheck disable=SC2086
step gpu-tests 150 pytest-gpu.log env IDID_KERNELS_TRITON_MAX_CONFIGS=1 "$PY" -m pytest -q -rs \
  $GPU_TEST_FILES -k "cuda or triton or gpu" --junitxml "$OUT/junit-gpu.xml"
step bench 150 bench.log "$PY" -m idid_kernels bench --device cuda --suite gpu-goals --dtype bfloat16 --quiet \
  --csv "$OUT/bench.csv"
step pytest 600 pytest.log env IDID_KERNELS_TRITON_MAX_CONFIGS=1 "$PY" -m pytest -q -x -rs \
  --junitxml "$OUT/junit.xml"

printf 'total %ss of a %ss budget; %s\n' "$((SECONDS - START))" "$BUDGET" \
  "$([ "$FAILED" -eq 0 ] && echo "every step passed" || echo "SOME STEP FAILED")" | tee -a "$SUMMARY"
exit "$FAILED"
