"""HiRED: high-resolution early dropping for LLaVA-NeXT (Arif et al., "HiRED: Attention-Guided Token Dropping for
Efficient Inference of High-Resolution Vision-Language Models", AAAI 2025; official code hasanar1f/HiRED @ 42be984,
``transformers/.../llava_next/modeling_llava_next.py``: ``HiRED_token_selection``, ``HiRED_sub_img_budgets``).

A ``vision``-stage method reading the [CLS] attention of two CLIP layers, per crop: the base view gets the share
``alpha`` of the budget; the rest goes to the high-resolution tiles in proportion to how many of the base view's top
``(1 - alpha) * P`` tokens by *layer-0* attention fall in each tile's part of the image; every crop then keeps its
top tokens by *layer-22* attention (the official hooks recompute the rows from ``q_proj`` / ``k_proj``, as here).
"""

from __future__ import annotations

import torch

from .. import ops
from ..layouts import LlavaNextLayout
from . import _checks
from ._vision import Budget, allocate, check_layer, select_per_crop, token_scores
from .base import Pruner
from .stages import Need, Stage

__all__ = ["HiRED"]


class HiRED(Pruner):
    """HiRED: per-crop budgets from early-layer [CLS] attention, per-crop selection by late-layer [CLS] attention.

    Parameters
    ----------
    budget : int, optional
        Tokens kept per image (LLaVA-NeXT tables: 640 / 320; LLaVA-1.5: 192 / 128 / 64).
    keep_ratio : float in (0, 1], optional
        Share kept instead; with ``official=True`` the official ``token_budget_rate`` (paper default 0.2): the image
        keeps ``int(crops * P * rate)`` patches before unpadding. Exactly one of ``budget`` and ``keep_ratio``.
    alpha : float in [0, 1]
        Share of the budget for the base view (official default 0.5).
    budget_layer, select_layer : int
        Vision encoder layers (indices into its layers) whose [CLS] attention splits the budget (official: 0) and
        ranks the tokens within a crop (official: 22 of CLIP-L's 24, i.e. -2).
    official : bool
        ``True`` reproduces the official selection on multi-crop LLaVA-NeXT images: ``T = int(crops * P * rate)``,
        base view ``min(int(T * alpha), P)``, tiles ``min(T - base, (crops - 1) * P)`` split as
        ``int(share * rest)`` (truncated, so fewer tokens than ``T`` survive) by the base view's top
        ``int(P * (1 - alpha))`` layer-0 tokens counted per *contiguous raster chunk* of ``P / tiles`` tokens (the
        official reshape, not the tile's image region), each crop's top tokens among all its ``P`` patches (those
        the unpadding removes included), and no newline token (the official packing passes ``image_newline=None``).
        The unpadding itself is the model's (transformers >= 5.17), not the official fork's.

    Notes
    -----
    Default mode (``official=False``): the image keeps ``budget`` tokens, LLaVA-NeXT newlines included (kept first);
    the tiles' shares count the top layer-0 base tokens in each tile's actual region of the image (the base token's
    relative position mapped into the unpadded grid), any budget a crop cannot use goes to the others, and images
    that are not multi-crop LLaVA-NeXT (LLaVA-1.5, single-crop, Qwen2.5-VL frames) split the budget over their
    crops by size. Ties go to the lower index.
    """

    stage = Stage.VISION
    needs = Pruner.needs | {Need.VISION_ATTENTION}

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        alpha: float = 0.5,
        budget_layer: int = 0,
        select_layer: int = -2,
        official: bool = False,
    ) -> None:
        self.size = Budget("HiRED", budget, keep_ratio)
        alpha = _checks.non_negative("HiRED", "alpha", alpha)
        if alpha > 1:
            raise ValueError(f"mrprune.HiRED: alpha must lie in [0, 1], got {alpha}")
        self.alpha = alpha
        self.budget_layer = check_layer("HiRED", budget_layer)
        self.select_layer = check_layer("HiRED", select_layer)
        self.official = _checks.flag("HiRED", "official", official)
        if self.official and self.size.keep_ratio is None:
            raise ValueError("mrprune.HiRED(official=True) takes keep_ratio (the official token_budget_rate)")
        self.attention_layers = tuple(dict.fromkeys((self.budget_layer, self.select_layer)))

    def __repr__(self) -> str:
        return (
            f"HiRED({self.size!r}, alpha={self.alpha}, budget_layer={self.budget_layer}, "
            f"select_layer={self.select_layer}, official={self.official})"
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
        attention_kind="cls",
        **kwargs,
    ):
        scores, crops = token_scores("HiRED", features, attention, crops, self.select_layer)
        early = token_scores("HiRED", features, attention, crops, self.budget_layer)[0]
        if self.official:
            return self._official(layouts, lengths, crops, patches, crop_attention, attention_kind)

        def split(b, scored, owned, present, sizes):  # multi-crop LLaVA-NeXT: by the early attention; else by size
            layout = layouts[b]
            if isinstance(layout, LlavaNextLayout) and not layout.single_crop and len(present) > 1:
                return self._split(scored, early[b, : owned.numel()], owned, layout, present, sizes)
            return None

        return select_per_crop(self.size, features, scores, crops, lengths, split=split)

    def _split(self, scored, early, owned, layout, present, sizes):
        """Default-mode budgets per crop of one multi-crop image: ``alpha`` for the base view, the rest by where
        the base view's early attention concentrates."""
        base_count = sizes[0]  # crop 0 (the base view) comes first
        base = min(int(scored * self.alpha), base_count)
        side = layout.base_side
        top = int(layout.num_base * (1 - self.alpha))
        lengths = torch.tensor([layout.num_base], device=early.device)
        chosen = ops.topk_indices(early[None, : layout.num_base], lengths, top)[0]
        # each base token's tile: its relative position in the image, looked up in the unpadded grid
        rows, cols = chosen // side, chosen % side
        grid_rows = ((rows.double() + 0.5) * layout.rows / side).long()
        grid_cols = ((cols.double() + 0.5) * layout.cols / side).long()
        tiles = owned[layout.highres_indices.to(owned.device).view(layout.rows, layout.cols)[grid_rows, grid_cols]]
        weights = [float((tiles == c).sum()) for c in present[1:]]
        rest = allocate(scored - base, sizes[1:], weights)
        counts = dict(zip(present, [base, *rest], strict=True))
        spare = scored - sum(counts.values())  # a tile that could not take its share: back to the base view
        counts[present[0]] = min(base_count, counts[present[0]] + spare)
        return counts

    def _official(self, layouts, lengths, crops, patches, crop_attention, attention_kind):
        if attention_kind != "cls" or crop_attention is None or patches is None:
            raise ValueError("mrprune.HiRED(official=True) needs the [CLS] attention of every crop (CLIP towers)")
        kept = []
        for b, n in enumerate(lengths.tolist()):
            layout = layouts[b]
            if not isinstance(layout, LlavaNextLayout) or layout.single_crop:
                raise ValueError(
                    f"mrprune.HiRED(official=True) needs multi-crop LlavaNextLayout images (the official code is "
                    f"LLaVA-NeXT anyres only), got {layout}; use official=False"
                )
            select = crop_attention[self.select_layer][b].float()  # [crops, P]
            early = crop_attention[self.budget_layer][b].float()
            count, total = select.shape
            budget = int(count * total * self.size.keep_ratio)
            base = min(int(budget * self.alpha), total)
            rest = min(budget - base, (count - 1) * total)
            per_crop = [base]
            if rest > 0:
                spread = int(total * (1 - self.alpha))
                if spread == 0:
                    raise ValueError("mrprune.HiRED(official=True): alpha = 1 leaves the tiles' split 0/0 (NaN)")
                marked = torch.zeros(total, device=select.device)
                marked[_top(early[:1], spread)[0]] = 1
                mass = marked.view(count - 1, -1).sum(-1)  # contiguous raster chunks, as the official reshape
                shares = (mass / mass.sum() * rest).int().clamp(max=total)
                per_crop += shares.tolist()
            else:
                per_crop += [0] * (count - 1)
            chosen = torch.zeros(count, total, dtype=torch.bool, device=select.device)
            for crop, k in enumerate(per_crop):
                chosen[crop, _top(select[crop : crop + 1], k)[0]] = True
            owned, where = crops[b, :n], patches[b, :n]
            keep = (owned >= 0) & chosen[owned.clamp(min=0), where.clamp(min=0)]
            kept.append(keep.nonzero()[:, 0])
        return kept


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[R, P]`` scores -> ``[R, k]`` indices of each row's ``k`` best (ties to the lower index)."""
    lengths = torch.full((scores.shape[0],), scores.shape[1], dtype=torch.int64, device=scores.device)
    return ops.topk_indices(scores, lengths, min(k, scores.shape[1]))
