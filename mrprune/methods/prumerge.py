"""PruMerge / PruMerge+: keep the [CLS]-attention outliers, each absorbing its nearest neighbours, plus uniform
spatial samples (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal Models",
ICCV 2025, arXiv 2403.15388; official code 42Shawn/LLaVA-PruMerge @ 097c041,
``llava/model/multimodal_encoder/clip_encoder.py::token_prune_merge_advanced(_plus)``).

A ``vision``-stage merging method. Per crop:

1. the keep count: the share of the [CLS] attention of the last vision layer above the IQR outlier bound
   ``Q3 + 1.5 (Q3 - Q1)`` (adaptive, the shipped default), or a fixed budget / ratio;
2. the kept tokens: the top tokens by that attention; PruMerge+ adds spatially uniform samples;
3. each kept token ``c`` becomes ``x_c + sum_j a_j x_j`` over its ``neighbors`` (32) nearest other tokens by cosine
   similarity (official: of the last layer's full keys; default mode: of the tokens), ``a`` the [CLS] attention
   (``mrprune.knn_weighted_merge``; unnormalised, as the official code), and
   one extra token ``sum_j a_j x_j`` over all pruned tokens is added.

On Qwen2.5-VL (no [CLS]) the attention is the attention each token receives; each video frame is a crop.
"""

from __future__ import annotations

import torch

from .. import ops
from . import _checks
from ._merging import assemble, padded_positions
from ._vision import Budget, check_layer, merge_per_crop, token_scores
from .base import Pruner
from .stages import Need, Stage
from .trim import _outlier_share

__all__ = ["PruMerge"]


