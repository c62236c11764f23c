"""VisPruner: important tokens by [CLS] attention, diverse tokens by similarity de-duplication (Zhang et al.,
"Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in VLMs", ICCV 2025; official code
Theia-4869/VisPruner @ a089bff, ``llava/model/llava_arch.py::encode_images``).

A ``vision``-stage method: per crop, the top ``T * important_ratio`` tokens by head-averaged [CLS] attention are
kept; the others, in descending attention order, go through rounds that split them by position parity and drop the
(up to 8) even-position tokens most similar to the odd-position ones, until ``T`` tokens remain in all
(``mrprune.bipartite_dedup``). On Qwen2.5-VL the attention is the attention each token receives, as the authors
recommend for towers without [CLS] (VisPruner issue #1).
"""

from __future__ import annotations

import torch

from .. import ops
from ..batching import pad_batch
from . import _checks
from ._vision import Budget, check_layer, select_per_crop, token_scores
from .base import Pruner
from .stages import Need, Stage

__all__ = ["VisPruner"]


class VisPruner(Pruner):
    """VisPruner: [CLS]-important tokens plus de-duplicated diverse tokens, crop by crop.

    Parameters
    ----------
    budget : int, optional
        Tokens kept per image (LLaVA-1.5: 192 / 128 / 64; LLaVA-NeXT: 640 / 320). With ``official=True``: tokens
        kept *per crop* (the official ``visual_token_num``).
    keep_ratio : float in (0, 1], optional
        Share kept instead (``round(keep_ratio * n)``). Exactly one of the two.
    important_ratio : float in [0, 1]
        Share of a crop's budget taken by attention (official default 0.5; ``int(T * r)`` important tokens).
    per_round : int >= 1
        Most tokens dropped per de-duplication round (official: 8).
    layer : int
        Vision encoder layer whose attention ranks the tokens (official: -2, the select layer).
    official : bool
        ``True`` reproduces the official selection: every crop keeps ``int(T * r)`` important tokens and
        ``T - int(T * r)`` diverse ones among *all* its patches, de-duplicated on the cosine of the vision tower's own
        select-layer features (before the projector); on LLaVA-NeXT the official code neither unpads nor adds
        newlines (it strips ``_unpad`` from the merge type), so picks in the padding are lost here (those tokens do
        not exist in transformers' LLaVA-NeXT) and no newline is kept. [CLS] towers only.

    Notes
    -----
    Default mode (``official=False``): the image keeps ``budget`` tokens, LLaVA-NeXT newlines included (kept first),
    the rest split over the crops by size; each crop de-duplicates its tokens in the LLM input space (every model,
    Qwen2.5-VL frames included). Sorting is stable (the official ``argsort`` leaves ties unspecified); an odd
    number of candidates gives the even set the extra token (the official code raises there).
    """

    stage = Stage.VISION
    needs = Pruner.needs | {Need.VISION_ATTENTION, Need.VISION_FEATURES}

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        important_ratio: float = 0.5,
        per_round: int = 8,
        layer: int = -2,
        official: bool = False,
    ) -> None:
        self.size = Budget("VisPruner", budget, keep_ratio)
        ratio = _checks.non_negative("VisPruner", "important_ratio", important_ratio)
        if ratio > 1:
            raise ValueError(f"mrprune.VisPruner: important_ratio must lie in [0, 1], got {ratio}")
        self.important_ratio = ratio
        self.per_round = _checks.count("VisPruner", "per_round", per_round, minimum=1)
        self.layer = check_layer("VisPruner", layer)
        self.official = _checks.flag("VisPruner", "official", official)
        if self.official and self.size.budget is None:
            raise ValueError("mrprune.VisPruner(official=True) takes budget (the official visual_token_num per crop)")
        self.attention_layers = (self.layer,)

    def __repr__(self) -> str:
        return (
            f"VisPruner({self.size!r}, important_ratio={self.important_ratio}, per_round={self.per_round}, "
            f"layer={self.layer}, official={self.official})"
        )

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
        scores, crops = token_scores("VisPruner", features, attention, crops, self.layer)
        if self.official:
            return self._official(lengths, crops, patches, crop_attention, crop_features, attention_kind)
        return select_per_crop(self.size, features, scores, crops, lengths, self._pick)

    def _pick(self, tokens, saliency, sizes, wanted):
        """Per row of ``tokens [G, P, D]`` (``sizes`` valid), ``wanted[g]`` picks: the important tokens, then the
        survivors of the de-duplication among the rest."""
        order = ops.topk_indices(saliency.float(), sizes, tokens.shape[1])  # descending attention, ties lower index
        important = [int(t * self.important_ratio) for t in wanted]
        picks = [order[g, :k] for g, k in enumerate(important)]
        diverse = [t - k for t, k in zip(wanted, important, strict=True)]
        rest_sizes = sizes - torch.tensor(important, device=sizes.device)
        rest = [order[g, important[g] : int(sizes[g])] for g in range(len(wanted))]
        for k in sorted(set(diverse)):  # one launch per distinct budget (the rounds depend on it)
            rows = [g for g, d in enumerate(diverse) if d == k]
            batch = pad_batch([tokens[g, rest[g]] for g in rows])[0]
            survivors = ops.bipartite_dedup(batch, rest_sizes[rows], k, self.per_round)
            for row, g in enumerate(rows):
                chosen = survivors[row, : min(k, int(rest_sizes[g]))]
                picks[g] = torch.cat([picks[g], rest[g][chosen]])
        return picks

    def _official(self, lengths, crops, patches, crop_attention, crop_features, attention_kind):
        if attention_kind != "cls" or crop_attention is None or crop_features is None or patches is None:
            raise ValueError(
                "mrprune.VisPruner(official=True) needs the [CLS] attention and the vision tower's features of every "
                "crop (CLIP towers)"
            )
        kept = []
        for b, n in enumerate(lengths.tolist()):
            tokens, saliency = crop_features[b], crop_attention[self.layer][b]  # [crops, P, Dv], [crops, P]
            count, total = saliency.shape
            sizes = torch.full((count,), total, dtype=torch.int64, device=tokens.device)
            picks = self._pick(tokens, saliency, sizes, [min(self.size.budget, total)] * count)
            chosen = torch.zeros(count, total, dtype=torch.bool, device=tokens.device)
            for crop, pick in enumerate(picks):
                chosen[crop, pick] = True
            owned, where = crops[b, :n], patches[b, :n]
            keep = (owned >= 0) & chosen[owned.clamp(min=0), where.clamp(min=0)]
            kept.append(keep.nonzero()[:, 0])
        return kept
