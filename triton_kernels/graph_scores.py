"""Triton ``graph_scores``: features straight to ``s = (w^T P^t) / degree``, streaming (no ``N x N`` buffer) or not.

The spec is ``mrprune.reference.graph_scores`` (research/algorithms.md §2.3, §2.8, §3.2): ``P`` is the row softmax of
``Z`` with ``Z_ij = S_ij / T`` on edges (``S_ij >= threshold``) and -5000 on every other valid entry, ``degree`` the
edge count of a row (``n`` without edges), ``w`` the token norms unless given, and ``t`` vector-matrix products.

**Streaming variant** (O(N * D + N^2 / BLOCK) memory; flash-attention style). The similarity tiles are recomputed
from the features in every pass; symmetry halves that work: one program per tile pair ``(I, J)``, ``I <= J``,
computes ``S_IJ`` once (a ``BLOCK_D``-tiled dot) and serves both the rows of ``I`` (over the columns of ``J``) and
the rows of ``J`` (over the columns of ``I``, through ``S_JI = S_IJ^T``). The two results of a tile go to separate
slots of a ``[B, T, N]`` partial buffer (``T = ceil(N / BLOCK)``, slot = the other tile's index), so no atomics are
needed and the sums are deterministic; a small kernel then reduces the ``T`` slots of every token. At video sizes the
tile-pair kernels run as persistent programs (a fixed grid looping over the pairs in banded order, so that the
programs running at once share one band's tiles in L2; ``_common.pair_grid``, ``MRPRUNE_TRITON_PERSISTENT``), with the
bits of one program per pair under the same launch config; unmeasured on a GPU so far.

1. :func:`~triton_kernels._common.row_norms`: ``r_i = 1 / max(||x_i||, 1e-12)`` and the default weights ``||x_i||``.
2. Statistics pass (:func:`_stream_stats_kernel`): per tile and row, the max logit, ``sum exp(z - max)`` and the edge
   count, over the tile's valid columns, non-edges at logit -5000 (so a row whose edge logits all lie far below
   -5000, or that has no edge, gets exactly the spec's mass on its non-edges). :func:`_stats_combine_kernel` merges
   the slots (online-softmax rescaling) into ``m_i``, ``l_i``, ``deg_i`` and ``a_i = w_i / l_i``.
3. One propagation pass per step (:func:`_stream_propagate_kernel`): tile ``(I, J)`` adds
   ``sum_{i in I} a_i exp(z_ij - m_i)`` to the columns ``j`` of ``J`` (slot ``I``) and, off the diagonal,
   ``sum_{j in J} a_j exp(z_ij - m_j)`` to the columns ``i`` of ``I`` (slot ``J``). The non-edge part is exact: a
   non-edge simply has ``z = -5000`` in the same ``exp``, i.e. contributes ``a_i * fill_i`` with
   ``fill_i = exp(-5000 - m_i)`` (0 in float32 unless the row has no edge above -5000 + 88). :func:`_slot_reduce_kernel`
   sums the slots into the next step's ``a_j = v_j / l_j`` or, after the last step, into ``v_j / deg_j``.

**Sparse variant** (O(N * D + E) memory, ``E`` the edge count): once a row has its self-edge the -5000 fill
underflows to exactly 0 in float32, so the graph is sparse. The statistics pass as above, then one more pass over the
tile pairs (:func:`_edge_write_kernel`) writes every row's edges into per-row lists (CSR; positions from the
statistics pass's per-slot edge counts, so no atomics, ascending column order), each with the weight
``exp(z_ij - m_j)`` of its neighbour's softmax; every step is then a gather over the lists
(:func:`_sparse_step_kernel`): two Gram passes whatever ``t`` is, instead of ``1 + t``. Rows whose fill does not
underflow (no edge above -5000 + 88, e.g. no edge at all) add ``a_j fill_j`` to every column: one per-item sum
``F = sum_j a_j fill_j`` plus an edge correction ``a_j (w_ij - fill_j)``, exact when every fill is 0.

**Materialising variant** (O(N^2) memory): ``S`` is computed once, symmetric (``cosine_graph``'s
:func:`~triton_kernels.cosine_graph.gram_store`), the statistics come from one sweep over it, and each step is a
column-blocked GEMV over ``S`` that recomputes ``a_i exp(z_ij - m_i)`` (so ``P`` itself is never written), split over
row ranges into a ``[B, splits, N]`` partial buffer to fill the GPU.

**Choosing** (:func:`choose_variant`). Memory first: materialising is allowed only while one item's float32 ``S``
(``4 N^2`` bytes) is at most twice its features (``N D`` elements), i.e. ``N <= D * itemsize / 2`` (N <= 4096 for
half inputs at D = 4096, so LLaVA views qualify and video does not), and the whole ``B N^2 * 4`` bytes stay under
``MATERIALIZE_MAX_BYTES`` (2 GiB): the op then always runs in O(N D) memory. Then time: per similarity entry and
pass, streaming pays half a ``D``-long dot (``D`` flops, symmetric), materialising a 4-byte read of ``S``. Streaming
costs ``1 + t`` Gram passes; materialising one Gram pass plus ``2 + t`` sweeps of ``4 N^2`` bytes (write once, read
for the statistics and once per step). With an H100's rates (about 600 TFLOP/s for float16/bfloat16 tensor-core
dots, about 40 for IEEE float32 dots, about 3 TB/s) materialising wins once ``D > 4 F (2 + t) / (t BW)``: about 2400
(t = 1) or 1100 (t = 5) for half inputs, 160 (t = 1) for float32. The GPU session measures both variants
(``benchmarks/gpu_graph.py``) and tunes these constants. Where streaming wins and ``t > 1``, the sparse variant
replaces it (2 Gram passes instead of ``1 + t``) unless the edge lists would take more than ``SPARSE_MAX_RATIO``
times the features' bytes, ``SPARSE_MIN_BYTES`` and (on a GPU) a quarter of the free memory (checked after the
statistics pass, which both share; then the steps stream) or a CUDA graph is being captured (sizing the lists needs
the edge count on the host).
"""