class PruMerge(Pruner):
    """PruMerge(+): [CLS]-attention outliers merged with their nearest neighbours, crop by crop.

    Parameters
    ----------
    budget : int, optional
        Output tokens per image (the extra token included; LLaVA-1.5: 192 / 128 / 64, LLaVA-NeXT: 640 / 320).
    keep_ratio : float in (0, 1], optional
        Share of each image's tokens instead (``round(keep_ratio * n)``). With ``official=True`` and ``plus=False``:
        the official fixed ``reduction_ratio`` (``int(P * r)`` kept, the extra token on top). Neither given: the
        adaptive IQR share (the official default).
    plus : bool
        PruMerge+ (spatial samples added; the official shipped ``forward``), or plain PruMerge.
    neighbors : int >= 0
        Nearest tokens each kept token absorbs (official: 32; 0 merges nothing). The official ``topk(32)`` needs
        ``P >= 33`` patches; here fewer are capped at the ``P - 1`` other tokens (a smaller value with
        ``official=True`` runs the official steps with that ``k``).
    extra_token : bool
        Add the attention-weighted sum of the pruned tokens as one more token (official: always).
    layer : int
        Vision layer whose [CLS] attention is read (official: the last, -1).
    official : bool
        ``True`` reproduces the official selection and merge arithmetic on one-crop [CLS] images (LLaVA-1.5, the
        official code's only model): the IQR share over *all images of the call at once* (the official flattens the
        batch), ``int(P * share)`` top tokens, PruMerge+ samples ``arange(0, 575, int(int(1 / share) / 3))`` (575
        read as ``P - 1``) that are not kept already, ``neighbors`` (32) neighbours ranked among all other tokens;
        the score is the [CLS] row of layer ``layer`` without a head split and the neighbours' metric its full keys
        (``attention_heads = "joint"``, ``key_layers = (layer,)``: the integration hands both over on CLIP towers).

    Notes
    -----
    Differences from the official code, both modes:

    * **Attention heads.** The official score is one softmax of layer ``layer``'s full ``q_cls . k / sqrt(C)``
      (``C`` = 1024, the tower width; ``q_proj`` / ``k_proj`` outputs of the layer's normed input, bias included,
      the [CLS] key in the softmax) without a head split: ``official=True`` reads exactly that
      (``attention_heads = "joint"``). The default mode reads the head-averaged row (``"mean"``), which also exists
      on Qwen2.5-VL as received attention; it ranks tokens differently from the joint row.
    * **Similarity metric.** The official code ranks neighbours by the cosine of layer ``layer``'s full keys (all
      heads concatenated, [CLS] key left out): ``official=True`` compares exactly those (``Need.VISION_KEYS``,
      ``crop_keys[layer].flatten(-2)``). The default mode compares the tokens in the LLM input space (the same
      metric on every model, the space the merged tokens live in) and asks for no keys.
    * **Where tokens are merged.** On the projected tokens instead of the vision states (a vision-stage method never
      calls the projector): ``proj(x_c) + sum a_j proj(x_j)`` instead of ``proj(x_c + sum a_j x_j)``.
    * **Positions.** Output tokens sit at their representatives' rows (spatial order; official: attention order,
      the samples, the extra token last). The extra token takes the row of the pruned token of largest attention;
      without pruned tokens there is none (official: a zero token).
    * Ties go to the lower index (official ``topk``: unspecified); the official fixed-ratio PruMerge+ branch (its
      training path, which can pick a token twice) is not reproduced; a share of 0 or a stride of 0 raises (the
      official code divides by zero / calls ``arange`` with step 0); sums accumulate in float32.

    Default mode (``official=False``): items and crops are independent (batch > 1). Adaptive: per crop the IQR share
    of its tokens, ``max(1, int(P * share))`` top tokens, PruMerge+ samples at stride ``max(1, int(int(1 / share) /
    3))`` over all ``P`` tokens. Budget / ratio: the image's count (LLaVA-NeXT newlines kept first and counted) split
    over its crops by size; per crop one slot goes to the extra token (when something is pruned and the crop keeps
    >= 2), PruMerge+ gives half the rest (rounded down) to samples evenly spaced among the tokens not picked by
    attention. ``sources`` of the result: a pruned token's output is the kept token that ranks it nearest (lowest
    rank, then lowest position; the neighbour lists overlap and also hold kept tokens, so this is the primary group
    only), else the extra token; ``weights`` are the coefficients normalised per output (``1 / (1 + sum a)`` for the
    kept token, ``a_j / (1 + sum a)`` for a neighbour, ``a_j / sum a`` in the extra token), so a kept token's
    primary group need not sum to 1.
    """

    stage = Stage.VISION
    merges = True
    needs = Pruner.needs | {Need.VISION_ATTENTION, Need.VISION_KEYS}

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        plus: bool = True,
        neighbors: int = 32,
        extra_token: bool = True,
        layer: int = -1,
        official: bool = False,
    ) -> None:
        self.size = None if budget is None and keep_ratio is None else Budget("PruMerge", budget, keep_ratio)
        self.plus = _checks.flag("PruMerge", "plus", plus)
        self.neighbors = _checks.count("PruMerge", "neighbors", neighbors)
        self.extra_token = _checks.flag("PruMerge", "extra_token", extra_token)
        self.layer = check_layer("PruMerge", layer)
        self.official = _checks.flag("PruMerge", "official", official)
        if self.official and self.size is not None and (self.size.budget is not None or self.plus):
            raise ValueError(
                "mrprune.PruMerge(official=True) takes the adaptive share, or keep_ratio with plus=False (the official "
                "fixed-ratio PruMerge+ branch can pick a token twice)"
            )
        if self.official and not self.extra_token:
            raise ValueError("mrprune.PruMerge(official=True) always adds the extra token")
        self.attention_layers = (self.layer,)
        self.attention_heads = "joint" if self.official else "mean"
        self.key_layers = (self.layer,) if self.official else ()

    def __repr__(self) -> str:
        size = "adaptive" if self.size is None else repr(self.size)
        return (
            f"PruMerge({size}, plus={self.plus}, neighbors={self.neighbors}, extra_token={self.extra_token}, "
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
        crop_keys=None,
        attention_kind="cls",
        **kwargs,
    ):
        scores, crops = token_scores("PruMerge", features, attention, crops, self.layer)
        if self.official:
            return self._official(features, lengths, crops, crop_attention, crop_keys, attention_kind)
        # adaptive (size None): whole crops go in, each keeps its own attention outliers
        return merge_per_crop(self.size, features, scores, crops, lengths, self._merge_groups)

    def _merge_groups(
        self, tokens: torch.Tensor, saliency: torch.Tensor, sizes: torch.Tensor, wanted: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The default mode on each crop group (:data:`~mrprune.methods._vision.Merge`): the kept tokens, adaptive
        or of the ``wanted`` budgets, merged with their neighbours by the tokens' own similarity."""
        if self.size is None:
            kept, extra = self._adaptive(saliency, sizes)
        else:
            kept, extra = self._budgeted(saliency, sizes, wanted)
        return _merge(tokens, tokens, saliency, sizes, kept, extra, self.neighbors)

    def _adaptive(self, saliency: torch.Tensor, sizes: torch.Tensor) -> tuple[list[torch.Tensor], list[bool]]:
        """Per group the kept tokens (attention picks, then PruMerge+ samples) and whether it has an extra token."""
        shares = [_outlier_share(saliency[g, : int(p)]) for g, p in enumerate(sizes.tolist())]
        counts = [max(1, int(int(p) * s)) for p, s in zip(sizes.tolist(), shares, strict=True)]
        order = ops.topk_indices(saliency.float(), sizes, max(counts, default=0))
        kept, extra = [], []
        for g, (p, share, count) in enumerate(zip(sizes.tolist(), shares, counts, strict=True)):
            top = order[g, :count]
            if self.plus:
                stride = max(1, int(int(1 / share) / 3)) if share > 0 else max(1, p // 3)
                samples = torch.arange(0, p, stride, device=top.device)
                top = torch.cat([top, samples[~torch.isin(samples, top)]])
            kept.append(top)
            extra.append(self.extra_token and top.numel() < p)
        return kept, extra

    def _budgeted(
        self, saliency: torch.Tensor, sizes: torch.Tensor, wanted: list[int]
    ) -> tuple[list[torch.Tensor], list[bool]]:
        extra = [self.extra_token and 2 <= w < int(p) for w, p in zip(wanted, sizes.tolist(), strict=True)]
        slots = [w - e for w, e in zip(wanted, extra, strict=True)]
        by_attention = [s - s // 2 if self.plus else s for s in slots]
        order = ops.topk_indices(saliency.float(), sizes, max(by_attention, default=0))
        kept = []
        for g, (p, s, a) in enumerate(zip(sizes.tolist(), slots, by_attention, strict=True)):
            top = order[g, :a]
            rest = torch.ones(p, dtype=torch.bool, device=top.device)
            rest[top] = False
            rest = rest.nonzero()[:, 0]
            samples = s - a
            if samples:  # evenly spaced among the tokens attention did not pick
                top = torch.cat([top, rest[torch.arange(samples, device=top.device) * rest.numel() // samples]])
            kept.append(top)
        return kept, extra

    def _official(self, features, lengths, crops, crop_attention, crop_keys, attention_kind):
        if attention_kind != "cls" or crop_attention is None or not crop_keys:
            raise ValueError(
                "mrprune.PruMerge(official=True) needs the [CLS] attention and the vision tower's keys (CLIP towers); "
                "use official=False"
            )
        rows = [crop_attention[self.layer][b] for b in range(features.shape[0])]
        if any(r.shape[0] != 1 or r.shape[1] != int(n) for r, n in zip(rows, lengths.tolist(), strict=True)):
            raise ValueError("mrprune.PruMerge(official=True) takes one-crop images (LLaVA-1.5); use official=False")
        saliency = torch.cat(rows)  # [B, P]: the official code's cls_attn
        batch, total = saliency.shape
        share = self.size.keep_ratio if self.size is not None else _outlier_share(saliency.flatten())
        count = int(total * share)
        sizes = lengths.clone()
        top = ops.topk_indices(saliency.float(), sizes, min(count, total))
        kept = [top[b] for b in range(batch)]
        if self.plus:
            if share == 0:
                raise ValueError("mrprune.PruMerge(official=True): no outliers, the official 1 / ratio divides by 0")
            stride = int(int(1 / share) / 3)
            if stride == 0:
                raise ValueError("mrprune.PruMerge(official=True): the official sample stride int(int(1/r)/3) is 0")
            samples = torch.arange(0, total - 1, stride, device=features.device)
            kept = [torch.cat([k, samples[~torch.isin(samples, k)]]) for k in kept]
        extra = [bool(k.numel() < total) for k in kept]
        metric = torch.cat([crop_keys[self.layer][b].flatten(-2) for b in range(batch)])  # [B, P, H * d]: full keys
        picks = _merge(features, metric, saliency, sizes, kept, extra, self.neighbors)
        return [
            assemble(int(n), [rep], [out], into, weight)
            for n, (rep, out, into, weight) in zip(lengths.tolist(), picks, strict=True)
        ]


def _merge(
    tokens: torch.Tensor,
    metric: torch.Tensor,
    saliency: torch.Tensor,
    sizes: torch.Tensor,
    kept: list[torch.Tensor],
    extra: list[bool],
    neighbors: int,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """PruMerge's merge on each row of a padded group batch.

    Parameters
    ----------
    tokens : Tensor ``[G, P, D]``; metric : Tensor ``[G, P, Dm]``; saliency : Tensor ``[G, P]``, the weights ``a``
    sizes : Tensor ``[G]`` int64; kept : per row the kept indices; extra : per row whether to add the extra token
    neighbors : int, the ``k`` of the kNN

    Returns
    -------
    Per row: representatives ``[k]`` (indices into the row), output tokens ``[k, D]``, each token's representative
    ``[P_g]`` (-1: dropped), each token's weight ``[P_g]`` float32.
    """
    device = tokens.device
    k = min(neighbors, tokens.shape[1])
    merged, near = ops.knn_weighted_merge(tokens, metric, saliency, sizes, padded_positions(kept), k)
    out = []
    for g, (chosen, with_extra) in enumerate(zip(kept, extra, strict=True)):
        size, slots = int(sizes[g]), chosen.numel()
        a = saliency[g, :size].float()
        lists = near[g, :slots]  # [slots, k], nearest first, -1 padded
        # each token's nearest-ranking kept token: rank * size + its position, minimised (ties: the lower position)
        big = (k + 1) * size
        best = torch.full((size,), big, dtype=torch.int64, device=device)
        key = torch.arange(k, device=device)[None] * size + chosen[:, None]
        valid = lists >= 0
        best.scatter_reduce_(0, lists[valid], key.expand_as(lists)[valid], reduce="amin")
        found = best < big
        into = torch.where(found, best % max(size, 1), -1)
        slot_of = torch.zeros(size, dtype=torch.int64, device=device)
        slot_of[chosen] = torch.arange(slots, device=device)
        mass = 1.0 + torch.where(valid, a[lists.clamp(min=0)], 0.0).sum(1)  # [slots]: 1 + sum of a_j
        weight = torch.where(found, a / mass[slot_of[into.clamp(min=0)]], 0.0) if slots else torch.zeros_like(a)
        into[chosen], weight[chosen] = chosen, 1.0 / mass
        reps, outs = [chosen], [merged[g, :slots]]
        pruned = torch.ones(size, dtype=torch.bool, device=device)
        pruned[chosen] = False
        if with_extra and bool(pruned.any()):
            kept_a = torch.where(pruned, a, -1.0)
            rep = kept_a.argmax()[None]  # the pruned token of largest attention (the first on ties)
            pa = torch.where(pruned, a, 0.0)
            outs.append((pa[:, None] * tokens[g, :size].float()).sum(0, keepdim=True).to(tokens.dtype))
            reps.append(rep)
            total = pa.sum()
            share = pa / total if float(total) > 0 else pruned.float() / pruned.sum()
            orphan = pruned & ~found
            into[orphan] = rep
            weight = torch.where(orphan, share, weight)
        out.append((torch.cat(reps), torch.cat(outs), into, weight))
    return out
