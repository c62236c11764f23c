#!/usr/bin/env bash
# Compile-check the C++ sources without a GPU (engineering.md §3.4):
#   * every csrc/cuda/*.cu with plain nvcc (sm_90 and sm_80, ptxas included) against the installed torch's headers,
#     with the flags setup.py uses (stable ABI restricted to torch 2.11, USE_CUDA for the CUDA stream getter), and
#     ptxas's resource usage (--resource-usage): any kernel that spills registers to local memory fails the check
#     (spills are made by ptxas, so they only show here, never in the PTX);
#   * every csrc/cpu/*.cpp and csrc/module.cpp with g++ -fsyntax-only;
#   * no file under csrc/ may include torch/extension.h, ATen/ or c10/cuda/ (they break the stable-ABI build).
# Prints one line per file and stops at the first failure (non-zero exit).
#
# Environment: PYTHON (default: python) must import torch; NVCC (default: nvcc on PATH); ALLOW_NO_NVCC=1 skips the
# CUDA files instead of failing when nvcc is missing; NVCC_EXTRA_FLAGS are appended to the nvcc command (e.g.
# -maxrregcount=32 to see the spill check fail).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python}"
TORCH_TARGET="-DTORCH_TARGET_VERSION=0x020b000000000000"

fail() {
  echo "check_cuda_compile: $*" >&2
  exit 1
}

# --- forbidden includes ------------------------------------------------------------------------------------------
forbidden='^[[:space:]]*#[[:space:]]*include[[:space:]]*[<"](torch/extension\.h|ATen/|c10/cuda/)'
if hits=$(grep -rnE "$forbidden" csrc/); then
  echo "$hits" >&2
  fail "csrc/ must use the LibTorch stable ABI only (no torch/extension.h, ATen/ or c10/cuda/ includes)"
fi
echo "ok    includes  csrc/ (stable ABI only)"

# --- include paths -----------------------------------------------------------------------------------------------
torch_includes=$("$PYTHON" -c "from torch.utils.cpp_extension import include_paths; print(' '.join(include_paths()))") ||
  fail "'$PYTHON' cannot import torch; set PYTHON to the interpreter of the venv that has torch"
include_flags=()
for dir in $torch_includes; do include_flags+=("-I$dir"); done
include_flags+=("-Icsrc/include")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- CUDA --------------------------------------------------------------------------------------------------------
shopt -s nullglob
cuda_files=(csrc/cuda/*.cu)
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$nvcc" ]; then
  if [ "${ALLOW_NO_NVCC:-0}" = "1" ]; then
    echo "skip  nvcc      not found (ALLOW_NO_NVCC=1): ${#cuda_files[@]} CUDA file(s) not checked"
  else
    fail "nvcc not found on PATH (install the CUDA toolkit, or set ALLOW_NO_NVCC=1 to skip the CUDA files)"
  fi
else
  read -r -a nvcc_extra <<<"${NVCC_EXTRA_FLAGS:-}"
  for f in "${cuda_files[@]}"; do
    start=$SECONDS
    out="$tmp/$(basename "$f" .cu).o"
    if ! log=$("$nvcc" -std=c++17 -O2 -DUSE_CUDA "$TORCH_TARGET" \
      -gencode arch=compute_90,code=sm_90 -gencode arch=compute_80,code=sm_80 --resource-usage \
      "${nvcc_extra[@]}" "${include_flags[@]}" -c "$f" -o "$out" 2>&1); then
      echo "$log" >&2
      fail "nvcc failed on $f"
    fi
    # ptxas -v lines: "Compiling entry function '<name>' for 'sm_XX'", then "<s> bytes stack frame, <n> bytes spill
    # stores, <m> bytes spill loads" per function. Anything but "0 bytes spill" is a spill.
    spills=$(awk '
      /Compiling entry function/ { fn = $0; sub(/.*entry function /, "", fn) }
      /Function properties for/ { fn2 = $0; sub(/.*Function properties for /, "", fn2) }
      /bytes spill stores/ && ($5 != 0 || $9 != 0) { print "  " (fn2 != "" ? fn2 : fn) ": " $0 }
    ' <<<"$log" | c++filt)
    usage=$(grep -E "Used [0-9]+ registers|bytes spill" <<<"$log" | sed 's/^/  /' || true)
    if [ -n "$spills" ]; then
      echo "$usage" >&2
      echo "$spills" >&2
      fail "register spills in $f (see above; spills are local-memory traffic on every access)"
    fi
    other=$(grep -vE "^ptxas info|bytes stack frame" <<<"$log" || true)  # warnings stay visible
    [ -z "$other" ] || echo "$other"
    echo "ok    nvcc      $f ($((SECONDS - start)) s, no spills: $(grep -c "bytes spill" <<<"$log") kernel builds)"
  done
fi

# --- C++ (CPU) ---------------------------------------------------------------------------------------------------
# Python.h for csrc/module.cpp: python3-config, else the include folder of $PYTHON itself.
if command -v python3-config >/dev/null; then
  python_includes=$(python3-config --includes)
else
  python_includes="-I$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")"
fi
read -r -a python_include_flags <<<"$python_includes"
for f in csrc/cpu/*.cpp csrc/module.cpp; do
  start=$SECONDS
  if ! log=$(g++ -std=c++17 -fsyntax-only "$TORCH_TARGET" -DPy_LIMITED_API=0x030A0000 \
    "${include_flags[@]}" "${python_include_flags[@]}" "$f" 2>&1); then
    echo "$log" >&2
    fail "g++ failed on $f"
  fi
  [ -z "$log" ] || echo "$log"
  echo "ok    g++       $f ($((SECONDS - start)) s)"
done
