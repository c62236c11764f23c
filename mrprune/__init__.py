"""mrprune: fused kernels for training-free visual token pruning in multimodal LLMs.

Importing the package defines the ``torch.ops.mrprune`` ops and loads the compiled kernels (``mrprune._C``) when
they were built; without them every op still runs on its eager reference (set ``MRPRUNE_REQUIRE_EXT=1`` to make a
missing extension an error instead).
"""

from __future__ import annotations

import logging
import os

from . import _library, backends, ops, reference
from .integrations import FastV, patch, patched
from .layouts import GridLayout, LlavaNextLayout
from .methods import PRESETS, DivPrune, GPrune, MRPruner, Pruner, RandomPruner, ResPrune, preset
from .ops import (
    cosine_graph,
    diversity_select,
    graph_propagate,
    graph_scores,
    greedy_residual_select,
    max_cosine,
    topk_indices,
    transfer_scores,
)

__version__ = "0.1.0"

logger = logging.getLogger(__name__)


def _load_extension() -> bool:
    if os.environ.get("MRPRUNE_SKIP_EXT") == "1":
        return False
    try:
        from . import _C  # noqa: F401  (registers the C++ kernels with the dispatcher)
    except ImportError as error:
        if os.environ.get("MRPRUNE_REQUIRE_EXT") == "1":
            raise ImportError("mrprune._C is required (MRPRUNE_REQUIRE_EXT=1) but failed to load") from error
        logger.warning("mrprune._C not loaded (%s); ops run on the eager reference", error)
        return False
    _library.register_compiled_kernels()
    return True


HAS_EXTENSION = _load_extension()


def _load_triton_kernels() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.debug("triton is not installed; the Triton kernels are not registered")
        return False
    from . import triton_kernels  # noqa: F401  (registers the "triton" backend of the graph ops)

    return True


HAS_TRITON = _load_triton_kernels()

__all__ = [
    "HAS_EXTENSION",
    "PRESETS",
    "DivPrune",
    "FastV",
    "GPrune",
    "GridLayout",
    "LlavaNextLayout",
    "MRPruner",
    "Pruner",
    "RandomPruner",
    "ResPrune",
    "preset",
    "backends",
    "cosine_graph",
    "diversity_select",
    "graph_propagate",
    "graph_scores",
    "greedy_residual_select",
    "max_cosine",
    "ops",
    "patch",
    "patched",
    "reference",
    "topk_indices",
    "transfer_scores",
]
