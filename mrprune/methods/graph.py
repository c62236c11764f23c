"""Graph-propagation pruners: MR-Pruner (WACV 2026) and G-Prune (AAAI 2025).

Both score tokens by ``(w^T P^t) / degree`` on a thresholded-softmax cosine graph (``mrprune.graph_scores``),
separately for LLaVA-NeXT's base view and its high-resolution grid, keep the best of each plus every newline token,
and return the kept indices in spatial order. MR-Pruner splits the budget between the resolutions by their mean
token norms and lends the informativeness of the pruned high-resolution tokens to similar base tokens
(``mrprune.transfer_scores``); G-Prune keeps the same ratio of each resolution and propagates ``t = 5`` steps.

``official=True`` reproduces the official code's kept set (gooriiie/MR-Pruner @ 8c71785, jytmelon/G-Prune @ 762c637;
research/algorithms.md §2–3) in float32. ``official=False`` (the default) is the same method with the official bugs
fixed; see each class for the differences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import ops
from ..batching import gather_rows, pad_batch
from ..layouts import LlavaNextLayout
from . import _checks
from .base import Layout, Pruner, check_keep_ratio, round_half_up, top_tokens

__all__ = ["GPrune", "MRPruner"]


@dataclass
class _Resolutions:
    """One batch split into its two resolutions: padded base and high-resolution tokens, their index maps back into
    each image's sequence, and the tokens every image keeps unconditionally (newlines)."""

    low: torch.Tensor  # [B, n_low_max, D]
    low_lengths: torch.Tensor  # [B]
    low_index: list[torch.Tensor]  # per item: low token -> image index
    high: torch.Tensor  # [B, n_high_max, D]
    high_lengths: torch.Tensor
    high_index: list[torch.Tensor]
    always: list[torch.Tensor]  # per item: image indices kept unconditionally

    @classmethod
    def split(cls, owner: str, features: torch.Tensor, layouts: Sequence[Layout]) -> _Resolutions:
        """``owner`` (the method) names the errors: the unconditionally kept tokens are checked for NaN/Inf here."""
        device = features.device
        low_index, high_index, always, low, high = [], [], [], [], []
        for b, layout in enumerate(layouts):
            # The low set is a leading run of tokens (the base view, or all of them): a view, not a gather; with one
            # item pad_batch adds no copy either, so only the high-resolution tokens are copied (once).
            if isinstance(layout, LlavaNextLayout):
                low_index.append(layout.base_indices.to(device))
                high_index.append(layout.highres_indices.to(device))
                always.append(layout.newline_indices.to(device))
            else:  # one resolution: every token competes in the "low" set
                low_index.append(torch.arange(layout.num_tokens, device=device))
                high_index.append(torch.zeros(0, dtype=torch.int64, device=device))
                always.append(torch.zeros(0, dtype=torch.int64, device=device))
            low.append(features[b, : low_index[b].numel()])
            high.append(gather_rows(features[b], high_index[b]))
        _checks.unconditional_tokens(owner, features, always)
        low, low_lengths = pad_batch(low)
        high, high_lengths = pad_batch(high)
        return cls(low, low_lengths, low_index, high, high_lengths, high_index, always)

    def assemble(self, keep_low: Sequence[torch.Tensor], keep_high: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [
            torch.cat([self.low_index[b][keep_low[b]], self.high_index[b][keep_high[b]], self.always[b]])
            for b in range(len(self.low_index))
        ]


def _require_official_layout(method: str, layouts: Sequence[Layout]) -> None:
    for layout in layouts:
        if not isinstance(layout, LlavaNextLayout) or layout.rows * layout.cols == 0:
            raise ValueError(
                f"{method}(official=True) needs LlavaNextLayout images with a high-resolution grid: the official code "
                f"only handles anyres images (NameError on single-crop ones, NaN budgets on empty grids); "
                f"got {layout}. Use official=False."
            )


def _scored_budget(keep_ratio: float, layout: Layout, always: int) -> int:
    """Default mode: ``round(keep_ratio * tokens)`` kept in all, newlines included (they are kept first; a budget
    smaller than the newline count keeps just the newlines)."""
    return max(round_half_up(keep_ratio * layout.num_tokens) - always, 0)


class MRPruner(Pruner):
    """MR-Pruner: multi-resolution graph pruning for LLaVA-NeXT (Lee et al., WACV 2026).

    Per image (research/algorithms.md §2): the budget is split between the base view and the high-resolution grid by
    their mean token norms; high-resolution tokens are scored on their cosine graph and the top ``K_H`` kept; the
    pruned high-resolution tokens transfer their norms to similar base tokens (``beta`` times the cross transfer is
    added to the base scores); the top ``K_L`` base tokens and every newline token are kept.

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Official code default 0.1; the paper reports 0.5 / 0.3 / 0.1 / 0.05 (see :mod:`mrprune.methods.presets`).
    official : bool
        ``True`` reproduces the official code's kept set (float32): ``K = floor(keep_ratio * T_img)`` over all image
        tokens *including* newlines, ``K_L = min(int(K * m_L / (m_L + m_H)), 576)`` computed as float32 tensors,
        ``K_H = min(K - K_L, R * C)``, and the ``R`` newline tokens kept *on top* (so 0.1 keeps 11.6 % of a square
        image). Only multi-crop LLaVA-NeXT images (the official code crashes on single-crop ones). The official
        degree counts ``P > 0`` after the softmax: the same as the edge count used here in float32 (not float16).
        Where nothing is pruned at high resolution the official transfer is 0/0 = NaN and its selection undefined;
        here it is 0 in both modes.
    threshold, cross_threshold, temperature, iterations, beta
        Official defaults 0.5, 0.5, 0.03, 1, 0.5.

    Notes
    -----
    Default mode (``official=False``) fixes: the number kept is ``round(keep_ratio * T_img)`` with newline tokens
    kept and counted inside it (the rest split by mean norms, a capped side's excess going to the other);
    single-crop images (base + one newline) and plain grids (:class:`~mrprune.layouts.GridLayout`, no transfer) work;
    any batch size and any number of images (each image is pruned on its own statistics, not the last image's);
    no NaN when nothing is pruned at high resolution.
    """

    def __init__(
        self,
        keep_ratio: float = 0.1,
        official: bool = False,
        threshold: float = 0.5,
        cross_threshold: float = 0.5,
        temperature: float = 0.03,
        iterations: int = 1,
        beta: float = 0.5,
    ) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio, "MRPruner")
        self.official = _checks.flag("MRPruner", "official", official)
        self.threshold, self.temperature, self.iterations = _checks.graph_params(
            "MRPruner", threshold, temperature, iterations
        )
        self.cross_threshold = _checks.real("MRPruner", "cross_threshold", cross_threshold)
        self.beta = _checks.real("MRPruner", "beta", beta)

    def __repr__(self) -> str:
        return f"MRPruner(keep_ratio={self.keep_ratio}, official={self.official}, beta={self.beta})"

    def _budgets(
        self, layout: Layout, low_norms: torch.Tensor, high_norms: torch.Tensor, always: int
    ) -> tuple[int, int]:
        n_low, n_high = low_norms.numel(), high_norms.numel()
        if self.official:
            total = int(self.keep_ratio * layout.num_tokens)
            mass = low_norms.mean() + high_norms.mean()
            if not bool(mass > 0):  # the official code divides by it (and crashes on int(nan))
                raise ValueError(
                    f"mrprune.MRPruner(official=True): the mean token norms of an image sum to {float(mass)} (all-zero "
                    "features?), so the official budget split m_L / (m_L + m_H) is undefined; use official=False"
                )
            share = low_norms.mean() / mass  # 0-dim float32, as in the official code
            k_low = min(int(total * share), n_low)
            return k_low, min(total - k_low, n_high)
        scored = min(_scored_budget(self.keep_ratio, layout, always), n_low + n_high)
        if n_high == 0:
            return scored, 0
        mass = low_norms.mean() + high_norms.mean()
        share = float(low_norms.mean() / mass) if mass > 0 else n_low / (n_low + n_high)
        k_low = min(int(scored * share), n_low)
        k_high = min(scored - k_low, n_high)
        return scored - k_high, k_high  # a capped side's excess goes to the other

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        if self.official:
            _require_official_layout("MRPruner", layouts)
        split = _Resolutions.split("MRPruner", features, layouts)
        low_norms = _checks.token_norms("MRPruner", split.low, split.low_lengths)
        high_norms = _checks.token_norms("MRPruner", split.high, split.high_lengths)
        budgets = [
            self._budgets(
                layout,
                low_norms[b, : split.low_lengths[b]],
                high_norms[b, : split.high_lengths[b]],
                split.always[b].numel(),
            )
            for b, layout in enumerate(layouts)
        ]
        graph = dict(threshold=self.threshold, temperature=self.temperature, iterations=self.iterations)
        high_scores = ops.graph_scores(split.high, split.high_lengths, None, **graph)
        keep_high = top_tokens(high_scores, split.high_lengths, [k_high for _, k_high in budgets])
        valid_high = torch.arange(split.high.shape[1], device=features.device) < split.high_lengths[:, None]
        pruned_high = valid_high.clone()
        for b, kept in enumerate(keep_high):
            pruned_high[b, kept] = False
        transfer = ops.transfer_scores(
            split.low, split.low_lengths, split.high, pruned_high, None, self.cross_threshold, self.temperature
        )
        low_scores = ops.graph_scores(split.low, split.low_lengths, None, **graph) + self.beta * transfer
        keep_low = top_tokens(low_scores, split.low_lengths, [k_low for k_low, _ in budgets])
        return split.assemble(keep_low, keep_high)


