"""What the vision-stage methods share: budgets, their attention inputs, and per-crop selection."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import ops
from ..batching import pad_batch
from . import _checks
from ._merging import assemble
from .base import round_half_up, take_prefixes
from .results import MergedTokens

__all__ = [
    "Budget",
    "Merge",
    "Pick",
    "Split",
    "allocate",
    "check_layer",
    "crop_groups",
    "gather_kept",
    "group_batch",
    "merge_per_crop",
    "select_per_crop",
    "size_split",
    "token_scores",
    "top_per_crop",
]


#: ``pick(tokens [G, P, D], saliency [G, P], sizes [G], wanted)``: ``wanted[g]`` indices into row ``g`` of a padded
#: batch of (item, crop) groups (:func:`select_per_crop`).
Pick = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int]], list[torch.Tensor]]
#: ``merge(tokens [G, P, D], saliency [G, P], sizes [G], wanted)``: per row ``g`` of a padded batch of (item, crop)
#: groups, its output tokens' representatives ``[k]`` (indices into the row), the output tokens ``[k, D]``, each of
#: its tokens' representative ``[P_g]`` (an index into the row; -1: dropped) and weight ``[P_g]`` float32
#: (:func:`merge_per_crop`).
Merge = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, list[int]],
    list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
]
#: ``split(b, scored, owned, present, sizes)``: item ``b``'s crop -> count, or ``None`` for the split by size
#: (:func:`size_split`).
Split = Callable[[int, int, torch.Tensor, list[int], list[int]], dict[int, int] | None]


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


def crop_groups(
    crops: torch.Tensor, lengths: torch.Tensor, counts: Sequence[dict[int, int]]
) -> tuple[list[torch.Tensor], list[int], list[int]]:
    """The (item, crop) groups a per-crop selection runs on: each group's token indices in its item, its item, and
    how many tokens it keeps (at most its size); empty groups left out."""
    groups, owners, wanted = [], [], []
    for b, per_item in enumerate(counts):
        n = int(lengths[b])
        for crop, k in sorted(per_item.items()):
            index = (crops[b, :n] == crop).nonzero()[:, 0]
            if index.numel():
                groups.append(index)
                owners.append(b)
                wanted.append(min(k, index.numel()))
    return groups, owners, wanted


def gather_kept(
    picks: list[torch.Tensor], groups: list[torch.Tensor], owners: list[int], items: int, device: torch.device
) -> list[torch.Tensor]:
    """Per item, the token indices that the groups' ``picks`` (indices into each group) select."""
    kept: list[list[torch.Tensor]] = [[] for _ in range(items)]
    for pick, group, owner in zip(picks, groups, owners, strict=True):
        kept[owner].append(group[pick])
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return [torch.cat(parts) if parts else empty for parts in kept]


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
    groups, owners, wanted = crop_groups(crops, lengths, counts)
    picks = []
    if groups:
        rows = [scores[owner, group].float()[:, None] for owner, group in zip(owners, groups, strict=True)]
        values, sizes = pad_batch(rows)
        picks = take_prefixes(ops.topk_indices(values[..., 0], sizes, max(wanted)), wanted)
    return gather_kept(picks, groups, owners, len(counts), scores.device)


