#!/usr/bin/env bash
# The CUDA kernels on the CPU emulation (csrc/emu) under ThreadSanitizer: builds the emulation with
# -fsanitize=thread and runs one small case per kernel family (tests/test_cuda_emulation.py,
# test_emulated_kernels_under_thread_sanitizer). Fails on any TSan report: a shared-memory race between two
# __syncthreads, or an unsynchronised global-memory access between the blocks of the cooperative greedy launch.
# Needs g++ with libtsan (Debian: libgcc-12-dev); PYTHON (default: python) must import torch, numpy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
MRPRUNE_CUDAEMU_TSAN=1 "${PYTHON:-python}" -m pytest -q tests/test_cuda_emulation.py \
  -k test_emulated_kernels_under_thread_sanitizer "$@"
