"""VisionZip: dominant tokens by [CLS] attention, the rest merged into a few contextual tokens (Yang et al.,
"VisionZip: Longer is Better but Not Necessary in Vision Language Models", CVPR 2025, arXiv 2412.04467; official code
dvlab-research/VisionZip @ 3151f6d, ``visionzip/clip_encoder.py``, ``visionzip/llava_arch.py``).

A ``vision``-stage merging method. Per crop (LLaVA-1.5's one, each LLaVA-NeXT crop, each Qwen2.5-VL frame):

1. **dominant** tokens: the top tokens by the head-averaged [CLS] attention of vision layer ``layer`` (-2, the layer
   LLaVA projects); on Qwen2.5-VL, which has no [CLS], the attention each token receives (streamed from the layer's
   q/k by ``mrprune.received_attention``, never the N x N matrix the official Qwen port materialises);
2. **contextual** tokens: among the remaining tokens (in position order) ``C`` targets at the uniform stride
   ``max(1, R // C)``; every other remaining token joins the target of largest cosine similarity (official: of
   layer ``layer``'s head-averaged keys; default mode: of the tokens), and each target becomes
   ``target + mean(members)`` (``mrprune.assign_merge``; the official arithmetic).

Output tokens take their representatives' rows: a dominant token its own, a contextual token its target's.
"""

from __future__ import annotations

import torch

from .. import ops
from ..batching import pad_batch
from . import _checks
from ._merging import assemble, padded_positions
from ._vision import Budget, check_layer, merge_per_crop, token_scores
from .base import Pruner, round_half_up
from .stages import Need, Stage

__all__ = ["VisionZip"]


