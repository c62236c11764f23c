"""Batched, mask-based eager implementations (backend ``"torch"``) of the ops that have no kernel on GPUs.

:mod:`mrprune.reference` loops over the items and slices each one to its length, which reads every length on the host
(one synchronisation per item on a GPU, and nothing a CUDA graph can capture). These compute the same values for the
whole padded batch at once with masks (``arange(N) < lengths[:, None]``), so no tensor value ever reaches the host.
They serve GPU tensors (``mrprune.backends`` ranks them after the kernels and before the reference) and any device
when asked for (tests compare them with the reference on the CPU).
"""

from __future__ import annotations

import torch

from . import backends
from .reference import compute_dtype, normalize_rows

__all__ = ["graph_propagate", "max_cosine"]


def _valid(lengths: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[B, tokens]`` bool: position ``j`` of item ``b`` is below ``lengths[b]``."""
    return torch.arange(tokens, device=lengths.device) < lengths.unsqueeze(1)


def graph_propagate(
    graph: torch.Tensor, degree: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor, iterations: int = 1
) -> torch.Tensor:
    """:func:`mrprune.reference.graph_propagate` for the padded batch: ``graph [B, N, N]``, ``degree [B, N]``,
    ``weights [B, N]``, ``lengths [B]`` → ``scores [B, N]`` (0 on padding). Padded rows get zero mass before every
    product, so the finite values validation guarantees in the padding never contribute."""
    dtype = compute_dtype(graph.dtype)
    valid = _valid(lengths, graph.shape[1])
    mass = torch.where(valid, weights.to(dtype), 0)
    g = graph.to(dtype).contiguous()  # one memory layout: the same rounding for any strides of the input
    for _ in range(iterations):
        mass = torch.where(valid, torch.bmm(mass.unsqueeze(1), g).squeeze(1), 0)
    return torch.where(valid, mass / torch.where(valid, degree.to(dtype), 1), 0)


def max_cosine(
    queries: torch.Tensor, query_lengths: torch.Tensor, keys: torch.Tensor, key_lengths: torch.Tensor
) -> torch.Tensor:
    """:func:`mrprune.reference.max_cosine` for the padded batch: ``queries [B, M, D]``, ``keys [B, N, D]`` →
    ``rho [B, M]`` (``-inf`` for an item without keys, 0 for padded queries)."""
    dtype = compute_dtype(queries.dtype)
    batch, queries_n, _ = queries.shape
    if keys.shape[1] == 0:
        best = torch.full((batch, queries_n), float("-inf"), dtype=dtype, device=queries.device)
    else:
        q = normalize_rows(queries.to(dtype)).contiguous()
        k = normalize_rows(keys.to(dtype)).contiguous()
        similarity = torch.bmm(q, k.transpose(1, 2))
        similarity = similarity.masked_fill(
            torch.logical_not(_valid(key_lengths, keys.shape[1])).unsqueeze(1), float("-inf")
        )
        best = similarity.amax(dim=2)
    return torch.where(_valid(query_lengths, queries_n), best, 0)


backends.register("graph_propagate", "torch", graph_propagate)
backends.register("max_cosine", "torch", max_cosine)
