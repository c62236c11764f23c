"""The Hugging Face ``transformers`` integration, one module per stage.

:mod:`.patch` (``patch``, ``patched``, ``PruningHandle``: install, prefill orchestration, records), :mod:`.vision`
(encoding, vision-encoder attention signals), :mod:`.projector` (selection before the language model and its merged
call), :mod:`.llm` (selection inside the language model), :mod:`.decode` (decoding on a pruned cache), :mod:`.rows`
(re-padding), and :mod:`.adapters` (one per model family, each implementing every stage once).
"""

from .patch import MIN_TRANSFORMERS, PruneRecord, PruningHandle, patch, patched

__all__ = ["MIN_TRANSFORMERS", "PruneRecord", "PruningHandle", "patch", "patched"]