import contextlib
import contextvars
import os

import torch
import triton
import triton.language as tl

from mrprune import _validation, backends

from ._common import (
    EDGE_FILL_LOGIT,
    LAUNCH_OPTIONS,
    Launcher,
    check_device,
    cosine_tile,
    device_guard,
    dot_upcast,
    edge_logits,
    feature_block,
    gram_tile,
    next_power_of_2,
    num_programs_target,
    pair_grid,
    row_norms,
    symmetric_config_ok,
    symmetric_fixed_config,
    tile_offsets,
    tile_pair,
    token_block,
    work_range,
    work_tile_pair,
)
from .cosine_graph import _check_dtype, dense_blocks, dense_rows, gram_store

__all__ = ["VARIANTS", "choose_variant", "graph_scores_triton", "use_variant"]

VARIANTS = ("auto", "stream", "sparse", "materialize")

#: Cost-model constants of :func:`choose_variant` (H100 figures; the GPU session tunes them).
MATERIALIZE_MAX_BYTES = int(os.environ.get("MRPRUNE_TRITON_MATERIALIZE_BYTES", 2 << 30))
MATERIALIZE_MAX_RATIO = 2.0  # float32 S of an item / its features, in bytes
SPARSE_MAX_RATIO = 2.0  # edge lists (8 bytes an edge) / the features, in bytes ...
SPARSE_MIN_BYTES = 64 << 20  # ... or up to this much at any size
#: Clear edges, with logits ``z >= (threshold + CLEAR_MARGIN) / T`` (the cosine ``CLEAR_MARGIN`` above the threshold),
#: are edges in both passes of the sparse variant whatever the tiling or feature-block order (the rounding of a
#: float32 cosine over D <= 2^16 features stays far below it).
CLEAR_MARGIN = tl.constexpr(1e-3)
_DOT_FLOPS = {torch.float16: 600e12, torch.bfloat16: 600e12, torch.float32: 40e12}
_BANDWIDTH = 3.0e12

_variant: contextvars.ContextVar[str | None] = contextvars.ContextVar("mrprune_triton_graph_variant", default=None)


@contextlib.contextmanager
def use_variant(name: str):
    """Force the ``"stream"``, ``"sparse"`` or ``"materialize"`` variant (or ``"auto"``) for the calls inside the
    block (tests, benchmarks); ``MRPRUNE_TRITON_GRAPH_VARIANT`` does the same process-wide."""
    if name not in VARIANTS:
        raise ValueError(f"unknown graph_scores variant {name!r}; choose one of {VARIANTS}")
    token = _variant.set(name)
    try:
        yield
    finally:
        _variant.reset(token)


def choose_variant(
    batch: int, tokens: int, dim: int, iterations: int, dtype: torch.dtype, variant: str | None = None
) -> str:
    """``"stream"``, ``"sparse"`` or ``"materialize"`` (see the module docstring for the cost model)."""
    variant = variant or _variant.get() or os.environ.get("MRPRUNE_TRITON_GRAPH_VARIANT", "auto")
    if variant not in VARIANTS:
        raise ValueError(f"unknown graph_scores variant {variant!r}; choose one of {VARIANTS}")
    if variant != "auto":
        return variant
    itemsize = torch.empty((), dtype=dtype).element_size()
    streaming = "sparse" if iterations > 1 else "stream"
    if tokens * 4 > MATERIALIZE_MAX_RATIO * dim * itemsize or batch * tokens * tokens * 4 > MATERIALIZE_MAX_BYTES:
        return streaming
    n2 = float(tokens) * tokens
    flops = _DOT_FLOPS.get(dtype, _DOT_FLOPS[torch.float32])
    stream = (1 + iterations) * n2 * dim / flops  # the sparse variant's sweeps are not modelled: it only replaces it
    materialize = n2 * dim / flops + (2 + iterations) * 4 * n2 / _BANDWIDTH
    return "materialize" if materialize <= stream else streaming


