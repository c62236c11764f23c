"""Test set-up. Runs before mrprune is imported: Triton kernels must see TRITON_INTERPRET at decoration time."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # No GPU: Triton kernels run on the CPU under the interpreter (never set it on a GPU machine).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mrprune  # noqa: E402


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