class GPrune(Pruner):
    """G-Prune: graph-propagation token pruning (Jiang et al., AAAI 2025).

    Per resolution (base view, high-resolution grid) separately: scores ``(w^T P^5) / deg(P^1)`` on the cosine graph
    with norms as weights; keeps the same ratio of each resolution plus every newline token
    (research/algorithms.md §3).

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Official default 0.5.
    official : bool
        ``True`` reproduces the official kept set (float32): ``K_L = floor(keep_ratio * 576)``,
        ``K_H = floor(keep_ratio * R * C)``, newlines on top; multi-crop LLaVA-NeXT images only. Propagation is
        ``t`` vector-matrix products instead of ``matrix_power`` (equal in exact arithmetic).
    threshold, temperature, iterations
        Official defaults 0.5, 0.03, 5.

    Notes
    -----
    Default mode (``official=False``): ``round(keep_ratio * T_img)`` tokens kept in all, newlines included, the rest
    split between the resolutions in proportion to their sizes; single-crop images, plain grids (LLaVA-1.5,
    Qwen2.5-VL: one resolution) and any batch work.
    """

    def __init__(
        self,
        keep_ratio: float = 0.5,
        official: bool = False,
        threshold: float = 0.5,
        temperature: float = 0.03,
        iterations: int = 5,
    ) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio, "GPrune")
        self.official = _checks.flag("GPrune", "official", official)
        self.threshold, self.temperature, self.iterations = _checks.graph_params(
            "GPrune", threshold, temperature, iterations
        )

    def __repr__(self) -> str:
        return f"GPrune(keep_ratio={self.keep_ratio}, official={self.official}, iterations={self.iterations})"

    def _budgets(self, layout: Layout, n_low: int, n_high: int, always: int) -> tuple[int, int]:
        if self.official:
            return int(self.keep_ratio * n_low), int(self.keep_ratio * n_high)
        scored = min(_scored_budget(self.keep_ratio, layout, always), n_low + n_high)
        k_low = min(round_half_up(scored * n_low / (n_low + n_high)), n_low) if n_low + n_high else 0
        return k_low, scored - k_low

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        if self.official:
            _require_official_layout("GPrune", layouts)
        split = _Resolutions.split("GPrune", features, layouts)
        budgets = [
            self._budgets(layout, int(split.low_lengths[b]), int(split.high_lengths[b]), split.always[b].numel())
            for b, layout in enumerate(layouts)
        ]
        graph = dict(threshold=self.threshold, temperature=self.temperature, iterations=self.iterations)
        keep = [
            top_tokens(ops.graph_scores(tokens, n, None, **graph), n, [budget[side] for budget in budgets])
            for side, (tokens, n) in enumerate([(split.low, split.low_lengths), (split.high, split.high_lengths)])
        ]
        return split.assemble(*keep)
