"""The build's invariants: CUDA and C++ sources compile without a GPU, stay on the stable ABI, and mirror the ops."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mrprune
from mrprune import _library, backends

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
SCRIPT = ROOT / "scripts" / "check_cuda_compile.sh"
PUBLIC_OPS = set(_library.SCHEMAS)
# Headers that tie a file to libtorch's C++ ABI or to a CUDA build of torch (engineering.md §3.4).
FORBIDDEN_INCLUDE = re.compile(r'^\s*#\s*include\s*[<"](torch/extension\.h|ATen/|c10/cuda/)', re.MULTILINE)


def _sources(folder: str, suffix: str) -> set[str]:
    return {p.stem for p in (CSRC / folder).glob(f"*{suffix}")}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_compile_check_script_passes():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, f"check_cuda_compile.sh failed:\n{result.stdout}\n{result.stderr}"
    for path in sorted(CSRC.glob("cuda/*.cu")):
        assert f"nvcc      {path.relative_to(ROOT)}" in result.stdout
    for path in [*sorted(CSRC.glob("cpu/*.cpp")), CSRC / "module.cpp"]:
        assert f"g++       {path.relative_to(ROOT)}" in result.stdout


def test_compile_check_script_is_executable():
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)


def test_no_forbidden_includes():
    offenders = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in {".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu"}:
            for match in FORBIDDEN_INCLUDE.finditer(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert not offenders, "csrc/ must use the LibTorch stable ABI only:\n" + "\n".join(offenders)


def test_forbidden_include_pattern():
    assert FORBIDDEN_INCLUDE.search("#include <torch/extension.h>")
    assert FORBIDDEN_INCLUDE.search('  # include "ATen/cuda/CUDAContext.h"')
    assert FORBIDDEN_INCLUDE.search("#include <c10/cuda/CUDAStream.h>")
    assert not FORBIDDEN_INCLUDE.search("#include <torch/csrc/stable/tensor.h>")
    assert not FORBIDDEN_INCLUDE.search("// no #include <ATen/ATen.h> here")


def test_one_cpu_source_per_public_op():
    assert _sources("cpu", ".cpp") == PUBLIC_OPS


def test_cuda_sources_match_cuda_ops():
    assert len(set(_library.CUDA_OPS)) == len(_library.CUDA_OPS)
    assert set(_library.CUDA_OPS) <= PUBLIC_OPS
    assert _sources("cuda", ".cu") == set(_library.CUDA_OPS)


def test_kernel_headers_are_torch_free():
    # Device code in csrc/include/mrprune/kernels stays compilable by plain nvcc without torch.
    for path in sorted((CSRC / "include" / "mrprune" / "kernels").glob("*.cuh")):
        assert not re.search(r'#\s*include\s*[<"](torch|ATen|c10)/', path.read_text()), path


@pytest.mark.ext
@pytest.mark.parametrize("op", sorted(PUBLIC_OPS))
def test_cpu_kernel_registered(op):
    assert mrprune.HAS_EXTENSION
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mrprune::_{op}_cpu", "CPU")
    assert backends.available(op, "cpu")[0] == "cpp"


@pytest.mark.cuda
@pytest.mark.ext
@pytest.mark.parametrize("op", _library.CUDA_OPS)
def test_cuda_kernel_registered(op):
    if torch.version.cuda is None:
        pytest.skip("torch is not a CUDA build")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mrprune::_{op}_cuda", "CUDA"), (
        f"mrprune._C has no CUDA kernel for {op}: was it built with MRPRUNE_CUDA=0 or without nvcc?"
    )
    assert "cuda" in backends.available(op, "cuda")


def test_every_subpackage_ships():
    """pyproject lists packages explicitly (triton_kernels/ ships as mrprune.triton_kernels), so a new subpackage
    missing from the list installs from a checkout but not from a wheel."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "mrprune").rglob("__init__.py")} | {
        "mrprune.triton_kernels"
    }
    assert declared == on_disk
