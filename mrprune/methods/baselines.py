"""Baselines: DivPrune (max-min diversity, CVPR 2025) and seeded random pruning."""

from __future__ import annotations

import torch

from .. import ops
from . import _checks
from .base import KeptCountUnknown, Layout, Pruner, check_keep_ratio, round_half_up, take_prefixes

__all__ = ["DivPrune", "RandomPruner"]


class DivPrune(Pruner):
    """DivPrune: keep a maximally diverse subset (Alvar et al., CVPR 2025; official code vbdi/divprune @ 799e2d9).

    Greedy max-min selection on cosine distance over all of an image's tokens jointly (LLaVA-NeXT newline tokens
    included, as in the official code), through ``mrprune.diversity_select``: the first pick is the most isolated
    token, then each pick maximises its distance to the nearest picked token (research/algorithms.md §5).

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Official default ``SUBSET_RATIO = 0.098``; ``K = round(keep_ratio * n)`` with Python's round (half to even),
        as in the official code.
    official : bool
        ``True`` does not mask picked tokens (the official loop), so an exact duplicate can be picked twice and the
        image keeps fewer distinct tokens; the default masks them and always keeps ``K`` distinct tokens.

    Notes
    -----
    The official code prunes only batch row 0 at a fixed offset and applies its indices to every row; here each
    image is pruned on its own tokens. Distances are float32 (the official code uses the model dtype).
    """

    position_mode = "compact"

    def __init__(self, keep_ratio: float = 0.098, official: bool = False) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio, "DivPrune")
        self.official = _checks.flag("DivPrune", "official", official)

    def __repr__(self) -> str:
        return f"DivPrune(keep_ratio={self.keep_ratio}, official={self.official})"

    def kept_count(self, layout: Layout) -> int:
        """``round(keep_ratio * T)`` half to even, newlines not kept apart; ``official=True`` may keep a duplicate
        pick once (fewer tokens), so its count is unknown (:class:`mrprune.KeptCountUnknown`)."""
        if self.official:
            raise KeptCountUnknown(
                "mrprune.DivPrune(official=True) can pick an exact duplicate twice and keep it once, so its count "
                "depends on the features; use official=False"
            )
        return int(round(self.keep_ratio * layout.num_tokens))

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        counts = [int(round(self.keep_ratio * n)) for n in lengths.tolist()]
        picks = ops.diversity_select(features, lengths, max(counts, default=0), mask_picked=not self.official)
        return [p.unique() for p in take_prefixes(picks, counts)]


class RandomPruner(Pruner):
    """Uniform random subset of ``round(keep_ratio * n)`` tokens per image, reproducible from ``seed``.

    Every image draws from its own generator seeded with ``seed``, so an image's kept set depends only on the seed and
    its token count (``select`` and ``select_batch`` agree, and reruns repeat).
    """

    def __init__(self, keep_ratio: float = 0.5, seed: int = 0) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio, "RandomPruner")
        self.seed = _checks.generator_seed("RandomPruner", seed)

    def __repr__(self) -> str:
        return f"RandomPruner(keep_ratio={self.keep_ratio}, seed={self.seed})"

    def kept_count(self, layout: Layout) -> int:
        """``round(keep_ratio * T)`` half up: a uniform subset, newlines not kept apart."""
        return min(layout.num_tokens, round_half_up(self.keep_ratio * layout.num_tokens))

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        kept = []
        for n in lengths.tolist():
            generator = torch.Generator().manual_seed(self.seed)
            count = min(n, round_half_up(self.keep_ratio * n))
            kept.append(torch.randperm(n, generator=generator)[:count].to(features.device))
        return kept
