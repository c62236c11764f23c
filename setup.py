"""Build mrprune._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc exists.

Environment:
  MRPRUNE_BUILD_EXT = auto (default) | 1 | 0   1: a failed or impossible build is an error; 0: pure Python.
  MRPRUNE_CUDA      = auto (default) | 1 | 0   1: CUDA kernels are required; 0: CPU kernels only.
  MAX_JOBS, TORCH_CUDA_ARCH_LIST, DEBUG=1      as for torch.utils.cpp_extension.

Install with ``pip install --no-build-isolation .`` so that the build sees the installed torch.
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup

BUILD_EXT = os.environ.get("MRPRUNE_BUILD_EXT", "auto")
WANT_CUDA = os.environ.get("MRPRUNE_CUDA", "auto")
# The stable-ABI headers are restricted to what torch 2.11 (the GPU machines' version) provides.
TORCH_TARGET = "-DTORCH_TARGET_VERSION=0x020b000000000000"


def _fail_or_skip(message):
    if BUILD_EXT == "1":
        sys.exit(f"mrprune: {message} (MRPRUNE_BUILD_EXT=1)")
    print(f"mrprune: WARNING: {message}; building without the C++ extension", file=sys.stderr)
    return {}


def _extension_kwargs():
    if BUILD_EXT == "0":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return _fail_or_skip("torch is not importable; install torch first and use pip --no-build-isolation")

    cuda_home = os.environ.get("CUDA_HOME")
    nvcc = shutil.which("nvcc") or (os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None)
    # torch.version.cuda (a CUDA build of torch) plus a compiler, never torch.cuda.is_available(): build hosts often
    # have no GPU.
    use_cuda = WANT_CUDA != "0" and torch.version.cuda is not None and nvcc is not None
    if WANT_CUDA == "1" and not use_cuda:
        sys.exit("mrprune: MRPRUNE_CUDA=1 but torch is not a CUDA build or nvcc is missing")

    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = ["-std=c++17", *opt, "-DPy_LIMITED_API=0x030A0000", TORCH_TARGET]
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("MRPRUNE_NATIVE_SIMD", "1") != "0":
        # AVX2 + FMA for the hand-written loops (the GEMMs go through torch's BLAS, which dispatches at run time):
        # 1.5x on the greedy selection. Every x86-64 CPU since 2013 has them; MRPRUNE_NATIVE_SIMD=0 builds for older.
        cxx += ["-mavx2", "-mfma"]
    sources = ["csrc/module.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    kwargs = dict(
        name="mrprune._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc/include")],
        extra_compile_args={"cxx": cxx},
        py_limited_api=True,
    )
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # H100/H200 when no GPU is visible to detect
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["cxx"].append("-DUSE_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = [*opt, "-std=c++17", "-DUSE_CUDA", TORCH_TARGET, "--threads", "2"]
        extension = CUDAExtension(**kwargs)
    else:
        extension = CppExtension(**kwargs)
    print(f"mrprune: building mrprune._C ({'CPU + CUDA' if use_cuda else 'CPU'})", file=sys.stderr)
    return dict(
        ext_modules=[extension],
        cmdclass={"build_ext": BuildExtension},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


setup(**_extension_kwargs())
