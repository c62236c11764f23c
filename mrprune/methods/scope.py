"""SCOPE: saliency-weighted greedy coverage (Deng et al., "SCOPE: Saliency-Coverage Oriented Token Pruning for
Efficient Multimodal LLMs", arXiv 2510.24214; official code kinredon/SCOPE @ a01b98f, ``scope/clip_encoder.py``).

A ``vision``-stage method: with ``S`` the tokens' cosine matrix and ``cur`` the coverage so far (initially 0), each
step keeps ``argmax_j a_j^alpha * sum_i max(0, S_ij - cur_i)`` among the unkept tokens, ``a`` the [CLS] attention of
the select layer, then ``cur := max(cur, S_j)`` (``mrprune.coverage_select``, one launch per batch of crops).
"""

from __future__ import annotations

import torch

from .. import ops
from . import _checks
from ._vision import Budget, check_layer, select_per_crop, token_scores
from .base import Pruner, take_prefixes
from .stages import Need, Stage

__all__ = ["SCOPE"]


class SCOPE(Pruner):
    """SCOPE: tokens that cover the image's feature space, weighted by [CLS] saliency, crop by crop.

    Parameters
    ----------
    budget : int, optional
        Tokens kept per image (LLaVA-1.5: 192 / 128 / 64; LLaVA-NeXT: 640 / 320). With ``official=True``: the
        official ``token_num``, split evenly over an image's crops as ``int(token_num / crops)``.
    keep_ratio : float in (0, 1], optional
        Share kept instead (``round(keep_ratio * n)``; Qwen2.5-VL: 1/3, 2/9, 1/9). Exactly one of the two.
    alpha : float >= 0
        Saliency exponent (official env ``ALPHA``, default 1.0; the multiplicative ``COMBINED=multi`` form).
    layer : int
        Vision encoder layer whose attention is the saliency (official: -2, the select layer).
    official : bool
        ``True`` reproduces the official selection: per crop, ``int(token_num / crops)`` greedy picks among *all* the
        crop's patches on the cosine of the vision tower's own select-layer features (before the projector), the
        patches LLaVA-NeXT's unpadding removes included (the official code does not unpad: the picks that fall there
        are lost here, as those tokens do not exist in transformers' LLaVA-NeXT), and no newline token (the official
        packing adds none). [CLS] towers only. Arithmetic is float32 (the official code runs in float16).

    Notes
    -----
    Default mode (``official=False``): the image keeps ``budget`` tokens, LLaVA-NeXT newlines included (kept first);
    the rest is split over the crops in proportion to their tokens, and each crop runs the coverage greedy on the
    tokens in the LLM input space (every model, Qwen2.5-VL frames included, where the saliency is the received
    attention). Ties go to the lower index.
    """

    stage = Stage.VISION
    needs = Pruner.needs | {Need.VISION_ATTENTION, Need.VISION_FEATURES}

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        alpha: float = 1.0,
        layer: int = -2,
        official: bool = False,
    ) -> None:
        self.size = Budget("SCOPE", budget, keep_ratio)
        self.alpha = _checks.non_negative("SCOPE", "alpha", alpha)
        self.layer = check_layer("SCOPE", layer)
        self.official = _checks.flag("SCOPE", "official", official)
        if self.official and self.size.budget is None:
            raise ValueError("mrprune.SCOPE(official=True) takes budget (the official token_num)")
        self.attention_layers = (self.layer,)

    def __repr__(self) -> str:
        return f"SCOPE({self.size!r}, alpha={self.alpha}, layer={self.layer}, official={self.official})"

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
        crop_features=None,
        attention_kind="cls",
        **kwargs,
    ):
        scores, crops = token_scores("SCOPE", features, attention, crops, self.layer)
        if self.official:
            return self._official(lengths, crops, patches, crop_attention, crop_features, attention_kind)
        return select_per_crop(self.size, features, scores, crops, lengths, self._pick)

    def _pick(
        self, tokens: torch.Tensor, saliency: torch.Tensor, sizes: torch.Tensor, wanted: list[int]
    ) -> list[torch.Tensor]:
        """Per row ``g`` of ``tokens [G, P, D]``: ``wanted[g]`` saliency-weighted coverage picks (SCOPE's greedy)."""
        return take_prefixes(ops.coverage_select(tokens, sizes, max(wanted), saliency, self.alpha), wanted)

    def _official(self, lengths, crops, patches, crop_attention, crop_features, attention_kind):
        if attention_kind != "cls" or crop_attention is None or crop_features is None or patches is None:
            raise ValueError(
                "mrprune.SCOPE(official=True) needs the [CLS] attention and the vision tower's features of every "
                "crop (CLIP towers)"
            )
        kept = []
        for b, n in enumerate(lengths.tolist()):
            tokens, saliency = crop_features[b], crop_attention[self.layer][b]  # [crops, P, Dv], [crops, P]
            count, total = saliency.shape
            per_crop = min(self.size.budget // count, total)  # int(token_num / bs), bs = the image's crops
            sizes = torch.full((count,), total, dtype=torch.int64, device=tokens.device)
            picks = ops.coverage_select(tokens, sizes, per_crop, saliency.float(), self.alpha)
            chosen = torch.zeros(count, total, dtype=torch.bool, device=tokens.device)
            chosen.scatter_(1, picks, True)
            owned, where = crops[b, :n], patches[b, :n]
            keep = (owned >= 0) & chosen[owned.clamp(min=0), where.clamp(min=0)]
            kept.append(keep.nonzero()[:, 0])
        return kept
