"""Triton ``cosine_graph``: the materialised thresholded-softmax graph ``P [B, N, N]`` and its degree.

Three launches (research/algorithms.md §2.3; the spec is ``mrprune.reference.cosine_graph``):

1. :func:`~triton_kernels._common.row_norms`: ``1 / max(||x_i||, 1e-12)`` per token.
2. :func:`gram_store_kernel`, one program per tile pair ``(I, J)``, ``I <= J``, of the symmetric similarity matrix:
   ``S_IJ = (X_I X_J^T) r_I r_J`` (a ``BLOCK_D``-tiled dot) stored at ``(I, J)`` and, transposed, at ``(J, I)``:
   half the Gram flops, and ``S`` comes out symmetric (bitwise off the diagonal tiles). Only valid entries
   (``i, j < n_b``) are written. For many pairs, persistent programs loop over them instead (same bits;
   ``_common.pair_grid``).
3. :func:`dense_rows_kernel`, one program per block of rows: a first sweep over the row's valid columns keeps the
   online softmax statistics (running max, rescaled sum, edge count; non-edges at logit -5000), a second sweep
   overwrites ``S`` in place with ``P = exp(z - max) / sum`` and writes zeros to every padded row and column.

The same two dense kernels serve the materialising variant of ``graph_scores`` (which keeps ``S`` as scratch and asks
:func:`dense_rows_kernel` for the statistics only).
"""

import torch
import triton
import triton.language as tl

from mrprune import _validation, backends

from ._common import (
    LAUNCH_OPTIONS,
    Launcher,
    check_device,
    cosine_tile,
    device_guard,
    dot_upcast,
    edge_logits,
    feature_block,
    interpreting,
    next_power_of_2,
    pair_grid,
    row_norms,
    tile_offsets,
    tile_pair,
    token_block,
    work_range,
    work_tile_pair,
)

__all__ = ["cosine_graph_triton", "dense_blocks", "dense_rows", "gram_store"]


