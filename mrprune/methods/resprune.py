"""ResPrune: text-conditioned greedy residual-energy subspace selection (arXiv 2603.21105, 2026).

The paper's code is not public; this is a reconstruction from its text (research/algorithms.md §4). What the paper
states: greedy selection maximising the explained energy of the visual tokens (residual energy ``||v - P_S v||^2``
updated by Gram-Schmidt), each token's energy weighted by a text-relevance gate ``g(rho)`` with
``rho = max_t cos(v, t)`` over the instruction's noun-token embeddings, seeded with the highest-CLS-attention token
(max-norm for models without a CLS token), ``alpha`` 0.75 for LLaVA and 0.3 for Qwen2.5-VL, and pure residual energy
when the instruction has no noun. Reconstructed [R]: the gate ``g = max(rho, 0) ** alpha`` (the paper's equation was
lost; non-negative and monotone as it describes), the rank-exhaustion fill (by gate, then index), and keeping the
selection in spatial order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import ops
from ..batching import pad_batch
from . import _checks
from .base import Layout, Pruner, check_keep_ratio, round_half_up, take_prefixes
from .stages import Need

__all__ = ["ALPHA_PRESETS", "ResPrune"]

#: The gate strength the paper uses per model family.
ALPHA_PRESETS = {"llava": 0.75, "qwen": 0.3}


class ResPrune(Pruner):
    """ResPrune: keep the tokens that best reconstruct the image's token subspace, gated by text relevance.

    Parameters
    ----------
    keep_ratio : float in (0, 1], optional
        Fraction of each image's tokens to keep (``round(keep_ratio * n)``).
    budget : int, optional
        Tokens kept per image instead of a ratio (the paper's LLaVA-1.5 budgets 192 / 128 / 64); exactly one of
        ``keep_ratio`` and ``budget`` is given.
    alpha : float or {"llava", "qwen"}
        Gate strength; the names are the paper's presets (0.75, 0.3). ``alpha = 0`` ignores the text.
    exhaustion_tol : float
        Relative residual energy under which a token counts as already spanned.
    noun_extractor : callable ``str -> list[str]``, optional
        How integrations turn the instruction into nouns (after removing answer-format phrases); ``None`` uses
        :func:`mrprune.text.default_noun_extractor` (spaCy when installed, else a labelled heuristic).

    Notes
    -----
    ``select(features, layout, text)`` takes ``text`` as the ``[M, D]`` LLM input embeddings of the instruction's
    noun tokens (see :mod:`mrprune.text` to extract them); ``None`` or ``M = 0`` means no text (gate 1). ``seeds``
    (a keyword of ``select``: the image's token index, an int; of ``select_batch``: one per image ``[B]``; e.g. the
    argmax of the vision tower's CLS attention; negative means "no seed") fixes the first pick; without one it is
    the largest-norm token. All
    of an image's tokens compete jointly (LLaVA-NeXT newline tokens are identical vectors, so at most one of them
    is ever a pivot).
    """

    needs = Pruner.needs | {Need.TEXT, Need.CLS_SEED}
    position_mode = "compact"

    def __init__(
        self,
        keep_ratio: float | None = None,
        budget: int | None = None,
        alpha: float | str = "llava",
        exhaustion_tol: float = 1e-5,
        noun_extractor: Callable[[str], list[str]] | None = None,
    ) -> None:
        if (keep_ratio is None) == (budget is None):
            raise ValueError("mrprune.ResPrune: give exactly one of keep_ratio and budget")
        self.keep_ratio = None if keep_ratio is None else check_keep_ratio(keep_ratio, "ResPrune")
        self.budget = None if budget is None else _checks.count("ResPrune", "budget", budget, minimum=1)
        if isinstance(alpha, str):
            if alpha not in ALPHA_PRESETS:
                raise ValueError(
                    f"mrprune.ResPrune: alpha must be a number or one of {sorted(ALPHA_PRESETS)}, got {alpha!r}"
                )
            alpha = ALPHA_PRESETS[alpha]
        self.alpha = _checks.non_negative("ResPrune", "alpha", alpha)
        self.exhaustion_tol = _checks.tolerance("ResPrune", "exhaustion_tol", exhaustion_tol)
        if noun_extractor is not None and not callable(noun_extractor):
            raise TypeError(f"mrprune.ResPrune: noun_extractor must be callable or None, got {noun_extractor!r}")
        self.noun_extractor = noun_extractor

    def __repr__(self) -> str:
        size = f"budget={self.budget}" if self.budget is not None else f"keep_ratio={self.keep_ratio}"
        return f"ResPrune({size}, alpha={self.alpha})"

    def _count(self, n: int) -> int:
        return min(n, self.budget if self.budget is not None else round_half_up(self.keep_ratio * n))

    def kept_count(self, layout: Layout) -> int:
        """The budget of all ``T`` tokens (``budget`` or ``round(keep_ratio * T)``), newlines ranked like any token."""
        return self._count(layout.num_tokens)

    def _gate(self, features: torch.Tensor, lengths: torch.Tensor, texts: Sequence[torch.Tensor | None] | None):
        """``max(rho, 0) ** alpha`` per token, 1 for images without text; None when no image has text."""
        if texts is None or all(t is None or t.shape[0] == 0 for t in texts):
            return None
        dim = features.shape[-1]
        rows = [features.new_zeros(0, dim) if t is None else t.to(features.device, features.dtype) for t in texts]
        for t in rows:
            if t.dim() != 2 or t.shape[1] != dim:
                raise ValueError(f"ResPrune: text embeddings must be [M, D={dim}], got {tuple(t.shape)}")
        text, text_lengths = pad_batch(rows)
        rho = ops.max_cosine(features, lengths, text, text_lengths)
        gate = rho.clamp_min(0) ** self.alpha
        return torch.where((text_lengths > 0)[:, None], gate, torch.ones_like(gate))

    def _select_batch(self, features, layouts, lengths, texts, seeds=None, **kwargs):
        counts = [self._count(n) for n in lengths.tolist()]
        norms = _checks.token_norms("ResPrune", features, lengths)
        largest_norm = ops.topk_indices(norms, lengths, 1)[:, 0]  # ties to the lower index
        if seeds is None:
            seeds = largest_norm
        seeds = _checks.item_seeds("ResPrune.select_batch", seeds, lengths)
        seeds = torch.where(seeds < 0, largest_norm, seeds)
        picks, _ = ops.greedy_residual_select(
            features, lengths, max(counts, default=0), self._gate(features, lengths, texts), seeds, self.exhaustion_tol
        )
        return take_prefixes(picks, counts)
