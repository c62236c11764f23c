"""Triton ``transfer_scores``: MR-Pruner's cross-resolution transfer as one streaming pass per query block.

The spec is ``mrprune.reference.transfer_scores`` (research/algorithms.md §2.5): for query ``i`` and the selected keys
``k`` (``key_mask``), ``Q_ik`` is the row softmax of ``S_ik / T`` on edges (``S_ik >= threshold``) and -5000 on the
other selected keys, ``dc_i`` the edge count (or the number of selected keys when there is no edge), and
``prop_i = (sum_k w_k Q_ik) / dc_i``; 0 for padded queries and for items without selected keys.

This is an attention forward pass with a one-dimensional value ``w_k`` (research/algorithms.md §2.8): one program per
block of queries and range of key tiles (:func:`_transfer_kernel`) computes the cosine tiles (``BLOCK_D``-tiled dot
of the raw rows, scaled by both inverse norms) and keeps, per query, the running max logit, the rescaled sums
``sum exp(z - max)`` and ``sum w_k exp(z - max)`` and the edge count, in a single pass. Unselected and padded keys get
logit ``-inf`` (out of the softmax), selected non-edges -5000 (in it, exactly as the spec: a query without edges
averages the weights uniformly, and one whose edge logits all lie far below -5000 puts its mass on the non-edges).
When the query blocks alone do not fill the GPU the keys are split over several programs (flash-decoding style); each
writes its partial statistics to a ``[B, splits, M]`` buffer and :func:`_transfer_combine_kernel` merges them.
"""

import torch
import triton
import triton.language as tl

from mrprune import _validation, backends

from ._common import (
    LAUNCH_OPTIONS,
    Launcher,
    check_device,
    device_guard,
    dot_upcast,
    edge_logits,
    feature_block,
    gram_tile,
    interpreting,
    next_power_of_2,
    num_programs_target,
    row_norms,
    token_block,
    token_block_cuda,
)
from .cosine_graph import _check_dtype

__all__ = ["cuda_tiles", "transfer_scores_triton"]