# --- streaming kernels ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["B"])
def _stream_stats_kernel(
    x,
    inv_norms,
    lengths,
    part_m,
    part_l,
    part_c,
    part_k,
    B,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_pb,
    stride_ps,
    threshold,
    temperature,
    N_BUCKET,
    D_BUCKET,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    COUNT_CLEAR: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """Per tile pair and row: max logit, softmax sum and edge count (slot = the other tile); with COUNT_CLEAR also the
    count of clear edges (logit ``>= (threshold + CLEAR_MARGIN) / T``, uint8 ``part_k``) that the sparse variant's
    edge pass relies on. One program per pair and item, or PERSISTENT programs looping over them (``pair_grid``)."""
    if PERSISTENT:
        first, end, step = work_range(B, N, BLOCK)
        for w in range(first, end, step):
            b, ti, tj, offs_i, offs_j, ok_i, ok_j, live = work_tile_pair(w, N, lengths, BLOCK)
            if live:  # ti <= tj: the tile touches the item
                _stats_tile(
                    x, inv_norms, part_m, part_l, part_c, part_k, b, ti, tj, offs_i, offs_j, ok_i, ok_j, N, D,
                    stride_xb, stride_xn, stride_pb, stride_ps, threshold, temperature, BLOCK, BLOCK_D, UPCAST,
                    COUNT_CLEAR,
                )  # fmt: skip
    else:
        b, ti, tj, offs_i, offs_j, ok_i, ok_j, live = tile_pair(N, lengths, BLOCK)
        if live:
            _stats_tile(
                x, inv_norms, part_m, part_l, part_c, part_k, b, ti, tj, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb,
                stride_xn, stride_pb, stride_ps, threshold, temperature, BLOCK, BLOCK_D, UPCAST, COUNT_CLEAR,
            )  # fmt: skip


@triton.jit
def _stats_tile(
    x,
    inv_norms,
    part_m,
    part_l,
    part_c,
    part_k,
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
    stride_pb,
    stride_ps,
    threshold,
    temperature,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    COUNT_CLEAR: tl.constexpr,
):
    """:func:`_stream_stats_kernel`'s work on one live tile pair ``(ti, tj)`` of item ``b``."""
    s = cosine_tile(x, inv_norms, b, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb, stride_xn, BLOCK, BLOCK_D, UPCAST)
    z, edge = edge_logits(s, ok_i[:, None] & ok_j[None, :], threshold, temperature)
    # both halves' clear counts at once (the column half goes unused on diagonal tiles): the int32 tile dies before the
    # softmax sums (with it live there, the persistent 128-token half-precision build spilled 12 bytes on sm_90)
    if COUNT_CLEAR:
        clear = (edge & (z >= (threshold + CLEAR_MARGIN) / temperature)).to(tl.int32)  # z, not s: registers
        k_r = tl.sum(clear, axis=1).to(tl.uint8)
        k_c = tl.sum(clear, axis=0).to(tl.uint8)
    # rows of I over the columns of J -> slot J (every valid row has a valid column: m_r is finite there)
    m_r = tl.max(z, axis=1)
    m_r = tl.where(m_r == float("-inf"), 0.0, m_r)
    out_i = b * stride_pb + tj.to(tl.int64) * stride_ps + offs_i
    tl.store(part_m + out_i, m_r, mask=ok_i)
    tl.store(part_l + out_i, tl.sum(tl.exp(z - m_r[:, None]), axis=1), mask=ok_i)
    tl.store(part_c + out_i, tl.sum(edge.to(tl.float32), axis=1), mask=ok_i)
    if COUNT_CLEAR:
        tl.store(part_k + out_i, k_r, mask=ok_i)
    if ti != tj:  # rows of J over the columns of I (S_JI = S_IJ^T) -> slot I
        m_c = tl.max(z, axis=0)
        m_c = tl.where(m_c == float("-inf"), 0.0, m_c)
        out_j = b * stride_pb + ti.to(tl.int64) * stride_ps + offs_j
        tl.store(part_m + out_j, m_c, mask=ok_j)
        tl.store(part_l + out_j, tl.sum(tl.exp(z - m_c[None, :]), axis=0), mask=ok_j)
        tl.store(part_c + out_j, tl.sum(edge.to(tl.float32), axis=0), mask=ok_j)
        if COUNT_CLEAR:
            tl.store(part_k + out_j, k_c, mask=ok_j)


@triton.jit
def _stats_combine_kernel(
    part_m,
    part_l,
    part_c,
    lengths,
    weights,
    row_max,
    row_sum,
    degree,
    coef,
    N,
    stride_pb,
    stride_ps,
    ROWS_PER_SLOT,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    edges = tl.zeros([BLOCK_R], dtype=tl.float32)
    at = b * stride_pb + rows
    for _ in range(0, tl.cdiv(n, ROWS_PER_SLOT)):
        m_s = tl.load(part_m + at, mask=row_ok, other=float("-inf"))
        l_s = tl.load(part_l + at, mask=row_ok, other=0.0)
        edges += tl.load(part_c + at, mask=row_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_new) + l_s * tl.exp(m_s - m_new)
        m = m_new
        at += stride_ps
    total = tl.where(row_ok, total, 1.0)
    out = b * N + rows
    in_range = rows < N
    w = tl.load(weights + out, mask=row_ok, other=0.0)
    tl.store(row_max + out, tl.where(row_ok, m, 0.0), mask=in_range)
    tl.store(row_sum + out, total, mask=in_range)
    tl.store(degree + out, tl.where(row_ok, tl.where(edges > 0, edges, n.to(tl.float32)), 0.0), mask=in_range)
    tl.store(coef + out, tl.where(row_ok, w / total, 0.0), mask=in_range)


@triton.jit(do_not_specialize=["B"])
def _stream_propagate_kernel(
    x,
    inv_norms,
    lengths,
    row_max,
    coef,
    part_v,
    B,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_pb,
    stride_ps,
    threshold,
    temperature,
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
            if live:
                _propagate_tile(
                    x, inv_norms, row_max, coef, part_v, b, ti, tj, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb,
                    stride_xn, stride_pb, stride_ps, threshold, temperature, BLOCK, BLOCK_D, UPCAST,
                )  # fmt: skip
    else:
        b, ti, tj, offs_i, offs_j, ok_i, ok_j, live = tile_pair(N, lengths, BLOCK)
        if live:
            _propagate_tile(
                x, inv_norms, row_max, coef, part_v, b, ti, tj, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb,
                stride_xn, stride_pb, stride_ps, threshold, temperature, BLOCK, BLOCK_D, UPCAST,
            )  # fmt: skip


@triton.jit
def _propagate_tile(
    x,
    inv_norms,
    row_max,
    coef,
    part_v,
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
    stride_pb,
    stride_ps,
    threshold,
    temperature,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """:func:`_stream_propagate_kernel`'s work on one live tile pair ``(ti, tj)`` of item ``b``."""
    s = cosine_tile(x, inv_norms, b, offs_i, offs_j, ok_i, ok_j, N, D, stride_xb, stride_xn, BLOCK, BLOCK_D, UPCAST)
    z, _ = edge_logits(s, ok_i[:, None] & ok_j[None, :], threshold, temperature)
    m_i = tl.load(row_max + b * N + offs_i, mask=ok_i, other=0.0)
    a_i = tl.load(coef + b * N + offs_i, mask=ok_i, other=0.0)
    to_j = tl.sum(a_i[:, None] * tl.exp(z - m_i[:, None]), axis=0)  # rows of I -> columns of J, slot I
    tl.store(part_v + b * stride_pb + ti.to(tl.int64) * stride_ps + offs_j, to_j, mask=ok_j)
    if ti != tj:  # rows of J -> columns of I, slot J
        m_j = tl.load(row_max + b * N + offs_j, mask=ok_j, other=0.0)
        a_j = tl.load(coef + b * N + offs_j, mask=ok_j, other=0.0)
        to_i = tl.sum(a_j[None, :] * tl.exp(z - m_j[None, :]), axis=1)
        tl.store(part_v + b * stride_pb + tj.to(tl.int64) * stride_ps + offs_i, to_i, mask=ok_i)


@triton.jit
def _slot_reduce_kernel(part_v, lengths, divisor, out, N, stride_pb, stride_ps, ROWS_PER_SLOT, BLOCK_R: tl.constexpr):
    """``out[b, j] = sum_slots part_v[b, slot, j] / divisor[b, j]`` on valid ``j`` (0 on padding)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    cols = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    col_ok = cols < n
    at = b * stride_pb + cols
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for _ in range(0, tl.cdiv(n, ROWS_PER_SLOT)):
        acc += tl.load(part_v + at, mask=col_ok, other=0.0)
        at += stride_ps
    div = tl.load(divisor + b * N + cols, mask=col_ok, other=1.0)
    tl.store(out + b * N + cols, tl.where(col_ok, acc / div, 0.0), mask=cols < N)


# --- sparse kernels ---------------------------------------------------------------------------------------------------


@triton.jit
def _edge_slots(edge, clear, axis: tl.constexpr, done_clear, done_near, start, cap, cap_clear):
    """Positions of a chunk's edges in their rows' slots (rows along ``1 - axis``) and which to write: the slot's
    clear edges first, in column order from ``start``, then its near ones from ``start + cap_clear``; at most
    ``cap_clear`` clear and ``cap - cap_clear`` near edges (the statistics pass's counts). ``done_*``: edges of the
    slot's earlier chunks."""
    near = edge & ~clear
    if axis == 1:
        rank_clear = done_clear[:, None] + tl.cumsum(clear.to(tl.int32), axis=1) - 1
        rank_near = done_near[:, None] + tl.cumsum(near.to(tl.int32), axis=1) - 1
        start, cap, cap_clear = start[:, None], cap[:, None], cap_clear[:, None]
    else:
        rank_clear = done_clear[None, :] + tl.cumsum(clear.to(tl.int32), axis=0) - 1
        rank_near = done_near[None, :] + tl.cumsum(near.to(tl.int32), axis=0) - 1
        start, cap, cap_clear = start[None, :], cap[None, :], cap_clear[None, :]
    at = tl.where(clear, start + rank_clear, start + cap_clear + rank_near)
    keep = tl.where(clear, rank_clear < cap_clear, near & (rank_near < cap - cap_clear))
    return at, keep


@triton.jit(do_not_specialize=["B"])
def _edge_write_kernel(
    x,
    inv_norms,
    lengths,
    row_max,
    slot_start,
    slot_count,
    slot_clear,
    edge_col,
    edge_w,
    B,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_sb,
    stride_ss,
    threshold,
    temperature,
    N_BUCKET,
    D_BUCKET,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    SUB: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """Tile ``(I, J)`` appends the edges of the rows of ``I`` among the columns of ``J`` (slots ``[b, J, i]``) and, off
    the diagonal, of the rows of ``J`` among the columns of ``I`` (slots ``[b, I, j]``): the views the statistics pass
    counted. Weight of edge ``(i, j)`` in row ``i``'s list: ``exp(z_ij - m_j)``, what column ``i`` receives from row
    ``j`` per unit of ``a_j``. The tile is computed in column chunks of ``SUB`` (registers), in another tiling than
    the statistics pass, so a similarity within rounding of the threshold may fall on the other side here: clear
    edges (``CLEAR_MARGIN`` above it) are the same in both passes and always written; a near edge the statistics
    pass did not count is dropped and one it counted but this pass misses leaves a ``-1`` entry, never touching
    another slot (the disagreement on edges within rounding of the threshold that every backend pair has). One program
    per pair and item, or PERSISTENT programs looping over them (``pair_grid``)."""
    if PERSISTENT:
        first, end, step = work_range(B, N, BLOCK)
        for w in range(first, end, step):
            b, ti, tj, offs_i, offs_j, ok_i, ok_j, live = work_tile_pair(w, N, lengths, BLOCK)
            if live:
                _edge_write_tile(
                    x, inv_norms, lengths, row_max, slot_start, slot_count, slot_clear, edge_col, edge_w, b, ti, tj,
                    offs_i, ok_i, N, D, stride_xb, stride_xn, stride_sb, stride_ss, threshold, temperature, BLOCK,
                    BLOCK_D, UPCAST, SUB,
                )  # fmt: skip
    else:
        b, ti, tj, offs_i, offs_j, ok_i, ok_j, live = tile_pair(N, lengths, BLOCK)
        if live:
            _edge_write_tile(
                x, inv_norms, lengths, row_max, slot_start, slot_count, slot_clear, edge_col, edge_w, b, ti, tj,
                offs_i, ok_i, N, D, stride_xb, stride_xn, stride_sb, stride_ss, threshold, temperature, BLOCK,
                BLOCK_D, UPCAST, SUB,
            )  # fmt: skip


@triton.jit
def _edge_write_tile(
    x,
    inv_norms,
    lengths,
    row_max,
    slot_start,
    slot_count,
    slot_clear,
    edge_col,
    edge_w,
    b,
    ti,
    tj,
    offs_i,
    ok_i,
    N,
    D,
    stride_xb,
    stride_xn,
    stride_sb,
    stride_ss,
    threshold,
    temperature,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    SUB: tl.constexpr,
):
    """:func:`_edge_write_kernel`'s work on one live tile pair ``(ti, tj)`` of item ``b``."""
    n = tl.load(lengths + b).to(tl.int32)
    base = x + b * stride_xb
    r_i = tl.load(inv_norms + b * N + offs_i, mask=ok_i, other=0.0)
    m_i = tl.load(row_max + b * N + offs_i, mask=ok_i, other=0.0)
    slot_i = b * stride_sb + tj.to(tl.int64) * stride_ss + offs_i
    start_i = tl.load(slot_start + slot_i, mask=ok_i, other=0)
    cap_i = tl.load(slot_count + slot_i, mask=ok_i, other=0).to(tl.int32)
    clear_i = tl.load(slot_clear + slot_i, mask=ok_i, other=0).to(tl.int32)
    done_clear = tl.zeros([BLOCK], dtype=tl.int32)  # edges of each row of I written by the earlier chunks
    done_near = tl.zeros([BLOCK], dtype=tl.int32)
    for c0 in range(0, BLOCK, SUB):
        cols = tj * BLOCK + c0 + tl.arange(0, SUB)
        ok_c = cols < n
        acc = gram_tile(base, base, offs_i, cols, ok_i, ok_c, D, stride_xn, BLOCK, SUB, BLOCK_D, UPCAST)
        r_c = tl.load(inv_norms + b * N + cols, mask=ok_c, other=0.0)
        sim = acc * (r_i[:, None] * r_c[None, :])
        z, edge = edge_logits(sim, ok_i[:, None] & ok_c[None, :], threshold, temperature)
        clear = edge & (z >= (threshold + CLEAR_MARGIN) / temperature)  # as the statistics pass decides
        m_c = tl.load(row_max + b * N + cols, mask=ok_c, other=0.0)
        at, keep = _edge_slots(edge, clear, 1, done_clear, done_near, start_i, cap_i, clear_i)
        tl.store(edge_col + at, (cols[None, :] + 0 * offs_i[:, None]).to(tl.int32), mask=keep)
        tl.store(edge_w + at, tl.exp(z - m_c[None, :]), mask=keep)
        done_clear += tl.sum(clear.to(tl.int32), axis=1)
        done_near += tl.sum((edge & ~clear).to(tl.int32), axis=1)
        if ti != tj:  # every row of I is in the chunk: the columns' slots are whole
            slot_c = b * stride_sb + ti.to(tl.int64) * stride_ss + cols
            start_c = tl.load(slot_start + slot_c, mask=ok_c, other=0)
            cap_c = tl.load(slot_count + slot_c, mask=ok_c, other=0).to(tl.int32)
            clear_c = tl.load(slot_clear + slot_c, mask=ok_c, other=0).to(tl.int32)
            none = tl.zeros([SUB], dtype=tl.int32)
            at_t, keep_t = _edge_slots(edge, clear, 0, none, none, start_c, cap_c, clear_c)
            tl.store(edge_col + at_t, (offs_i[:, None] + 0 * cols[None, :]).to(tl.int32), mask=keep_t)
            tl.store(edge_w + at_t, tl.exp(z - m_i[:, None]), mask=keep_t)


@triton.jit
def _sparse_step_kernel(
    row_ptr,
    edge_col,
    edge_w,
    coef,
    fill,
    fill_total,
    lengths,
    divisor,
    out,
    N,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """``out[b, i] = (F_b + sum_{j in edges(i)} a_j (w_ij - fill_j)) / divisor[b, i]`` on valid rows (0 on padding):
    one propagation step, gathered over the row's edge list in a fixed order (deterministic)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    begin = tl.load(row_ptr + b * N + rows, mask=row_ok, other=0)
    end = tl.load(row_ptr + b * N + rows + 1, mask=row_ok, other=0)
    offs_e = tl.arange(0, BLOCK_E)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for e0 in range(0, tl.max(end - begin, axis=0), BLOCK_E):
        at = begin[:, None] + e0 + offs_e[None, :]
        col = tl.load(edge_col + at, mask=at < end[:, None], other=-1)
        ok = col >= 0  # -1: an entry the edge pass left empty (module docstring), or past the row
        j = b * N + tl.maximum(col, 0)
        w = tl.load(edge_w + at, mask=ok, other=0.0)
        a_j = tl.load(coef + j, mask=ok, other=0.0)
        f_j = tl.load(fill + j, mask=ok, other=0.0)
        acc += tl.sum(a_j * (w - f_j), axis=1)
    total = tl.load(fill_total + b) + acc
    div = tl.load(divisor + b * N + rows, mask=row_ok, other=1.0)
    tl.store(out + b * N + rows, tl.where(row_ok, total / div, 0.0), mask=rows < N)


# --- materialising kernel -------------------------------------------------------------------------------------------


@triton.jit
def _dense_propagate_kernel(
    S,
    lengths,
    row_max,
    coef,
    part_v,
    N,
    stride_sb,
    stride_pb,
    stride_ps,
    ROWS_PER_SLOT,
    threshold,
    temperature,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n
    r_begin = split * ROWS_PER_SLOT
    if (r_begin < n) & (pid * BLOCK_C < n):
        r_end = tl.minimum(r_begin + ROWS_PER_SLOT, n)
        offs_r = tl.arange(0, BLOCK_R)
        tile = tile_offsets(b, r_begin + offs_r, cols, stride_sb, N, 1)  # the first row tile of the range
        vec = b * N + r_begin + offs_r
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_R):
            row_ok = (r0 + offs_r) < r_end
            valid = row_ok[:, None] & col_ok[None, :]
            s = tl.load(S + tile, mask=valid, other=0.0)
            z, _ = edge_logits(s, valid, threshold, temperature)
            m = tl.load(row_max + vec, mask=row_ok, other=0.0)
            a = tl.load(coef + vec, mask=row_ok, other=0.0)
            acc += tl.sum(a[:, None] * tl.exp(z - m[:, None]), axis=0)
            tile += BLOCK_R * N
            vec += BLOCK_R
        tl.store(part_v + b * stride_pb + split.to(tl.int64) * stride_ps + cols, acc, mask=col_ok)


def _stream_stats_config_ok(constexprs: dict, block_d: int, warps: int, stages: int) -> bool:
    """The symmetric kernels' configs, less 16-wide feature tiles in a persistent float32 build with 64-token tiles
    (ptxas spills 4 bytes there on sm_90)."""
    small_persistent = constexprs["UPCAST"] and constexprs["PERSISTENT"] and constexprs["BLOCK"] < 128
    return symmetric_config_ok(constexprs, block_d, warps, stages) and not (small_persistent and block_d == 16)


_stream_stats = Launcher(_stream_stats_kernel, key=["N_BUCKET", "D_BUCKET"], config_ok=_stream_stats_config_ok)
_stream_propagate = Launcher(_stream_propagate_kernel, key=["N_BUCKET", "D_BUCKET"])


def _edge_write_config_ok(constexprs: dict, block_d: int, warps: int, stages: int) -> bool:
    """The symmetric kernels' configs, with 16-wide feature tiles only for float32 (32 spills in the edge pass)."""
    return symmetric_config_ok(constexprs, block_d, warps, stages) and (block_d == 16 or not constexprs["UPCAST"])


def _edge_write_fixed_config(constexprs: dict) -> tuple[int, int, int]:
    block_d, warps, stages = symmetric_fixed_config(constexprs)
    return (16 if constexprs["UPCAST"] else block_d), warps, stages


_edge_write = Launcher(
    _edge_write_kernel,
    key=["N_BUCKET", "D_BUCKET"],
    config_ok=_edge_write_config_ok,
    fixed_config=_edge_write_fixed_config,
)


def _reduce(part_v, lengths, divisor, out, rows_per_slot):
    batch, _, tokens = part_v.shape
    block_r = min(128, max(16, next_power_of_2(tokens)))
    _slot_reduce_kernel[(triton.cdiv(tokens, block_r), batch)](
        part_v,
        lengths,
        divisor,
        out,
        tokens,
        part_v.stride(0),
        part_v.stride(1),
        rows_per_slot,
        BLOCK_R=block_r,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )


def _stream(
    features,
    inv,
    lengths,
    weights,
    threshold,
    temperature,
    iterations,
    block,
    block_d,
    out,
    sparse=False,
    chunk=None,
    persistent=None,
):
    """The streaming variant, or (``sparse``) the sparse one where its edge lists fit (module docstring)."""
    batch, tokens, dim = features.shape
    tiles = triton.cdiv(tokens, block)
    grid, on = pair_grid(batch, tiles, features, persistent)
    common = dict(
        like=features,
        block_d=block_d,
        BLOCK=block,
        UPCAST=dot_upcast(features),
        PERSISTENT=on,
    )
    sizes = (batch, tokens, dim, features.stride(0), features.stride(1))
    buckets = (next_power_of_2(tokens), next_power_of_2(dim))
    part_m, part_l, part_c = (
        torch.empty(batch, tiles, tokens, dtype=torch.float32, device=features.device) for _ in range(3)
    )
    # the sparse variant also counts each slot's clear edges (uint8: a slot holds at most BLOCK <= 128 edges)
    part_k = torch.empty(batch, tiles, tokens, dtype=torch.uint8, device=features.device) if sparse else part_c
    _stream_stats(
        grid,
        features,
        inv,
        lengths,
        part_m,
        part_l,
        part_c,
        part_k,
        *sizes,
        part_m.stride(0),
        part_m.stride(1),
        threshold,
        temperature,
        *buckets,
        COUNT_CLEAR=sparse,
        **common,
    )
    row_max, row_sum, degree, coef = (
        torch.empty(batch, tokens, dtype=torch.float32, device=features.device) for _ in range(4)
    )
    block_r = min(128, max(16, next_power_of_2(tokens)))
    _stats_combine_kernel[(triton.cdiv(tokens, block_r), batch)](
        part_m,
        part_l,
        part_c,
        lengths,
        weights,
        row_max,
        row_sum,
        degree,
        coef,
        tokens,
        part_m.stride(0),
        part_m.stride(1),
        block,
        BLOCK_R=block_r,
        num_warps=4,
        **LAUNCH_OPTIONS,
    )
    if sparse and _sparse_steps(
        features,
        inv,
        lengths,
        part_c,
        part_k,
        row_max,
        row_sum,
        degree,
        coef,
        threshold,
        temperature,
        iterations,
        out,
        chunk,
        grid,
        **common,
    ):
        return
    part_v = part_m  # free again
    for step in range(iterations):
        _stream_propagate(
            grid,
            features,
            inv,
            lengths,
            row_max,
            coef,
            part_v,
            *sizes,
            part_v.stride(0),
            part_v.stride(1),
            threshold,
            temperature,
            *buckets,
            **common,
        )
        last = step == iterations - 1
        _reduce(part_v, lengths, degree if last else row_sum, out if last else coef, block)


def _sparse_steps(
    features,
    inv,
    lengths,
    part_c,
    part_k,
    row_max,
    row_sum,
    degree,
    coef,
    threshold,
    temperature,
    iterations,
    out,
    chunk,
    grid,
    **common,
) -> bool:
    """The sparse variant's edge lists and steps after the statistics pass; False (nothing written) when the lists
    would exceed their memory cap or a CUDA graph is being captured."""
    if features.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    batch, tokens, dim = features.shape
    block = common["BLOCK"]
    tiles = part_c.shape[1]
    # edges per (row, slot): the statistics pass wrote slots below the item's tile count for its valid rows only
    rows_ok = torch.arange(tokens, device=features.device) < lengths[:, None]  # [B, N]
    slots_ok = torch.arange(tiles, device=features.device) < (lengths[:, None] + block - 1) // block  # [B, T]
    written = rows_ok[:, None, :] & slots_ok[:, :, None]
    counts = torch.where(written, part_c, 0.0).to(torch.int64)
    clear = torch.where(written, part_k, 0)
    row_ptr = torch.zeros(batch * tokens + 1, dtype=torch.int64, device=features.device)
    torch.cumsum(counts.sum(dim=1).flatten(), dim=0, out=row_ptr[1:])
    edges = int(row_ptr[-1])  # host sync: sizes the lists
    limit = max(SPARSE_MAX_RATIO * features.numel() * features.element_size(), SPARSE_MIN_BYTES)
    if features.is_cuda:  # a GPU's memory is rarely the limit: a quarter of what is free (5 % dense, N = 64k: 1.7 GB)
        limit = max(limit, torch.cuda.mem_get_info(features.device)[0] / 4)
    if edges * 8 > limit:
        return False
    slot_start = row_ptr[:-1].view(batch, 1, tokens) + (torch.cumsum(counts, dim=1) - counts)
    edge_col = torch.full((max(edges, 1),), -1, dtype=torch.int32, device=features.device)
    edge_w = torch.empty(max(edges, 1), dtype=torch.float32, device=features.device)
    _edge_write(
        grid,
        features,
        inv,
        lengths,
        row_max,
        slot_start,
        counts,
        clear,
        edge_col,
        edge_w,
        batch,
        tokens,
        dim,
        features.stride(0),
        features.stride(1),
        slot_start.stride(0),
        slot_start.stride(1),
        threshold,
        temperature,
        next_power_of_2(tokens),
        next_power_of_2(dim),
        # the edge pass's column chunk: 16 on a GPU (registers); the whole tile elsewhere, so the interpreter rounds S
        # as the statistics pass did (another tiling can move a cosine by an ulp, a weight by about ulp / T)
        SUB=chunk or (16 if features.is_cuda else block),
        **common,
    )
    # the non-edge mass exp(-5000 - m_j) of each row (0 in float32 once the row has an edge above -5000 + 88)
    fill = torch.where(rows_ok, torch.exp(EDGE_FILL_LOGIT.value - row_max), 0.0)
    a, spare = coef, torch.empty_like(coef)
    block_r = min(64, max(16, next_power_of_2(tokens)))
    for step in range(iterations):
        last = step == iterations - 1
        target = out if last else spare
        _sparse_step_kernel[(triton.cdiv(tokens, block_r), batch)](
            row_ptr,
            edge_col,
            edge_w,
            a,
            fill,
            (a * fill).sum(dim=1),
            lengths,
            degree if last else row_sum,
            target,
            tokens,
            BLOCK_R=block_r,
            BLOCK_E=32,
            num_warps=4,
            **LAUNCH_OPTIONS,
        )
        a, spare = target, a
    return True


def _materialize(
    features,
    inv,
    lengths,
    weights,
    threshold,
    temperature,
    iterations,
    block,
    block_d,
    splits,
    out,
    dense_block,
    persistent=None,
):
    batch, tokens, _ = features.shape
    S = torch.empty(batch, tokens, tokens, dtype=torch.float32, device=features.device)
    gram_store(features, inv, lengths, S, block, block_d, persistent)
    row_max, row_sum, degree, coef = dense_rows(S, lengths, threshold, temperature, weights=weights, block=dense_block)
    block_r, block_c = dense_blocks(tokens, S, dense_block)
    col_blocks, row_tiles = triton.cdiv(tokens, block_c), triton.cdiv(tokens, block_r)
    if splits is None:
        splits = num_programs_target(features) // max(col_blocks * batch, 1)
    splits = min(max(splits, 1), row_tiles)
    rows_per_slot = triton.cdiv(row_tiles, splits) * block_r
    splits = triton.cdiv(tokens, rows_per_slot)
    part_v = torch.empty(batch, splits, tokens, dtype=torch.float32, device=features.device)
    for step in range(iterations):
        _dense_propagate_kernel[(col_blocks, splits, batch)](
            S,
            lengths,
            row_max,
            coef,
            part_v,
            tokens,
            S.stride(0),
            part_v.stride(0),
            part_v.stride(1),
            rows_per_slot,
            threshold,
            temperature,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            num_warps=4,
            **LAUNCH_OPTIONS,
        )
        last = step == iterations - 1
        _reduce(part_v, lengths, degree if last else row_sum, out if last else coef, rows_per_slot)


def graph_scores_triton(
    features: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
    iterations: int = 1,
    *,
    variant: str | None = None,
    block: int | None = None,
    block_d: int | None = None,
    splits: int | None = None,
    edge_chunk: int | None = None,
    persistent: bool | None = None,
) -> torch.Tensor:
    """Scores ``[B, N]`` float32 for contiguous ``features [B, N, D]`` (float16/bfloat16/float32), int64 ``lengths``
    and optional contiguous float32 ``weights [B, N]``; see ``mrprune.reference.graph_scores``.

    ``variant`` (``"stream"``/``"sparse"``/``"materialize"``/``"auto"``), ``block`` (token tile, and the row and
    column tiles of the materialising sweeps), ``block_d`` (feature tile, fixed-config launches only) and ``splits``
    (row splits of the materialising GEMV), ``edge_chunk`` (column chunk of the sparse variant's edge pass) and
    ``persistent`` (persistent programs for the tile-pair kernels or not, ``_common.pair_grid``) override the
    automatic choices, for tests and benchmarks."""
    batch, tokens, dim = features.shape
    if batch == 0 or tokens == 0:
        return torch.zeros(batch, tokens, dtype=torch.float32, device=features.device)
    out = torch.empty(batch, tokens, dtype=torch.float32, device=features.device)  # the last reduce writes every entry
    chosen = choose_variant(batch, tokens, dim, iterations, features.dtype, variant)
    dense_block = block  # an override also sets the tiles of the materialising sweeps
    block = token_block(tokens, features, block)
    if chosen == "sparse" and features.is_cuda and dot_upcast(features):
        block = min(block, 64)  # float32 statistics with clear counts spill at 128-token tiles
    block_d = feature_block(dim, features, block_d)
    with device_guard(features):
        norms, inv = row_norms(features)
        w = norms if weights is None else weights
        if chosen in ("stream", "sparse"):
            _stream(
                features,
                inv,
                lengths,
                w,
                threshold,
                temperature,
                iterations,
                block,
                block_d,
                out,
                chosen == "sparse",
                edge_chunk,
                persistent,
            )
        else:
            _materialize(
                features,
                inv,
                lengths,
                w,
                threshold,
                temperature,
                iterations,
                block,
                block_d,
                splits,
                out,
                dense_block,
                persistent,
            )
    return out


# --- registration ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("mrprune::_graph_scores_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _graph_scores_op(
    features: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
    iterations: int = 1,
) -> torch.Tensor:
    check_device("graph_scores", features)
    _check_dtype("graph_scores", features)
    w = None if weights is None else weights.to(torch.float32).contiguous()
    return graph_scores_triton(
        features.contiguous(), lengths.to(torch.int64).contiguous(), w, threshold, temperature, iterations
    )


@_graph_scores_op.register_fake
def _(features, lengths, weights=None, threshold=0.5, temperature=0.03, iterations=1):
    _validation.graph_scores("graph_scores", features, lengths, weights, threshold, temperature, iterations)
    _check_dtype("graph_scores", features)
    return features.new_empty(features.shape[:2], dtype=torch.float32)


def _backend(features, lengths, weights, threshold, temperature, iterations):
    return torch.ops.mrprune._graph_scores_triton(
        features.contiguous(),
        lengths.to(torch.int64).contiguous(),
        None if weights is None else weights.to(torch.float32).contiguous(),
        float(threshold),
        float(temperature),
        int(iterations),
    )


backends.register("graph_scores", "triton", _backend)
