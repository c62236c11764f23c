"""Triton ``received_attention``: head-averaged column sums of ``softmax(q k^T * scale)``, streamed from ``q`` and
``k`` in two passes, O(B H N) extra memory, never an ``N x N`` tile buffer.

The spec is ``mrprune.reference.received_attention``: ``scores[b, j] = (1 / H) sum_h sum_i P_h[i, j]`` with
``P_h`` the row softmax of ``scale * q_h k_h^T`` over the keys a query may attend (valid, same segment).

1. Statistics pass (:func:`_row_stats_kernel`, one program per query tile, head and item): flash-attention style
   online softmax over the key tiles, giving each query row's max logit ``m_i`` and ``l_i = sum_j exp(z_ij - m_i)``.
2. Column pass (:func:`_column_kernel`, one program per key tile, head and item): recomputes the logit tiles against
   every query tile and sums ``exp(z_ij - m_i) / l_i`` over the rows into the tile's columns, written to a
   ``[B, H, N]`` partial buffer (no atomics: deterministic); the head mean is one ``torch.mean`` over it.

Segments (Qwen2.5-VL's ``cu_seqlens`` / ``cu_window_seqlens`` blocks as ``segment_ids``) are masked exactly
(``seg_i == seg_j``) and also skip work: each tile only visits the tiles from the first to the last one whose segment
id range overlaps its own (:func:`tile_ranges`, computed on the device without a host sync). For sorted ids, the
layout Qwen2.5-VL uses, that is the block-diagonal band; for unsorted ids it is a correct superset.

Values are loaded in their storage dtype; the dot runs on raw float16/bfloat16 operands on GPUs (exact products,
float32 accumulation) and on float32 otherwise (float32 input, and bfloat16 under the interpreter, whose bfloat16
arithmetic is wrong: ``dot_upcast``), accumulated over the head dimension in ``BLOCK_D`` steps (the whole head for
half operands; 32 features for float32 ones, whose FMA dot would spill with the whole head: :func:`launch_config`).
Every softmax quantity is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrprune import _validation, backends

from ._common import LAUNCH_OPTIONS, check_device, device_guard, dot_upcast, interpreting, next_power_of_2

__all__ = ["launch_config", "received_attention_triton", "tile_ranges"]


def _block(tokens: int, t: torch.Tensor, override: int | None) -> int:
    if override is not None:
        if override < 16 or override & (override - 1):
            raise ValueError(f"token block must be a power of two >= 16, got {override}")
        return override
    if interpreting() or t.device.type != "cuda":
        return min(128, max(16, next_power_of_2(tokens)))
    return 64


def launch_config(dim: int, upcast: bool, on_gpu: bool) -> tuple[int, int]:
    """``(BLOCK_D, num_warps)`` of both kernels: ``BLOCK_D`` is the head-dimension step of the logit dots. Half
    operands on a GPU take the whole head in one wgmma dot with 4 warps. Float32 operands take Triton's FMA dot,
    which keeps the whole ``BLOCK_D`` slice of both 64-token operands in registers: they step by 32 features with
    8 warps (a 128-feature step spills kilobytes on sm_90, and the segment-masked column pass still spills with
    4 warps; ``scripts/check_triton_compile.py``). The interpreter takes the whole head (fewest interpreted steps)."""
    whole = max(16, next_power_of_2(dim))
    if upcast and on_gpu:
        return min(32, whole), 8
    return whole, 4


def tile_ranges(segment_ids: torch.Tensor | None, lengths: torch.Tensor, tokens: int, block: int) -> torch.Tensor:
    """``[B, T, 2]`` int32 (``T = ceil(N / block)``): for each tile, the first and one-past-the-last tile whose valid
    tokens' segment ids overlap its own id range (all of ``[0, ceil(n_b / block))`` without segments; ``(0, 0)`` for
    tiles past ``n_b``). The relation is symmetric, so it serves both passes."""
    batch = lengths.shape[0]
    tiles = triton.cdiv(tokens, block)
    device = lengths.device
    live = (lengths[:, None] + block - 1) // block  # [B, 1] live tiles per item
    index = torch.arange(tiles, device=device)
    if segment_ids is None:
        valid = index[None, :] < live
        first = torch.zeros(batch, tiles, dtype=torch.int64, device=device)
        last = live.expand(batch, tiles)
    else:
        pad = tiles * block - tokens
        positions = torch.arange(tiles * block, device=device)
        ok = positions[None, :] < lengths[:, None]
        ids = torch.nn.functional.pad(segment_ids.to(torch.int64), (0, pad))
        big = torch.iinfo(torch.int64).max
        low = torch.where(ok, ids, big).view(batch, tiles, block).amin(dim=-1)
        high = torch.where(ok, ids, -big).view(batch, tiles, block).amax(dim=-1)
        valid = low <= high  # the tile has a valid token
        overlap = (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])
        overlap &= valid[:, :, None] & valid[:, None, :]
        first = overlap.int().argmax(dim=-1)
        last = tiles - overlap.flip(-1).int().argmax(dim=-1)
    ranges = torch.stack([torch.where(valid, first, 0), torch.where(valid, last, 0)], dim=-1)
    return ranges.to(torch.int32).contiguous()


@triton.jit
def _logits(
    q_base,
    k_base,
    seg_base,
    offs_m,
    offs_j,
    own_seg,
    row_ok,
    n,
    scale,
    stride_n,
    D,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SEG: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``[BLOCK_M, BLOCK_N]`` float32 logits ``scale * q k^T`` of the query rows ``offs_m`` against the keys
    ``offs_j``, accumulated over the head dimension in ``BLOCK_D`` steps; ``-inf`` where the key is padding, in
    another segment, or the row is invalid."""
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_j < n
    q_ptrs = q_base + (offs_m.to(tl.int64)[:, None] * stride_n + offs_d[None, :])
    k_ptrs = k_base + (offs_d[:, None] + offs_j.to(tl.int64)[None, :] * stride_n)
    z = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = (d0 + offs_d) < D
        qt = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        z = tl.dot(qt, kt, z, input_precision="ieee")
        q_ptrs += BLOCK_D
        k_ptrs += BLOCK_D
    z = z * scale
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_SEG:
        key_seg = tl.load(seg_base + offs_j, mask=col_ok, other=-1)
        ok = ok & (own_seg[:, None] == key_seg[None, :])
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _row_segments(seg_base, offs, n, HAS_SEG: tl.constexpr):
    """The rows' validity and segment ids (``-2`` on padding; zeros without segments)."""
    ok = offs < n
    seg = tl.zeros_like(offs).to(tl.int64)
    if HAS_SEG:
        seg = tl.load(seg_base + offs, mask=ok, other=-2)
    return seg, ok


