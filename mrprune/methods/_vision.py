"""What the vision-stage methods share: budgets, their attention inputs, and per-crop selection."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from ..batching import pad_batch
from . import _checks
from .base import round_half_up, take_prefixes

__all__ = ["Budget", "allocate", "check_layer", "token_scores", "top_per_crop"]


class Budget:
    """Tokens kept per item: a fixed count (``budget``, the papers' 192 / 128 / 64 for LLaVA-1.5, 640 / 320 for
    LLaVA-NeXT) or a share (``keep_ratio``, ``round(keep_ratio * n)`` half up; the Qwen2.5-VL tables prune 66.7 /
    77.8 / 88.9 %). Exactly one is given."""

    def __init__(self, owner: str, budget: int | None, keep_ratio: float | None) -> None:
        if (budget is None) == (keep_ratio is None):
            raise ValueError(f"mrprune.{owner}: give exactly one of budget and keep_ratio")
        self.budget = None if budget is None else _checks.count(owner, "budget", budget, minimum=1)
        self.keep_ratio = None if keep_ratio is None else _checks.keep_ratio(owner, keep_ratio)

    def __call__(self, n: int) -> int:
        """Kept tokens of an item of ``n`` tokens (at most ``n``)."""
        if self.budget is not None:
            return min(self.budget, n)
        return min(round_half_up(self.keep_ratio * n), n)

    def __repr__(self) -> str:
        return f"budget={self.budget}" if self.budget is not None else f"keep_ratio={self.keep_ratio}"


def allocate(total: int, sizes: Sequence[int], weights: Sequence[float] | None = None) -> list[int]:
    """Split ``total`` tokens over groups of ``sizes`` in proportion to ``weights`` (default: the sizes), by largest
    remainder (ties to the lower group), no group above its size; what a capped group cannot take goes to the
    others."""
    sizes = list(sizes)
    weights = list(sizes if weights is None else weights)
    counts = [0] * len(sizes)
    left = min(total, sum(sizes))
    while left > 0:
        open_groups = [g for g in range(len(sizes)) if counts[g] < sizes[g]]
        mass = sum(weights[g] for g in open_groups)
        if mass <= 0:  # no weight left: fill the open groups evenly
            weights = [1.0 if g in open_groups else 0.0 for g in range(len(sizes))]
            mass = float(len(open_groups))
        shares = {g: left * weights[g] / mass for g in open_groups}
        grant = {g: min(int(shares[g]), sizes[g] - counts[g]) for g in open_groups}
        rest = left - sum(grant.values())
        order = sorted(open_groups, key=lambda g: (-(shares[g] - int(shares[g])), g))
        for g in order:
            if rest == 0:
                break
            if counts[g] + grant[g] < sizes[g]:
                grant[g] += 1
                rest -= 1
        for g, extra in grant.items():
            counts[g] += extra
        given = sum(grant.values())
        left -= given
        if given == 0:
            break
    return counts


def top_per_crop(
    scores: torch.Tensor, crops: torch.Tensor, lengths: torch.Tensor, counts: Sequence[dict[int, int]]
) -> list[torch.Tensor]:
    """Per item ``b``, the ``counts[b][c]`` best-scored tokens of each crop ``c`` (ties to the lower index), through one
    ``mrprune.topk_indices`` call over all (item, crop) groups.

    Parameters
    ----------
    scores : Tensor ``[B, N]``
    crops : Tensor ``[B, N]`` int64, each token's crop (-1: in no crop)
    lengths : Tensor ``[B]``
    counts : per item, crop -> tokens to keep

    Returns
    -------
    list of B int64 tensors (token indices of the item, unsorted).
    """
    groups, owners, wanted = [], [], []
    for b, per_item in enumerate(counts):
        n = int(lengths[b])
        for crop, k in sorted(per_item.items()):
            index = (crops[b, :n] == crop).nonzero()[:, 0]
            groups.append(index)
            owners.append(b)
            wanted.append(min(k, index.numel()))
    kept: list[list[torch.Tensor]] = [[] for _ in counts]
    live = [g for g in range(len(groups)) if groups[g].numel() > 0]
    if live:
        values, sizes = pad_batch([scores[owners[g], groups[g]].float()[:, None] for g in live])
        picks = ops.topk_indices(values[..., 0], sizes, max(wanted[g] for g in live))
        for g, pick in zip(live, take_prefixes(picks, [wanted[g] for g in live]), strict=True):
            kept[owners[g]].append(groups[g][pick])
    empty = torch.zeros(0, dtype=torch.int64, device=scores.device)
    return [torch.cat(parts) if parts else empty for parts in kept]


def check_layer(owner: str, layer: int) -> int:
    """A vision encoder layer index (an int, negative from the end)."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"mrprune.{owner}: layer must be an int (a vision encoder layer), got {layer!r}")
    return layer


def token_scores(
    owner: str,
    features: torch.Tensor,
    attention: dict[int, torch.Tensor] | None,
    crops: torch.Tensor | None,
    layer: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token scores ``[B, N]`` float32 at ``layer`` and the crops ``[B, N]`` (all 0 when not given) a
    vision-stage method reads (``Need.VISION_ATTENTION``)."""
    if attention is None or layer not in attention:
        raise ValueError(
            f"mrprune.{owner}: needs attention={{{layer}: [B, N] scores}} (the vision encoder's attention at layer "
            f"{layer}); integrations pass it, select_batch callers must"
        )
    scores = attention[layer]
    if not isinstance(scores, torch.Tensor) or scores.shape != features.shape[:2]:
        raise ValueError(f"mrprune.{owner}: attention[{layer}] must be [B, N] = {tuple(features.shape[:2])}")
    if crops is None:
        crops = torch.zeros(features.shape[:2], dtype=torch.int64, device=features.device)
    elif crops.shape != features.shape[:2]:
        raise ValueError(f"mrprune.{owner}: crops must be [B, N] = {tuple(features.shape[:2])}")
    return scores.float(), crops
