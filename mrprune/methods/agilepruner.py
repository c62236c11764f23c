"""AgilePruner: [CLS]-ordered similarity suppression with an effective-rank-scaled threshold (Baek et al.,
"AgilePruner: An Empirical Study of Attention and Diversity for Adaptive Visual Token Pruning in Large
Vision-Language Models", ICLR 2026, arXiv 2603.01236; project page https://cvsp-lab.github.io/AgilePruner; the
repository cvsp-lab/AgilePruner holds no code).

The paper's code is not public; this is a reconstruction of the rule as its project page describes it (the paper's
method section was not available for this reconstruction, so its equations are not checked here): tokens are visited in
descending [CLS] attention; each visited token that survives is kept and suppresses the remaining candidates whose
cosine distance to it lies below a threshold ``tau_i = order_i * (erank / erank_avg) * 0.01``, capped at ``tau_max``,
where ``erank`` is the effective rank of the image's features (Roy & Vetterli 2007: ``exp(H(p))``, ``p`` the singular
values normalised to sum 1), so complex images (high erank) get more diversity and simple ones stay attention-driven.
The method sits on FasterVLM's [CLS] attention, before the LLM.

Reconstructed [R] (guesses; the two constants are constructor arguments):

- ``erank_avg`` (default 100.0): the paper's dataset-average erank is not given;
- ``tau_max`` (default 0.4): the cap's value is not given;
- ``order_i`` is the 1-based position of the kept token among the kept tokens (not among all visited tokens);
- a candidate is suppressed when ``1 - cos < tau`` strictly (zero vectors have cosine 0 with everything);
- erank is taken over the uncentred LLM-space tokens of each crop (projector output, float64 singular values);
- when suppression leaves fewer than the budget, the suppressed tokens fill it in [CLS] order, so budgets are exact;
- the budget is split over crops like FasterVLM (LLaVA-NeXT newlines kept first; Qwen2.5-VL frames are crops) and
  each crop runs the selection on its own, with its own erank.
"""

from __future__ import annotations

import torch

from .. import ops
from . import _checks
from ._vision import Budget, check_layer, select_per_crop, token_scores
from .base import Pruner
from .stages import Need, Stage

__all__ = ["AgilePruner", "effective_rank"]

#: the paper's threshold step per kept token (``tau_i = order_i * ratio * STEP``)
STEP = 0.01


