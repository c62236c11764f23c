"""Typed entry points to the ``torch.ops.mrprune`` primitives.

All ops are batched over padded inputs with ``lengths[B]`` (padded positions never contribute and are never picked),
accept float16/bfloat16/float32 features (computed in float32) or float64 (the reference, in float64), return
fixed-size outputs (so they work under ``torch.compile`` and CUDA graphs), and are inference-only (no autograd).
Each validates its arguments before any kernel runs (scalar types here, before the dispatcher would coerce a bool
or ``None`` to a number or a default; everything else in the op's router). The math of each op is specified in
:mod:`mrprune.reference`.
"""

from __future__ import annotations

import torch

from . import (
    _library,  # noqa: F401  (defines torch.ops.mrprune)
    _validation,
)

__all__ = [
    "cosine_graph",
    "graph_propagate",
    "graph_scores",
    "transfer_scores",
    "greedy_residual_select",
    "diversity_select",
    "max_cosine",
    "topk_indices",
    "received_attention",
    "segment_ids_from_cu_seqlens",
    "coverage_select",
    "bipartite_dedup",
]


def cosine_graph(
    features: torch.Tensor, lengths: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholded-softmax cosine-similarity graph (MR-Pruner / G-Prune affinity).

    ``features [B, N, D]``, ``lengths [B]`` → ``graph [B, N, N]`` (row-stochastic on each item's valid block),
    ``degree [B, N]`` (edge count ``#{j: cos >= threshold}``, or ``n_b`` for a row without edges). See
    :func:`mrprune.reference.cosine_graph`.
    """
    _validation.graph_hyper("cosine_graph", threshold, temperature)  # before the dispatcher coerces bools
    return torch.ops.mrprune.cosine_graph.default(features, lengths, threshold, temperature)


def graph_propagate(
    graph: torch.Tensor, degree: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor, iterations: int = 1
) -> torch.Tensor:
    """Scores ``(w^T P^t) / degree`` by ``t`` vector-matrix products.

    ``graph [B, N, N]``, ``degree [B, N]``, ``weights [B, N]``, ``lengths [B]`` → ``scores [B, N]``. See
    :func:`mrprune.reference.graph_propagate`.
    """
    _validation.iterations("graph_propagate", iterations)
    return torch.ops.mrprune.graph_propagate.default(graph, degree, weights, lengths, iterations)


def graph_scores(
    features: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
    iterations: int = 1,
) -> torch.Tensor:
    """Fused graph scoring: features to ``(w^T P^t) / degree`` without handing back the ``N x N`` graph.

    ``features [B, N, D]``, ``lengths [B]``, ``weights [B, N]`` (``None``: the feature norms) → ``scores [B, N]``.
    MR-Pruner uses ``iterations=1``, G-Prune ``5``. See :func:`mrprune.reference.graph_scores`.
    """
    _validation.graph_hyper("graph_scores", threshold, temperature)
    _validation.iterations("graph_scores", iterations)
    return torch.ops.mrprune.graph_scores.default(features, lengths, weights, threshold, temperature, iterations)


def transfer_scores(
    queries: torch.Tensor,
    query_lengths: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    key_weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
) -> torch.Tensor:
    """MR-Pruner's cross-resolution transfer from a masked subset of keys to every query.

    ``queries [B, M, D]``, ``query_lengths [B]``, ``keys [B, N, D]``, ``key_mask [B, N]`` bool, ``key_weights
    [B, N]`` (``None``: key norms) → ``prop [B, M]``, 0 where an item selects no key. See
    :func:`mrprune.reference.transfer_scores`.
    """
    _validation.graph_hyper("transfer_scores", threshold, temperature)
    return torch.ops.mrprune.transfer_scores.default(
        queries, query_lengths, keys, key_mask, key_weights, threshold, temperature
    )


def greedy_residual_select(
    features: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    gate: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    exhaustion_tol: float = 1e-5,
    algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy gated residual-energy selection (ResPrune), ``k`` picks per item in one call.

    ``features [B, N, D]``, ``lengths [B]``, ``gate [B, N]`` (``None``: 1), ``seed [B]`` (``None`` or negative:
    no forced first pick) → ``indices [B, k]`` int64 in pick order (-1 past ``n_b``), ``energies [B, k]`` (residual
    energy of each pick when picked). Ties go to the lower index. See
    :func:`mrprune.reference.greedy_residual_select`.
    """
    _validation.integer("greedy_residual_select", "k", k)
    _validation.tolerance("greedy_residual_select", exhaustion_tol)
    return torch.ops.mrprune.greedy_residual_select.default(features, lengths, k, gate, seed, exhaustion_tol, algorithm)


def diversity_select(features: torch.Tensor, lengths: torch.Tensor, k: int, mask_picked: bool = True) -> torch.Tensor:
    """Greedy max-min cosine-distance selection (DivPrune), ``k`` picks per item in one call.

    ``features [B, N, D]``, ``lengths [B]`` → ``indices [B, k]`` int64 in pick order (-1 past ``n_b``). The first pick
    is the most isolated token; ``mask_picked=False`` reproduces the official code, which can pick a token twice.
    See :func:`mrprune.reference.diversity_select`.
    """
    _validation.integer("diversity_select", "k", k)
    _validation.boolean("diversity_select", "mask_picked", mask_picked)
    return torch.ops.mrprune.diversity_select.default(features, lengths, k, mask_picked)


def max_cosine(
    queries: torch.Tensor, query_lengths: torch.Tensor, keys: torch.Tensor, key_lengths: torch.Tensor
) -> torch.Tensor:
    """Largest cosine of each query with the valid keys (ResPrune's text relevance).

    ``queries [B, M, D]``, ``query_lengths [B]``, ``keys [B, N, D]``, ``key_lengths [B]`` → ``rho [B, M]``
    (``-inf`` for an item without keys). See :func:`mrprune.reference.max_cosine`.
    """
    return torch.ops.mrprune.max_cosine.default(queries, query_lengths, keys, key_lengths)


def topk_indices(scores: torch.Tensor, lengths: torch.Tensor, k: int, sort_indices: bool = False) -> torch.Tensor:
    """Deterministic top-k over valid tokens: larger score first, ties to the lower index.

    ``scores [B, N]``, ``lengths [B]`` → ``indices [B, k]`` int64 in score order, or ascending when
    ``sort_indices``; -1 past ``n_b``. See :func:`mrprune.reference.topk_indices`.
    """
    _validation.integer("topk_indices", "k", k)
    _validation.boolean("topk_indices", "sort_indices", sort_indices)
    return torch.ops.mrprune.topk_indices.default(scores, lengths, k, sort_indices)


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention each token receives (column sums of the attention softmax, averaged over heads), streamed from
    ``q`` and ``k`` without an ``N x N`` matrix: the [CLS]-free saliency of Qwen2.5-VL's vision encoder.

    ``q, k [B, H, N, d]`` (the SDPA layout), ``lengths [B]``, ``segment_ids [B, N]`` (attention only between equal
    ids: Qwen2.5-VL's window / full-attention blocks, :func:`segment_ids_from_cu_seqlens`), ``scale`` (``None``:
    ``d ** -0.5``) → ``scores [B, N]`` float32 (float64 for float64 input), 0 for padding. See
    :func:`mrprune.reference.received_attention`.
    """
    if scale is not None:
        _validation.real("received_attention", "scale", scale)
    return torch.ops.mrprune.received_attention.default(q, k, lengths, segment_ids, scale)


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """Segment id of each of ``tokens`` positions from cumulative boundaries ``cu_seqlens [S + 1]`` (``0 = c_0 <= c_1
    <= ... <= c_S``, the ``cu_seqlens`` / ``cu_window_seqlens`` of Qwen2.5-VL's vision attention): position ``p``
    gets the ``s`` with ``c_s <= p < c_{s+1}``; positions at or past ``c_S`` get ``S``. Returns ``[tokens]`` int64."""
    positions = torch.arange(tokens, device=cu_seqlens.device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64).contiguous(), positions, right=True)


def coverage_select(
    features: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    saliency: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Saliency-weighted greedy coverage (SCOPE): ``k`` picks of ``argmax_j a_j ** alpha * sum_i max(0, S_ij -
    cur_i)``, then ``cur := max(cur, S_j)``, ties to the lower index.

    ``features [B, N, D]``, ``lengths [B]``, ``saliency [B, N]`` non-negative (``None``: 1) → ``indices [B, k]`` int64
    in pick order; -1 past ``n_b``. See :func:`mrprune.reference.coverage_select`.
    """
    _validation.integer("coverage_select", "k", k)
    _validation.real("coverage_select", "alpha", alpha)  # the dispatcher would take True as 1.0
    return torch.ops.mrprune.coverage_select.default(features, lengths, k, saliency, alpha)


def bipartite_dedup(features: torch.Tensor, lengths: torch.Tensor, k: int, per_round: int = 8) -> torch.Tensor:
    """Even/odd similarity de-duplication (VisPruner's diverse tokens): rounds that drop up to ``per_round``
    even-position tokens most similar to the odd-position ones until ``k`` remain.

    ``features [B, N, D]`` in priority order, ``lengths [B]`` → ``indices [B, k]`` int64: positions of the survivors
    in the rounds' final order; -1 past ``min(k, n_b)``. See :func:`mrprune.reference.bipartite_dedup`.
    """
    _validation.integer("bipartite_dedup", "k", k)
    _validation.integer("bipartite_dedup", "per_round", per_round)
    return torch.ops.mrprune.bipartite_dedup.default(features, lengths, k, per_round)
