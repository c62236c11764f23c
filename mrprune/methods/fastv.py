"""FastV: inside the language model, drop the visual tokens the last prompt token attends to least (Chen et al.,
"An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024; official code pkunlp-icler/FastV).

An ``llm``-stage method: layers ``0 .. K-1`` run on the full prefill; at the entry of layer ``K`` the integration
hands each image / video its tokens' head-averaged attention from the last prompt token in layer ``K - 1``
(recomputed from that layer's q/k, so the model keeps SDPA / FlashAttention); each keeps its ``round(keep_ratio * n)``
best tokens (ties to the lower index), the others leave the sequence and the cache for layers ``K ..`` (the official
KV-cache variant). Positions stay the original ones.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Pruner, check_keep_ratio, round_half_up, top_tokens
from .stages import Need, Stage

__all__ = ["FastV"]


class FastV(Pruner):
    """FastV: keep each item's tokens the last prompt token attends to most at decoder layer ``layer - 1``.

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Fraction of each image's / video's tokens kept (``round(keep_ratio * n)``, half up); the paper's R = 50 % is
        0.5.
    layer : int >= 1
        ``K``: pruning happens before decoder layer ``K``, scored with layer ``K - 1``'s attention (paper: 2).

    Notes
    -----
    The official code scores batch row 0 at a hard-coded image span; here every prompt of the batch and every image
    is scored on its own (an image keeps its share, so no image is dropped wholesale). ``select`` / ``select_batch``
    take the scores as ``attention``, floating point ``[N]`` / ``[B, N]`` (``select`` lifts one item's to a batch of
    one, :meth:`Pruner.select`; other shapes raise ``ValueError``); ``features`` are the hidden states entering layer
    ``K`` and are not read.
    """

    stage = Stage.LLM
    needs = Pruner.needs | {Need.LAST_QUERY_ATTENTION}
    #: every layer's cache keeps only the kept tokens (layers ``0 .. K-1`` drop theirs too)
    prune_earlier_cache = True

    def __init__(self, keep_ratio: float = 0.5, layer: int = 2) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        if isinstance(layer, bool) or not (isinstance(layer, int) and layer >= 1):
            raise ValueError(f"FastV: layer must be an int >= 1 (layer 0 has no previous attention), got {layer!r}")
        self.layer = layer

    def __repr__(self) -> str:
        return f"FastV(keep_ratio={self.keep_ratio}, layer={self.layer})"

    def _select_batch(self, features, layouts, lengths, texts, attention: torch.Tensor | None = None, **kwargs):
        _check_attention("FastV.select_batch", attention, features.shape[:2], "[B, N]")
        counts = [round_half_up(self.keep_ratio * n) for n in lengths.tolist()]
        return top_tokens(attention.float(), lengths, counts)


def _check_attention(owner: str, attention: Any, shape: torch.Size, name: str) -> None:
    """Raise ``ValueError`` naming ``owner`` unless ``attention`` is a tensor of ``shape`` (spelt ``name``)."""
    if not isinstance(attention, torch.Tensor) or attention.shape != shape:
        got = tuple(attention.shape) if isinstance(attention, torch.Tensor) else type(attention).__name__
        raise ValueError(
            f"mrprune.{owner}: attention must be the {name} = {tuple(shape)} last-query attention scores, got {got}"
        )
