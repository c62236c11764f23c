"""Typed entry points to the ``torch.ops.mrprune`` primitives.

All ops are batched over padded inputs with ``lengths[B]`` (padded positions never contribute and are never picked),
accept float16/bfloat16/float32 features (computed in float32) or float64 (the reference, in float64), return
fixed-size outputs (so they work under ``torch.compile``), and are inference-only (no autograd). On CUDA tensors
no op reads a value on the host (bad values raise as device-side assertions at the next synchronisation), so the ops
with a GPU implementation can be captured in a CUDA graph; autotuned Triton kernels must have run once for the shape
before capturing (under capture an untuned shape takes the fixed launch config). An op served on GPUs by its
per-item reference only (no Triton, CUDA or batched ``"torch"`` implementation) still synchronises;
``tests/test_no_host_sync.py`` lists the ops checked.
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
    "bipartite_merge",
    "assign_merge",
    "knn_weighted_merge",
    "attention_rows",
    "density_peak_merge",
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
    if isinstance(alpha, bool):  # the dispatcher would take True as 1.0 (the router checks the value itself)
        raise TypeError(f"mrprune.coverage_select: alpha must be a number, got {alpha!r}")
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


def bipartite_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    lengths: torch.Tensor,
    r: int,
    sizes: torch.Tensor | None = None,
    protect_first: bool = True,
    spatial_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching + size-weighted merge of ``r`` pairs per item (even positions into their most
    similar odd position, by cosine of ``metric``).

    ``x [B, N, D]``, ``metric [B, N, C]`` (ToMe: head-averaged keys), ``lengths [B]``, ``sizes [B, N]`` (``None``:
    1) → ``merged [B, N - r, D]`` (``x.dtype``), ``merged_sizes [B, N - r]`` float32, ``source [B, N]`` int64 (output
    row of every input token, -1 for padding), ``out_lengths [B]`` int64 (``n_b - min(r, (n_b - p) // 2)``). Output
    order ``[unmerged even tokens, odd tokens]`` as ToMe, or by position with ``spatial_order``. See
    :func:`mrprune.reference.bipartite_merge`.
    """
    _validation.integer("bipartite_merge", "r", r)
    _validation.boolean("bipartite_merge", "protect_first", protect_first)
    _validation.boolean("bipartite_merge", "spatial_order", spatial_order)
    return torch.ops.mrprune.bipartite_merge.default(x, metric, lengths, r, sizes, protect_first, spatial_order)


def assign_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    include_target: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip's contextual merge: every token joins the target of largest ``metric`` cosine (ties to the lower
    slot); each target becomes itself plus the mean of its members (``include_target``: the mean of all).

    ``x [B, N, D]``, ``metric [B, N, C]``, ``lengths [B]``, ``targets [B, T]`` (distinct positions or -1) →
    ``merged [B, T, D]`` (``x.dtype``), ``assignment [B, N]`` int64 (slot of each token, -1 for padding),
    ``sizes [B, T]`` int64 (tokens per slot, target included). See :func:`mrprune.reference.assign_merge`.
    """
    _validation.boolean("assign_merge", "include_target", include_target)
    return torch.ops.mrprune.assign_merge.default(x, metric, lengths, targets, include_target)


def knn_weighted_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    weights: torch.Tensor,
    lengths: torch.Tensor,
    kept: torch.Tensor,
    k: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PruMerge's merge: each kept token plus the ``weights``-weighted sum of its ``k`` nearest other tokens by
    ``metric`` cosine (ties to the lower position; unnormalised weights, as the official code).

    ``x [B, N, D]``, ``metric [B, N, C]``, ``weights [B, N]``, ``lengths [B]``, ``kept [B, K]`` (positions or -1) →
    ``merged [B, K, D]`` (``x.dtype``), ``neighbors [B, K, k]`` int64 (nearest first, -1 padded). See
    :func:`mrprune.reference.knn_weighted_merge`.
    """
    _validation.integer("knn_weighted_merge", "k", k)
    return torch.ops.mrprune.knn_weighted_merge.default(x, metric, weights, lengths, kept, k)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    query_positions: torch.Tensor | None = None,
    scale: float | None = None,
    reduce: bool = False,
) -> torch.Tensor:
    """Head-averaged attention probabilities of ``M`` query rows from ``q`` and ``k`` (FastV / PDrop / SparseVLM
    scoring rows; the model keeps SDPA/FlashAttention).

    ``q [B, H, M, d]``, ``k [B, H_kv, N, d]`` (GQA: ``H % H_kv == 0``), ``key_mask [B, N]`` bool,
    ``query_positions [B, M]`` (causal mask ``j <= position``; -1: padded row; ``None``: no causal mask), ``scale``
    (``None``: ``d ** -0.5``) → ``[B, M, N]`` float32, or ``[B, N]`` (mean over real rows) with ``reduce``. See
    :func:`mrprune.reference.attention_rows`.
    """
    if scale is not None:
        _validation.real("attention_rows", "scale", scale)
    _validation.boolean("attention_rows", "reduce", reduce)
    return torch.ops.mrprune.attention_rows.default(q, k, key_mask, query_positions, scale, reduce)


def density_peak_merge(
    x: torch.Tensor, lengths: torch.Tensor, clusters: int, neighbors: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseVLM's recycling: DPC-kNN density-peak clustering of each item's tokens into ``clusters`` centres, each
    cluster merged by its mean.

    ``x [B, N, D]``, ``lengths [B]``, ``neighbors`` (kNN of the density; ``None``: ``clusters``, as the official
    code) → ``merged [B, clusters, D]`` (``x.dtype``), ``assignment [B, N]`` int64 (cluster of each token, -1 for
    padding), ``centers [B, clusters]`` int64 (-1 past ``min(clusters, n_b)``). See
    :func:`mrprune.reference.density_peak_merge`.
    """
    _validation.integer("density_peak_merge", "clusters", clusters)
    if neighbors is not None:
        _validation.integer("density_peak_merge", "neighbors", neighbors)
    return torch.ops.mrprune.density_peak_merge.default(x, lengths, clusters, neighbors)
