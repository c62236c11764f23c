#!/usr/bin/env bash
# One command on a GPU machine (one H100/H200; about 8 minutes: the phase caps sum to 470 s): build mrprune with its
# CUDA kernels, run the CUDA and Triton tests natively, compute-sanitizer memcheck and racecheck on tiny calls, check
# that every op can be captured in a CUDA graph, and time every op against its hardware floor. Everything lands in one
# results folder: log.txt (the summary), env.txt (device, driver, versions, commit, date), the JSON of the smoke run
# and every phase's full output. Commit the folder under benchmarks/results/.
#
#   bash scripts/gpu_validate.sh [--dry-run] [--out DIR]
#
# --out DIR   the results folder (default: $OUT/gpu-validate-<date>-<commit> when $OUT is set, as on the lent GPU
#             machines whose $OUT comes back, else benchmarks/results/gpu-validate-<date>-<commit>).
# --dry-run   runs the steps that need no GPU, on this machine (CI): shell and Python syntax, the smoke script on tiny
#             shapes under the Triton interpreter, the sanitizer's tiny-call script on the CPU, and pytest's collection
#             of exactly the test selections the GPU run uses (so a renamed test or marker cannot silently empty them).
#
# Every phase has its own timeout, so a hang (a spinning cooperative kernel) cannot eat the machine's time; the phases
# are ordered by information per second. Needs no network. Exit status: the number of failed phases (0 = all passed).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
RESULTS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) RESULTS="$2"; shift ;;
    *) echo "usage: $0 [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PYTHON="${PYTHON:-python3}"
stamp="$(date -u +%Y%m%dT%H%M%SZ)-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
if [ -z "$RESULTS" ]; then
  if [ "$DRY" = 1 ]; then RESULTS="$(mktemp -d)/gpu-validate-dry-$stamp"
  elif [ -n "${OUT:-}" ]; then RESULTS="$OUT/gpu-validate-$stamp"
  else RESULTS="benchmarks/results/gpu-validate-$stamp"; fi
fi
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 MRPRUNE_TRITON_AUTOTUNE=0 MRPRUNE_FALLBACK=0 TRITON_DEFAULT_FP_FUSION=1
failures=0
log() { echo "### $(date -u +%T) $*" | tee -a "$RESULTS/log.txt"; }
phase_status() {  # name, exit status
  echo "$1 exit $2" | tee -a "$RESULTS/log.txt"
  [ "$2" -eq 0 ] || failures=$((failures + 1))
}
# pytest options the GPU image has (pytest-xdist, pytest-timeout); left out where the plugin is missing
pytest_opts() {  # workers
  local opts="-p no:cacheprovider"
  "$PYTHON" -c "import xdist" 2>/dev/null && opts="$opts -n $1"
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && opts="$opts --timeout 60"
  echo "$opts"
}

