"""Test set-up. Runs before mrprune is imported: Triton kernels must see TRITON_INTERPRET at decoration time."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # No GPU: Triton kernels run on the CPU under the interpreter (never set it on a GPU machine).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A kernel backend that fails must fail the tests, not fall back quietly to the reference (tests/test_dispatch.py
# turns the fallback back on where it is the subject).
os.environ.setdefault("MRPRUNE_FALLBACK", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import mrprune  # noqa: E402

# The tests exercise this checkout: mrprune and its Triton kernels must come from here, never from another install
# (a stale editable install of another checkout used to supply mrprune.triton_kernels).
_ROOT = Path(__file__).resolve().parents[1]
for _module in [mrprune] + ([mrprune.triton_kernels] if mrprune.HAS_TRITON else []):
    if _ROOT not in Path(_module.__file__).resolve().parents:
        raise pytest.UsageError(
            f"{_module.__name__} was imported from {_module.__file__}, not from this checkout {_ROOT}"
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_ext = pytest.mark.skip(reason="mrprune._C was not built")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "ext" in item.keywords and not mrprune.HAS_EXTENSION:
            item.add_marker(skip_ext)
