"""Integrations of the pruning methods into model libraries.

:func:`patch` / :func:`patched` make a Hugging Face ``transformers`` multimodal model (LLaVA-1.5, LLaVA-NeXT,
Qwen2.5-VL) prune its visual tokens with any :class:`~mrprune.Pruner`, at the stage the method declares
(:mod:`mrprune.methods.stages`). transformers is imported only when a model is patched.
"""

from ..methods.fastv import FastV  # re-exported for ``mrprune.integrations.FastV`` users (it is a method)
from .hf import MIN_TRANSFORMERS, PruneRecord, PruningHandle, patch, patched

__all__ = ["MIN_TRANSFORMERS", "FastV", "PruneRecord", "PruningHandle", "patch", "patched"]
