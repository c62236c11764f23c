"""PDrop (PyramidDrop): drop visual tokens in stages inside the language model, ranked each time by the last
instruction token's attention (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid
Visual Redundancy Reduction", CVPR 2025; official code Cooperx521/PyramidDrop, ``llava/model/modeling_llama_pdrop.py``,
``pdrop_forward`` / ``pdrop_rank_drop``).

An ``llm``-stage method with several pruning layers (paper and official scripts for LLaVA-1.5 and LLaVA-NeXT:
``layer_list [8, 16, 24]``, ``image_token_ratio_list [0.5, 0.25, 0.125]``, i.e. lambda = 0.5). At the entry of each
pruning layer ``K`` the official code recomputes layer ``K``'s queries and keys from ``input_layernorm`` of the
states entering it (rotary embedding applied), takes the softmax row of the last instruction token (in inference the
prompt's last token), averages it over heads, keeps the image columns and retains the top ``int(n0 * ratio)`` of
them (``n0`` the image's tokens before the first stage: the ratios are shares of the original count); the others
leave the sequence for layers ``K ..``. The layers before each stage keep the cache entries of the longer prompt.
LLaVA-NeXT: the official code treats an image's whole any-resolution token sequence (base view, high-resolution
tiles and newline tokens) as one span ranked at once; mrprune does the same per image.

The PyramidDrop paper (Table 2) and the comparison tables (ResPrune) report PDrop at *equivalent* token counts
(192 / 128 / 64 of LLaVA-1.5's 576, 640 / 320 of LLaVA-NeXT's 2880): the image tokens each decoder layer holds,
averaged over the layers (:meth:`PDrop.average_tokens`). No official script gives the settings for those counts;
:func:`pyramid_ratios` derives them the way the maintainer describes (Cooperx521/PyramidDrop #10, #29), and the
``pdrop_*`` presets use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _checks
from .base import Pruner, round_half_up, top_tokens
from .stages import Need, Stage

__all__ = ["PDrop", "pyramid_ratios"]


def _stage_spans(layers: Sequence[int], num_layers: int) -> list[int]:
    """Decoder layers each stage spans: ``layers[i]`` to the next pruning layer (the last: to ``num_layers``)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= max(layers, default=0):
        raise ValueError(
            f"mrprune.PDrop: num_layers must be an int above every pruning layer {tuple(layers)}, got {num_layers!r}"
        )
    return [end - start for start, end in zip(layers, [*layers[1:], num_layers], strict=True)]


def pyramid_ratios(keep: float, layers: Sequence[int] = (2, 8, 16), num_layers: int = 32) -> tuple[float, ...]:
    """PyramidDrop's ratios ``(lambda, lambda**2, ...)`` whose equivalent token count is a share ``keep`` of the image.

    PyramidDrop compares itself at an *equivalent* number of visual tokens: the average, over all ``num_layers``
    decoder layers, of the image tokens each layer holds (the maintainer's answers in Cooperx521/PyramidDrop issues
    #10, #22 and #29: ``sum(tokens_l) / layer_num``). With the paper's geometric pyramid (stage ``i`` keeps
    ``lambda**(i+1)`` of the original ``n0`` tokens from layer ``layers[i]`` on) that share is
    ``(layers[0] + sum_i span_i * lambda**(i+1)) / num_layers``, increasing in ``lambda``; this solves it for
    ``lambda`` by bisection (to float64 precision).

    Parameters
    ----------
    keep : float
        The equivalent share of the image's tokens, ``budget / n0`` (LLaVA-1.5: 192 / 576 = 1/3, 128 / 576, 64 / 576).
        It must exceed ``layers[0] / num_layers``, the share of the layers before the first pruning layer, and be at
        most 1.
    layers : sequence of int, increasing
        The pruning layers. The default ``(2, 8, 16)`` is the maintainer's suggestion for the small budgets in
        Cooperx521/PyramidDrop #29 (with ``lambda = 0.19`` for 64 of 576 tokens): the paper's ``(8, 16, 24)`` cannot
        go below ``8 / 32`` of the tokens (144 of 576) on a 32-layer model.
    num_layers : int
        Decoder layers of the language model (32 for the 7B LLaVA-1.5 / LLaVA-NeXT models of the tables).

    Returns
    -------
    tuple of float, one ratio per pruning layer (``lambda ** (i + 1)``), for :class:`PDrop`'s ``ratios``.
    """
    spans = _stage_spans(tuple(layers), num_layers)
    floor = layers[0] / num_layers
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not floor < keep <= 1:
        raise ValueError(
            f"mrprune.PDrop: an equivalent share keep={keep!r} is not reachable with pruning layers {tuple(layers)} "
            f"of {num_layers}: it must be in ({floor:.4g}, 1] (the layers before {layers[0]} hold every token)"
        )

    def share(lam: float) -> float:
        return (layers[0] + sum(span * lam ** (i + 1) for i, span in enumerate(spans))) / num_layers

    low, high = 0.0, 1.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if share(mid) < keep else (low, mid)
    return tuple(high ** (i + 1) for i in range(len(spans)))