def effective_rank(features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Effective rank ``exp(-sum p log p)`` of each item's token matrix, ``p = s / sum(s)`` its singular values.

    Parameters
    ----------
    features : Tensor ``[B, N, D]`` float
        Item ``b`` owns ``features[b, :lengths[b]]``; padding rows are ignored (zeroed: they add no singular value).
    lengths : Tensor ``[B]`` int64

    Returns
    -------
    Tensor ``[B]`` float64; 0 for an item whose tokens are all zero.
    """
    valid = torch.arange(features.shape[1], device=features.device) < lengths[:, None]
    matrix = torch.where(valid[..., None], features.double(), 0.0)
    values = torch.linalg.svdvals(matrix)  # [B, min(N, D)]
    total = values.sum(-1, keepdim=True)
    p = values / total.clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -torch.where(p > 0, p * p.clamp_min(torch.finfo(torch.float64).tiny).log(), 0.0).sum(-1)
    return torch.where(total[:, 0] > 0, entropy.exp(), 0.0)


class AgilePruner(Pruner):
    """AgilePruner: keep tokens in [CLS]-attention order, suppressing near-duplicates of kept tokens within an
    erank-scaled cosine distance.

    Parameters
    ----------
    budget : int, optional
        Tokens kept per image (LLaVA-1.5: 192 / 128 / 64; LLaVA-NeXT: 640 / 320).
    keep_ratio : float in (0, 1], optional
        Share kept instead (``round(keep_ratio * n)``; Qwen2.5-VL: 1/3, 2/9, 1/9). Exactly one of the two.
    erank_avg : float > 0
        [R] The reference effective rank the image's erank is divided by (the paper's dataset average; unknown).
    tau_max : float >= 0
        [R] Cap on the cosine-distance threshold (unknown in the paper). 0 turns AgilePruner into FasterVLM.
    layer : int
        Vision encoder layer whose attention orders the tokens (-2, LLaVA's select layer, as in FasterVLM).

    Notes
    -----
    Per crop of ``n`` tokens with budget ``k``: ``order`` = tokens by descending attention (ties to the lower
    index); ``ratio = erank(crop) / erank_avg``; walk ``order``; the ``i``-th token kept (``i = 1, 2, ...``) is the
    next token not yet suppressed, and it suppresses every remaining token ``j`` with
    ``1 - cos(x_i, x_j) < min(tau_max, i * ratio * 0.01)``; stop after ``k`` kept; if the walk ends first, the
    suppressed tokens fill up in ``order``. Items and crops are processed together in padded batches.
    """

    stage = Stage.VISION
    needs = Pruner.needs | {Need.VISION_ATTENTION}

    def __init__(
        self,
        budget: int | None = None,
        keep_ratio: float | None = None,
        erank_avg: float = 100.0,
        tau_max: float = 0.4,
        layer: int = -2,
    ) -> None:
        self.size = Budget("AgilePruner", budget, keep_ratio)
        self.erank_avg = _checks.non_negative("AgilePruner", "erank_avg", erank_avg)
        if self.erank_avg == 0:
            raise ValueError("mrprune.AgilePruner: erank_avg must be > 0, got 0")
        self.tau_max = _checks.non_negative("AgilePruner", "tau_max", tau_max)
        self.layer = check_layer("AgilePruner", layer)
        self.attention_layers = (self.layer,)

    def __repr__(self) -> str:
        return f"AgilePruner({self.size!r}, erank_avg={self.erank_avg}, tau_max={self.tau_max}, layer={self.layer})"

    def _select_batch(self, features, layouts, lengths, texts, attention=None, crops=None, **kwargs):
        scores, crops = token_scores("AgilePruner", features, attention, crops, self.layer)
        return select_per_crop(self.size, features, scores, crops, lengths, self._pick)

    def _pick(
        self, tokens: torch.Tensor, saliency: torch.Tensor, sizes: torch.Tensor, wanted: list[int]
    ) -> list[torch.Tensor]:
        """Per row ``g`` of ``tokens [G, P, D]`` (``sizes [G]`` valid, ``saliency [G, P]``), ``wanted[g]`` picks
        (indices into the row)."""
        groups, width = saliency.shape
        device = tokens.device
        order = ops.topk_indices(saliency.float(), sizes, width)  # [G, P] descending, ties to the lower index
        valid = torch.arange(width, device=device) < sizes[:, None]
        # rank[g, t]: position of token t in its row's order (width for padding); order is -1 past sizes[g]
        rank = torch.full((groups, width + 1), width, dtype=torch.int64, device=device)
        positions = torch.arange(width, device=device).expand(groups, width)
        rank.scatter_(1, torch.where(valid, order, width), torch.where(valid, positions, width))
        rank = rank[:, :width]
        unit = torch.nn.functional.normalize(tokens.float(), dim=-1)  # zero vectors stay zero: cosine 0
        ratio = (effective_rank(tokens, sizes) / self.erank_avg).to(device)  # [G]
        want = torch.tensor(wanted, device=device)
        alive = valid.clone()  # neither kept nor suppressed
        taken = torch.zeros_like(valid)
        kept_so_far = torch.zeros(groups, dtype=torch.int64, device=device)
        rows = torch.arange(groups, device=device)
        for step in range(max(wanted, default=0)):
            active = (kept_so_far < want) & alive.any(1)
            if not bool(active.any()):
                break
            pick = torch.where(alive, rank, width + 1).argmin(1)  # [G]: the next unsuppressed token in order
            tau = (ratio * ((step + 1) * STEP)).clamp(max=self.tau_max).float()
            distance = (1 - (unit * unit[rows, pick][:, None]).sum(-1)).clamp_min(0)  # [G, P]; rounding never < 0
            suppress = distance < tau[:, None]  # rows already done are never read again
            take = torch.zeros_like(valid)
            take[rows, pick] = active
            taken |= take
            alive &= ~(suppress | take)
            kept_so_far += active.long()
        # fill: the suppressed tokens, in [CLS] order, up to the budget
        out = []
        for g, k in enumerate(wanted):
            visit = order[g, : int(sizes[g])]
            chosen, rest = visit[taken[g, visit]], visit[~taken[g, visit]]
            out.append(torch.cat([chosen, rest[: max(k - chosen.numel(), 0)]]))
        return out
