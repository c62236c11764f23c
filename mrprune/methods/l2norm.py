"""L2-norm: keep the tokens with the largest projector-output norm (the baseline of G-Prune, Jiang et al., AAAI 2025,
Fig. 4; no official code of its own).

A ``projector``-stage method: every token of an image competes on its L2 norm in the LLM input space (LLaVA-NeXT
newlines included, as any token), through ``mrprune.topk_indices`` (ties to the lower index).
"""

from __future__ import annotations

from ._vision import Budget
from .base import Layout, Pruner, top_tokens

__all__ = ["L2Norm"]


class L2Norm(Pruner):
    """Top tokens by L2 norm of the projector output.

    Parameters
    ----------
    budget : int, optional
        Tokens kept per image (LLaVA-1.5: 192 / 128 / 64; LLaVA-NeXT: 640 / 320).
    keep_ratio : float in (0, 1], optional
        Share kept instead (``round(keep_ratio * n)``, half up). Exactly one of the two is given.
    """

    def __init__(self, budget: int | None = None, keep_ratio: float | None = None) -> None:
        self.size = Budget("L2Norm", budget, keep_ratio)

    def __repr__(self) -> str:
        return f"L2Norm({self.size!r})"

    def kept_count(self, layout: Layout) -> int:
        """The budget of all ``T`` tokens, newlines ranked like any token."""
        return self.size(layout.num_tokens)

    def _select_batch(self, features, layouts, lengths, texts, **kwargs):
        norms = features.float().norm(dim=-1)
        return top_tokens(norms, lengths, [self.size(n) for n in lengths.tolist()])