class PDrop(Pruner):
    """PyramidDrop: at each pruning layer, keep each item's visual tokens the last prompt token attends to most.

    Parameters
    ----------
    layers : sequence of int, increasing, each >= 1
        The pruning layers ``K`` (official ``layer_list``; default ``(8, 16, 24)``).
    ratios : sequence of float in (0, 1], non-increasing, one per layer
        The share of each item's *original* tokens kept from each pruning layer on (official
        ``image_token_ratio_list``; default ``(0.5, 0.25, 0.125)``).
    official : bool
        The official count ``int(n0 * ratio)`` (floor) instead of ``round(n0 * ratio)`` (half up).

    Notes
    -----
    Selection at layer ``K``: the head-averaged attention of the last prompt token in layer ``K`` itself, recomputed
    from that layer's ``q_proj`` / ``k_proj`` on the states entering it (``score_offset = 0``; the model keeps
    SDPA / FlashAttention), the top ``count`` tokens of each item (ties to the lower index; the official
    ``torch.topk`` leaves ties unspecified), sorted.

    Deviations from the official code, in both modes: every image / video of every prompt of a batch is ranked on its
    own with its own count (official: one image per prompt, right padding only); the kept tokens keep their original
    positions (the official code renumbers the sequence ``0 .. L'-1`` at each stage and shifts decoding positions
    stage by stage, so its scores at later stages use the renumbered rotary phases); the attention is averaged in
    float32 (official: softmax in float32, cast back to the model dtype before the head mean).

    ``select`` / ``select_batch`` take the scores as ``attention`` (``[N]`` / ``[B, N]``), the stage as ``step``
    (default 0) and the original token counts as ``original_lengths`` (an int / ``[B]``; default: the current
    ``lengths``); ``select`` lifts one item's to a batch of one (:meth:`Pruner.select`), other shapes raise
    ``ValueError``; ``features`` (the hidden states entering layer ``K``) are not read.
    """

    stage = Stage.LLM
    needs = Pruner.needs | {Need.LAST_QUERY_ATTENTION}
    #: scored with the pruning layer's own projections on the states entering it
    score_offset = 0
    #: the layers before each stage keep the longer prompt's cache entries
    prune_earlier_cache = False

    def __init__(
        self,
        layers: Sequence[int] = (8, 16, 24),
        ratios: Sequence[float] = (0.5, 0.25, 0.125),
        official: bool = False,
    ) -> None:
        owner = "PDrop"
        if isinstance(layers, int | str) or isinstance(ratios, float | int | str):
            raise TypeError("mrprune.PDrop: layers and ratios must be sequences (one ratio per layer)")
        self.layers = tuple(_checks.count(owner, "layers", k, minimum=1) for k in layers)
        self.ratios = tuple(_checks.keep_ratio(owner, r) for r in ratios)
        if not self.layers or len(self.layers) != len(self.ratios):
            raise ValueError(
                f"mrprune.PDrop: layers and ratios must have the same non-zero length, got {len(self.layers)} and "
                f"{len(self.ratios)}"
            )
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"mrprune.PDrop: layers must increase, got {self.layers}")
        if any(b > a for a, b in zip(self.ratios, self.ratios[1:], strict=False)):
            raise ValueError(f"mrprune.PDrop: ratios must not increase, got {self.ratios}")
        self.official = _checks.flag(owner, "official", official)

    def __repr__(self) -> str:
        return f"PDrop(layers={self.layers}, ratios={self.ratios}, official={self.official})"

    def count(self, step: int, original: int, current: int) -> int:
        """Tokens an item of ``original`` tokens (``current`` left) keeps from pruning layer ``layers[step]`` on."""
        ratio = self.ratios[step]
        kept = int(original * ratio) if self.official else round_half_up(original * ratio)
        return min(kept, current)

    def average_tokens(self, original: int, num_layers: int) -> float:
        """PyramidDrop's equivalent token count: the image tokens each of the model's ``num_layers`` decoder layers
        holds, averaged (``original`` before ``layers[0]``, :meth:`count` from each pruning layer on), for an image of
        ``original`` tokens; what the papers' tables report as the tokens PDrop keeps."""
        spans = _stage_spans(self.layers, num_layers)
        held = self.layers[0] * original
        current = original
        for step, span in enumerate(spans):
            current = self.count(step, original, current)
            held += span * current
        return held / num_layers

    def _select_batch(
        self,
        features,
        layouts,
        lengths,
        texts,
        attention: torch.Tensor | None = None,
        step: int = 0,
        original_lengths: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        if attention is None or attention.shape != features.shape[:2]:
            raise ValueError(
                f"mrprune.PDrop: attention must be the [B, N] = {tuple(features.shape[:2])} last-query attention "
                f"scores, got {None if attention is None else tuple(attention.shape)}"
            )
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(self.layers):
            raise ValueError(f"mrprune.PDrop: step must be an int in [0, {len(self.layers)}), got {step!r}")
        originals = lengths if original_lengths is None else original_lengths
        if originals.shape != lengths.shape or bool((originals < lengths).any()):
            raise ValueError("mrprune.PDrop: original_lengths must be [B] and at least the current lengths")
        counts = [self.count(step, n0, n) for n0, n in zip(originals.tolist(), lengths.tolist(), strict=True)]
        return top_tokens(attention.float(), lengths, counts)
