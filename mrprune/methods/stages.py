"""Where a method acts (its :class:`Stage`) and what it reads there (its :class:`Need` set).

A method is a :class:`~mrprune.Pruner` that declares both as class attributes; integrations read the declarations,
never the method's type. Each model adapter implements each stage once, so a new method is one file in
``mrprune/methods/`` and one test file.

==============  ==========================================================================================  ==========
stage           the method's ``features``, and what else it may read                                         examples
==============  ==========================================================================================  ==========
``vision``      the item's tokens in the LLM input space, plus the vision encoder's attention at the         FasterVLM
                layers the method names (``attention_layers``): the [CLS] row on towers with a [CLS] token
                (CLIP: LLaVA-1.5, every crop of LLaVA-NeXT), the attention each token receives on towers
                without one (Qwen2.5-VL)
``projector``   the item's tokens in the LLM input space (after the projector / merger), their layout,       MR-Pruner,
                optionally the instruction's text embeddings and a [CLS] seed                                L2-norm
``llm``         at each of its pruning layers ``K`` (``layers``), the hidden states of the item's surviving    FastV,
                tokens entering decoder layer ``K``, plus attention rows, key norms and normed states of its  PDrop,
                scoring layer ``K + score_offset`` (recomputed from that layer's own modules, so SDPA and      DART
                FlashAttention stay on) and the prompt's text tokens (:class:`PromptTokens`)
==============  ==========================================================================================  ==========

``vision``-stage declarations
-----------------------------
``attention_layers : tuple[int, ...]``
    The vision encoder layers whose attention :attr:`Need.VISION_ATTENTION` delivers.
``attention_heads : str`` (default ``"mean"``)
    How the [CLS] row is taken over the heads: ``"mean"``, the heads' softmax rows averaged; ``"joint"``, one softmax
    of the full ``q_cls . k / sqrt(embed_dim)`` without a head split (PruMerge's official score). ``"joint"`` needs a
    [CLS] tower (``attention_kind == "cls"``); the integration refuses it elsewhere. It applies to every probed layer.
``key_layers : tuple[int, ...]`` (default ``()``)
    The vision encoder layers whose keys :attr:`Need.VISION_KEYS` delivers (none: ``crop_keys`` is ``{}``).

Every stage returns kept indices per item (sorted ascending) or :class:`~mrprune.methods.results.MergedTokens`.
Vision- and projector-stage methods select before the language model runs; ``llm``-stage methods select inside it
and keep the original positions.

``llm``-stage declarations
--------------------------
``layers : tuple[int, ...]``
    The pruning layers ``K_1 < K_2 < ...``: at the entry of each, the item's surviving tokens are scored again and
    pruned further (a one-layer method may give ``layer`` instead). ``select_batch`` is called once per pruning
    layer with the keyword arguments ``step`` (0, 1, ...: which pruning layer), ``layer`` (its index ``K``),
    ``origin [B, N]`` int64 (each
    current token's index among the item's original tokens, -1 for padding), ``original_lengths [B]`` int64 (the
    items' token counts before the first pruning layer) and ``positions [B, N]`` int64 (each token's index in its
    row's current sequence of real tokens, -1 for padding); it returns indices into the *current* tokens. Layouts
    describe the original tokens, so they are given at step 0 only (``None``, flat, afterwards).
``score_offset : int`` (default -1)
    Layer ``K + score_offset`` provides the attention rows and keys: -1 is the layer before ``K`` run on its input
    (FastV, DART), 0 is layer ``K``'s own projections on the states entering it (PDrop).
``prompt_attention_heads : str`` (default ``"mean"``)
    How :attr:`Need.PROMPT_ATTENTION` delivers the text tokens' rows: ``"mean"``, head-averaged in
    ``prompt.attention [B, T, N]``; ``"per_head"``, every query head's own softmax rows in
    ``prompt.head_attention [B, H, T, N]`` (``prompt.attention`` is then ``None``; SparseVLM v2.0's head selection).
``prune_earlier_cache : bool`` (default False)
    ``False``: the layers before a pruning layer keep the cache entries of the longer prompt they saw (every
    stage's layers keep their own entries, as PDrop's and DART's official code); ``True``: they drop the unkept
    tokens too, so every layer's cache holds the final pruned prompt (FastV).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

__all__ = ["Need", "PromptTokens", "Stage"]


class Stage(str, enum.Enum):
    """Where a method selects tokens."""

    VISION = "vision"
    PROJECTOR = "projector"
    LLM = "llm"


class Need(str, enum.Enum):
    """What a method reads besides its stage's ``features`` (passed to ``select_batch`` as keyword arguments).

    Attributes
    ----------
    LAYOUT
        Each item's :class:`~mrprune.GridLayout` / :class:`~mrprune.LlavaNextLayout` (always given).
    TEXT
        ``texts``: the instruction's noun-token embeddings ``[M, D]`` per item (the integration needs a processor).
    CLS_SEED
        ``seeds [B]`` int64: the base-view token the vision tower's [CLS] attends to most at the feature layer, -1
        on towers without a [CLS] token.
    VISION_ATTENTION
        ``attention``: ``{layer: Tensor [B, N] float32}``, per token of each item the head-averaged attention of the
        vision encoder layer ``layer`` (an index into the encoder's layers, negative from the end): the [CLS] query
        row where the tower has a [CLS] token, the mean attention the token (its merged patches) receives where it
        has none; 0 for tokens no crop produced (LLaVA-NeXT newlines) and padding. ``crops [B, N]`` int64 gives the
        crop (0 = base view, ``1 + row * cols + col`` for the high-resolution tiles; the frame on Qwen2.5-VL
        videos) that produced each token, -1 for newlines and padding; ``patches [B, N]`` its index in that crop's
        raster; ``crop_attention`` ``{layer: [Tensor [crops_b, P]] * B}`` the attention over every patch of every
        crop, those LLaVA-NeXT's unpadding removed included (what per-crop official selections rank).
        ``attention_kind`` is ``"cls"`` or ``"received"``.
    VISION_FEATURES
        ``crop_features``: per item, the vision tower's own states at the feature layer for every patch of every
        crop, ``[crops, P, D_vision]`` (before the projector; what official codes that compare CLIP features
        read); ``None`` where the tower does not provide them (Qwen2.5-VL merges patches first).
    CLIP_EMBEDDINGS
        ``clip_image [B, N, E]``: each token's patch in CLIP's joint space (``visual_projection(post_layernorm(.))``
        of the vision tower's feature-layer state, with the CLIP model the method carries as ``clip``; 0 for
        newlines), and ``clip_text``: per item the CLIP text embeddings ``[M, E]`` of its instruction's 77-token
        segments (``clip_tokenizer``). ``None`` where the tower or the method does not provide them.
    VISION_KEYS
        ``crop_keys``: ``{layer: [Tensor [crops_b, P, H, d]] * B}``, for each layer of the method's ``key_layers``
        per item the keys of that vision encoder layer for every patch of every crop (the layer's ``k_proj`` output
        on its normed input, bias included, split into its ``H`` heads of ``d`` channels, [CLS] dropped; the tower's
        dtype), crops and patches indexed like ``crop_attention`` (a token's keys are
        ``crop_keys[layer][b][crops[b, i], patches[b, i]]``). ``.mean(-2)`` is VisionZip's head-averaged key,
        ``.flatten(-2)`` PruMerge's full key. ``None`` where the tower provides none (Qwen2.5-VL: its keys belong to
        patches before the 2 x 2 merger and under windowed attention, no [CLS]).
    VISION_MERGE
        The method merges tokens inside the vision encoder (ToMe): the integration runs the encoder's blocks through
        the method's ``schedule`` / ``start`` / ``attention_bias`` / ``merge_block`` / ``unmerge`` (CLIP: one merge
        set per crop, [CLS] first) or, on towers without [CLS] that attend within windows (Qwen2.5-VL),
        ``window_schedule`` / ``start_windows`` (one merge set per window, a unit per 2 x 2 patch group, i.e. per
        LLM token) / ``representatives`` (each unit's group's first unit: its rotary angles and LLM position) /
        ``unit_bias`` (the per-key ``log(size)``) with ``merge_block`` / ``unmerge``, and passes ``groups [B, N]``
        int64, each token's merged group (ids unique within the item), -1 for tokens of no crop (LLaVA-NeXT
        newlines) and padding.
    LAST_QUERY_ATTENTION
        ``attention [B, N]`` float32: the head-averaged attention the last prompt token pays each of the item's
        tokens in the scoring layer (``llm`` stage; decoder layer ``layer - 1`` for FastV).
    PROMPT_ATTENTION
        ``prompt``: a :class:`PromptTokens` whose ``attention [B, T, N]`` float32 holds, for each text token of the
        item's prompt, its head-averaged attention to each of the item's tokens in the scoring layer (softmax over
        every key the token may attend, causal, then the item's columns; 0 for a text token before the item),
        and ``input_embeddings [B, N0, D]``: the input embeddings of the item's *original* tokens (the language
        model's input; ``N0`` = ``original_lengths``) (``llm`` stage; SparseVLM's raters).
    KEY_NORMS
        ``key_norms [B, N]`` float32: the L1 norm of each item token's key in the scoring layer (after the rotary
        embedding, all key heads concatenated), and ``prompt.key_norms [B, T]`` for the text tokens (``llm``
        stage; DART's pivots).
    ROTARY
        ``rotary [B, N, d]`` float32: the scoring layer's rotary embedding applied to an all-ones head vector at each
        item token's position (the model's own ``apply_rotary_pos_emb`` on ``1``), and ``prompt.rotary [B, T, d]``
        for the text tokens: ``rotary_t . rotary_v`` is the RoPE-only part of the attention logit between two
        positions (SparseVLM v2.0's gravity term). Defined for 1-D RoPE only: the ``llm`` stage refuses it on
        M-RoPE models (Qwen2.5-VL), where the term depends on three position axes (``llm`` stage).
    NORMED_STATES
        ``normed [B, N, D]``: the hidden states of the item's tokens entering the pruning layer passed through the
        language model's final norm, and ``prompt.normed [B, T, D]`` for the text tokens (``llm`` stage; DART's
        duplication cosine).
    """

    LAYOUT = "layout"
    TEXT = "text"
    CLS_SEED = "cls_seed"
    VISION_ATTENTION = "vision_attention"
    VISION_FEATURES = "vision_features"
    CLIP_EMBEDDINGS = "clip_embeddings"
    VISION_MERGE = "vision_merge"
    VISION_KEYS = "vision_keys"
    LAST_QUERY_ATTENTION = "last_query_attention"
    PROMPT_ATTENTION = "prompt_attention"
    KEY_NORMS = "key_norms"
    ROTARY = "rotary"
    NORMED_STATES = "normed_states"


@dataclass(frozen=True)
class PromptTokens:
    """The text tokens of each item's prompt inside the language model (``llm`` stage), padded to ``T``.

    Given as ``prompt`` to ``llm``-stage methods that need :attr:`Need.PROMPT_ATTENTION`, :attr:`Need.KEY_NORMS` or
    :attr:`Need.NORMED_STATES`. The text tokens of an item are the real tokens of its prompt (row) that belong to
    no visual item, in sequence order; items of one prompt share them.

    Attributes
    ----------
    lengths : Tensor ``[B]`` int64
        ``T_b``: item ``b`` owns rows ``:T_b`` of every per-token field.
    positions : Tensor ``[B, T]`` int64
        Each text token's index in its row's current sequence of real tokens (-1 for padding).
    after : Tensor ``[B, T]`` bool
        Whether the text token comes after the item's last token (the instruction, for an image before it).
    embeddings : Tensor ``[B, T, D]``
        The text tokens' input embeddings (the language model's input, model dtype).
    hidden : Tensor ``[B, T, D]``
        Their hidden states entering the scoring layer (model dtype).
    attention : Tensor ``[B, T, N]`` float32 or None
        :attr:`Need.PROMPT_ATTENTION`: each text token's head-averaged attention to each of the item's tokens.
    key_norms : Tensor ``[B, T]`` float32 or None
        :attr:`Need.KEY_NORMS`: the L1 norms of the text tokens' keys.
    normed : Tensor ``[B, T, D]`` or None
        :attr:`Need.NORMED_STATES`: the text tokens' states entering the pruning layer after the final norm.
    head_attention : Tensor ``[B, H, T, N]`` float32 or None
        :attr:`Need.PROMPT_ATTENTION` with ``prompt_attention_heads = "per_head"``: each query head's attention
        of each text token to each of the item's tokens.
    rotary : Tensor ``[B, T, d]`` float32 or None
        :attr:`Need.ROTARY`: the rotary embedding of an all-ones head vector at each text token's position.
    """

    lengths: torch.Tensor
    positions: torch.Tensor
    after: torch.Tensor
    embeddings: torch.Tensor
    hidden: torch.Tensor
    attention: torch.Tensor | None = None
    key_norms: torch.Tensor | None = None
    normed: torch.Tensor | None = None
    head_attention: torch.Tensor | None = None
    rotary: torch.Tensor | None = None


#: What the ``llm`` stage passes at every pruning layer besides the needs (see ``llm``-stage declarations above);
#: every ``llm``-stage method's ``select_batch`` accepts them.
LLM_KEYWORDS = ("step", "layer", "origin", "original_lengths", "positions")
#: ``select``'s one-item form of the ``llm`` stage's batched keywords (as :data:`ITEM_KEYWORDS`; ``[]``: an int).
LLM_ITEM_KEYWORDS: dict[str, str] = {"origin": "[N]", "positions": "[N]", "original_lengths": "[]"}

#: The keyword arguments through which integrations deliver each need to ``select_batch`` (needs absent here deliver
#: none: the layout and the texts are positional). ``select_batch`` rejects a keyword that neither a declared need
#: nor the method's own ``_select_batch`` names.
NEED_KEYWORDS: dict[str, tuple[str, ...]] = {
    "cls_seed": ("seeds",),
    "vision_attention": ("attention", "crops", "patches", "crop_attention", "attention_kind"),
    "vision_features": ("crop_features",),
    "clip_embeddings": ("clip_image", "clip_text"),
    "vision_merge": ("groups",),
    "vision_keys": ("crop_keys",),
    "last_query_attention": ("attention",),
    "prompt_attention": ("prompt", "input_embeddings"),
    "key_norms": ("key_norms", "prompt"),
    "normed_states": ("normed", "prompt"),
    "rotary": ("rotary", "prompt"),
}

#: ``select``'s one-item form of the keywords that ``select_batch`` takes with a leading batch dimension, per need:
#: :meth:`~mrprune.Pruner.select` takes a tensor of this shape (``N``: the item's tokens, ``features.shape[0]``;
#: ``N0``: its original tokens; ``{layer: ...}``: a dict of them; ``[]``: an int) and hands ``select_batch`` the
#: batch of one. The other keywords (``crop_attention``, ``crop_features``, ``crop_keys``, ``clip_text``, ``prompt``,
#: ``attention_kind``) are given to ``select`` as ``select_batch`` takes them for a batch of one.
ITEM_KEYWORDS: dict[str, dict[str, str]] = {
    "cls_seed": {"seeds": "[]"},
    "vision_attention": {"attention": "{layer: [N]}", "crops": "[N]", "patches": "[N]"},
    "clip_embeddings": {"clip_image": "[N, E]"},
    "vision_merge": {"groups": "[N]"},
    "last_query_attention": {"attention": "[N]"},
    "prompt_attention": {"input_embeddings": "[N0, D]"},
    "key_norms": {"key_norms": "[N]"},
    "normed_states": {"normed": "[N, D]"},
    "rotary": {"rotary": "[N, d]"},
}
