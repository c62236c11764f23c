"""What the merging methods share: assembling one item's :class:`~mrprune.methods.results.MergedTokens` from the
parts a method produced (kept tokens, merged tokens, each input's owner), in position order."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .results import MergedTokens

__all__ = ["assemble", "padded_positions"]


def assemble(
    n: int,
    representatives: Sequence[torch.Tensor],
    tokens: Sequence[torch.Tensor],
    owners: torch.Tensor,
    weights: torch.Tensor,
) -> MergedTokens:
    """One item's merged result, output tokens ordered by their representatives' positions.

    Parameters
    ----------
    n : int
        The item's input tokens.
    representatives : sequence of Tensor ``[k_i]`` int64
        Positions (in ``[0, n)``, distinct over all parts) whose rows the output tokens take.
    tokens : sequence of Tensor ``[k_i, D]``
        The output tokens of each part, in the order of ``representatives`` (at least one part, maybe empty).
    owners : Tensor ``[n]`` int64
        For every input token, the *position of the representative* of the output token it went into; -1: dropped.
    weights : Tensor ``[n]`` float32
        Each input token's weight in that output token (0 where ``owners`` is -1).

    Returns
    -------
    MergedTokens with ``kept`` sorted ascending and ``sources`` the output index of each input (-1: dropped).
    """
    device = owners.device
    reps = torch.cat([r.to(device) for r in representatives])
    merged = torch.cat(list(tokens))
    order = reps.argsort()
    reps = reps[order]
    slot_of = torch.full((max(n, 1),), -1, dtype=torch.int64, device=device)
    slot_of[reps] = torch.arange(reps.numel(), device=device)
    sources = torch.where(owners >= 0, slot_of[owners.clamp(min=0)], -1)
    return MergedTokens(merged[order], reps, sources, torch.where(sources >= 0, weights.float(), 0.0))


def padded_positions(rows: Sequence[torch.Tensor], width: int | None = None) -> torch.Tensor:
    """``[k_i]`` int64 rows -> ``[G, max k_i]`` padded with -1 (the ops' unused slots)."""
    width = max([r.numel() for r in rows] + [0]) if width is None else width
    out = torch.full((len(rows), width), -1, dtype=torch.int64, device=rows[0].device if rows else None)
    for g, row in enumerate(rows):
        out[g, : row.numel()] = row
    return out
