"""DART: prune duplicated visual tokens inside the language model, by their dissimilarity to a few pivot tokens
(Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
EMNLP 2025; official code ZichenWen1/DART, ``llava/model/language_model/modeling_llama_self.py``,
``get_retained_image_token``).

An ``llm``-stage method at one layer (``K = 2``), without attention weights, so it runs under FlashAttention:

1. **Pivots**, from decoder layer ``K - 1``: the ``image_pivots`` (4) image tokens and the ``text_pivots`` (4) text
   tokens after the image with the largest L1 norm of their keys (after the rotary embedding, all heads).
2. **Duplication.** Every other image token is a candidate. For each pivot in turn, the ``per_pivot`` candidates
   least similar to it (lowest cosine of the hidden states entering layer ``K`` passed through the model's final
   norm) are kept and leave the candidate pool.
3. The image keeps its pivots and the picked tokens (text pivots are not image tokens and stay anyway); positions stay
   the original ones, and layers ``0 .. K-1`` keep the whole prompt in their cache.

Budget arithmetic (official): ``per_pivot = max_num_trunction // (image_pivots + text_pivots)`` with
``max_num_trunction`` 128 on LLaVA-1.5 (so 4 + 8 * 16 = **132** tokens stay), and on LLaVA-NeXT
``min(retain_token_num_for_llava_next, n - image_pivots) // 8`` with 320 (so 324 stay).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from ..layouts import LlavaNextLayout
from . import _checks
from ._vision import Budget
from .base import Pruner, top_tokens
from .stages import Need, PromptTokens, Stage

__all__ = ["DART"]

_MASKED = -4.0  # below every negative cosine: a token out of the candidate pool


def _cosine(pivot: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """``cos(pivot_b, states_b,j)`` ``[B, N]`` in float32 (``torch.nn.functional.cosine_similarity``'s eps)."""
    pivot, states = pivot.float(), states.float()
    dots = (states * pivot[:, None]).sum(-1)
    norms = (states.square().sum(-1) * pivot.square().sum(-1)[:, None]).clamp(min=1e-16).sqrt()
    return dots / norms


class DART(Pruner):
    """DART: keep pivot tokens and, per pivot, the image tokens least similar to it.

    Parameters
    ----------
    budget : int, optional
        Default mode: tokens each item keeps in all, its image pivots included (papers' 192 / 128 / 64 on LLaVA-1.5,
        640 / 320 on LLaVA-NeXT). ``official=True``: the official ``max_num_trunction`` (LLaVA-1.5, Qwen2.5-VL) or
        ``retain_token_num_for_llava_next`` (LLaVA-NeXT), so ``image_pivots + 8 * (budget // 8)`` stay. Default 128.
    keep_ratio : float in (0, 1], optional
        Instead of ``budget``: ``round(keep_ratio * n)`` tokens per item (the Qwen2.5-VL tables).
    layer : int >= 1
        ``K``: pruning before decoder layer ``K``, pivots from layer ``K - 1``'s keys (paper: 2).
    image_pivots, text_pivots : int >= 0
        Pivot counts (paper: 4 and 4).
    official : bool
        The official selection: its budget arithmetic, and the pivots visited in the iteration order of a Python
        ``set`` of their sequence positions (the official loop runs over ``set(image_pivots + text_pivots)``).

    Notes
    -----
    Default mode: every image / video of every prompt of a batch is pruned on its own (official: batch 1, one image,
    ``assert batch_size == 1``); an item keeps exactly ``budget`` tokens: its image pivots, then
    ``budget - image_pivots`` picks split evenly over the pivots (the first ``remainder`` pivots one more), visited
    image pivots first, each group by decreasing key norm. An item whose prompt has fewer than ``text_pivots`` text
    tokens after it uses those it has (official: ``topk`` fails); without any pivot the largest key norms fill the
    budget. Both modes: cosines and norms in float32 (official:
    the model's half precision); ties to the lower index (official: CUDA ``topk``, unspecified). In official mode the
    text pivots come from the item's prompt text after it (official: every token after the image, which is the same
    for the one-image prompts it supports).

    ``select_batch`` reads ``key_norms [B, N]``, ``normed [B, N, D]``, ``prompt``
    (:class:`~mrprune.methods.stages.PromptTokens` with ``after``, ``key_norms``, ``normed``) and, for
    ``official=True``, ``positions [B, N]``; ``select`` one item's ``key_norms [N]``, ``normed [N, D]``,
    ``positions [N]`` and a batch of one's ``prompt`` (:meth:`Pruner.select`); ``features`` are not read.
    """

    stage = Stage.LLM
    needs = Pruner.needs | {Need.KEY_NORMS, Need.NORMED_STATES}
    #: pivots from the keys of the layer before the pruning layer
    score_offset = -1
    #: layers ``0 .. K-1`` keep the whole prompt in their cache, as the official code
    prune_earlier_cache = False

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        layer: int = 2,
        image_pivots: int = 4,
        text_pivots: int = 4,
        official: bool = False,
    ) -> None:
        owner = "DART"
        if budget is None and keep_ratio is None:
            budget = 128
        self.size = Budget(owner, budget, keep_ratio)
        self.layer = _checks.count(owner, "layer", layer, minimum=1)
        self.image_pivots = _checks.count(owner, "image_pivots", image_pivots)
        self.text_pivots = _checks.count(owner, "text_pivots", text_pivots)
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("mrprune.DART: image_pivots + text_pivots must be >= 1")
        self.official = _checks.flag(owner, "official", official)
        if self.official and self.size.budget is None:
            raise ValueError("mrprune.DART: official=True takes a budget (max_num_trunction), not a keep_ratio")

    @property
    def layers(self) -> tuple[int, ...]:
        """The pruning layers: ``(layer,)``."""
        return (self.layer,)

    def __repr__(self) -> str:
        return (
            f"DART({self.size!r}, layer={self.layer}, image_pivots={self.image_pivots}, "
            f"text_pivots={self.text_pivots}, official={self.official})"
        )

    def _select_batch(
        self,
        features,
        layouts,
        lengths,
        texts,
        key_norms: torch.Tensor | None = None,
        normed: torch.Tensor | None = None,
        prompt: PromptTokens | None = None,
        positions: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        batch, tokens = features.shape[:2]
        if key_norms is None or key_norms.shape != (batch, tokens):
            raise ValueError(f"mrprune.DART: key_norms must be [B, N] = {(batch, tokens)}")
        if normed is None or normed.shape[:2] != (batch, tokens):
            raise ValueError(f"mrprune.DART: normed must be [B, N, D] with [B, N] = {(batch, tokens)}")
        if not isinstance(prompt, PromptTokens) or prompt.key_norms is None or prompt.normed is None:
            raise ValueError("mrprune.DART: prompt must be PromptTokens with key_norms and normed")
        if self.official:
            if positions is None or positions.shape != (batch, tokens):
                raise ValueError(f"mrprune.DART: official=True needs positions [B, N] = {(batch, tokens)}")
            return [self._official(b, layouts[b], lengths, key_norms, normed, prompt, positions) for b in range(batch)]
        return self._default(lengths, key_norms, normed, prompt)

    # -- default mode: batched over items --------------------------------------------------------------------------

    def _default(self, lengths, key_norms, normed, prompt) -> list[torch.Tensor]:
        device = key_norms.device
        batch, tokens = key_norms.shape
        sizes = lengths.tolist()
        budgets = [self.size(n) for n in sizes]
        text_lengths = prompt.after.sum(1)
        after_first = torch.sort((~prompt.after).to(torch.int8), dim=1, stable=True).indices  # text after the item
        text_norms = prompt.key_norms.float().gather(1, after_first)
        text_counts = [min(self.text_pivots, int(t)) for t in text_lengths.tolist()]
        text_pivots = [after_first[b, k] for b, k in enumerate(top_tokens(text_norms, text_lengths, text_counts))]
        # no pivot at all (no image pivots, no text after the item): the largest key norms fill the budget
        image_counts = [
            min(self.image_pivots, k) if self.image_pivots or t else k
            for k, t in zip(budgets, text_counts, strict=True)
        ]
        image_pivots = top_tokens(key_norms.float(), lengths, image_counts)  # by decreasing norm

        # pivot states [B, P, D] in visiting order, and each item's picks per pivot
        width = max((i.numel() + t.numel() for i, t in zip(image_pivots, text_pivots, strict=True)), default=0)
        states = normed.new_zeros(batch, width, normed.shape[-1])
        per_pivot = torch.zeros(batch, width, dtype=torch.long)
        pool = torch.arange(tokens, device=device)[None] < lengths[:, None]
        for b in range(batch):
            i, t = image_pivots[b], text_pivots[b]
            count = i.numel() + t.numel()
            states[b, : i.numel()] = normed[b, i]
            states[b, i.numel() : count] = prompt.normed[b, t]
            pool[b, i] = False
            if count:
                rest = budgets[b] - i.numel()
                per_pivot[b, :count] = rest // count
                per_pivot[b, : rest % count] += 1
        picks = [image_pivots[b] for b in range(batch)]
        for j in range(width):
            counts = per_pivot[:, j].tolist()
            if not any(counts):
                continue
            scores = torch.where(pool, -_cosine(states[:, j], normed), _MASKED)
            chosen = top_tokens(scores, lengths, counts)
            for b, c in enumerate(chosen):
                pool[b, c] = False
                picks[b] = torch.cat([picks[b], c])
        return picks

    # -- official mode: the official loop, per item ----------------------------------------------------------------

    def _official(self, b, layout, lengths, key_norms, normed, prompt, positions) -> torch.Tensor:
        n = int(lengths[b])
        pivots = self.image_pivots + self.text_pivots
        budget = self.size.budget
        if isinstance(layout, LlavaNextLayout):
            budget = min(budget, n - self.image_pivots)
        per_pivot = int(budget // pivots)
        image = ops.topk_indices(key_norms[b : b + 1, :n].float(), lengths[b : b + 1], min(self.image_pivots, n))[0]
        after = prompt.after[b].nonzero()[:, 0]
        text_scores = prompt.key_norms[b, after].float()[None]
        count = min(self.text_pivots, after.numel())
        text = after[ops.topk_indices(text_scores, torch.tensor([after.numel()], device=after.device), count)[0]]
        # the official loop visits set(image_positions + text_positions) in CPython's set order
        where = {int(positions[b, i]): ("image", int(i)) for i in image}
        where.update({int(prompt.positions[b, t]): ("text", int(t)) for t in text})
        order = list(set(where))
        position_of = positions[b, :n].tolist()
        valid = set(position_of)
        valid.difference_update(int(positions[b, i]) for i in image)
        index_of = {p: i for i, p in enumerate(position_of)}
        kept = [int(i) for i in image]
        for position in order:
            kind, index = where[position]
            pivot = normed[b, index] if kind == "image" else prompt.normed[b, index]
            candidates = list(valid)
            rows = torch.tensor([index_of[p] for p in candidates], device=normed.device, dtype=torch.long)
            cosine = -_cosine(pivot[None], normed[b, rows][None])
            k = min(per_pivot, len(candidates))
            top = ops.topk_indices(cosine, torch.tensor([len(candidates)], device=cosine.device), k)[0].tolist()
            picked = [candidates[i] for i in top]
            kept.extend(index_of[p] for p in picked)
            valid.difference_update(picked)
        return torch.tensor(sorted(set(kept)), device=key_norms.device, dtype=torch.long)
