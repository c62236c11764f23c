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
``llm``         the hidden states entering decoder layer ``layer`` and the head-averaged attention row of    FastV
                the last prompt token in the layer before it (recomputed from that layer's q/k, so SDPA and
                FlashAttention stay on)
==============  ==========================================================================================  ==========

Every stage returns kept indices per item (sorted ascending). Vision- and projector-stage methods select before the
language model runs; ``llm``-stage methods select inside it and keep the original positions.
"""

from __future__ import annotations

import enum

__all__ = ["Need", "Stage"]


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
    VISION_MERGE
        The method merges tokens inside the vision encoder (ToMe): the integration runs the encoder's blocks through
        the method's ``schedule`` / ``start`` / ``attention_bias`` / ``merge_block`` / ``unmerge`` and passes
        ``groups [B, N]`` int64, each token's merged group (ids unique within the item), -1 for tokens of no crop
        (LLaVA-NeXT newlines) and padding.
    LAST_QUERY_ATTENTION
        ``attention [B, N]`` float32: the head-averaged attention the last prompt token pays each of the item's
        tokens in decoder layer ``layer - 1`` (``llm`` stage).
    """

    LAYOUT = "layout"
    TEXT = "text"
    CLS_SEED = "cls_seed"
    VISION_ATTENTION = "vision_attention"
    VISION_FEATURES = "vision_features"
    CLIP_EMBEDDINGS = "clip_embeddings"
    VISION_MERGE = "vision_merge"
    LAST_QUERY_ATTENTION = "last_query_attention"