log "0 environment -> $RESULTS"
{
  echo "date_utc: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | grep -q . && echo '(dirty)')"
  echo "host: $(uname -srm)"
  if [ "$DRY" = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv 2>&1
    nvcc --version 2>&1 | tail -1
  else
    echo "device: none (dry run on the CPU)"
  fi
  "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'cuda', torch.version.cuda); print('triton', triton.__version__)" 2>&1
} | tee "$RESULTS/env.txt" | tee -a "$RESULTS/log.txt"

if [ "$DRY" = 1 ]; then
  log "dry run: syntax of this script and its helpers"
  bash -n "$0" && "$PYTHON" -m py_compile scripts/gpu_validate.py scripts/gpu_tiny_ops.py
  phase_status "syntax" $?
else
  log "1 build mrprune._C with the CUDA kernels (sm_90 only, no network)  [<=180 s]"
  TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 MRPRUNE_BUILD_EXT=1 MRPRUNE_CUDA=1 timeout 180 \
    "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$RESULTS/build.txt" 2>&1
  status=$?
  tail -5 "$RESULTS/build.txt" | tee -a "$RESULTS/log.txt"
  "$PYTHON" -c "import mrprune; assert mrprune.HAS_EXTENSION and mrprune.HAS_TRITON, 'extension or triton missing'" \
    >>"$RESULTS/log.txt" 2>&1 || status=1
  phase_status "build" "$status"
  if [ "$status" -ne 0 ]; then
    log "build/import failed: stop here (cheap to fix and rerun)"
    exit 1
  fi
  so=$("$PYTHON" -c "import mrprune._C as c; print(c.__file__)")
  cuobjdump --dump-resource-usage "$so" >"$RESULTS/cuda_resource_usage.txt" 2>&1
  grep -E "STACK:[1-9]" "$RESULTS/cuda_resource_usage.txt" | head -5 | sed 's/^/CUDA stack frame (spills?): /' \
    | tee -a "$RESULTS/log.txt"
fi

log "2 smoke: full-size correctness, CUDA-graph capture, streams, Triton kernel resources, timings vs floors  [<=130 s]"
if [ "$DRY" = 1 ]; then
  RESULTS="$RESULTS" timeout 600 "$PYTHON" scripts/gpu_validate.py --dry-run >"$RESULTS/smoke.txt" 2>&1
else
  RESULTS="$RESULTS" timeout 130 "$PYTHON" scripts/gpu_validate.py --budget-s 110 >"$RESULTS/smoke.txt" 2>&1
fi
phase_status "smoke" $?
grep -E "^(FAIL|TIME)|failed:" "$RESULTS/smoke.txt" | tee -a "$RESULTS/log.txt"

# The GPU runs of the test suite: the CUDA C++ backend of every per-op test (marker cuda), and the Triton tests,
# which run natively when a GPU is present (marker triton_interp; fixed launch configs).
# (The full-size tests autotune every config of every kernel: too slow for this budget; a second lease runs them.)
CUDA_TESTS=(-m "cuda and not slow" -k "not full_size" tests)
TRITON_TESTS=(-m "triton_interp and not slow" tests)
if [ "$DRY" = 1 ]; then
  log "dry run: the GPU test selections collect tests"
  collect() {  # name, pytest selection...
    local name=$1 count
    shift
    count=$(timeout 300 "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider "$@" 2>/dev/null | grep -c "::")
    echo "$name collects $count tests" | tee -a "$RESULTS/log.txt"
    [ "$count" -gt 0 ]
    phase_status "collect $name" $?
  }
  collect "CUDA tests" "${CUDA_TESTS[@]}"
  collect "Triton tests" "${TRITON_TESTS[@]}"
else
  log "3 CUDA C++ tests natively, not slow, 8 workers, 60 s per test  [<=90 s]"
  # shellcheck disable=SC2046
  timeout 90 "$PYTHON" -m pytest -q -rf $(pytest_opts 8) "${CUDA_TESTS[@]}" >"$RESULTS/cuda_tests.txt" 2>&1
  phase_status "cuda tests" $?
  tail -15 "$RESULTS/cuda_tests.txt" | grep -E "FAILED|Timeout|passed|failed" | tee -a "$RESULTS/log.txt"

  log "4 Triton tests natively (fixed configs, small shapes), 4 workers  [<=60 s]"
  # shellcheck disable=SC2046
  timeout 60 "$PYTHON" -m pytest -q -rf $(pytest_opts 4) "${TRITON_TESTS[@]}" >"$RESULTS/triton_tests.txt" 2>&1
  phase_status "triton tests" $?
  tail -15 "$RESULTS/triton_tests.txt" | grep -E "FAILED|Timeout|passed|failed" | tee -a "$RESULTS/log.txt"
fi

log "5 compute-sanitizer memcheck + racecheck on tiny calls of the CUDA ops  [<=2 x 35 s]"
if [ "$DRY" = 1 ]; then
  MRPRUNE_SKIP_EXT=1 timeout 300 "$PYTHON" scripts/gpu_tiny_ops.py --device cpu >"$RESULTS/tiny_ops.txt" 2>&1
  phase_status "tiny ops (CPU)" $?
else
  for tool in memcheck racecheck; do
    timeout 35 compute-sanitizer --tool "$tool" --error-exitcode 9 --kernel-name kns=mrprune \
      "$PYTHON" scripts/gpu_tiny_ops.py --device cuda >"$RESULTS/sanitizer_$tool.txt" 2>&1
    phase_status "compute-sanitizer $tool" $?
    grep -E "ERROR SUMMARY|Invalid|Race|Hazard" "$RESULTS/sanitizer_$tool.txt" | head -5 | tee -a "$RESULTS/log.txt"
  done
fi

log "done: $failures failed phase(s); results in $RESULTS"
exit "$failures"
