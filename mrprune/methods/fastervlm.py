"""FasterVLM: keep the tokens the vision encoder's [CLS] token attends to most (Zhang et al., "[CLS] Attention is
All You Need for Training-Free Visual Token Pruning: Make VLM Inference Faster", arXiv 2412.01818; official code
Theia-4869/FasterVLM @ 29ed074, ``llava/model/llava_arch.py::encode_images``).

A ``vision``-stage method: the score of a token is the head-averaged attention of the [CLS] query at the select layer
(``attentions[-2]`` in the official code, the layer whose output LLaVA projects), recomputed here from that layer's
q/k so the tower keeps SDPA / FlashAttention.
"""

from __future__ import annotations

import torch

from .. import ops
from . import _checks
from ._vision import Budget, check_layer, select_per_crop, token_scores
from .base import Pruner
from .stages import Need, Stage

__all__ = ["FasterVLM"]


class FasterVLM(Pruner):
    """FasterVLM: top tokens by [CLS] attention at the vision encoder's select layer.

    Parameters
    ----------
    budget : int, optional
        Tokens kept per image (the papers' LLaVA-1.5 settings 192 / 128 / 64, LLaVA-NeXT 640 / 320). With
        ``official=True``: tokens kept *per crop* (the official ``visual_token_num``).
    keep_ratio : float in (0, 1], optional
        Share of each image's tokens kept instead (``round(keep_ratio * n)``; Qwen2.5-VL: 1/3, 2/9, 1/9). With
        ``official=True``: ``int(P * keep_ratio)`` per crop of ``P`` patches (the ``retention_ratio`` variant of the
        official hooks). Exactly one of ``budget`` and ``keep_ratio`` is given.
    layer : int
        Vision encoder layer whose attention is read (index into its layers, negative from the end); -2 is LLaVA's
        select layer.
    official : bool
        ``True`` reproduces the official selection: every crop (LLaVA-1.5's one, LLaVA-NeXT's base view and each
        tile) keeps its top-``T`` patches among *all* its ``P`` patches, the patches LLaVA-NeXT's unpadding removes
        included (so a tile keeps fewer than ``T`` when some of its top patches are padding), and every newline token
        is kept on top. [CLS] towers only.

    Notes
    -----
    Default mode (``official=False``): the image keeps ``budget`` tokens in all, LLaVA-NeXT newlines included (kept
    first); the rest is split over the crops in proportion to the tokens each crop has after unpadding (largest
    remainder), and each crop keeps its best tokens, so a budget means the same on every image size. On Qwen2.5-VL
    (no [CLS]) the score is the attention each token receives, and each video frame is a crop. Ties go to the lower
    index (the official ``torch.topk`` leaves them unspecified).
    """

    stage = Stage.VISION
    needs = Pruner.needs | {Need.VISION_ATTENTION}

    def __init__(
        self, budget: int | None = None, keep_ratio: float | None = None, layer: int = -2, official: bool = False
    ) -> None:
        self.size = Budget("FasterVLM", budget, keep_ratio)
        self.layer = check_layer("FasterVLM", layer)
        self.official = _checks.flag("FasterVLM", "official", official)
        self.attention_layers = (self.layer,)

    def __repr__(self) -> str:
        return f"FasterVLM({self.size!r}, layer={self.layer}, official={self.official})"

    def _select_batch(
        self,
        features,
        layouts,
        lengths,
        texts,
        attention=None,
        crops=None,
        patches=None,
        crop_attention=None,
        attention_kind="cls",
        **kwargs,
    ):
        scores, crops = token_scores("FasterVLM", features, attention, crops, self.layer)
        if self.official:
            return self._official(lengths, crops, patches, crop_attention, attention_kind)
        return select_per_crop(self.size, features, scores, crops, lengths)

    def _official(self, lengths, crops, patches, crop_attention, attention_kind):
        if attention_kind != "cls" or crop_attention is None or patches is None:
            raise ValueError("mrprune.FasterVLM(official=True) needs the [CLS] attention of every crop (CLIP towers)")
        kept = []
        for b, n in enumerate(lengths.tolist()):
            per_crop = crop_attention[self.layer][b]  # [crops, P]
            count, total = per_crop.shape
            t = self.size.budget if self.size.budget is not None else int(total * self.size.keep_ratio)
            lengths_c = torch.full((count,), total, dtype=torch.int64, device=per_crop.device)
            top = ops.topk_indices(per_crop.float(), lengths_c, min(t, total))  # [crops, T]
            chosen = torch.zeros(count, total, dtype=torch.bool, device=per_crop.device)
            chosen.scatter_(1, top, True)
            owned, where = crops[b, :n], patches[b, :n]
            keep = (owned < 0) | chosen[owned.clamp(min=0), where.clamp(min=0)]
            kept.append(keep.nonzero()[:, 0])
        return kept
