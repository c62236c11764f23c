"""Eager PyTorch references of every ``torch.ops.mrprune`` op: the specification.

Each function here is plain, readable PyTorch that loops over the batch; the kernels in ``csrc/`` and
``triton_kernels/`` are tested against it, and it is itself tested against brute-force Python loops. It computes in
float32 for float16/bfloat16/float32 inputs and in float64 for float64 inputs (the float64 path is how tests get an
accurate oracle). It assumes validated inputs (``mrprune._validation`` checks them before any implementation runs).

Shapes use ``B`` (batch), ``N`` (padded tokens), ``M`` (padded query tokens), ``D`` (feature dimension) and ``n_b``
(the valid tokens of item ``b``: ``lengths[b]``). Padded positions never contribute and are written as 0 (scores,
graphs) or -1 (indices).

The graph math follows the official MR-Pruner / G-Prune code (research/algorithms.md §2.3–2.5, §3.2):

* similarities of L2-normalised rows, ``x / max(||x||, 1e-12)``;
* an entry is an *edge* iff ``S >= threshold`` (the official code zeroes ``S < threshold``, divides by the
  temperature, then replaces every value with ``|v| < 1e-6`` by -5000: so an entry whose ``S / T`` rounds to zero is
  not an edge either, which only matters for thresholds <= 0);
* ``P = softmax_j(Z)`` with ``Z = S / T`` on edges and -5000 elsewhere, so a row without edges is uniform;
* ``degree = #edges`` of the row, or ``n_b`` for a row without edges (the official code counts ``P > 0`` after the
  softmax: identical in float32/bfloat16 as long as ``exp((threshold - 1) / T)`` does not underflow, e.g. for the
  official threshold 0.5 and any temperature above 0.006; in float16 it undercounts borderline neighbours).
"""

from __future__ import annotations

import torch

__all__ = [
    "EDGE_FILL_LOGIT",
    "compute_dtype",
    "normalize_rows",
    "thresholded_softmax",
    "cosine_graph",
    "graph_propagate",
    "graph_scores",
    "transfer_scores",
    "greedy_residual_select",
    "diversity_select",
    "max_cosine",
    "topk_indices",
    "received_attention",
    "coverage_select",
    "bipartite_dedup",
    "even_odd_best_match",
    "bipartite_merge",
    "assign_merge",
    "knn_weighted_merge",
    "attention_rows",
    "density_peak_merge",
]

