"""SparseVLM: text-rated visual token sparsification inside the language model, with recycling of the pruned tokens
(Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model Inference", ICML 2025,
arXiv 2410.04417; official code github.com/Gumpest/SparseVLMs, ``llava/model/language_model/score.py`` and
``modelling_sparse_llama.py``, ``USE_VERSION=1_0``).

An ``llm``-stage method acting at several decoder layers (paper: 2, 6 and 15):

1. **Raters.** Once per prompt, on the language model's *input embeddings*: with ``V [N0, D]`` the item's visual
   tokens and ``T [M, D]`` the prompt's text tokens after them, ``m = mean_visual softmax_text(V T^T)`` ``[M]``; the
   text tokens with ``m > mean(m)`` are the raters.
2. **Scoring.** At each pruning layer ``l`` every current visual token gets the attention the raters pay it in that
   layer, averaged over heads and raters.
3. **Sparsification.** The item keeps its best tokens on the official per-budget schedule (:data:`SCHEDULES`: the
   visual tokens left after layers 2 / 6 / 15 for the 192 / 128 / 96 / 64-token settings of LLaVA-1.5), or, with
   ``rank=True``, on the first release's rank-based count (:data:`RANK_SETTINGS`, layers 2 / 6 / 15 / 19).
4. **Recycling.** Of the ``d`` dropped tokens, the ``int(0.3 d) + 1`` best scored are clustered by density peaks
   (DPC-kNN) into ``int(r / 10) + 1`` clusters (``r`` the recycled count) and each cluster becomes its mean
   (``mrprune.density_peak_merge``); the merged tokens are visual tokens for the next pruning layers.

**v2.0** (``version="2.0"``; the official ``v2.0`` branch with ``USE_VERSION=2_0``, its ``score.py`` and
``modelling_sparse_llama.py``; "SparseVLM+") changes steps 2 to 4: the attention of every head is divided by the
RoPE-only *gravity* term ``g(t, v) = (R_t 1) . (R_v 1) / sqrt(d)`` (the attention logit that two all-ones head
vectors would have at the two tokens' positions, :func:`gravity`), the ``heads`` (14) heads with the most corrected
attention from the raters to the item's tokens are kept and averaged (:func:`head_scores`), the counts follow the
v2.0 schedule (:data:`SCHEDULES_V2`, same layers 2 / 6 / 15), nothing is recycled, and the kept tokens keep their
original positions (as every ``llm``-stage method here does).

The hidden states pruned and merged are the outputs of layer ``l`` (the input of ``l + 1``), so the integration
calls the method at the entry of decoder layers ``l + 1`` (:attr:`SparseVLM.layers`) with the attention of layer
``l``. Each v1 call returns :class:`~mrprune.methods.results.MergedTokens` over the item's *current* visual tokens: the
kept tokens as they are, and one merged token per cluster whose representative (the token whose row and position it
takes) is the cluster's density-peak centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import ops
from ..batching import pad_batch
from . import _checks
from .base import Pruner, round_half_up, take_prefixes, top_tokens
from .results import MergedTokens
from .stages import Need, PromptTokens, Stage

__all__ = [
    "RANK_SETTINGS",
    "SCHEDULES",
    "SCHEDULES_V2",
    "SparseVLM",
    "gravity",
    "head_scores",
    "rater_scores",
    "select_raters",
]

#: The official ``sparse_token_dict`` (v1): visual tokens kept after layers 2 / 6 / 15 of LLaVA-1.5 (576 tokens),
#: by the setting's equivalent token budget.
SCHEDULES: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 110),
    128: (303, 110, 36),
    96: (238, 48, 26),
    64: (66, 30, 17),
}
#: The v2.0 ``sparse_token_dict`` (``USE_VERSION=2_0``): visual tokens kept after layers 2 / 6 / 15 by budget.
SCHEDULES_V2: dict[int, tuple[int, int, int]] = {
    192: (300, 200, 118),
    128: (238, 108, 60),
    96: (246, 54, 28),
    64: (66, 34, 20),
}
#: v2.0's priority heads: the official ``select_attn_head_by_sum`` keeps ``topk(14)`` heads (of LLaVA-1.5-7B's 32).
HEADS_V2 = 14
#: The visual tokens of a LLaVA-1.5 image, the scale the schedules are written for.
REFERENCE_TOKENS = 576
#: The first release's rank-based count (github.com/Gumpest/SparseVLMs @ 91fb6d9, ``attn_postprocess_rank``): keep
#: ``int(rank * scale + bias)`` tokens, ``(scale, bias)`` from its evaluation scripts by token budget (MME 192,
#: POPE 128, TextVQA 64), at the scoring layers :data:`RANK_LAYERS`.
RANK_SETTINGS: dict[int, tuple[float, float]] = {192: (13.5, 0.0), 128: (9.0, 6.0), 64: (0.8, 0.0)}
RANK_LAYERS = (2, 6, 15, 19)


def select_raters(
    visual: torch.Tensor, visual_lengths: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor
) -> torch.Tensor:
    """SparseVLM's text raters: the text tokens whose mean (over visual tokens) softmax relevance is above average.

    Parameters
    ----------
    visual : Tensor ``[B, N, D]``
        Each item's visual tokens in the language model's input embedding space; item ``b`` owns
        ``visual[b, :visual_lengths[b]]``.
    visual_lengths : Tensor ``[B]`` int64
    text : Tensor ``[B, M, D]``
        Input embeddings of text tokens (same dtype).
    text_mask : Tensor ``[B, M]`` bool
        Each item's text tokens (official: the prompt after the image).

    Returns
    -------
    Tensor ``[B, M]`` bool: ``m_t > mean(m)`` with ``m = mean_v softmax_t(V T^T)`` over the item's text tokens,
    computed in float32 (float64 for float64 input); ``False`` outside ``text_mask``. An item whose ``m`` is
    constant (one text token, or identical ones) has no rater above the mean: every text token rates instead (the
    official code averages an empty set and ranks NaN scores).
    """
    dtype = torch.float64 if visual.dtype == torch.float64 else torch.float32
    rows = torch.arange(visual.shape[1], device=visual.device)[None] < visual_lengths[:, None]
    cols = text_mask
    logits = visual.to(dtype) @ text.to(dtype).transpose(1, 2)  # [B, N, M]
    relevance = logits.masked_fill(~cols[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    m = (relevance * rows[..., None]).sum(1) / visual_lengths.clamp_min(1)[:, None].to(dtype)  # [B, M]
    mean = (m * cols).sum(1, keepdim=True) / cols.sum(1, keepdim=True).clamp_min(1).to(dtype)
    raters = (m > mean) & cols
    none = ~raters.any(1, keepdim=True)
    return torch.where(none, cols, raters)


def rater_scores(attention: torch.Tensor, raters: torch.Tensor) -> torch.Tensor:
    """Each visual token's attention from the raters, averaged over the raters.

    Parameters
    ----------
    attention : Tensor ``[B, M, N]``
        Head-averaged attention probabilities of each text token (row) to each visual token at the scoring layer.
    raters : Tensor ``[B, M]`` bool

    Returns
    -------
    Tensor ``[B, N]`` float32 (float64 for float64 input); 0 for an item without raters.
    """
    weights = raters.to(attention.dtype if attention.dtype == torch.float64 else torch.float32)
    total = (weights[..., None] * attention.to(weights.dtype)).sum(1)
    return total / weights.sum(1, keepdim=True).clamp_min(1)


def gravity(text_rotary: torch.Tensor, item_rotary: torch.Tensor) -> torch.Tensor:
    """SparseVLM v2.0's RoPE-only "gravity" term between text tokens and an item's tokens.

    Parameters
    ----------
    text_rotary : Tensor ``[B, T, d]``
        The rotary embedding of an all-ones head vector at each text token's position.
    item_rotary : Tensor ``[B, N, d]``
        The same at each of the item's tokens' positions.

    Returns
    -------
    Tensor ``[B, T, N]`` float32 (float64 for float64 input): ``text_rotary @ item_rotary^T / sqrt(d)``. Under 1-D
    RoPE with ``rotate_half`` it is ``2 sum_i cos((p_t - p_v) theta_i) / sqrt(d)``, a function of the distance that
    decays from ``sqrt(d)`` and crosses zero far away (LLaMA's ``d = 128``, base 10^4: first at distance 1707).
    """
    dtype = torch.float64 if text_rotary.dtype == torch.float64 else torch.float32
    return text_rotary.to(dtype) @ item_rotary.to(dtype).transpose(1, 2) / text_rotary.shape[-1] ** 0.5


def head_scores(
    attention: torch.Tensor, gravity: torch.Tensor, raters: torch.Tensor, lengths: torch.Tensor, heads: int
) -> torch.Tensor:
    """SparseVLM v2.0's scores: per-head attention divided by the gravity term, the ``heads`` heads with the most
    corrected rater-to-item attention averaged, then the raters.

    Parameters
    ----------
    attention : Tensor ``[B, H, T, N]``
        Each head's attention probabilities of each text token (row) to each of the item's current tokens.
    gravity : Tensor ``[B, T, N]``
        :func:`gravity` of the same pairs.
    raters : Tensor ``[B, T]`` bool
    lengths : Tensor ``[B]`` int64
        Item ``b`` owns columns ``:lengths[b]``.
    heads : int >= 1
        Heads kept (at most ``H``); ties go to the lower head index.

    Returns
    -------
    Tensor ``[B, N]`` float32 (float64 for float64 input): ``mean_{raters} mean_{kept heads} attention / gravity``;
    0 past ``lengths`` and for an item without raters.
    """
    dtype = torch.float64 if attention.dtype == torch.float64 else torch.float32
    batch, total, _, n = attention.shape
    valid = raters[:, :, None] & (torch.arange(n, device=attention.device)[None, None] < lengths[:, None, None])
    corrected = (attention.to(dtype) / gravity.to(dtype)[:, None]).masked_fill(~valid[:, None], 0.0)  # [B, H, T, N]
    mass = corrected.sum((2, 3))  # [B, H]: the official ``sum((1, 2))`` over rater rows and the item's columns
    # ties to the lower head: a stable descending sort
    chosen = mass.sort(dim=1, descending=True, stable=True).indices[:, : min(heads, total)]
    picked = corrected.gather(1, chosen[:, :, None, None].expand(-1, -1, *corrected.shape[2:])).mean(1)
    return rater_scores(picked, raters)


class SparseVLM(Pruner):
    """SparseVLM: rater-scored sparsification at several decoder layers, with density-peak recycling (v1) or
    gravity-corrected priority heads (``version="2.0"``).

    Parameters
    ----------
    budget : {192, 128, 96, 64}
        The official schedule (:data:`SCHEDULES`), named by its LLaVA-1.5 token budget. LLaVA-NeXT's 640 / 320 and
        Qwen2.5-VL's 77.8 / 88.9 % pruned are the 128 / 64 schedules (the same shares of the image's tokens).
    scoring_layers : sequence of int, increasing, optional
        The layers ``l`` whose attention scores and whose output is pruned (official ``pruning_loc``: 2, 6, 15; with
        ``rank``: 2, 6, 15, 19); tokens leave from layer ``l + 1`` (the pruning layers :attr:`layers`). One per
        schedule entry.
    schedule : sequence of int, optional
        Tokens kept after each scoring layer, written for a 576-token image, instead of ``budget``'s schedule
        (``(576, 576, 576)`` keeps every token).
    recycle : float in [0, 1]
        Share of the dropped tokens recycled into merged tokens (``int(recycle * d) + 1`` of ``d``; official 0.3).
    merge : bool, optional
        Recycle the dropped tokens (default for v1); ``False`` only drops them (v2.0 always).
    rank : bool
        The first release's adaptive count instead of a schedule (Gumpest/SparseVLMs @ 91fb6d9, the paper's
        rank-based sparsification): at each layer, with ``r`` the matrix rank of the raters' attention to the ``v``
        current tokens (``[raters, v]``, float32, ``torch.linalg.matrix_rank``'s default tolerance), keep
        ``int(r * scale + bias)`` tokens, or every token when ``r = v``.
    scale, bias : float >= 0, optional
        ``rank``'s constants; default :data:`RANK_SETTINGS` for ``budget`` (192: 13.5, 0; 128: 9, 6; 64: 0.8, 0).
    official : bool
        ``True`` reproduces the official selection arithmetic: keep ``min(schedule[s], v - 1)`` of the ``v`` current
        visual tokens (at least one token always leaves, even when the schedule keeps more; the schedule is not
        scaled to the image's token count); with ``rank``, ``min(int(r * scale + bias), v - 1)`` unless ``r = v``.
        Ties in the official ``torch.topk`` are unspecified; here they go to the lower index.
    version : {"1.0", "2.0"}
        ``"2.0"``: the v2.0 branch's selection (module docstring): gravity-corrected attention of the ``heads`` heads
        with the most corrected rater-to-item attention, the v2.0 schedule (:data:`SCHEDULES_V2`; ``budget`` and
        ``schedule`` as for v1), no recycling (``merge`` must stay off, ``rank`` is v1 only); results are kept
        indices. Needs 1-D RoPE (LLaVA-1.5, LLaVA-NeXT): the official code is LLaMA-only, and under Qwen2.5-VL's
        M-RoPE the RoPE-only term is not the one-distance term it defines, so the integration refuses it there.
    heads : int >= 1, optional
        v2.0's priority heads (official 14, at most the model's query heads: fewer heads keep them all, where the
        official ``topk(14)`` fails).

    Notes
    -----
    Default mode (``official=False``): an item of ``n0`` visual tokens keeps ``min(round(schedule[s] * n0 / 576), v)``
    tokens after stage ``s`` (half up; exactly the schedule on LLaVA-1.5), so nothing leaves when the schedule keeps
    every token, and LLaVA-NeXT / Qwen2.5-VL images keep the schedule's shares. The official code is batch 1 with one
    image (``# B == 1``) and its text after that image; here every item of a batch (each image / video of each
    prompt) is scored and budgeted on its own. Rank counts are not scaled (a rank does not grow with the image); the
    default mode keeps ``min(int(r * scale + bias), v)``. The official rank is of the half-precision attention.

    Deviations in both modes:

    * an item without a text token above the mean relevance uses every text token as a rater (official: NaN);
    * density ties in the clustering go by position instead of ``rand * 1e-6`` noise
      (:func:`mrprune.reference.density_peak_merge`). The recycled tokens enter it in score order, so the better
      scored of two tied tokens counts as denser. Ties are structural: the kNN densities of a mutual nearest pair
      are equal, and with one cluster (fewer than 10 recycled tokens) every density is 1 and the official centre is
      the noise's pick (here the best-scored recycled token; the merged token, the mean of all, is the same);
    * scores and merges in float32 (official: the model's half precision);
    * placement: the official code appends the merged tokens after the kept visual tokens and renumbers the
      sequence ``0 .. L'-1``; here each merged token takes its cluster centre's row and original position
      (:class:`MergedTokens`), kept tokens keep theirs. Each group of layers between two pruning layers keeps the
      cache entries of the prompt it saw, as the official code.

    v2.0 (``version="2.0"``): the official code divides the half-precision attention of every head of the whole
    sequence by the half-precision gravity and keeps ``topk(14)`` heads of ``attention[0]`` (batch 1); here the
    rater rows to the item's columns are divided in float32, per item, and the head ties go to the lower index. The
    gravity is taken as is in both modes: it is positive up to distance 1706 on LLaVA-1.5 (LLaMA, ``d = 128``,
    base 10^4; a LLaVA-1.5 prompt is far shorter), but a LLaVA-NeXT prompt of 2880 visual tokens can put a rater
    beyond it, where the term is near 0 or negative and the corrected attention flips sign (a quirk of the
    official formula, kept). The official counts are ``min(schedule[s], v - 1)`` on ``attn_postprocess_topk``'s
    ``mask[0]`` (batch 1); the default mode scales them as v1 and scores each item of a batch on its own.

    ``select`` / ``select_batch`` take, besides the hidden states of the item's current tokens (``features
    [B, N, D]``, the output of layer ``l``): ``step`` (which pruning layer), ``prompt`` (a
    :class:`~mrprune.methods.stages.PromptTokens` whose ``attention [B, T, N]`` holds each text token's head-averaged
    attention to the current tokens in layer ``l``, ``embeddings [B, T, D]`` their input embeddings and ``after`` the
    text tokens after the item, the raters' candidates), ``input_embeddings [B, N0, D]`` (the item's original tokens'
    input embeddings) and ``original_lengths [B]`` (``N0`` per item). v2.0 reads ``prompt.head_attention
    [B, H, T, N]`` (``prompt_attention_heads = "per_head"``) instead of ``prompt.attention``, and ``rotary [B, N, d]``
    with ``prompt.rotary [B, T, d]`` (:attr:`~mrprune.methods.stages.Need.ROTARY`); it returns kept indices.
    ``select`` takes one item's ``features [N, D]``, ``input_embeddings [N0, D]``, ``original_lengths`` (an int) and
    ``rotary [N, d]``, and a batch of one's ``prompt`` (:meth:`Pruner.select`).
    """

    stage = Stage.LLM
    merges = True
    needs = Pruner.needs | {Need.PROMPT_ATTENTION}
    #: each group of layers between two pruning layers keeps the cache entries of the prompt it saw (official)
    prune_earlier_cache = False

    def __init__(
        self,
        budget: int = 192,
        scoring_layers: Sequence[int] | None = None,
        schedule: Sequence[int] | None = None,
        recycle: float = 0.3,
        merge: bool | None = None,
        rank: bool = False,
        scale: float | None = None,
        bias: float | None = None,
        official: bool = False,
        version: str = "1.0",
        heads: int | None = None,
    ) -> None:
        owner = "SparseVLM"
        if version not in ("1.0", "2.0"):
            raise ValueError(f"mrprune.SparseVLM: version must be '1.0' or '2.0', got {version!r}")
        self.version = version
        if version == "2.0":
            if rank or merge:
                raise ValueError("mrprune.SparseVLM: version 2.0 neither recycles (merge) nor counts by rank")
            self.heads = _checks.count(owner, "heads", HEADS_V2 if heads is None else heads, minimum=1)
            # per-head rows and the RoPE-only term; plain kept indices
            self.needs = type(self).needs | {Need.ROTARY}
            self.prompt_attention_heads = "per_head"
            self.merges = False
        elif heads is not None:
            raise ValueError("mrprune.SparseVLM: heads belongs to version 2.0")
        else:
            self.heads = None
        if isinstance(scoring_layers, int | str) or isinstance(schedule, int | str):
            raise TypeError("mrprune.SparseVLM: scoring_layers and schedule must be sequences (one count per layer)")
        self.rank = _checks.flag(owner, "rank", rank)
        self.scale = self.bias = None
        if self.rank:
            if schedule is not None:
                raise ValueError("mrprune.SparseVLM: rank counts replace the schedule; give one of them")
            if scale is None or bias is None:
                budget = _checks.count(owner, "budget", budget, minimum=1)
                if budget not in RANK_SETTINGS:
                    raise ValueError(
                        f"mrprune.SparseVLM: rank counts have settings for budgets {sorted(RANK_SETTINGS)}, got "
                        f"{budget}; give scale and bias"
                    )
            default_scale, default_bias = RANK_SETTINGS.get(budget, (None, None))
            self.scale = _checks.non_negative(owner, "scale", default_scale if scale is None else scale)
            self.bias = _checks.non_negative(owner, "bias", default_bias if bias is None else bias)
            scoring_layers = RANK_LAYERS if scoring_layers is None else scoring_layers
            schedule = (0,) * len(scoring_layers)  # unused: the counts come from the ranks
        elif scale is not None or bias is not None:
            raise ValueError("mrprune.SparseVLM: scale and bias belong to rank=True")
        if schedule is None:
            budget = _checks.count(owner, "budget", budget, minimum=1)
            if budget not in SCHEDULES:
                raise ValueError(f"mrprune.SparseVLM: budget must be one of {sorted(SCHEDULES)}, got {budget}")
            schedule = (SCHEDULES_V2 if version == "2.0" else SCHEDULES)[budget]
        self.budget = budget
        self.schedule = tuple(_checks.count(owner, "schedule", s) for s in schedule)
        scoring_layers = (2, 6, 15) if scoring_layers is None else scoring_layers
        scoring = tuple(_checks.count(owner, "scoring_layers", layer) for layer in scoring_layers)
        if len(scoring) != len(self.schedule) or not scoring:
            raise ValueError(
                f"mrprune.SparseVLM: scoring_layers and schedule must have the same non-zero length, got "
                f"{len(scoring)} layers and {len(self.schedule)} schedule entries"
            )
        if any(b <= a for a, b in zip(scoring, scoring[1:], strict=False)):
            raise ValueError(f"mrprune.SparseVLM: scoring_layers must increase, got {scoring}")
        self.recycle = _checks.non_negative(owner, "recycle", recycle)
        if self.recycle > 1:
            raise ValueError(f"mrprune.SparseVLM: recycle must lie in [0, 1], got {recycle!r}")
        self.merge = _checks.flag(owner, "merge", version == "1.0" if merge is None else merge)
        self.official = _checks.flag(owner, "official", official)
        #: The decoder layers at whose entry the method selects (one after each scoring layer).
        self.layers = tuple(layer + 1 for layer in scoring)
        self.layer = self.layers[0]

    def __repr__(self) -> str:
        counts = f"rank * {self.scale} + {self.bias}" if self.rank else f"schedule={self.schedule}"
        v2 = f", version='2.0', heads={self.heads}" if self.version == "2.0" else ""
        return (
            f"SparseVLM({counts}, scoring_layers={tuple(k - 1 for k in self.layers)}, "
            f"recycle={self.recycle}, merge={self.merge}, official={self.official}{v2})"
        )

    def _rank_counts(self, attention: torch.Tensor, raters: torch.Tensor, lengths: torch.Tensor) -> list[int]:
        """The first release's counts: ``int(rank * scale + bias)`` of the raters' attention, all when full rank."""
        counts = []
        for b, v in enumerate(lengths.tolist()):
            rank = int(torch.linalg.matrix_rank(attention[b, raters[b], :v]))
            if rank == v:
                counts.append(v)
            else:
                counts.append(min(int(rank * self.scale + self.bias), v - 1 if self.official else v))
        return counts

    def _counts(self, stage: int, lengths: torch.Tensor, originals: torch.Tensor) -> list[int]:
        """Tokens each item keeps at ``stage`` out of its ``lengths[b]`` current ones."""
        target = self.schedule[stage]
        if self.official:
            return [min(target, v - 1) if v > 0 else 0 for v in lengths.tolist()]
        return [
            min(round_half_up(target * n0 / REFERENCE_TOKENS), v)
            for v, n0 in zip(lengths.tolist(), originals.tolist(), strict=True)
        ]

    def _select_batch(
        self,
        features,
        layouts,
        lengths,
        texts,
        step: int = 0,
        original_lengths: torch.Tensor | None = None,
        prompt: PromptTokens | None = None,
        input_embeddings: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        batch, tokens = features.shape[:2]
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < len(self.layers):
            raise ValueError(f"mrprune.SparseVLM: step must be an int in [0, {len(self.layers)}), got {step!r}")
        v2 = self.version == "2.0"
        field = "head_attention" if v2 else "attention"
        if not isinstance(prompt, PromptTokens) or getattr(prompt, field) is None:
            raise ValueError(
                f"mrprune.SparseVLM: prompt must be the PromptTokens of the items (text embeddings and {field}), "
                f"got {type(prompt).__name__}"
            )
        attention, text = getattr(prompt, field), prompt.embeddings
        expected = (batch, text.shape[1], tokens)
        if (v2 and (attention.dim() != 4 or attention.shape[0] != batch or attention.shape[2:] != expected[1:])) or (
            not v2 and attention.shape != expected
        ):
            shape = "[B, H, T, N]" if v2 else "[B, T, N]"
            raise ValueError(
                f"mrprune.SparseVLM: prompt.{field} must be {shape} with (B, T, N) = {expected} (text rows to the "
                f"current tokens), got {tuple(attention.shape)}"
            )
        if prompt.after.shape != text.shape[:2]:
            raise ValueError("mrprune.SparseVLM: prompt.after must be [B, T] like prompt.embeddings")
        if v2:
            rotary, text_rotary = kwargs.get("rotary"), prompt.rotary
            if (
                not isinstance(rotary, torch.Tensor)
                or not isinstance(text_rotary, torch.Tensor)
                or rotary.shape[:2] != (batch, tokens)
                or text_rotary.shape != (*text.shape[:2], rotary.shape[-1])
            ):
                raise ValueError(
                    "mrprune.SparseVLM: version 2.0 needs rotary [B, N, d] and prompt.rotary [B, T, d] (the rotary "
                    "embedding of an all-ones head vector at each token's position)"
                )
        originals = lengths if original_lengths is None else original_lengths
        if (
            not isinstance(input_embeddings, torch.Tensor)
            or input_embeddings.dim() != 3
            or input_embeddings.shape[0] != batch
            or originals.shape != lengths.shape
            or bool((originals > input_embeddings.shape[1]).any())
            or bool((originals < lengths).any())
        ):
            raise ValueError(
                "mrprune.SparseVLM: input_embeddings must be the items' original tokens' input embeddings [B, N0, D] "
                "with original_lengths [B] (at least the current lengths)"
            )
        # the official text: the prompt after the image (its instruction)
        after = prompt.after & (torch.arange(text.shape[1], device=text.device)[None] < prompt.lengths[:, None])
        if bool((~after.any(1)).any()):
            raise ValueError("mrprune.SparseVLM: every item needs text tokens after it to rate its tokens")
        if not bool(torch.isfinite(attention).all()):
            raise ValueError(f"mrprune.SparseVLM: prompt.{field} must be finite")
        raters = select_raters(input_embeddings, originals, text, after)
        if v2:
            scores = head_scores(attention, gravity(text_rotary, rotary), raters, lengths, self.heads)
            return top_tokens(scores, lengths, self._counts(step, lengths, originals))
        scores = rater_scores(attention, raters)
        if self.rank:
            counts = self._rank_counts(attention, raters, lengths)
        else:
            counts = self._counts(step, lengths, originals)
        kept = top_tokens(scores, lengths, counts)
        return self._recycle(features, scores, lengths, kept)

    def _recycle(
        self, features: torch.Tensor, scores: torch.Tensor, lengths: torch.Tensor, kept: list[torch.Tensor]
    ) -> list[MergedTokens]:
        """Cluster the best-scored dropped tokens of each item into merged tokens; assemble the results."""
        device = features.device
        dropped = []
        for b, k in enumerate(kept):
            out = torch.ones(int(lengths[b]), dtype=torch.bool, device=device)
            out[k] = False
            dropped.append(out.nonzero()[:, 0])  # ascending, as the official ``where(policy == 0)``
        sizes = [d.numel() for d in dropped]
        wanted = [min(int(d * self.recycle) + 1, d) if d > 0 and self.merge else 0 for d in sizes]
        recycled = [d[:0] for d in dropped]
        if any(wanted):
            dropped_scores, dropped_lengths = pad_batch([scores[b, d][:, None] for b, d in enumerate(dropped)])
            order = take_prefixes(ops.topk_indices(dropped_scores[..., 0], dropped_lengths, max(wanted)), wanted)
            recycled = [d[o] for d, o in zip(dropped, order, strict=True)]  # in score order, as the official topk
        clusters = [int(r / 10) + 1 if r > 0 else 0 for r in wanted]
        merged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(kept)
        for c in sorted(set(clusters) - {0}):  # items with equal cluster counts share one call
            group = [b for b, cb in enumerate(clusters) if cb == c]
            x, sizes_r = pad_batch([features[b, recycled[b]] for b in group])
            tokens, assignment, centers = ops.density_peak_merge(x, sizes_r, c)
            for i, b in enumerate(group):
                merged[b] = (tokens[i], assignment[i, : wanted[b]], centers[i])
        return [_assemble(features[b, : int(lengths[b])], kept[b], recycled[b], merged[b]) for b in range(len(kept))]


def _assemble(
    tokens: torch.Tensor,
    kept: torch.Tensor,
    recycled: torch.Tensor,
    merged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> MergedTokens:
    """One item's :class:`MergedTokens`: kept tokens as they are, one merged token per cluster at its centre."""
    n, device = tokens.shape[0], tokens.device
    sources = torch.full((n,), -1, dtype=torch.int64, device=device)
    weights = torch.zeros(n, dtype=torch.float32, device=device)
    if merged is None:
        kept = kept.sort().values
        sources[kept] = torch.arange(kept.numel(), device=device)
        weights[kept] = 1.0
        return MergedTokens(tokens[kept], kept, sources, weights)
    centre_tokens, assignment, centers = merged
    representatives = torch.cat([kept, recycled[centers]])
    order = representatives.argsort()
    slot = torch.empty_like(order)
    slot[order] = torch.arange(order.numel(), device=device)  # output index of each representative
    k = kept.numel()
    sources[kept] = slot[:k]
    sources[recycled] = slot[k + assignment]
    size = torch.bincount(assignment, minlength=centers.numel()).to(torch.float32)
    weights[kept] = 1.0
    weights[recycled] = 1.0 / size[assignment]
    output = torch.cat([tokens[kept], centre_tokens.to(tokens.dtype)])[order]
    return MergedTokens(output, representatives[order], sources, weights)
