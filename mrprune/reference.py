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
        graph[b, :n, :n], degree[b, :n] = thresholded_softmax(x @ x.T, threshold, temperature)
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
            mass = mass @ graph[b, :n, :n].to(dtype)
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
                energy = (energy - (v @ direction) ** 2).clamp_min(0)
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
        similarity = x @ x.T
        # a matmul is not exactly symmetric; mirror the upper triangle so d_sj == d_js and exact ties stay exact
        distance = 1 - (torch.triu(similarity) + torch.triu(similarity, 1).T)
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
        similarity = normalize_rows(queries[b, :m].to(dtype)) @ normalize_rows(keys[b, :n].to(dtype)).T
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
                scores = similarity[evens][:, odds].max(dim=1).values
                rank = torch.sort(scores, descending=True, stable=True).indices
                order = torch.cat([evens[rank[r:]], odds])
        indices[b, : order.numel()] = order
    return indices
