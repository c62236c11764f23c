"""CDPruner: conditional diversity through a determinantal point process (Zhang et al., "Beyond Attention or
Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", arXiv 2506.10967; official code
Theia-4869/CDPruner, ``llava/model/llava_arch.py::encode_images``).

A ``vision``-stage method: with ``S`` the cosine matrix of a crop's tokens (LLM input space) and ``r`` each token's
relevance to the instruction in CLIP's joint space, it keeps the greedy MAP of the DPP with kernel
``diag(r) S diag(r)``: each step takes ``argmax r_i^2 e_i``, ``e_i`` the residual energy of the normalised token
against the span of the kept ones — exactly ``mrprune.greedy_residual_select`` on normalised tokens with gate
``r^2`` (the official incremental Cholesky). The relevance is ``r_i = mean_m(-cos(v_i, t_m))`` (the authors'
negation), min-max normalised, with ``v_i`` the CLIP image embedding of the token's patch
(``visual_projection(post_layernorm(.))`` of the vision tower's select-layer state) and ``t_m`` the CLIP text
embedding of the instruction's 77-token segments; the CLIP model (with its text tower and projections) is the one
the user passes as ``clip``.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import ops
from . import _checks
from ._vision import Budget, Pick, check_layer, select_per_crop, token_scores
from .base import Pruner, take_prefixes
from .stages import Need, Stage

__all__ = ["CDPruner", "relevance"]


def relevance(image: torch.Tensor, lengths: torch.Tensor, text: list[torch.Tensor | None]) -> torch.Tensor:
    """``mean_m(-cos(v_i, t_m))`` per token: ``image [B, N, E]``, ``text`` per row ``[M, E]`` (``None`` / empty: 0)
    -> ``[B, N]`` float32 (``mrprune.max_cosine`` per text segment)."""
    out = torch.zeros(image.shape[:2], dtype=torch.float32, device=image.device)
    ones = torch.ones(image.shape[0], dtype=torch.int64, device=image.device)
    segments = max((0 if t is None else t.shape[0]) for t in text)
    for m in range(segments):
        keys = torch.zeros(image.shape[0], 1, image.shape[-1], dtype=image.dtype, device=image.device)
        has = torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)
        for b, t in enumerate(text):
            if t is not None and t.shape[0] > m:
                keys[b, 0], has[b] = t[m].to(image.dtype), True
        cosine = ops.max_cosine(image, lengths, keys, ones)
        counts = torch.tensor([0 if t is None else t.shape[0] for t in text], device=image.device).clamp(min=1)
        out = out - torch.where(has[:, None], cosine, 0.0) / counts[:, None]
    return out


def _minmax(values: torch.Tensor) -> torch.Tensor:
    """The official normalisation ``(r - min + 1e-6) / (max - min)``; equal relevances (no text) give 1 (the
    official division by 0 gives inf)."""
    if values.numel() == 0:
        return values
    low, high = values.min(), values.max()
    if high - low <= 0:
        return torch.ones_like(values)
    return (values - low + 1e-6) / (high - low)


class CDPruner(Pruner):
    """CDPruner: instruction-conditioned DPP greedy MAP per crop.

    Parameters
    ----------
    budget : int, optional
        Tokens kept per image (LLaVA-1.5: 192 / 128 / 64; LLaVA-NeXT: 640 / 320). With ``official=True``: tokens
        kept *per crop* (the official ``visual_token_num``).
    keep_ratio : float in (0, 1], optional
        Share kept instead. Exactly one of the two.
    clip : transformers ``CLIPModel``, optional
        The CLIP model whose vision tower LLaVA's matches (``post_layernorm``, ``visual_projection``) and whose
        text tower embeds the instruction; integrations read it. Without it (or without text) every relevance is
        equal and CDPruner is a pure DPP diversity selection.
    clip_tokenizer : callable, optional
        ``clip_tokenizer(text)["input_ids"]`` gives the CLIP token ids of the instruction (a CLIP tokenizer).
    layer : int
        The select layer (official: -2); its attention is not read, only named for the vision stage.
    official : bool
        ``True`` reproduces the official selection (``encode_images``): a crop keeps ``T`` tokens among all its
        patches, with the relevance min-max normalised over *all crops of all images of the call at once* (the
        official batch coupling). Only one-crop images without newlines (LLaVA-1.5) are supported, a limit of
        mrprune, not of the official code: on LLaVA-NeXT the official code runs the DPP on the projector outputs of
        *every* patch of every crop (the patches the unpadding removes included) and then unpads the crops' masks
        (picks in the padding are lost) and keeps every newline; here the vision stage receives projector outputs
        only for the tokens the model keeps after unpadding (``crop_features`` are the tower's states before the
        projector, and a method runs no model code), so the official kernel cannot be formed on multi-crop images.

    Notes
    -----
    Default mode (``official=False``): the image keeps ``budget`` tokens, LLaVA-NeXT newlines included (kept first),
    the rest split over its crops by size; the relevance is min-max normalised per image (no coupling between the
    images of a batch); models without CLIP image embeddings (Qwen2.5-VL) run with equal relevance. Ties go to the
    lower index; when a crop's tokens span fewer dimensions than its budget, the rest are filled by relevance.
    """

    stage = Stage.VISION
    needs = Pruner.needs | {Need.VISION_ATTENTION, Need.CLIP_EMBEDDINGS}

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        clip: Any = None,
        clip_tokenizer: Any = None,
        layer: int = -2,
        official: bool = False,
    ) -> None:
        self.size = Budget("CDPruner", budget, keep_ratio)
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.layer = check_layer("CDPruner", layer)
        self.official = _checks.flag("CDPruner", "official", official)
        if self.official and self.size.budget is None:
            raise ValueError("mrprune.CDPruner(official=True) takes budget (the official visual_token_num per crop)")
        self.attention_layers = (self.layer,)

    def __repr__(self) -> str:
        clip = None if self.clip is None else type(self.clip).__name__
        return f"CDPruner({self.size!r}, clip={clip}, official={self.official})"

    def _select_batch(
        self,
        features,
        layouts,
        lengths,
        texts,
        attention=None,
        crops=None,
        clip_image=None,
        clip_text=None,
        **kwargs,
    ):
        _, crops = token_scores("CDPruner", features, attention, crops, self.layer)
        batch = features.shape[0]
        if clip_image is None or clip_text is None or all(t is None or t.shape[0] == 0 for t in clip_text):
            rel = torch.ones(features.shape[:2], device=features.device)
        else:
            rel = relevance(clip_image, lengths, clip_text)
        unit = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if self.official:
            return self._official(unit, rel, lengths, crops)
        made = crops >= 0
        gates = torch.zeros_like(rel)
        for b in range(batch):  # per image: no coupling between the images of a batch
            valid = made[b, : int(lengths[b])]
            gates[b, : int(lengths[b])][valid] = _minmax(rel[b, : int(lengths[b])][valid]) ** 2
        return select_per_crop(self.size, unit, gates, crops, lengths, _dpp_greedy())

    def _official(self, unit, rel, lengths, crops):
        made = crops >= 0
        for b in range(unit.shape[0]):
            if bool((~made[b, : int(lengths[b])]).any()):
                raise ValueError(
                    "mrprune.CDPruner(official=True): the official code ranks every patch of a crop without newlines "
                    "or unpadding; use one-crop images or official=False"
                )
        valid = torch.arange(unit.shape[1], device=unit.device)[None] < lengths[:, None]
        gate = torch.zeros_like(rel)
        gate[valid] = _minmax(rel[valid]) ** 2  # over the whole call, as the official code
        budget = self.size.budget

        def split(b, scored, owned, present, sizes):  # the official visual_token_num, in the first crop only
            return {0: budget}

        return select_per_crop(self.size, unit, gate, crops, lengths, _dpp_greedy(tol=0.0), split)


def _dpp_greedy(tol: float = 1e-5) -> Pick:
    """The DPP greedy MAP per group: ``greedy_residual_select`` on the normalised tokens with the group's gate and
    exhaustion tolerance ``tol`` (the op's default 1e-5; the official incremental Cholesky stops at none: 0)."""

    def pick(tokens: torch.Tensor, gate: torch.Tensor, sizes: torch.Tensor, wanted: list[int]) -> list[torch.Tensor]:
        chosen, _ = ops.greedy_residual_select(tokens, sizes, max(wanted), gate, None, tol)
        return take_prefixes(chosen, wanted)

    return pick
