"""mrprune: fused kernels for training-free visual token pruning in multimodal LLMs.

Importing the package defines the ``torch.ops.mrprune`` ops and loads the compiled kernels (``mrprune._C``) when
they were built; without them every op still runs on its eager reference (set ``MRPRUNE_REQUIRE_EXT=1`` to make a
missing extension an error instead).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

from . import _batched, _library, backends, ops, reference  # noqa: F401  (_batched: the "torch" backend)
from .integrations import FastV, patch, patched
from .layouts import GridLayout, LlavaNextLayout
from .methods import (
    DART,
    PRESETS,
    SCOPE,
    TRIM,
    AgilePruner,
    CDPruner,
    DivPrune,
    FasterVLM,
    GPrune,
    HiRED,
    KeptCountUnknown,
    L2Norm,
    MergedTokens,
    MRPruner,
    Need,
    PDrop,
    PruMerge,
    Pruner,
    RandomPruner,
    ResPrune,
    SparseVLM,
    Stage,
    ToMe,
    VisionZip,
    VisPruner,
    preset,
)
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


def _triton_kernels_dir() -> str:
    """Where this copy of mrprune keeps its Triton kernels: ``mrprune/triton_kernels`` in a wheel (``package-dir``
    maps the top-level folder there), ``../triton_kernels`` next to ``mrprune/`` in a checkout (editable or not)."""
    here = os.path.dirname(os.path.abspath(__file__))
    installed = os.path.join(here, "triton_kernels")
    return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(here), "triton_kernels")


def _load_triton_kernels() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        logger.debug("triton is not installed; the Triton kernels are not registered")
        return False
    # Loaded from this copy's own folder, by path: a plain ``import mrprune.triton_kernels`` fails in a raw checkout
    # (the folder is only mapped into the package by an install) and, with another checkout installed in editable
    # mode, silently imports that checkout's kernels.
    path = _triton_kernels_dir()
    spec = importlib.util.spec_from_file_location(
        f"{__name__}.triton_kernels", os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    if spec is None or not os.path.isfile(os.path.join(path, "__init__.py")):
        logger.warning("mrprune's Triton kernels are missing (looked in %s); the Triton backend is off", path)
        return False
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)  # registers the "triton" backend of the graph ops
    except Exception as error:  # a triton too old or broken for the kernels: the other backends still serve
        del sys.modules[spec.name]
        if os.environ.get("MRPRUNE_REQUIRE_TRITON") == "1":
            raise
        logger.warning(
            "mrprune's Triton kernels failed to load (%s: %s); the Triton backend is off", type(error).__name__, error
        )
        return False
    globals()["triton_kernels"] = module
    return True


HAS_TRITON = _load_triton_kernels()

__all__ = [
    "HAS_EXTENSION",
    "PRESETS",
    "AgilePruner",
    "CDPruner",
    "DART",
    "DivPrune",
    "FastV",
    "FasterVLM",
    "GPrune",
    "HiRED",
    "KeptCountUnknown",
    "L2Norm",
    "MergedTokens",
    "GridLayout",
    "LlavaNextLayout",
    "MRPruner",
    "Need",
    "PDrop",
    "Pruner",
    "PruMerge",
    "RandomPruner",
    "ResPrune",
    "SCOPE",
    "SparseVLM",
    "Stage",
    "TRIM",
    "ToMe",
    "VisPruner",
    "VisionZip",
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