@triton.jit(do_not_specialize=["B"])
def gram_store_kernel(
    x,
    inv_norms,
    lengths,
    S,
    B,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_sb,
    N_BUCKET,
    D_BUCKET,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    if PERSISTENT:
        first, end, step = work_range(B, N, BLOCK)
        for w in range(first, end, step):
            b, ti, tj, offs_i, offs_j, ok_i, ok_j, live = work_tile_pair(w, N, lengths, BLOCK)
            if live:  # ti <= tj: the tile touches the item
                _gram_store_tile(
                    x, inv_norms, S, b, ti, tj, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb, stride_xn, stride_sb,
                    BLOCK, BLOCK_D, UPCAST,
                )  # fmt: skip
    else:
        b, ti, tj, offs_i, offs_j, ok_i, ok_j, live = tile_pair(N, lengths, BLOCK)
        if live:
            _gram_store_tile(
                x, inv_norms, S, b, ti, tj, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb, stride_xn, stride_sb, BLOCK,
                BLOCK_D, UPCAST,
            )  # fmt: skip


@triton.jit
def _gram_store_tile(
    x,
    inv_norms,
    S,
    b,
    ti,
    tj,
    offs_i,
    offs_j,
    ok_i,
    ok_j,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_sb,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """:func:`gram_store_kernel`'s work on one live tile pair ``(ti, tj)`` of item ``b``."""
    s = cosine_tile(x, inv_norms, b, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb, stride_xn, BLOCK, BLOCK_D, UPCAST)
    if ti == tj:  # the tile holds (i, j) and (j, i): its upper triangle gives both (S bitwise symmetric whatever
        # order tl.dot sums each entry in: the interpreter's float16 matmul does not sum them alike)
        s = tl.where(offs_i[:, None] <= offs_j[None, :], s, tl.trans(s))
    tl.store(S + tile_offsets(b, offs_i, offs_j, stride_sb, N, 1), s, mask=ok_i[:, None] & ok_j[None, :])
    if ti != tj:
        tl.store(S + tile_offsets(b, offs_j, offs_i, stride_sb, N, 1), tl.trans(s), mask=ok_j[:, None] & ok_i[None, :])


@triton.jit
def dense_rows_kernel(
    S,
    P,
    lengths,
    weights,
    row_max,
    row_sum,
    degree,
    coef,
    N,
    stride_sb,
    threshold,
    temperature,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_P: tl.constexpr,
    WRITE_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    offs_c = tl.arange(0, BLOCK_C)
    tile = tile_offsets(b, rows, offs_c, stride_sb, N, 1)  # int64 offsets of the row block's first column tile
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    edges = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, n, BLOCK_C):
        valid = row_ok[:, None] & ((c0 + offs_c) < n)[None, :]
        s = tl.load(S + tile + c0, mask=valid, other=0.0)
        z, edge = edge_logits(s, valid, threshold, temperature)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without valid entries (padding)
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        edges += tl.sum(edge.to(tl.float32), axis=1)
        m = m_new
    m = tl.where(row_ok, m, 0.0)  # padding rows (and empty items, where the loop never ran)
    total = tl.where(row_ok, total, 1.0)
    deg = tl.where(row_ok, tl.where(edges > 0, edges, n.to(tl.float32)), 0.0)
    out = b * N + rows
    in_range = rows < N
    tl.store(degree + out, deg, mask=in_range)
    if WRITE_STATS:
        w = tl.load(weights + out, mask=row_ok, other=0.0)
        tl.store(row_max + out, m, mask=in_range)
        tl.store(row_sum + out, total, mask=in_range)
        tl.store(coef + out, tl.where(row_ok, w / total, 0.0), mask=in_range)
    if WRITE_P:
        for c0 in range(0, N, BLOCK_C):
            cols = c0 + offs_c
            valid = row_ok[:, None] & (cols < n)[None, :]
            s = tl.load(S + tile + c0, mask=valid, other=0.0)
            z, _ = edge_logits(s, valid, threshold, temperature)
            p = tl.exp(z - m[:, None]) / total[:, None]  # 0 outside valid (z = -inf)
            tl.store(P + tile + c0, p, mask=in_range[:, None] & (cols < N)[None, :])


_gram_store = Launcher(gram_store_kernel, key=["N_BUCKET", "D_BUCKET"])


def gram_store(
    x: torch.Tensor,
    inv_norms: torch.Tensor,
    lengths: torch.Tensor,
    S: torch.Tensor,
    block: int,
    block_d: int,
    persistent: bool | None = None,
) -> None:
    """``S[b, :n, :n] = cosine similarities`` (float32) for contiguous ``x [B, N, D]``; the rest of ``S`` untouched.
    ``persistent`` overrides the choice of ``_common.pair_grid``."""
    batch, tokens, dim = x.shape
    grid, on = pair_grid(batch, triton.cdiv(tokens, block), x, persistent)
    _gram_store(
        grid,
        x,
        inv_norms,
        lengths,
        S,
        batch,
        tokens,
        dim,
        x.stride(0),
        x.stride(1),
        S.stride(0),
        next_power_of_2(tokens),
        next_power_of_2(dim),
        BLOCK=block,
        UPCAST=dot_upcast(x),
        PERSISTENT=on,
        like=x,
        block_d=block_d,
    )


def dense_blocks(tokens: int, t: torch.Tensor, override: int | None = None) -> tuple[int, int]:
    """``(BLOCK_R, BLOCK_C)`` of the memory-bound kernels that sweep a materialised ``[N, N]`` matrix: under the
    interpreter as large as useful; on GPUs 32 rows x 128 columns (512-byte coalesced row segments, 16 KiB of
    float32 per step; to be tuned). ``override`` (tests) sets both."""
    if override is not None:
        return token_block(tokens, t, override), token_block(tokens, t, override)
    if interpreting() or t.device.type != "cuda":
        return min(128, max(16, next_power_of_2(tokens))), min(256, max(16, next_power_of_2(tokens)))
    return 32, 128


def dense_rows(
    S: torch.Tensor,
    lengths: torch.Tensor,
    threshold: float,
    temperature: float,
    *,
    P: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    block: int | None = None,
):
    """Row statistics of the thresholded softmax of the valid block of every ``S[b]``.

    Returns ``degree`` and, when ``weights`` is given, ``(row_max, row_sum, degree, coef = weights / row_sum)``;
    with ``P`` given (may be ``S`` itself) also writes the full ``P`` (zeros in padding)."""
    batch, tokens, _ = S.shape
    degree = torch.empty(batch, tokens, dtype=torch.float32, device=S.device)
    stats = weights is not None
    row_max = torch.empty_like(degree) if stats else degree
    row_sum = torch.empty_like(degree) if stats else degree
    coef = torch.empty_like(degree) if stats else degree
    block_r, block_c = dense_blocks(tokens, S, block)
    grid = (triton.cdiv(tokens, block_r), batch)
    dense_rows_kernel[grid](
        S,
        S if P is None else P,
        lengths,
        degree if weights is None else weights,
        row_max,
        row_sum,
        degree,
        coef,
        tokens,
        S.stride(0),
        threshold,
        temperature,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        WRITE_P=P is not None,
        WRITE_STATS=stats,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )
    return (row_max, row_sum, degree, coef) if stats else degree


def cosine_graph_triton(
    features: torch.Tensor,
    lengths: torch.Tensor,
    threshold: float = 0.5,
    temperature: float = 0.03,
    *,
    block: int | None = None,
    block_d: int | None = None,
    persistent: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P [B, N, N], degree [B, N])`` float32 for contiguous ``features [B, N, D]`` (float16/bfloat16/float32) and
    int64 ``lengths``; see ``mrprune.reference.cosine_graph``. ``block``/``block_d`` override the tile sizes,
    ``persistent`` the Gram pass's launch shape (``_common.pair_grid``)."""
    batch, tokens, dim = features.shape
    if batch == 0 or tokens == 0:
        return (
            torch.zeros(batch, tokens, tokens, dtype=torch.float32, device=features.device),
            torch.zeros(batch, tokens, dtype=torch.float32, device=features.device),
        )
    graph = torch.empty(batch, tokens, tokens, dtype=torch.float32, device=features.device)  # every entry written
    with device_guard(features):
        _, inv = row_norms(features)
        gram_store(
            features,
            inv,
            lengths,
            graph,
            token_block(tokens, features, block),
            feature_block(dim, features, block_d),
            persistent,
        )
        degree = dense_rows(graph, lengths, threshold, temperature, P=graph, block=block)
    return graph, degree


# --- registration ---------------------------------------------------------------------------------------------------


def _check_dtype(op: str, features: torch.Tensor) -> None:
    if features.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"mrprune.{op}: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {features.dtype}"
        )


@torch.library.custom_op("mrprune::_cosine_graph_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _cosine_graph_op(
    features: torch.Tensor, lengths: torch.Tensor, threshold: float = 0.5, temperature: float = 0.03
) -> tuple[torch.Tensor, torch.Tensor]:
    check_device("cosine_graph", features)
    _check_dtype("cosine_graph", features)
    return cosine_graph_triton(features.contiguous(), lengths.to(torch.int64).contiguous(), threshold, temperature)


@_cosine_graph_op.register_fake
def _(features, lengths, threshold=0.5, temperature=0.03):
    _validation.cosine_graph("cosine_graph", features, lengths, threshold, temperature)
    _check_dtype("cosine_graph", features)
    batch, tokens, _ = features.shape
    return (
        features.new_empty(batch, tokens, tokens, dtype=torch.float32),
        features.new_empty(batch, tokens, dtype=torch.float32),
    )


def _backend(features, lengths, threshold, temperature):
    return torch.ops.mrprune._cosine_graph_triton(
        features.contiguous(), lengths.to(torch.int64).contiguous(), float(threshold), float(temperature)
    )


backends.register("cosine_graph", "triton", _backend)
