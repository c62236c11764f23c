"""What a method returns per item: kept indices, or merged tokens.

Two result kinds
----------------
* **kept indices** — an int64 tensor ``[K]`` sorted ascending: the item's tokens that stay (every selecting method).
* :class:`MergedTokens` — a merging method's output tokens with their source map: which input tokens each output
  token absorbed, with which weight, and which input token's position it takes (its *representative*).

Integrations treat both the same way for positions and rows (the representatives play the kept tokens' part: their
original positions under ``"original"``, renumbered under ``"compact"``, on Qwen2.5-VL their M-RoPE positions), and
replace the representatives' rows by the merged tokens. :func:`kept_indices` gives either kind's kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MergedTokens", "Result", "kept_indices", "merged_tokens"]


@dataclass(frozen=True)
class MergedTokens:
    """One item's merged tokens.

    Attributes
    ----------
    tokens : Tensor ``[K, D]``
        The output tokens, in the order of ``kept`` (the item's feature dtype).
    kept : Tensor ``[K]`` int64, sorted ascending
        The representative of each output token: the input token whose position (and row) it takes.
    sources : Tensor ``[N]`` int64
        For every input token, the output token (an index into ``tokens``) it was merged into; -1 for a token that
        was dropped without being merged anywhere.
    weights : Tensor ``[N]`` float32
        Each input token's weight in its output token, 0 where ``sources`` is -1. For a (size-weighted) mean the
        weights of one output token's sources sum to 1 (a plain average of ``s`` tokens: ``1 / s`` each); methods
        that add weighted neighbours to a kept token (PruMerge) say what their weights are.
    """

    tokens: torch.Tensor
    kept: torch.Tensor
    sources: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        k, n = self.kept.shape[0], self.sources.shape[0]
        if self.tokens.dim() != 2 or self.tokens.shape[0] != k or self.kept.dim() != 1:
            raise ValueError(
                f"MergedTokens: tokens must be [K, D] with K = len(kept) = {k}, got {tuple(self.tokens.shape)}"
            )
        if self.sources.shape != (n,) or self.weights.shape != (n,):
            raise ValueError(
                f"MergedTokens: sources and weights must both be [N], got {tuple(self.sources.shape)} and "
                f"{tuple(self.weights.shape)}"
            )
        if self.kept.dtype != torch.int64 or self.sources.dtype != torch.int64:
            raise TypeError("MergedTokens: kept and sources must be int64")

    @property
    def sizes(self) -> torch.Tensor:
        """``[K]`` int64: how many input tokens each output token absorbed (its representative included)."""
        real = self.sources >= 0
        return torch.bincount(self.sources[real], minlength=self.kept.shape[0])

    def cpu(self) -> MergedTokens:
        return MergedTokens(self.tokens.cpu(), self.kept.cpu(), self.sources.cpu(), self.weights.cpu())


#: One item's result: kept indices ``[K]`` or :class:`MergedTokens`.
Result = torch.Tensor | MergedTokens


def kept_indices(result: Result) -> torch.Tensor:
    """The input tokens whose positions stay: the kept indices, or a merge's representatives (``[K]`` int64)."""
    return result.kept if isinstance(result, MergedTokens) else result


def merged_tokens(result: Result, features: torch.Tensor) -> torch.Tensor:
    """The item's output tokens ``[K, D]``: ``features[kept]`` for kept indices, the merged tokens otherwise."""
    return result.tokens if isinstance(result, MergedTokens) else features[result]