#: The logit the official code gives to non-edges; finite so that a row without edges becomes uniform, not NaN.
EDGE_FILL_LOGIT = -5000.0
#: The official code's test for "this logit is zero" after thresholding and dividing by the temperature.
ZERO_LOGIT_TOL = 1e-6
#: ``F.normalize``'s norm floor.
NORM_EPS = 1e-12


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (float16/bfloat16 are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / max(||x||, 1e-12)`` row-wise, as ``torch.nn.functional.normalize``. ``[n, D] -> [n, D]``."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def exact_matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` (``[n, D] x [m, D] -> [n, m]``) in which exact duplicate rows of ``a`` get bitwise equal rows and
    exact duplicate rows of ``b`` bitwise equal columns.

    BLAS may round one dot product differently at different output positions, so duplicate tokens would get
    different similarities and the lower-index tie rule could break between them; each distinct row is multiplied
    once and the products are gathered back.
    """
    if a.numel() == 0 or b.numel() == 0:  # no rows, or D = 0 (torch.unique refuses empty dimensions)
        return a @ b.T
    unique_a, inverse_a = torch.unique(a, dim=0, return_inverse=True)
    unique_b, inverse_b = (unique_a, inverse_a) if b is a else torch.unique(b, dim=0, return_inverse=True)
    return (unique_a @ unique_b.T)[inverse_a][:, inverse_b]


def thresholded_softmax(
    similarity: torch.Tensor, threshold: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax over the edges of a similarity matrix, in the official code's order of operations.

    Parameters
    ----------
    similarity : Tensor ``[n, m]``
        Cosine similarities (float32 or float64). ``m`` may be 0.
    threshold, temperature : float
        Edge threshold ``tau`` and softmax temperature ``T > 0``.

    Returns
    -------
    probs : Tensor ``[n, m]``
        ``softmax_j`` of ``S / T`` on edges and -5000 elsewhere; a row without edges is uniform ``1 / m``.
    degree : Tensor ``[n]``
        Number of edges per row, or ``m`` for a row without edges (the count of positive entries of ``probs``).
    """
    logits = similarity * (similarity >= threshold) / temperature
    is_edge = logits.abs() >= ZERO_LOGIT_TOL
    logits = logits.masked_fill(~is_edge, EDGE_FILL_LOGIT)
    probs = torch.softmax(logits, dim=-1)
    edges = is_edge.sum(dim=-1)
    degree = torch.where(edges > 0, edges, similarity.shape[-1]).to(similarity.dtype)
    return probs, degree


def cosine_graph(
    features: torch.Tensor, lengths: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholded-softmax cosine-similarity graph of each item.

    Parameters
    ----------
    features : Tensor ``[B, N, D]``, float16/bfloat16/float32/float64
    lengths : Tensor ``[B]``, int64, ``0 <= lengths[b] <= N``
    threshold, temperature : float

    Returns
    -------
    graph : Tensor ``[B, N, N]`` (float32, or float64 for float64 input)
        ``graph[b, :n_b, :n_b]`` is the row-stochastic ``P`` of item ``b`` (see the module docstring); 0 elsewhere.
    degree : Tensor ``[B, N]``
        ``degree[b, :n_b]`` as in :func:`thresholded_softmax`; 0 for padding.
    """
    batch, tokens, _ = features.shape
    dtype = compute_dtype(features.dtype)
    graph = features.new_zeros(batch, tokens, tokens, dtype=dtype)
    degree = features.new_zeros(batch, tokens, dtype=dtype)
    for b in range(batch):
        n = int(lengths[b])
        x = normalize_rows(features[b, :n].to(dtype))
        graph[b, :n, :n], degree[b, :n] = thresholded_softmax(exact_matmul_t(x, x), threshold, temperature)
    return graph, degree


def graph_propagate(
    graph: torch.Tensor, degree: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor, iterations: int = 1
) -> torch.Tensor:
    """Propagated scores ``s = (w^T P^t) / degree`` by ``t`` vector-matrix products (never a matrix power).

    Parameters
    ----------
    graph : Tensor ``[B, N, N]``, float32/float64
        Row-stochastic graphs (as from :func:`cosine_graph`).
    degree : Tensor ``[B, N]``
        Divisor per column; the degree of ``P^1`` (G-Prune does not recompute it after the power).
    weights : Tensor ``[B, N]``
        Token weights ``w`` (the official methods use the L2 norms of the un-normalised features).
    lengths : Tensor ``[B]``, int64
    iterations : int, ``>= 1``
        ``t``.

    Returns
    -------
    scores : Tensor ``[B, N]`` in ``graph.dtype``; ``scores[b, j] = (sum_i w_i (P^t)_ij) / degree_j``; 0 for padding.
    """
    dtype = compute_dtype(graph.dtype)
    scores = graph.new_zeros(degree.shape, dtype=dtype)
    for b in range(graph.shape[0]):
        n = int(lengths[b])
        mass = weights[b, :n].to(dtype)
        for _ in range(iterations):
            # row-wise reductions of P^T in one fixed order per row, not a BLAS vector-matrix product: duplicate
            # tokens have equal columns of P and so get bitwise equal mass
            mass = (graph[b, :n, :n].to(dtype).T.contiguous() * mass).sum(-1)
        scores[b, :n] = mass / degree[b, :n].to(dtype)
    return scores


def graph_scores(
    features: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
    iterations: int = 1,
) -> torch.Tensor:
    """Features straight to propagated graph scores: :func:`cosine_graph` then :func:`graph_propagate`.

    Parameters
    ----------
    features : Tensor ``[B, N, D]``
    lengths : Tensor ``[B]``, int64
    weights : Tensor ``[B, N]`` or None
        Token weights; ``None`` means the L2 norms of ``features`` (computed in the compute dtype), as in the
        official MR-Pruner and G-Prune code.
    threshold, temperature : float
    iterations : int, ``>= 1``

    Returns
    -------
    scores : Tensor ``[B, N]`` (float32, or float64 for float64 input); 0 for padding.
    """
    dtype = compute_dtype(features.dtype)
    if weights is None:
        weights = features.to(dtype).norm(dim=-1)
    graph, degree = cosine_graph(features, lengths, threshold, temperature)
    return graph_propagate(graph, degree, weights.to(dtype), lengths, iterations)


def transfer_scores(
    queries: torch.Tensor,
    query_lengths: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    key_weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
) -> torch.Tensor:
    """Cross-resolution score transfer of MR-Pruner (research/algorithms.md §2.5).

    For each query token ``i`` (a low-resolution token) and the selected key tokens ``k`` (the *pruned*
    high-resolution tokens, ``key_mask[b, k]``, in ascending index order):
    ``Q_ik = softmax_k`` of the thresholded cross similarities (same rule as :func:`thresholded_softmax`),
    ``dc_i`` = their degree, and ``prop_i = (sum_k w_k Q_ik) / dc_i``.

    Parameters
    ----------
    queries : Tensor ``[B, M, D]``
    query_lengths : Tensor ``[B]``, int64
    keys : Tensor ``[B, N, D]``
    key_mask : Tensor ``[B, N]``, bool
        Which keys take part; padding keys must be False.
    key_weights : Tensor ``[B, N]`` or None
        ``w``; ``None`` means the L2 norms of ``keys``.
    threshold, temperature : float

    Returns
    -------
    prop : Tensor ``[B, M]`` (float32, or float64 for float64 input). 0 for padding and for items with no selected
    key (the official code divides 0 by 0 there and gets NaN).
    """
    dtype = compute_dtype(queries.dtype)
    prop = queries.new_zeros(queries.shape[:2], dtype=dtype)
    for b in range(queries.shape[0]):
        m = int(query_lengths[b])
        selected = keys[b][key_mask[b]].to(dtype)
        if selected.shape[0] == 0:
            continue
        weight = selected.norm(dim=-1) if key_weights is None else key_weights[b][key_mask[b]].to(dtype)
        similarity = normalize_rows(queries[b, :m].to(dtype)) @ normalize_rows(selected).T
        probs, degree = thresholded_softmax(similarity, threshold, temperature)
        prop[b, :m] = (probs @ weight) / degree
    return prop


def greedy_residual_select(
    features: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    gate: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    exhaustion_tol: float = 1e-5,
    algorithm: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy gated residual-energy selection (ResPrune; research/algorithms.md §4.5), in the basis form.

    Per item, with ``e_i`` the residual energy ``||v_i - P_S v_i||^2`` of token ``i`` against the span of the
    picked tokens ``S`` (initially ``||v_i||^2``) and ``g_i`` the gate:

    1. the first pick is ``seed[b]`` if given (``>= 0``), else ``argmax g_i e_i``;
    2. every later pick is ``argmax g_i e_i`` over the unpicked tokens, ties to the lower index;
    3. after a pick, its residual (orthogonalised twice against the basis) extends the orthonormal basis and every
       ``e_i`` drops by ``(q . v_i)^2``; an energy at or below ``exhaustion_tol * ||v_i||^2`` counts as 0, so a
       zero vector, or a token already in the span, is never a pivot;
    4. once every unpicked token scores 0 (rank exhausted, or the remaining gates are 0), the remaining slots are
       filled by descending gate, then ascending index.

    Parameters
    ----------
    features : Tensor ``[B, N, D]``
    lengths : Tensor ``[B]``, int64
    k : int, ``0 <= k <= N``
        Picks per item; an item with ``n_b < k`` picks all its tokens and pads with -1.
    gate : Tensor ``[B, N]`` or None
        Non-negative weights ``g`` (ResPrune: ``max(rho, 0) ** alpha``); ``None`` means 1.
    seed : Tensor ``[B]``, int64, or None
        Forced first pick per item; a negative entry means none.
    exhaustion_tol : float
        Relative energy below which a token counts as spanned.
    algorithm : str
        ``"auto"``, ``"gram"`` (pivoted Cholesky on ``V V^T``) or ``"basis"`` (Gram-Schmidt basis, one GEMV per
        step): the kernels choose by shape; all forms pick the same tokens up to rounding. The reference always
        uses the basis form.

    Returns
    -------
    indices : Tensor ``[B, k]``, int64
        Picks in pick order; -1 past ``n_b``.
    energies : Tensor ``[B, k]`` (float32, or float64 for float64 input)
        The un-gated residual energy of each pick at the moment it was picked (0 for fill picks and padding).
    """
    del algorithm  # one readable form is the spec
    dtype = compute_dtype(features.dtype)
    batch = features.shape[0]
    indices = torch.full((batch, k), -1, dtype=torch.int64, device=features.device)
    energies = features.new_zeros(batch, k, dtype=dtype)
    for b in range(batch):
        n = int(lengths[b])
        v = features[b, :n].to(dtype)
        g = torch.ones(n, dtype=dtype, device=v.device) if gate is None else gate[b, :n].to(dtype)
        initial = (v * v).sum(dim=-1)
        energy = initial.clone()
        picked = torch.zeros(n, dtype=torch.bool, device=v.device)
        basis = v.new_zeros(0, v.shape[1])
        for t in range(min(k, n)):
            if t == 0 and seed is not None and int(seed[b]) >= 0:
                j = int(seed[b])
            else:
                score = torch.where(picked, float("-inf"), g * energy)
                j = int(torch.argmax(score))  # the first maximum
                if score[j] <= 0:  # nothing left to explain: fill by gate, then index
                    rest = (~picked).nonzero().squeeze(1)
                    order = torch.sort(g[rest], descending=True, stable=True).indices
                    fill = rest[order][: min(k, n) - t]
                    indices[b, t : t + fill.numel()] = fill
                    break
            indices[b, t], energies[b, t] = j, energy[j]
            picked[j] = True
            if energy[j] > 0:
                residual = v[j]
                for _ in range(2):  # "twice is enough" re-orthogonalisation
                    residual = residual - (basis @ residual) @ basis
                direction = residual / residual.norm()
                basis = torch.cat([basis, direction[None]])
                # a row-wise reduction, not a BLAS matvec: duplicate tokens keep bitwise equal energies
                energy = (energy - (v * direction).sum(-1) ** 2).clamp_min(0)
                energy = torch.where(energy <= exhaustion_tol * initial, 0.0, energy)
            energy[j] = 0
    return indices, energies


def diversity_select(features: torch.Tensor, lengths: torch.Tensor, k: int, mask_picked: bool = True) -> torch.Tensor:
    """Greedy max-min cosine-distance selection (DivPrune; research/algorithms.md §5), ``k`` picks per item.

    With ``d_ij = 1 - cos(x_i, x_j)``: the first pick is the token whose nearest *other* token is farthest (the
    largest second-smallest value of its column of ``d``; the smallest is the self-distance); every later pick is
    ``argmax_j min_{s in S} d_sj``, ties to the lower index.

    Parameters
    ----------
    features : Tensor ``[B, N, D]``
    lengths : Tensor ``[B]``, int64
    k : int, ``0 <= k <= N``
    mask_picked : bool
        Exclude picked tokens from later steps. The official code does not: a picked token only loses because its
        self-distance is about 0, so exact duplicates (LLaVA-NeXT's newline tokens) or rounding can pick an index
        twice; ``False`` reproduces that.

    Returns
    -------
    indices : Tensor ``[B, k]``, int64, in pick order; -1 past ``n_b``.
    """
    dtype = compute_dtype(features.dtype)
    indices = torch.full((features.shape[0], k), -1, dtype=torch.int64, device=features.device)
    for b in range(features.shape[0]):
        n = int(lengths[b])
        if n == 0 or k == 0:
            continue
        x = normalize_rows(features[b, :n].to(dtype))
        similarity = exact_matmul_t(x, x)
        # a matmul is not exactly symmetric; mirror the upper triangle so d_sj == d_js and exact ties stay exact; a
        # cosine is at most 1 (collinear tokens can round to 1 + ulp, and a negative distance would break exact ties)
        distance = 1 - (torch.triu(similarity) + torch.triu(similarity, 1).T).clamp(max=1)
        first_score = distance.sort(dim=0).values[1] if n > 1 else distance[0]
        j = int(torch.argmax(first_score))
        nearest = torch.full((n,), float("inf"), dtype=dtype, device=x.device)
        picked = torch.zeros(n, dtype=torch.bool, device=x.device)
        for t in range(min(k, n)):
            indices[b, t] = j
            picked[j] = True
            nearest = torch.minimum(nearest, distance[j])
            score = nearest.masked_fill(picked, float("-inf")) if mask_picked else nearest
            j = int(torch.argmax(score))
    return indices


def max_cosine(
    queries: torch.Tensor, query_lengths: torch.Tensor, keys: torch.Tensor, key_lengths: torch.Tensor
) -> torch.Tensor:
    """Largest cosine similarity of each query with the valid keys (ResPrune's text relevance ``rho``).

    Parameters
    ----------
    queries : Tensor ``[B, M, D]`` (visual tokens)
    query_lengths : Tensor ``[B]``, int64
    keys : Tensor ``[B, N, D]`` (text token embeddings)
    key_lengths : Tensor ``[B]``, int64

    Returns
    -------
    rho : Tensor ``[B, M]`` (float32, or float64 for float64 input); ``-inf`` for an item without keys (the max of
    nothing), 0 for padded queries.
    """
    dtype = compute_dtype(queries.dtype)
    rho = queries.new_zeros(queries.shape[:2], dtype=dtype)
    for b in range(queries.shape[0]):
        m, n = int(query_lengths[b]), int(key_lengths[b])
        if n == 0:
            rho[b, :m] = float("-inf")
            continue
        similarity = exact_matmul_t(normalize_rows(queries[b, :m].to(dtype)), normalize_rows(keys[b, :n].to(dtype)))
        rho[b, :m] = similarity.max(dim=1).values
    return rho


def topk_indices(scores: torch.Tensor, lengths: torch.Tensor, k: int, sort_indices: bool = False) -> torch.Tensor:
    """Deterministic top-k over the valid tokens of each item: larger score first, ties to the lower index.

    Parameters
    ----------
    scores : Tensor ``[B, N]``, float (no NaN)
    lengths : Tensor ``[B]``, int64
    k : int, ``0 <= k <= N``
    sort_indices : bool
        Return each item's picks in ascending index order (spatial order) instead of score order.

    Returns
    -------
    indices : Tensor ``[B, k]``, int64; an item with ``n_b < k`` returns its ``n_b`` tokens, then -1.
    """
    indices = torch.full((scores.shape[0], k), -1, dtype=torch.int64, device=scores.device)
    for b in range(scores.shape[0]):
        n = int(lengths[b])
        top = torch.sort(scores[b, :n], descending=True, stable=True).indices[:k]
        if sort_indices:
            top = top.sort().values
        indices[b, : top.numel()] = top
    return indices


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention each token *receives*: column sums of ``softmax(q k^T * scale)``, averaged over heads.

    The "global attention" score of a vision encoder without a [CLS] token (Qwen2.5-VL; VisPruner's recommendation
    for it, github.com/Theia-4869/VisPruner issue #1; VisionZip's Qwen2.5-VL port takes the same head-mean column
    sum of a materialised attention matrix). With ``P_h = softmax_j(scale * q_h k_h^T)`` over the keys ``j`` a query
    may attend (valid, and in its segment), the score of token ``j`` is ``(1 / H) sum_h sum_i P_h[i, j]``.

    Parameters
    ----------
    q, k : Tensor ``[B, H, N, d]`` (the SDPA layout), float16/bfloat16/float32/float64, same shape and dtype
        Queries and keys of one attention layer (after RoPE, as the layer uses them).
    lengths : Tensor ``[B]``, int64
        Valid tokens per item; padded tokens neither attend nor are attended.
    segment_ids : Tensor ``[B, N]``, integer, or None
        Attention stays within a segment: query ``i`` attends key ``j`` only if ``segment_ids[b, i] ==
        segment_ids[b, j]`` (Qwen2.5-VL's ``cu_seqlens`` / ``cu_window_seqlens`` blocks; see
        :func:`mrprune.ops.segment_ids_from_cu_seqlens`). ``None``: one segment.
    scale : float or None
        Logit scale; ``None`` means ``d ** -0.5``.

    Returns
    -------
    scores : Tensor ``[B, N]`` (float32, or float64 for float64 input); 0 for padding. Each item's scores sum to
    its number of valid queries (every row of ``P_h`` sums to 1).
    """
    dtype = compute_dtype(q.dtype)
    batch, _, tokens, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    scores = q.new_zeros(batch, tokens, dtype=dtype)
    for b in range(batch):
        n = int(lengths[b])
        logits = (q[b, :, :n].to(dtype) @ k[b, :, :n].to(dtype).transpose(-1, -2)) * scale  # [H, n, n]
        if segment_ids is not None:
            same = segment_ids[b, :n, None] == segment_ids[b, None, :n]
            logits = logits.masked_fill(~same, float("-inf"))
        scores[b, :n] = torch.softmax(logits, dim=-1).sum(dim=1).mean(dim=0)
    return scores


def _symmetric_cosines(x: torch.Tensor) -> torch.Tensor:
    """Cosine matrix of the rows of ``x [n, D]`` (compute dtype), made exactly symmetric (upper triangle mirrored)."""
    u = normalize_rows(x)
    similarity = u @ u.T
    return torch.triu(similarity) + torch.triu(similarity, 1).T


def coverage_select(
    features: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    saliency: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Saliency-weighted greedy coverage (SCOPE, arXiv 2510.24214; official code github.com/kinredon/SCOPE,
    ``scope/clip_encoder.py::SCOPE``), ``k`` picks per item.

    With ``S`` the cosine matrix of the valid tokens (``S_jj = 1`` exactly for every non-zero token; the rows are
    normalised as ``x / max(||x||, 1e-12)``) and the coverage ``cur`` (initially 0), each step picks
    ``argmax_j gain_j * a_j ** alpha`` over the unpicked tokens, ties to the lower index, where
    ``gain_j = sum_i max(0, S_ij - cur_i)`` runs over every valid token ``i`` (picked ones and ``j`` itself
    included, as in the official code), then sets ``cur := max(cur, S_j)``. The objective is a saliency-weighted
    facility location; negative cosines never count.

    Differences from the official code (all of which only matter off its happy path): rows are normalised as
    ``x / max(||x||, 1e-12)`` (the official division gives NaN for a zero vector); arithmetic is float32 (float64 for
    float64 input) where the official code computes in the features' dtype (float16 in LLaVA); padded tokens never
    count; its additive variant (env ``COMBINED=add``) is not offered.

    Parameters
    ----------
    features : Tensor ``[B, N, D]``, float16/bfloat16/float32/float64
    lengths : Tensor ``[B]``, int64
    k : int, ``0 <= k <= N``
    saliency : Tensor ``[B, N]`` or None
        Non-negative saliency ``a`` (SCOPE: the [CLS] attention summed over heads); ``None`` means 1.
    alpha : float
        Saliency exponent (official default 1.0, env ``ALPHA``); ``0 ** 0`` is 1.

    Returns
    -------
    indices : Tensor ``[B, k]``, int64, in pick order; -1 past ``n_b``.
    """
    dtype = compute_dtype(features.dtype)
    indices = torch.full((features.shape[0], k), -1, dtype=torch.int64, device=features.device)
    for b in range(features.shape[0]):
        n = int(lengths[b])
        if n == 0 or k == 0:
            continue
        x = features[b, :n].to(dtype)
        similarity = _symmetric_cosines(x)
        # a token's cosine with itself is exactly 1 (not 1 +- rounding), so that exact ties stay exact
        similarity.diagonal().copy_(torch.where(x.norm(dim=-1) >= NORM_EPS, 1.0, similarity.diagonal()))
        weight = torch.ones(n, dtype=dtype, device=features.device)
        if saliency is not None:
            weight = saliency[b, :n].to(dtype) ** alpha
        cover = similarity.new_zeros(n)
        picked = torch.zeros(n, dtype=torch.bool, device=features.device)
        for t in range(min(k, n)):
            gain = (similarity - cover[:, None]).clamp_min(0).sum(dim=0)
            j = int(torch.argmax(torch.where(picked, float("-inf"), gain * weight)))  # the first maximum
            indices[b, t] = j
            picked[j] = True
            cover = torch.maximum(cover, similarity[j])
    return indices


def bipartite_dedup(features: torch.Tensor, lengths: torch.Tensor, k: int, per_round: int = 8) -> torch.Tensor:
    """Even/odd similarity de-duplication down to ``k`` tokens (VisPruner's diverse tokens, arXiv 2412.01818;
    official code github.com/Theia-4869/VisPruner, ``llava/model/llava_arch.py::encode_images``).

    The valid tokens of an item start in their input order (VisPruner passes the non-important tokens in descending
    attention order). While more than ``k`` remain, with ``R`` remaining: split them by position parity into A
    (positions 0, 2, ...) and B (1, 3, ...), score each A token by its largest cosine similarity to B, drop the
    ``r = min(per_round, R - k, |A|)`` highest-scoring A tokens (a stable descending sort: ties drop the earlier
    position), and continue with the order ``[kept A tokens in descending score order, B tokens in order]``.

    Differences from the official code: rows are normalised as ``x / max(||x||, 1e-12)`` (official: NaN for a zero
    vector); the sort is stable (official: ``argsort``, unspecified among ties); an odd ``R`` gives A the extra token
    and ``r`` is capped at ``|A|`` (the official code raises ``IndexError`` in both cases); cosines are computed once
    (float32, or float64 for float64 input) instead of per round in the features' dtype.

    Parameters
    ----------
    features : Tensor ``[B, N, D]``, float16/bfloat16/float32/float64
        The candidate tokens in their priority order.
    lengths : Tensor ``[B]``, int64
    k : int, ``0 <= k <= N``
        Tokens to keep per item; an item with ``n_b <= k`` keeps all of them.
    per_round : int, ``>= 1``
        Most A tokens dropped per round (official: 8).

    Returns
    -------
    indices : Tensor ``[B, k]``, int64
        Positions (into ``features[b]``) of the survivors in the final order of the rounds (``0, 1, ..., n_b - 1``
        when nothing is dropped); -1 past ``min(k, n_b)``.
    """
    dtype = compute_dtype(features.dtype)
    indices = torch.full((features.shape[0], k), -1, dtype=torch.int64, device=features.device)
    for b in range(features.shape[0]):
        n = int(lengths[b])
        if n == 0 or k == 0:
            continue
        order = torch.arange(n, device=features.device)
        if n > k:
            similarity = _symmetric_cosines(features[b, :n].to(dtype))
            while order.numel() > k:
                evens, odds = order[0::2], order[1::2]
                r = min(per_round, order.numel() - k, evens.numel())
                scores = even_odd_best_match(similarity, evens, odds)[0]  # shared with bipartite_merge (ToMe)
                rank = torch.sort(scores, descending=True, stable=True).indices
                order = torch.cat([evens[rank[r:]], odds])
        indices[b, : order.numel()] = order
    return indices


# --- token merging and multi-row attention (issue 17) ------------------------------------------------------------


def even_odd_best_match(
    similarity: torch.Tensor, evens: torch.Tensor, odds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best odd-position partner of every even-position token: the even/odd matching that ToMe's bipartite merge
    and VisPruner's de-duplication share.

    Parameters
    ----------
    similarity : Tensor ``[n, n]``
        Cosines of an item's tokens.
    evens, odds : Tensor ``[a]``, ``[o]``, int64
        Rows (set A) and columns (set B) of ``similarity``.

    Returns
    -------
    value : Tensor ``[a]``, the largest cosine of each A token to B (``-inf`` when B is empty).
    partner : Tensor ``[a]``, int64, its position in ``odds`` (the first maximum; 0 when B is empty).
    """
    if odds.numel() == 0:
        return similarity.new_full((evens.numel(),), float("-inf")), evens.new_zeros(evens.numel())
    block = similarity[evens][:, odds]
    partner = torch.argmax(block, dim=1)  # the first maximum
    return block.gather(1, partner[:, None])[:, 0], partner


def bipartite_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    lengths: torch.Tensor,
    r: int,
    sizes: torch.Tensor | None = None,
    protect_first: bool = True,
    spatial_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ToMe's bipartite soft matching and size-weighted merge (arXiv 2210.09461; official code
    github.com/facebookresearch/ToMe, ``tome/merge.py``: ``bipartite_soft_matching`` then ``merge_wavg``).

    Per item with ``n = n_b`` valid tokens and ``p = 1`` if ``protect_first`` (the [CLS] at position 0) else 0:

    1. ``r_b = min(r, (n - p) // 2)`` pairs are merged (the official cap);
    2. A = positions 0, 2, 4, ...; B = positions 1, 3, ...; each A token's score is its largest cosine of
       ``metric`` rows (normalised as ``x / max(||x||, 1e-12)``) to B, its partner the first B token reaching it;
       a protected [CLS] scores ``-inf``;
    3. the ``r_b`` A tokens with the highest scores (stable descending sort: ties merge the earlier position) are
       merged into their partners; the other A tokens stay;
    4. a B token that absorbed A tokens ``S`` becomes ``(s_b x_b + sum_{a in S} s_a x_a) / (s_b + sum_{a in S} s_a)``
       with size ``s_b + sum s_a``; every other token is copied unchanged (bit for bit) with its size.

    Output order: as the official code, ``[unmerged A tokens, B tokens in position order]``, where the unmerged A
    tokens are in position order when ``protect_first`` (the official re-sort that keeps the [CLS] first) and in
    descending score order otherwise; ``spatial_order=True`` puts every output token at its (B token's or unmerged A
    token's own) position order instead.

    Differences from the official code: a zero ``metric`` row has cosine 0 (official: NaN); the sort is stable
    (official: ``argsort``, unspecified among ties); the weighted mean is accumulated in float32 (float64 for float64
    input) and tokens that absorbed nothing are copied instead of being multiplied and divided by their size.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``, float16/bfloat16/float32/float64
        The tokens to merge (ToMe: the block's hidden states).
    metric : Tensor ``[B, N, C]``, floating
        The similarity features (ToMe: the block's keys averaged over heads).
    lengths : Tensor ``[B]``, int64
    r : int, ``0 <= r <= max(N - p, 0) // 2``
        Pairs to merge per item (fewer where an item is short).
    sizes : Tensor ``[B, N]`` or None
        Positive token sizes (original patches per token); ``None`` means 1.
    protect_first : bool
        Never merge position 0 (the [CLS] token).
    spatial_order : bool
        Order the output by position instead of the official ``[unmerged A, B]``.

    Returns
    -------
    merged : Tensor ``[B, N - r, D]`` in ``x.dtype``; rows past ``n_b - r_b`` are 0.
    merged_sizes : Tensor ``[B, N - r]`` (float32, or float64 for float64 ``x``); 0 past ``n_b - r_b``.
    source : Tensor ``[B, N]``, int64: the output row of each input token (a merged A token maps to its partner's
        row); -1 for padding.
    out_lengths : Tensor ``[B]``, int64: ``n_b - r_b``.
    """
    dtype = compute_dtype(x.dtype)
    batch, tokens, dim = x.shape
    out_tokens = tokens - r
    merged = x.new_zeros(batch, out_tokens, dim)
    merged_sizes = x.new_zeros(batch, out_tokens, dtype=dtype)
    source = torch.full((batch, tokens), -1, dtype=torch.int64, device=x.device)
    out_lengths = torch.zeros(batch, dtype=torch.int64, device=x.device)
    for b in range(batch):
        n = int(lengths[b])
        protect = 1 if protect_first and n > 0 else 0
        rb = min(r, max(n - protect, 0) // 2)
        size = torch.ones(n, dtype=dtype, device=x.device) if sizes is None else sizes[b, :n].to(dtype)
        positions = torch.arange(n, device=x.device)
        evens, odds = positions[0::2], positions[1::2]
        u = normalize_rows(metric[b, :n].to(dtype))
        score, partner = even_odd_best_match(u @ u.T, evens, odds)
        if protect:
            score[0] = float("-inf")
        rank = torch.sort(score, descending=True, stable=True).indices
        gone, stay = rank[:rb], rank[rb:]
        if protect:
            stay = stay.sort().values
        kept = torch.cat([evens[stay], odds])  # output rows -> input positions (their representatives)
        if spatial_order:
            kept = kept.sort().values
        slot = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        slot[kept] = torch.arange(kept.numel(), device=x.device)
        slot[evens[gone]] = slot[odds[partner[gone]]]
        total = x.new_zeros(kept.numel(), dim, dtype=dtype).index_add_(0, slot, x[b, :n].to(dtype) * size[:, None])
        mass = size.new_zeros(kept.numel()).index_add_(0, slot, size)
        absorbed = torch.zeros(kept.numel(), dtype=torch.bool, device=x.device)
        absorbed[slot[evens[gone]]] = True
        rows = torch.where(absorbed[:, None], (total / mass[:, None]).to(x.dtype), x[b, kept])
        merged[b, : kept.numel()] = rows
        merged_sizes[b, : kept.numel()] = mass
        source[b, :n] = slot
        out_lengths[b] = n - rb
    return merged, merged_sizes, source, out_lengths


def assign_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    include_target: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every token joins its most similar target, then each target absorbs its members (VisionZip's contextual
    tokens, arXiv 2412.04467; official code github.com/dvlab-research/VisionZip, ``visionzip/clip_encoder.py``).

    Per item, token ``i`` (valid, not itself a target) joins the target slot ``t`` maximising
    ``cos(metric_i, metric_{targets[b, t]})`` over the valid slots (rows normalised as ``x / max(||x||, 1e-12)``;
    ties to the lower slot); a target stays in its own slot. With ``M_t`` the members of slot ``t`` (the target
    excluded) and ``h = x``:

    * ``include_target=False`` (VisionZip): ``c_t = h_t + (sum_{i in M_t} h_i) / max(|M_t|, 1)``, the target *plus*
      the mean of its members;
    * ``include_target=True``: the plain mean ``(h_t + sum_{i in M_t} h_i) / (1 + |M_t|)``.

    Differences from the official code: a zero ``metric`` row has cosine 0 (official: NaN); sums are accumulated in
    float32 (float64 for float64 input) instead of a bmm in the features' dtype.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``, float16/bfloat16/float32/float64
        The tokens (VisionZip: the hidden states that remain after the dominant tokens).
    metric : Tensor ``[B, N, C]``, floating
        Similarity features (VisionZip: the keys averaged over heads).
    lengths : Tensor ``[B]``, int64
    targets : Tensor ``[B, T]``, int64
        Positions of the targets, distinct per item, each in ``[0, n_b)``, or -1 for an unused slot (VisionZip:
        the first ``C`` of ``0, step, 2 step, ...`` with ``step = max(1, n // C)``).
    include_target : bool
        The plain mean instead of VisionZip's target plus mean.

    Returns
    -------
    merged : Tensor ``[B, T, D]`` in ``x.dtype``; 0 for unused slots.
    assignment : Tensor ``[B, N]``, int64: the slot of every valid token (a target's own slot); -1 for padding and
        for every token of an item without targets.
    sizes : Tensor ``[B, T]``, int64: input tokens per slot (``1 + |M_t|``); 0 for unused slots.
    """
    dtype = compute_dtype(x.dtype)
    batch, tokens, dim = x.shape
    slots = targets.shape[1]
    merged = x.new_zeros(batch, slots, dim)
    assignment = torch.full((batch, tokens), -1, dtype=torch.int64, device=x.device)
    sizes = torch.zeros(batch, slots, dtype=torch.int64, device=x.device)
    for b in range(batch):
        n = int(lengths[b])
        used = (targets[b] >= 0).nonzero()[:, 0]
        if n == 0 or used.numel() == 0:
            continue
        where = targets[b, used]
        u = normalize_rows(metric[b, :n].to(dtype))
        slot = used[torch.argmax(u @ u[where].T, dim=1)]  # the first maximum: the lower slot
        slot[where] = used
        assignment[b, :n] = slot
        member = torch.ones(n, dtype=torch.bool, device=x.device)
        member[where] = False
        count = torch.bincount(slot[member], minlength=slots)
        total = x.new_zeros(slots, dim, dtype=dtype).index_add_(0, slot[member], x[b, :n][member].to(dtype))
        target, members = x[b, where].to(dtype), count[used].to(dtype)[:, None]
        if include_target:
            rows = (target + total[used]) / (members + 1)
        else:
            rows = target + total[used] / members.clamp_min(1)
        merged[b, used] = rows.to(x.dtype)
        sizes[b] = count
        sizes[b, used] += 1
    return merged, assignment, sizes


def knn_weighted_merge(
    x: torch.Tensor,
    metric: torch.Tensor,
    weights: torch.Tensor,
    lengths: torch.Tensor,
    kept: torch.Tensor,
    k: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each kept token absorbs its ``k`` nearest neighbours, weighted (PruMerge / PruMerge+, arXiv 2403.15388;
    official code github.com/42Shawn/LLaVA-PruMerge, ``llava/model/multimodal_encoder/clip_encoder.py``,
    ``token_prune_merge_advanced(_plus)``).

    For kept token ``c = kept[b, t]``: its neighbours ``K_c`` are the ``min(k, n_b - 1)`` valid tokens ``j != c``
    (kept or not, as in the official code) with the largest ``cos(metric_c, metric_j)`` (rows normalised as
    ``x / max(||x||, 1e-12)``; ties to the lower position), and ``y_t = x_c + sum_{j in K_c} w_j x_j``: the token
    itself unweighted, the neighbours weighted by ``w`` (the [CLS] attention) without normalisation (the official
    ``/ torch.sum(weights)`` is commented out).

    Differences from the official code: the neighbour ranking breaks ties by position (official: ``topk`` over
    ``[kept before c, kept after c, the rest]``, unspecified among ties); ``k`` is capped at ``n_b - 1`` (official:
    an error); the sum is accumulated in float32 (float64 for float64 input).

    Parameters
    ----------
    x : Tensor ``[B, N, D]``, float16/bfloat16/float32/float64
        The tokens (PruMerge: the select layer's patch features).
    metric : Tensor ``[B, N, C]``, floating
        Similarity features (PruMerge: the last layer's keys).
    weights : Tensor ``[B, N]``, floating, finite
        Neighbour weights (PruMerge: the [CLS] attention of each patch).
    lengths : Tensor ``[B]``, int64
    kept : Tensor ``[B, K]``, int64
        Positions of the kept tokens in ``[0, n_b)``, or -1 for an unused slot.
    k : int, ``0 <= k <= N``
        Neighbours per kept token (official: 32).

    Returns
    -------
    merged : Tensor ``[B, K, D]`` in ``x.dtype``; 0 for unused slots.
    neighbors : Tensor ``[B, K, k]``, int64: each kept token's neighbours, nearest first; -1 past ``min(k, n_b - 1)``
        and for unused slots.
    """
    dtype = compute_dtype(x.dtype)
    batch, _, dim = x.shape
    slots = kept.shape[1]
    merged = x.new_zeros(batch, slots, dim)
    neighbors = torch.full((batch, slots, k), -1, dtype=torch.int64, device=x.device)
    for b in range(batch):
        n = int(lengths[b])
        u = normalize_rows(metric[b, :n].to(dtype))
        w = weights[b, :n].to(dtype)
        for t in range(slots):
            c = int(kept[b, t])
            if c < 0:
                continue
            similarity = u @ u[c]
            similarity[c] = float("-inf")
            near = torch.sort(similarity, descending=True, stable=True).indices[: min(k, n - 1)]
            neighbors[b, t, : near.numel()] = near
            merged[b, t] = (x[b, c].to(dtype) + (w[near, None] * x[b, near].to(dtype)).sum(0)).to(x.dtype)
    return merged, neighbors


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    query_positions: torch.Tensor | None = None,
    scale: float | None = None,
    reduce: bool = False,
) -> torch.Tensor:
    """Head-averaged attention probabilities of a few query rows, computed from ``q`` and ``k`` (FastV's last-token
    row generalised to ``M`` rows: PDrop's last instruction token, SparseVLM's text raters), so the model's own
    attention can stay on SDPA/FlashAttention.

    ``P_h[m, j] = softmax_j(scale * q_h[m] . k_{g(h)}[j])`` over the keys row ``m`` may attend: ``key_mask[b, j]``
    and, with ``query_positions``, ``j <= query_positions[b, m]`` (causal). Query head ``h`` reads key head
    ``g(h) = h // (H / H_kv)`` (grouped-query attention, as ``repeat_interleave`` of the keys). The result is
    ``(1 / H) sum_h P_h``.

    Parameters
    ----------
    q : Tensor ``[B, H, M, d]``, float16/bfloat16/float32/float64
        Queries of the rows (after RoPE, as the layer uses them).
    k : Tensor ``[B, H_kv, N, d]``, same dtype, ``H % H_kv == 0``
        Keys of the whole sequence (after RoPE).
    key_mask : Tensor ``[B, N]``, bool
        Keys any row may attend (the real tokens of each sequence).
    query_positions : Tensor ``[B, M]``, integer, or None
        Sequence position of each row for the causal mask; -1 marks a padded row (all zeros, left out of the
        ``reduce`` mean). ``None``: no causal mask, every row real.
    scale : float or None
        Logit scale; ``None`` means ``d ** -0.5``.
    reduce : bool
        Return the mean over an item's real rows instead of every row.

    Returns
    -------
    Tensor ``[B, M, N]`` (or ``[B, N]`` with ``reduce``), float32 (float64 for float64 input); 0 at keys a row may
    not attend, for padded rows, for rows without any key, and (``reduce``) for items without real rows.
    """
    dtype = compute_dtype(q.dtype)
    batch, heads, rows, dim = q.shape
    kv_heads, tokens = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else scale
    out = q.new_zeros(batch, rows, tokens, dtype=dtype)
    real = torch.ones(batch, rows, dtype=torch.bool, device=q.device)
    for b in range(batch):
        keys = k[b].to(dtype).repeat_interleave(heads // kv_heads, dim=0)  # [H, N, d]
        allowed = key_mask[b][None, :].expand(rows, tokens)
        if query_positions is not None:
            real[b] = query_positions[b] >= 0
            allowed = allowed & (torch.arange(tokens, device=q.device)[None, :] <= query_positions[b][:, None])
            allowed = allowed & real[b][:, None]
        logits = (q[b].to(dtype) @ keys.transpose(-1, -2)) * scale  # [H, M, N]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row without keys: 0
        out[b] = probs.mean(0)
    if not reduce:
        return out
    count = real.sum(1, keepdim=True).clamp_min(1).to(dtype)
    return (out * real[..., None]).sum(1) / count


def density_peak_merge(
    x: torch.Tensor, lengths: torch.Tensor, clusters: int, neighbors: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Density-peak (DPC-kNN) clustering and mean merge of each item's tokens (SparseVLM v1's recycling of pruned
    tokens, arXiv 2410.04417; official code github.com/Gumpest/SparseVLMs, ``cluster_and_merge``, itself TCFormer's
    DPC-kNN).

    Per item with ``n = n_b`` valid tokens and ``c = min(clusters, n)`` centres:

    1. ``d_ij = ||x_i - x_j|| / sqrt(D)``;
    2. density ``rho_i = exp(-mean of d_ij^2 over the m = min(neighbors, n) nearest j``, the token itself
       included);
    3. ``delta_i`` = the distance to the nearest token of strictly higher density, or ``max d`` over the item for
       tokens without one; density ties are broken by position (the lower position counts as denser);
    4. the ``c`` tokens with the largest ``rho_i * delta_i`` (stable: ties to the lower position) are the centres,
       in that order;
    5. every token joins its nearest centre (ties to the lower slot), a centre its own slot, and each cluster
       becomes the mean of its tokens.

    Differences from the official code: density ties are broken by position instead of by ``rand * 1e-6`` noise
    (deterministic); the mean divides by the count (official: ``count + 1e-6``); distances and means are computed
    in float32 (float64 for float64 input); ``clusters > n_b`` leaves slots empty (official: an error).

    Parameters
    ----------
    x : Tensor ``[B, N, D]``, float16/bfloat16/float32/float64
    lengths : Tensor ``[B]``, int64
    clusters : int, ``0 <= clusters <= N``
        Centres per item (SparseVLM: ``n / 10 + 1`` of the recycled tokens).
    neighbors : int or None, ``>= 1``
        ``m`` of the density; ``None`` means ``clusters`` (the official code uses the cluster count).

    Returns
    -------
    merged : Tensor ``[B, clusters, D]`` in ``x.dtype``; 0 for empty slots.
    assignment : Tensor ``[B, N]``, int64: the cluster of each valid token; -1 for padding.
    centers : Tensor ``[B, clusters]``, int64: the centre positions, -1 past ``min(clusters, n_b)``.
    """
    dtype = compute_dtype(x.dtype)
    batch, tokens, dim = x.shape
    merged = x.new_zeros(batch, clusters, dim)
    assignment = torch.full((batch, tokens), -1, dtype=torch.int64, device=x.device)
    centers = torch.full((batch, clusters), -1, dtype=torch.int64, device=x.device)
    m_nearest = clusters if neighbors is None else neighbors
    for b in range(batch):
        n = int(lengths[b])
        c = min(clusters, n)
        if c == 0:
            continue
        v = x[b, :n].to(dtype)
        distance = (v[:, None] - v[None]).norm(dim=-1) / dim**0.5  # exact 0 for duplicates (cdist's GEMM is not)
        m = max(1, min(m_nearest, n))
        density = torch.exp(-(distance.sort(dim=1).values[:, :m] ** 2).mean(1))
        position = torch.arange(n, device=x.device)
        denser = (density[None, :] > density[:, None]) | (
            (density[None, :] == density[:, None]) & (position[None, :] < position[:, None])
        )
        delta = torch.where(denser, distance, distance.max()).min(dim=1).values
        score = density * delta
        center = torch.sort(score, descending=True, stable=True).indices[:c]
        slot = torch.argmin(distance[:, center], dim=1)  # the first minimum: the lower slot
        slot[center] = torch.arange(c, device=x.device)
        count = torch.bincount(slot, minlength=c).to(dtype)
        total = v.new_zeros(c, dim).index_add_(0, slot, v)
        merged[b, :c] = (total / count[:, None]).to(x.dtype)
        assignment[b, :n] = slot
        centers[b, :c] = center
    return merged, assignment, centers