def group_batch(
    features: torch.Tensor, scores: torch.Tensor, groups: list[torch.Tensor], owners: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (item, crop) groups of :func:`crop_groups` as one padded batch: their tokens ``[G, P, D]``, scores
    ``[G, P]`` (0 on padding) and sizes ``[G]`` int64, ``P`` the largest group."""
    pairs = list(zip(owners, groups, strict=True))
    tokens, sizes = pad_batch([features[o, g] for o, g in pairs])
    saliency = pad_batch([scores[o, g][:, None] for o, g in pairs])[0][..., 0]
    return tokens, saliency, sizes


def select_per_crop(
    budget: Budget,
    features: torch.Tensor,
    scores: torch.Tensor,
    crops: torch.Tensor,
    lengths: torch.Tensor,
    pick: Pick | None = None,
    split: Split | None = None,
) -> list[torch.Tensor]:
    """Default-mode per-crop selection: :func:`size_split`'s budgets (``split`` may set an item's own), every
    (item, crop) group padded into one batch (:func:`group_batch`), ``pick(tokens [G, P, D], saliency [G, P], sizes
    [G], wanted)`` choosing ``wanted[g]`` indices into row ``g`` (``None``: each crop's best-scored tokens,
    :func:`top_per_crop`, with no copy of the features), then each item's picks gathered back with its newlines
    appended (list of B int64 tensors, unsorted)."""
    counts, newlines = size_split(budget, crops, lengths, split)
    if pick is None:
        kept = top_per_crop(scores, crops, lengths, counts)
    else:
        groups, owners, wanted = crop_groups(crops, lengths, counts)
        picks = pick(*group_batch(features, scores, groups, owners), wanted) if groups else []
        kept = gather_kept(picks, groups, owners, len(counts), features.device)
    return [torch.cat([k, lines]) for k, lines in zip(kept, newlines, strict=True)]


def merge_per_crop(
    budget: Budget | None,
    features: torch.Tensor,
    scores: torch.Tensor,
    crops: torch.Tensor,
    lengths: torch.Tensor,
    merge: Merge,
) -> list[MergedTokens]:
    """Default-mode per-crop merging, the merging counterpart of :func:`select_per_crop`.

    Parameters
    ----------
    budget : Budget or None
        Output tokens per item, split over its crops by :func:`size_split` (newlines kept first and counted);
        ``None``: every crop asks for all its tokens (a method that sets its own count per crop).
    features : Tensor ``[B, N, D]``
    scores : Tensor ``[B, N]`` float32, the saliency handed to ``merge``
    crops : Tensor ``[B, N]`` int64, each token's crop (-1: a newline, in no crop)
    lengths : Tensor ``[B]`` int64
    merge : Merge
        Runs on every (item, crop) group at once, padded into one batch (:func:`group_batch`), ``wanted[g]`` the
        output tokens asked of group ``g`` (at most its size).

    Returns
    -------
    list of B :class:`MergedTokens`: each item's groups' outputs plus its newlines as themselves (weight 1).
    """
    if budget is None:
        counts = []
        for b, n in enumerate(lengths.tolist()):
            owned = crops[b, :n]
            counts.append({c: int((owned == c).sum()) for c in sorted(set(owned[owned >= 0].tolist()))})
    else:
        counts = size_split(budget, crops, lengths)[0]
    groups, owners, wanted = crop_groups(crops, lengths, counts)
    parts = merge(*group_batch(features, scores, groups, owners), wanted) if groups else []
    results = []
    for b, n in enumerate(lengths.tolist()):
        lines = (crops[b, :n] < 0).nonzero()[:, 0]
        reps, outs = [lines], [features[b, lines]]
        where = torch.full((n,), -1, dtype=torch.int64, device=features.device)
        weights = torch.zeros(n, dtype=torch.float32, device=features.device)
        where[lines], weights[lines] = lines, 1.0
        for group, owner, (rep, out, into, weight) in zip(groups, owners, parts, strict=True):
            if owner != b:
                continue
            # the group's row indices back to the item's positions
            reps.append(group[rep])
            outs.append(out)
            real = into >= 0
            where[group[real]] = group[into[real]]
            weights[group] = weight
        results.append(assemble(n, reps, outs, where, weights))
    return results


def size_split(
    budget: Budget, crops: torch.Tensor, lengths: torch.Tensor, split: Split | None = None
) -> tuple[list[dict[int, int]], list[torch.Tensor]]:
    """Default-mode budgets: per item, ``budget(n)`` tokens with the newlines (crop -1) kept first and counted, the
    rest (``scored``) split over the crops in proportion to their sizes, unless ``split(b, scored, owned, present,
    sizes)`` (item ``b``, its crops ``owned [n]``, the crops present in ascending order and their sizes) returns the
    item's own crop -> count; returns the per-crop counts and each item's newlines."""
    counts, newlines = [], []
    for b, n in enumerate(lengths.tolist()):
        owned = crops[b, :n]
        lines = (owned < 0).nonzero()[:, 0]
        newlines.append(lines)
        scored = max(budget(n) - lines.numel(), 0)
        present = sorted(set(owned[owned >= 0].tolist()))
        sizes = [int((owned == c).sum()) for c in present]
        own = None if split is None else split(b, scored, owned, present, sizes)
        counts.append(own if own is not None else dict(zip(present, allocate(scored, sizes), strict=True)))
    return counts, newlines


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