@triton.jit
def _row_stats_kernel(
    q,
    k,
    seg,
    lengths,
    ranges,
    row_max,
    row_sum,
    N,
    D,
    H,
    stride_qb,
    stride_qh,
    stride_qn,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SEG: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    if tile * BLOCK_M < n:
        head = b * stride_qb + h * stride_qh
        seg_base = seg + b * N
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        own_seg, row_ok = _row_segments(seg_base, offs_m, n, HAS_SEG)
        ranges_at = ranges + (b * tl.cdiv(N, BLOCK_M) + tile) * 2
        first = tl.load(ranges_at)
        last = tl.load(ranges_at + 1)
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for kt in range(first, last):
            offs_j = kt * BLOCK_N + tl.arange(0, BLOCK_N)
            z = _logits(
                q + head, k + head, seg_base, offs_m, offs_j, own_seg, row_ok, n, scale, stride_qn, D,
                BLOCK_M, BLOCK_N, BLOCK_D, HAS_SEG, UPCAST,
            )  # fmt: skip
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
            m = m_new
        out = (b * H + h) * N + offs_m
        tl.store(row_max + out, tl.where(row_ok, m, 0.0), mask=offs_m < N)
        tl.store(row_sum + out, tl.where(row_ok, total, 1.0), mask=offs_m < N)


@triton.jit
def _column_kernel(
    q,
    k,
    seg,
    lengths,
    ranges,
    row_max,
    row_sum,
    part,
    N,
    D,
    H,
    stride_qb,
    stride_qh,
    stride_qn,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_SEG: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    offs_j = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if tile * BLOCK_N < n:
        head = b * stride_qb + h * stride_qh
        seg_base = seg + b * N
        stats = (b * H + h) * N
        ranges_at = ranges + (b * tl.cdiv(N, BLOCK_N) + tile) * 2
        first = tl.load(ranges_at)
        last = tl.load(ranges_at + 1)
        for qt in range(first, last):
            offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
            own_seg, row_ok = _row_segments(seg_base, offs_m, n, HAS_SEG)
            z = _logits(
                q + head, k + head, seg_base, offs_m, offs_j, own_seg, row_ok, n, scale, stride_qn, D,
                BLOCK_M, BLOCK_N, BLOCK_D, HAS_SEG, UPCAST,
            )  # fmt: skip
            m = tl.load(row_max + stats + offs_m, mask=row_ok, other=0.0)
            inv = 1.0 / tl.load(row_sum + stats + offs_m, mask=row_ok, other=1.0)
            acc += tl.sum(tl.exp(z - m[:, None]) * inv[:, None], axis=0)  # exp(-inf) = 0 off the mask
    tl.store(part + (b * H + h) * N + offs_j, acc, mask=offs_j < N)


def received_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    block: int | None = None,
    block_d: int | None = None,
) -> torch.Tensor:
    """Scores ``[B, N]`` float32 for contiguous ``q, k [B, H, N, d]`` (float16/bfloat16/float32, the same dtype),
    int64 ``lengths`` and optional int64 ``segment_ids [B, N]``; see ``mrprune.reference.received_attention``.
    ``block`` overrides the query/key tile and ``block_d`` the head-dimension step (tests)."""
    batch, heads, tokens, dim = q.shape
    if batch == 0 or tokens == 0:
        return torch.zeros(batch, tokens, dtype=torch.float32, device=q.device)
    scale = dim**-0.5 if scale is None else float(scale)
    block = _block(tokens, q, block)
    upcast = dot_upcast(q)
    default_d, warps = launch_config(dim, upcast, q.device.type == "cuda" and not interpreting())
    if block_d is None:
        block_d = default_d
    elif block_d < 16 or block_d & (block_d - 1):
        raise ValueError(f"head block must be a power of two >= 16, got {block_d}")
    tiles = triton.cdiv(tokens, block)
    with device_guard(q):
        ranges = tile_ranges(segment_ids, lengths, tokens, block)
        seg = segment_ids if segment_ids is not None else lengths  # a dummy pointer when HAS_SEG is off
        row_max = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
        row_sum = torch.empty_like(row_max)
        part = torch.empty_like(row_max)
        grid = (tiles, heads, batch)
        common = dict(
            BLOCK_M=block,
            BLOCK_N=block,
            BLOCK_D=block_d,
            HAS_SEG=segment_ids is not None,
            UPCAST=upcast,
            num_warps=warps,
            **LAUNCH_OPTIONS,
        )
        sizes = (tokens, dim, heads, q.stride(0), q.stride(1), q.stride(2), scale)
        _row_stats_kernel[grid](q, k, seg, lengths, ranges, row_max, row_sum, *sizes, **common)
        _column_kernel[grid](q, k, seg, lengths, ranges, row_max, row_sum, part, *sizes, **common)
    return part.mean(dim=1)


# --- registration ---------------------------------------------------------------------------------------------------


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.received_attention: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {q.dtype}"
        )


@torch.library.custom_op("mrprune::_received_attention_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _received_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    lengths: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    check_device("received_attention", q)
    _check_dtype(q)
    seg = None if segment_ids is None else segment_ids.to(torch.int64).contiguous()
    return received_attention_triton(q.contiguous(), k.contiguous(), lengths.to(torch.int64).contiguous(), seg, scale)


@_received_attention_op.register_fake
def _(q, k, lengths, segment_ids=None, scale=None):
    _validation.received_attention("received_attention", q, k, lengths, segment_ids, scale)
    _check_dtype(q)
    return q.new_empty(q.shape[0], q.shape[2], dtype=torch.float32)


def _backend(q, k, lengths, segment_ids, scale):
    return torch.ops.mrprune._received_attention_triton(
        q.contiguous(),
        k.contiguous(),
        lengths.to(torch.int64).contiguous(),
        None if segment_ids is None else segment_ids.to(torch.int64).contiguous(),
        None if scale is None else float(scale),
    )


backends.register("received_attention", "triton", _backend)
