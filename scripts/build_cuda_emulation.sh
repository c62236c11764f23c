#!/usr/bin/env bash
# Build the CPU emulation of the CUDA kernels (csrc/emu): the torch-free device code of
# csrc/include/mrprune/kernels/*.cuh compiled with the host g++ into a shared library that
# tests/cuda_emulation_driver.py drives through ctypes (tests/test_cuda_emulation.py).
#
# Usage: scripts/build_cuda_emulation.sh OUTPUT.so [--tsan]
#   --tsan: a ThreadSanitizer build (-fsanitize=thread; load it with LD_PRELOAD of libtsan, see
#           scripts/check_cuda_emulation_tsan.sh).
# Environment: CXX (default g++), CUDAEMU_EXTRA_FLAGS (appended, e.g. -DSOME_MACRO for a local experiment).
set -euo pipefail
cd "$(dirname "$0")/.."

out="${1:?usage: $0 OUTPUT.so [--tsan]}"
mode="${2:-}"
cxx="${CXX:-g++}"
flags=(-std=c++20 -O1 -g -fPIC -shared -pthread -Wall -Wextra -Wno-unused-parameter -Wno-unknown-pragmas
  # `extern __shared__` arrays are block-scope extern thread_locals: without this GCC calls a TLS init function
  # that does not exist.
  -fno-extern-tls-init
  -DMRPRUNE_CUDA_EMULATION -Icsrc/emu -Icsrc/include)
if [ "$mode" = "--tsan" ]; then
  flags+=(-fsanitize=thread -fno-omit-frame-pointer)
elif [ -n "$mode" ]; then
  echo "build_cuda_emulation: unknown option $mode" >&2
  exit 2
fi
read -r -a extra <<<"${CUDAEMU_EXTRA_FLAGS:-}"
mkdir -p "$(dirname "$out")"
"$cxx" "${flags[@]}" "${extra[@]}" csrc/emu/runtime.cpp csrc/emu/kernels.cpp csrc/emu/selftest.cpp -o "$out"