class VisionZip(Pruner):
    """VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by similarity, crop by crop.

    Parameters
    ----------
    budget : int, optional
        Output tokens per image (LLaVA-1.5: 192 / 128 / 64; LLaVA-NeXT: 640 / 320). With ``official=True``: output
        tokens *per crop* before the [CLS] state is left out (the official ``dominant + contextual``).
    keep_ratio : float in (0, 1], optional
        Share of each image's tokens instead (``round(keep_ratio * n)``; Qwen2.5-VL: 1/3, 2/9, 1/9). With
        ``official=True``: ``int(P * keep_ratio)`` per crop of ``P`` patches. Exactly one of the two.
    contextual_ratio : float in [0, 1]
        Share of a crop's tokens that are contextual: ``C = round(T * contextual_ratio)`` of ``T``, ``T - C``
        dominant. The default 5/32 gives the official settings 54 + 10 (64), 108 + 20 (128), 162 + 30 (192).
    layer : int
        Vision encoder layer whose attention ranks the tokens (official: -2; Qwen2.5-VL presets: -1, its last
        full-attention block, as the official Qwen port).
    include_target : bool
        Contextual tokens as the plain mean of target and members instead of the official ``target + mean(members)``
        (not allowed with ``official=True``).
    official : bool
        ``True`` reproduces the official selection and merge arithmetic on [CLS] towers: per crop over all its ``P``
        patches, the top ``T - C - 1`` patches by attention (the official ``topk(dominant - 1)``), the remaining
        patches in position order, targets ``arange(0, R, max(1, R // C))[:C]``, each other patch to its first most
        cosine-similar target by layer ``layer``'s head-averaged keys (``Need.VISION_KEYS``), ``target +
        mean(members)``; LLaVA-NeXT newlines are dropped (the official code adds
        none). Needs every patch of every crop to have a token (LLaVA-1.5; LLaVA-NeXT images unpadding leaves
        whole).

    Notes
    -----
    Differences from the official code, both modes:

    * **The [CLS] state.** The official output starts with the [CLS] token's layer -2 state as an extra dominant
      token (``dominant - 1`` patches + [CLS]). transformers' LLaVA drops [CLS] (``vision_feature_select_strategy=
      "default"``), so there is no row for it: ``official=True`` keeps the official ``T - C - 1`` dominant patches
      and leaves the [CLS] state out (``T - 1`` tokens per crop); the default mode gives the slot to one more
      dominant patch (exactly ``T`` tokens).
    * **The similarity metric.** The official code compares the head-averaged *keys* of layer ``layer`` (its
      ``CLIPAttention`` returns ``k_proj(layer_norm1(x))`` split into heads and averaged over them; the [CLS] key is
      never compared, [CLS] being dominant). ``official=True`` compares exactly those (``Need.VISION_KEYS``,
      ``crop_keys[layer].mean(-2)``). The default mode compares the tokens in the LLM input space: the same metric
      on every model (Qwen2.5-VL's tower has no keys per token: they belong to patches before its 2 x 2 merger),
      and the space the merged tokens live in; it asks for no keys.
    * **Where tokens are merged.** The official code merges vision states and projects the merged states; here the
      merge runs on the projected tokens (a vision-stage method never calls the projector), so a contextual token is
      ``proj(t) + mean(proj(m))`` instead of ``proj(t + mean(m))``.
    * **Order.** Output tokens sit at their representatives' rows (spatial order); the official sequence is
      ``[CLS, dominant in position order, contextual in target order]`` (LLaVA-NeXT: base view, tiles' dominant
      tokens, the tiles' [CLS] states, the tiles' contextual tokens).
    * Ties in the attention ranking go to the lower index (official ``topk``: unspecified); arithmetic accumulates
      in float32.

    Default mode (``official=False``): the image's budget (LLaVA-NeXT newlines kept first and counted) is split over
    its crops by size (:func:`~mrprune.methods._vision.size_split`), each crop keeps ``T - C`` dominant tokens and
    ``C`` contextual ones of its ``T``; items are independent (batch > 1), Qwen2.5-VL images and video frames
    included. ``sources`` / ``weights`` of the result: a contextual token's target has weight 1/2 and each of its
    ``m`` members ``1 / (2 m)`` (the token is twice that weighted mean), a target without members weight 1.
    """

    stage = Stage.VISION
    merges = True
    needs = Pruner.needs | {Need.VISION_ATTENTION, Need.VISION_KEYS}

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        contextual_ratio: float = 5 / 32,
        layer: int = -2,
        include_target: bool = False,
        official: bool = False,
    ) -> None:
        self.size = Budget("VisionZip", budget, keep_ratio)
        ratio = _checks.non_negative("VisionZip", "contextual_ratio", contextual_ratio)
        if ratio > 1:
            raise ValueError(f"mrprune.VisionZip: contextual_ratio must lie in [0, 1], got {ratio}")
        self.contextual_ratio = ratio
        self.layer = check_layer("VisionZip", layer)
        self.include_target = _checks.flag("VisionZip", "include_target", include_target)
        self.official = _checks.flag("VisionZip", "official", official)
        if self.official and self.include_target:
            raise ValueError("mrprune.VisionZip(official=True) merges as target + mean(members); drop include_target")
        self.attention_layers = (self.layer,)
        self.key_layers = (self.layer,) if self.official else ()

    def __repr__(self) -> str:
        return (
            f"VisionZip({self.size!r}, contextual_ratio={self.contextual_ratio}, layer={self.layer}, "
            f"include_target={self.include_target}, official={self.official})"
        )

    def split(self, total: int) -> tuple[int, int]:
        """``(dominant, contextual)`` of a crop keeping ``total`` tokens."""
        contextual = min(round_half_up(total * self.contextual_ratio), total)
        return total - contextual, contextual

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
        scores, crops = token_scores("VisionZip", features, attention, crops, self.layer)
        if self.official:
            return self._official(features, lengths, crops, patches, crop_attention, crop_keys, attention_kind)
        return merge_per_crop(self.size, features, scores, crops, lengths, self._merge_groups)

    def _merge_groups(
        self, tokens: torch.Tensor, saliency: torch.Tensor, sizes: torch.Tensor, wanted: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The default mode on each crop group (:data:`~mrprune.methods._vision.Merge`): ``split(wanted[g])``
        dominant and contextual tokens, the similarity on the tokens themselves."""
        return _zip(tokens, tokens, saliency, sizes, [self.split(w) for w in wanted], self.include_target)

    def _official(self, features, lengths, crops, patches, crop_attention, crop_keys, attention_kind):
        if attention_kind != "cls" or crop_attention is None or not crop_keys or patches is None:
            raise ValueError(
                "mrprune.VisionZip(official=True) needs the [CLS] attention and the vision tower's keys of every crop "
                "(CLIP towers); use official=False"
            )
        results = []
        for b, n in enumerate(lengths.tolist()):
            # [crops, P] and the head-averaged keys [crops, P, d] (the official metric)
            saliency, metric = crop_attention[self.layer][b], crop_keys[self.layer][b].float().mean(-2)
            count, total = saliency.shape
            owned, where = crops[b, :n], patches[b, :n]
            made = owned >= 0
            position = torch.full((count, total), -1, dtype=torch.int64, device=features.device)
            position[owned[made], where[made]] = made.nonzero()[:, 0]
            if bool((position < 0).any()):
                raise ValueError(
                    "mrprune.VisionZip(official=True) needs a token for every patch of every crop (LLaVA-1.5, or "
                    "LLaVA-NeXT images that unpadding leaves whole); use official=False"
                )
            t = self.size.budget if self.size.budget is not None else int(total * self.size.keep_ratio)
            dominant, contextual = self.split(min(t, total))
            if contextual == 0:
                raise ValueError("mrprune.VisionZip(official=True): no contextual tokens (the official divides by 0)")
            if dominant < 1:
                raise ValueError("mrprune.VisionZip(official=True): dominant tokens include the [CLS] state, so >= 1")
            sizes = torch.full((count,), total, dtype=torch.int64, device=features.device)
            plan = [(dominant - 1, contextual)] * count
            parts = _zip(features[b, position], metric, saliency, sizes, plan, False)
            reps, outs = [], [features.new_zeros(0, features.shape[-1])]
            into_item = torch.full((n,), -1, dtype=torch.int64, device=features.device)
            weights = torch.zeros(n, dtype=torch.float32, device=features.device)
            for crop, (rep, out, into, weight) in enumerate(parts):
                rows = position[crop]
                reps.append(rows[rep])
                outs.append(out)
                into_item[rows] = torch.where(into >= 0, rows[into.clamp(min=0)], -1)
                weights[rows] = weight
            results.append(assemble(n, reps, outs, into_item, weights))
        return results


def _zip(
    tokens: torch.Tensor,
    metric: torch.Tensor,
    saliency: torch.Tensor,
    sizes: torch.Tensor,
    plan: list[tuple[int, int]],
    include_target: bool,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """VisionZip on each row of a padded group batch.

    Parameters
    ----------
    tokens : Tensor ``[G, P, D]``, the tokens merged; metric : Tensor ``[G, P, Dm]``, what the similarity compares
    saliency : Tensor ``[G, P]``, the attention ranking the dominant tokens; sizes : Tensor ``[G]`` int64
    plan : per row ``(dominant, contextual)`` counts

    Returns
    -------
    Per row: output representatives ``[k]`` (indices into the row), output tokens ``[k, D]``, each token's
    representative ``[P_g]`` (-1: dropped), each token's weight ``[P_g]`` float32.
    """
    device = tokens.device
    order = ops.topk_indices(saliency.float(), sizes, max([d for d, _ in plan], default=0))
    dominant, rests, targets = [], [], []
    for g, (d, c) in enumerate(plan):
        size = int(sizes[g])
        chosen = order[g, :d]
        rest = torch.ones(size, dtype=torch.bool, device=device)
        rest[chosen] = False
        rest = rest.nonzero()[:, 0]  # ascending: the official masked_select order
        step = max(1, rest.numel() // c) if c else 1
        dominant.append(chosen)
        rests.append(rest)
        targets.append(torch.arange(0, rest.numel(), step, device=device)[:c])
    merged = assignment = slot_sizes = None
    if any(r.numel() for r in rests):
        x, rest_sizes = pad_batch([tokens[g, r] for g, r in enumerate(rests)])
        m = pad_batch([metric[g, r] for g, r in enumerate(rests)])[0]
        merged, assignment, slot_sizes = ops.assign_merge(x, m, rest_sizes, padded_positions(targets), include_target)
    out = []
    for g, (chosen, rest, target) in enumerate(zip(dominant, rests, targets, strict=True)):
        size = int(sizes[g])
        into = torch.full((size,), -1, dtype=torch.int64, device=device)
        weight = torch.zeros(size, dtype=torch.float32, device=device)
        into[chosen], weight[chosen] = chosen, 1.0
        reps, outs = [chosen], [tokens[g, chosen]]
        if target.numel():
            slot = assignment[g, : rest.numel()]
            joined = slot >= 0
            into[rest[joined]] = rest[target[slot[joined]]]
            count = slot_sizes[g, slot.clamp(min=0)].float()
            if include_target:
                share = 1.0 / count
            else:  # target + mean(members): the target half the weight, the members the other half
                members = count - 1
                is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
                is_target[target] = True
                share = torch.where(is_target, torch.where(members > 0, 0.5, 1.0), 0.5 / members.clamp(min=1))
            weight[rest] = torch.where(joined, share, 0.0)
            reps.append(rest[target])
            outs.append(merged[g, : target.numel()])
        out.append((torch.cat(reps), torch.cat(outs), into, weight))
    return out