@triton.jit
def _transfer_kernel(
    q,
    k,
    q_inv,
    k_inv,
    k_weights,
    k_mask,
    q_lengths,
    part_m,
    part_l,
    part_a,
    part_c,
    M,
    N,
    D,
    stride_qb,
    stride_kb,
    stride_n,
    stride_pb,
    stride_ps,
    TILES_PER_SPLIT,
    threshold,
    temperature,
    N_BUCKET,
    D_BUCKET,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    m_len = tl.load(q_lengths + b).to(tl.int32)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m_len
    if pid * BLOCK_M < m_len:
        r_q = tl.load(q_inv + b * M + rows, mask=row_ok, other=0.0)
        q_base = q + b * stride_qb
        k_base = k + b * stride_kb
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        mass = tl.zeros([BLOCK_M], dtype=tl.float32)
        edges = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_begin = split * TILES_PER_SPLIT * BLOCK_N
        k_end = tl.minimum(k_begin + TILES_PER_SPLIT * BLOCK_N, N)
        offs_n = tl.arange(0, BLOCK_N)
        for k0 in range(k_begin, k_end, BLOCK_N):
            cols = k0 + offs_n
            at = b * N + cols
            col_ok = cols < k_end
            selected = (tl.load(k_mask + at, mask=col_ok, other=0) != 0) & col_ok
            acc = gram_tile(
                q_base, k_base, rows, cols, row_ok, selected, D, stride_n, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST
            )
            r_k = tl.load(k_inv + at, mask=selected, other=0.0)
            w = tl.load(k_weights + at, mask=selected, other=0.0)
            z, edge = edge_logits(
                acc * (r_q[:, None] * r_k[None, :]), row_ok[:, None] & selected[None, :], threshold, temperature
            )
            # m stays -inf until a selected key shows up (also in the stored partial: a split without selected
            # keys must not pull the combined max up); m_safe is the finite subtrahend for the exponentials
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(z - m_safe[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            mass = mass * alpha + tl.sum(p * w[None, :], axis=1)
            edges += tl.sum(edge.to(tl.float32), axis=1)
            m = m_new
        out = b * stride_pb + split.to(tl.int64) * stride_ps + rows
        tl.store(part_m + out, m, mask=row_ok)
        tl.store(part_l + out, total, mask=row_ok)
        tl.store(part_a + out, mass, mask=row_ok)
        tl.store(part_c + out, edges, mask=row_ok)


@triton.jit
def _transfer_combine_kernel(
    part_m,
    part_l,
    part_a,
    part_c,
    q_lengths,
    selected_count,
    out,
    M,
    stride_pb,
    stride_ps,
    SPLITS,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m_len = tl.load(q_lengths + b).to(tl.int32)
    n_sel = tl.load(selected_count + b).to(tl.float32)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < tl.where(n_sel > 0, m_len, 0)  # no selected key: prop = 0
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    mass = tl.zeros([BLOCK_R], dtype=tl.float32)
    edges = tl.zeros([BLOCK_R], dtype=tl.float32)
    at = b * stride_pb + rows
    for _ in range(0, SPLITS):
        m_s = tl.load(part_m + at, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        beta = tl.exp(m_s - m_safe)
        total = total * alpha + tl.load(part_l + at, mask=row_ok, other=0.0) * beta
        mass = mass * alpha + tl.load(part_a + at, mask=row_ok, other=0.0) * beta
        edges += tl.load(part_c + at, mask=row_ok, other=0.0)
        m = m_new
        at += stride_ps
    degree = tl.where(edges > 0, edges, n_sel)
    prop = tl.where(row_ok, (mass / tl.where(row_ok, total, 1.0)) / tl.where(row_ok, degree, 1.0), 0.0)
    tl.store(out + b * M + rows, prop, mask=rows < M)


def cuda_tiles(queries_n: int, keys_n: int, upcast: bool) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` on a GPU: the token tiles of the queries and the keys, except that float32 operands
    never get a 128 x 128 tile (it spills in every config on sm_90)."""
    block_m, block_n = token_block_cuda(queries_n), token_block_cuda(keys_n)
    if upcast and min(block_m, block_n) > 64:
        block_m = 64
    return block_m, block_n


def _config_ok(constexprs: dict, bd: int, warps: int, stages: int) -> bool:
    """Configs of :func:`_transfer_kernel` that compile without spills on sm_90 (``scripts/check_triton_compile.py``
    checks every one kept). The kernel holds more per row than the symmetric ones (running max, two rescaled sums,
    edge count), so it needs 8 warps with a 128-token tile, and with float32 operands (FMA dot: the whole BLOCK_D
    slice in registers) at most 32 features per step with 3 stages, or 16."""
    bm, bn, upcast = constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["UPCAST"]
    if upcast:
        return warps == 8 and stages == 3 and bd <= 32 and min(bm, bn) <= 64
    if max(bm, bn) >= 128:
        return warps == 8 and (bd <= 64 or min(bm, bn) <= 64)
    return True


def _fixed_config(constexprs: dict) -> tuple[int, int, int]:
    """``(BLOCK_D, num_warps, num_stages)`` of :func:`_transfer_kernel` without autotuning on a GPU."""
    bm, bn, upcast = constexprs["BLOCK_M"], constexprs["BLOCK_N"], constexprs["UPCAST"]
    if upcast:
        return 16, 8, 3
    return 64, (8 if max(bm, bn) >= 128 else 4), 3


#: No spill is allowed in any kernel of this module (scripts/check_triton_compile.py).
SPILL_ALLOWANCES: dict[str, tuple[int, str]] = {}

_transfer = Launcher(_transfer_kernel, key=["N_BUCKET", "D_BUCKET"], config_ok=_config_ok, fixed_config=_fixed_config)


def transfer_scores_triton(
    queries: torch.Tensor,
    query_lengths: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    key_weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
    *,
    block: int | None = None,
    block_d: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """``prop [B, M]`` float32 for contiguous ``queries [B, M, D]``, ``keys [B, N, D]`` (float16/bfloat16/float32),
    int64 ``query_lengths``, bool ``key_mask [B, N]`` and optional float32 ``key_weights [B, N]``; see
    ``mrprune.reference.transfer_scores``. ``block`` (query and key tile), ``block_d`` and ``splits`` (key ranges per
    query block) override the automatic choices."""
    batch, queries_n, dim = queries.shape
    keys_n = keys.shape[1]
    if batch == 0 or queries_n == 0 or keys_n == 0:
        return torch.zeros(batch, queries_n, dtype=torch.float32, device=queries.device)
    out = torch.empty(batch, queries_n, dtype=torch.float32, device=queries.device)  # the combine writes every entry
    block_m = token_block(queries_n, queries, block)
    block_n = token_block(keys_n, keys, block)
    if block is None and queries.device.type == "cuda" and not interpreting():
        block_m, block_n = cuda_tiles(queries_n, keys_n, dot_upcast(queries, keys))
    block_d = feature_block(dim, queries, block_d)
    q_blocks, key_tiles = triton.cdiv(queries_n, block_m), triton.cdiv(keys_n, block_n)
    if splits is None:
        splits = num_programs_target(queries) // max(q_blocks * batch, 1)
    splits = min(max(splits, 1), key_tiles)
    tiles_per_split = triton.cdiv(key_tiles, splits)
    splits = triton.cdiv(key_tiles, tiles_per_split)
    with device_guard(queries):
        _, q_inv = row_norms(queries)
        k_norms, k_inv = row_norms(keys)
        w = k_norms if key_weights is None else key_weights
        mask = key_mask.contiguous().view(torch.uint8)
        selected = key_mask.sum(dim=1)
        parts = [torch.empty(batch, splits, queries_n, dtype=torch.float32, device=queries.device) for _ in range(4)]
        _transfer(
            (q_blocks, splits, batch),
            queries,
            keys,
            q_inv,
            k_inv,
            w,
            mask,
            query_lengths,
            *parts,
            queries_n,
            keys_n,
            dim,
            queries.stride(0),
            keys.stride(0),
            dim,
            parts[0].stride(0),
            parts[0].stride(1),
            tiles_per_split,
            threshold,
            temperature,
            next_power_of_2(keys_n),
            next_power_of_2(dim),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            UPCAST=dot_upcast(queries, keys),
            like=queries,
            block_d=block_d,
        )
        block_r = min(128, max(16, next_power_of_2(queries_n)))
        _transfer_combine_kernel[(triton.cdiv(queries_n, block_r), batch)](
            *parts,
            query_lengths,
            selected,
            out,
            queries_n,
            parts[0].stride(0),
            parts[0].stride(1),
            splits,
            BLOCK_R=block_r,
            num_warps=4,
            **LAUNCH_OPTIONS,
        )
    return out


# --- registration ---------------------------------------------------------------------------------------------------


@torch.library.custom_op("mrprune::_transfer_scores_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _transfer_scores_op(
    queries: torch.Tensor,
    query_lengths: torch.Tensor,
    keys: torch.Tensor,
    key_mask: torch.Tensor,
    key_weights: torch.Tensor | None = None,
    threshold: float = 0.5,
    temperature: float = 0.03,
) -> torch.Tensor:
    check_device("transfer_scores", queries)
    _check_dtype("transfer_scores", queries)
    _check_dtype("transfer_scores", keys)
    w = None if key_weights is None else key_weights.to(torch.float32).contiguous()
    return transfer_scores_triton(
        queries.contiguous(),
        query_lengths.to(torch.int64).contiguous(),
        keys.contiguous(),
        key_mask.contiguous(),
        w,
        threshold,
        temperature,
    )


@_transfer_scores_op.register_fake
def _(queries, query_lengths, keys, key_mask, key_weights=None, threshold=0.5, temperature=0.03):
    _validation.transfer_scores(
        "transfer_scores", queries, query_lengths, keys, key_mask, key_weights, threshold, temperature
    )
    _check_dtype("transfer_scores", queries)
    _check_dtype("transfer_scores", keys)
    return queries.new_empty(queries.shape[:2], dtype=torch.float32)


def _backend(queries, query_lengths, keys, key_mask, key_weights, threshold, temperature):
    return torch.ops.mrprune._transfer_scores_triton(
        queries.contiguous(),
        query_lengths.to(torch.int64).contiguous(),
        keys.contiguous(),
        key_mask.contiguous(),
        None if key_weights is None else key_weights.to(torch.float32).contiguous(),
        float(threshold),
        float(temperature),
    )


backends.register("transfer_scores", "triton", _backend)
