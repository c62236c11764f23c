"""Integrations of the pruning methods into model libraries.

:func:`patch` / :func:`patched` make a Hugging Face ``transformers`` multimodal model (LLaVA-1.5, LLaVA-NeXT,
Qwen2.5-VL) prune its visual tokens at prefill; :class:`FastV` is the in-LLM method they also accept. transformers
is imported only when a model is patched.
"""

from .fastv import FastV
from .hf import MIN_TRANSFORMERS, PruneRecord, PruningHandle, patch, patched

__all__ = ["MIN_TRANSFORMERS", "FastV", "PruneRecord", "PruningHandle", "patch", "patched"]
