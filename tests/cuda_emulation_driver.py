"""Runs mrprune's CUDA kernels on the CPU emulation (``csrc/emu``, built by ``scripts/build_cuda_emulation.sh``).

The emulator ends its process on a detected error (a race between barriers, a divergent warp collective, a write
past dynamic shared memory, a deadlock), so it runs in a subprocess of its own: numpy and ctypes only (no torch),
which also keeps a ThreadSanitizer run free of uninstrumented noise.

Usage: ``python tests/cuda_emulation_driver.py LIB REQUEST RESULT``. ``REQUEST`` is a pickle of
``{"config": {...}, "cases": [{"op": ..., <arrays and scalars>}, ...]}``; ``RESULT`` receives a pickle of one dict of
output arrays per case. :func:`request` is the in-process side.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

FORMS = {"auto": 0, "gram": 1, "basis": 2}
ORDERS = {"fwd": 0, "rev": 1, "rand": 2}
#: Exit codes of the emulator: a detected kernel error, a watchdog timeout.
KERNEL_ERROR, TIMEOUT = 86, 87


def _pointer(array: np.ndarray | None) -> ctypes.c_void_p | None:
    return None if array is None else ctypes.c_void_p(array.ctypes.data)


def _f32(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)


def _features(case: dict) -> tuple[np.ndarray, int]:
    """The features and their element code: 0 float32, or 1 float16 / 2 bfloat16 as raw 16-bit words (``element``)."""
    element = int(case.get("element", 0))
    if element == 0:
        return _f32(case["features"]), 0
    return np.ascontiguousarray(case["features"], dtype=np.uint16), element


def _i64(array) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.int64)


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.emu_configure.argtypes = [ctypes.c_int, ctypes.c_uint64, ctypes.c_double, ctypes.c_int]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.emu_topk_indices.argtypes = [ptr, ptr, i64, i64, i64, ctypes.c_int, i64, ptr]
    lib.emu_diversity_select.argtypes = [ptr, ctypes.c_int, ptr, i64, i64, i64, i64, ctypes.c_int, i64, i64, ptr]
    lib.emu_greedy_residual_select.argtypes = [
        ptr,
        ctypes.c_int,
        ptr,
        i64,
        i64,
        i64,
        i64,
        ptr,
        ptr,
        ctypes.c_double,
        ctypes.c_int,
        ctypes.c_int,
        i64,
        i64,
        ptr,
        ptr,
    ]
    lib.emu_greedy_residual_select.restype = ctypes.c_int
    lib.emu_coverage_select.argtypes = [
        ptr,
        ctypes.c_int,
        ptr,
        i64,
        i64,
        i64,
        i64,
        ptr,
        ctypes.c_double,
        i64,
        i64,
        ptr,
    ]
    lib.emu_bipartite_dedup.argtypes = [ptr, ctypes.c_int, ptr, i64, i64, i64, i64, i64, i64, i64, ptr]
    lib.emu_selftest.argtypes = [ctypes.c_int, ptr]
    lib.emu_selftest.restype = ctypes.c_int
    return lib


def _run(lib: ctypes.CDLL, case: dict) -> dict:
    op = case["op"]
    if op == "selftest":  # csrc/emu/selftest.cpp
        out = np.zeros(64 * 5, dtype=np.int32)
        status = lib.emu_selftest(int(case["which"]), _pointer(out))
        return {"out": out, "status": status}
    lengths = _i64(case["lengths"])
    k = int(case["k"])
    if op == "topk_indices":
        scores = _f32(case["scores"])
        batch, tokens = scores.shape
        out = np.full((batch, k), -7, dtype=np.int64)  # the launcher's new_empty: garbage until written
        lib.emu_topk_indices(
            _pointer(scores),
            _pointer(lengths),
            batch,
            tokens,
            k,
            int(case["sort_indices"]),
            int(case.get("max_grid_y", 65535)),
            _pointer(out),
        )
        return {"indices": out}
    x, element = _features(case)
    batch, tokens, dim = x.shape
    smem_optin = int(case.get("smem_optin", 232448))
    workspace = int(case.get("workspace_bytes", 1 << 30))
    if op == "diversity_select":
        out = np.full((batch, k), -7, dtype=np.int64)
        lib.emu_diversity_select(
            _pointer(x),
            element,
            _pointer(lengths),
            batch,
            tokens,
            dim,
            k,
            int(case["mask_picked"]),
            smem_optin,
            workspace,
            _pointer(out),
        )
        return {"indices": out}
    if op == "greedy_residual_select":
        gate = None if case.get("gate") is None else _f32(case["gate"])
        seed = None if case.get("seed") is None else _i64(case["seed"])
        indices = np.full((batch, k), -7, dtype=np.int64)
        energies = np.full((batch, k), np.nan, dtype=np.float32)
        status = lib.emu_greedy_residual_select(
            _pointer(x),
            element,
            _pointer(lengths),
            batch,
            tokens,
            dim,
            k,
            _pointer(gate),
            _pointer(seed),
            float(case.get("tol", 1e-5)),
            FORMS[case.get("algorithm", "auto")],
            int(case.get("sms", 4)),
            smem_optin,
            workspace,
            _pointer(indices),
            _pointer(energies),
        )
        return {"indices": indices, "energies": energies, "status": status}
    if op == "coverage_select":
        saliency = None if case.get("saliency") is None else _f32(case["saliency"])
        out = np.full((batch, k), -7, dtype=np.int64)
        lib.emu_coverage_select(
            _pointer(x),
            element,
            _pointer(lengths),
            batch,
            tokens,
            dim,
            k,
            _pointer(saliency),
            float(case.get("alpha", 1.0)),
            smem_optin,
            workspace,
            _pointer(out),
        )
        return {"indices": out}
    if op == "bipartite_dedup":
        out = np.full((batch, k), -7, dtype=np.int64)
        lib.emu_bipartite_dedup(
            _pointer(x),
            element,
            _pointer(lengths),
            batch,
            tokens,
            dim,
            k,
            int(case.get("per_round", 8)),
            smem_optin,
            workspace,
            _pointer(out),
        )
        return {"indices": out}
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str]) -> int:
    lib_path, request_path, result_path = argv
    with open(request_path, "rb") as f:
        payload = pickle.load(f)
    lib = _load(lib_path)
    config = payload["config"]
    lib.emu_configure(ORDERS[config["order"]], int(config["seed"]), float(config["timeout_s"]), int(config["workers"]))
    results = [_run(lib, case) for case in payload["cases"]]
    with open(result_path, "wb") as f:
        pickle.dump(results, f)
    return 0


def request(
    lib: Path,
    cases: list[dict],
    workdir: Path,
    order: str = "fwd",
    seed: int = 0,
    timeout_s: float = 120.0,
    workers: int = 2,
    env: dict | None = None,
    timeout: float = 600.0,
) -> tuple[subprocess.CompletedProcess, list[dict] | None]:
    """Runs ``cases`` on the emulator ``lib`` in a subprocess; returns the process and its results (``None`` when the
    emulator stopped on an error: its message is in the process's stderr)."""
    workdir.mkdir(parents=True, exist_ok=True)
    request_path, result_path = workdir / f"request-{order}.pkl", workdir / f"result-{order}.pkl"
    result_path.unlink(missing_ok=True)
    config = {"order": order, "seed": seed, "timeout_s": timeout_s, "workers": workers}
    with open(request_path, "wb") as f:
        pickle.dump({"config": config, "cases": cases}, f)
    proc = subprocess.run(
        [sys.executable, __file__, str(lib), str(request_path), str(result_path)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0 or not result_path.exists():
        return proc, None
    with open(result_path, "rb") as f:
        return proc, pickle.load(f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
