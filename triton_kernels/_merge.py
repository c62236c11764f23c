"""Triton pieces shared by the token-merging ops (``bipartite_merge``, ``assign_merge``).

* :func:`best_match`: for listed rows of each item, the first listed column of largest cosine (``metric`` rows in
  their storage dtype, float32 accumulation, the cosine as ``dot * (inv_i * inv_j)`` like the C++ kernels): ToMe's and
  VisPruner's even/odd matching (rows = even positions, columns = odd positions) and VisionZip's target assignment
  (rows = all tokens, columns = the targets in slot order). One program per row tile and item streams the column
  tiles with a running maximum: no similarity matrix.
* :func:`segment_sum`: ``out[s] = sum_e coef[e] * x[row[e]]`` over the entries ``e`` of output row ``s`` (CSR), summed
  in float32 in entry order (deterministic, no atomics) and written in ``x``'s dtype. A single entry with
  coefficient 1 copies its row exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, device_guard, dot_upcast, interpreting, next_power_of_2

__all__ = ["best_match", "segment_sum", "csr_order"]


@triton.jit
def _best_match_kernel(
    x,
    inv,
    rows,
    cols,
    best,
    arg,
    R,
    C,
    N,
    D,
    stride_xb,
    stride_xn,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_idx = tl.load(rows + b * R + offs_r, mask=offs_r < R, other=-1).to(tl.int64)
    r_ok = r_idx >= 0
    inv_r = tl.load(inv + b * N + r_idx, mask=r_ok, other=0.0)
    x_b = x + b * stride_xb
    offs_d = tl.arange(0, BLOCK_D)
    running = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    where = tl.zeros((BLOCK_R,), tl.int64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_idx = tl.load(cols + b * C + offs_c, mask=offs_c < C, other=-1).to(tl.int64)
        c_ok = c_idx >= 0
        inv_c = tl.load(inv + b * N + c_idx, mask=c_ok, other=0.0)
        acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + offs_d) < D
            a = tl.load(x_b + r_idx[:, None] * stride_xn + (d0 + offs_d)[None, :], mask=r_ok[:, None] & d_ok[None, :])
            bt = tl.load(x_b + c_idx[None, :] * stride_xn + (d0 + offs_d)[:, None], mask=d_ok[:, None] & c_ok[None, :])
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc += tl.dot(a, bt, input_precision="ieee")
        cos = acc * (inv_r[:, None] * inv_c[None, :])
        cos = tl.where(c_ok[None, :] & r_ok[:, None], cos, float("-inf"))
        tile_best = tl.max(cos, axis=1)
        tile_arg = tl.argmax(cos, axis=1, tie_break_left=True).to(tl.int64)
        better = tile_best > running  # strict: the first maximum over the column tiles
        where = tl.where(better, c0 + tile_arg, where)
        running = tl.where(better, tile_best, running)
    tl.store(best + b * R + offs_r, running, mask=offs_r < R)
    tl.store(arg + b * R + offs_r, where, mask=offs_r < R)


def best_match(
    metric: torch.Tensor, inv: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``metric [B, N, C]`` (contiguous, float16/bfloat16/float32), ``inv [B, N]`` float32 inverse norms, ``rows
    [B, R]`` and ``cols [B, S]`` int64 positions (-1: none) → ``best [B, R]`` float32 (``-inf`` for a row without
    columns or a -1 row) and ``arg [B, R]`` int64 (the column *slot*, first maximum; 0 when ``best`` is ``-inf``)."""
    batch, tokens, dim = metric.shape
    r_count, c_count = rows.shape[1], cols.shape[1]
    best = torch.empty(batch, r_count, dtype=torch.float32, device=metric.device)
    arg = torch.empty(batch, r_count, dtype=torch.int64, device=metric.device)
    if batch == 0 or r_count == 0:
        return best, arg
    if interpreting() or metric.device.type != "cuda":
        block_r = min(64, max(16, next_power_of_2(r_count)))
        block_c = min(64, max(16, next_power_of_2(c_count)))
    else:
        block_r, block_c = 64, 64
    upcast = dot_upcast(metric)
    block_d = min(32 if upcast else 64, max(16, next_power_of_2(dim)))  # float32 tiles at 64 spill on sm_90
    with device_guard(metric):
        _best_match_kernel[(triton.cdiv(r_count, block_r), batch)](
            metric,
            inv,
            rows,
            cols,
            best,
            arg,
            r_count,
            c_count,
            tokens,
            dim,
            metric.stride(0),
            metric.stride(1),
            BLOCK_R=block_r,
            BLOCK_C=block_c,
            BLOCK_D=block_d,
            UPCAST=upcast,
            num_warps=4,
            **LAUNCH_OPTIONS,
        )
    return best, arg


@triton.jit
def _segment_sum_kernel(x, entry_rows, entry_coef, offsets, out, D, BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    start = tl.load(offsets + s)
    end = tl.load(offsets + s + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for e in range(start, end):
        row = tl.load(entry_rows + e)
        coef = tl.load(entry_coef + e)
        acc += coef * tl.load(x + row * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    tl.store(out + s * D + offs_d, acc.to(out.dtype.element_ty), mask=d_ok)


def csr_order(segment: torch.Tensor, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group entries by output row without a host synchronisation (no boolean indexing, no ``bincount``): ``segment``
    (int64 ``[E]``, ``-1`` for an entry that belongs nowhere) → ``order [E]`` (a stable sort: each segment's entries
    in their given order, the ``-1`` entries last) and ``offsets [segments + 1]`` (segment ``s`` owns sorted entries
    ``offsets[s] .. offsets[s + 1]``)."""
    key = torch.where(segment >= 0, segment, segments)
    ordered = torch.sort(key, stable=True)
    bounds = torch.arange(segments + 1, device=segment.device, dtype=key.dtype)
    return ordered.indices, torch.searchsorted(ordered.values, bounds)


def segment_sum(
    x: torch.Tensor, entry_rows: torch.Tensor, entry_coef: torch.Tensor, offsets: torch.Tensor, segments: int
) -> torch.Tensor:
    """``x [R, D]`` contiguous rows, entries (``entry_rows`` int64 and ``entry_coef`` float32 ``[E]``, grouped by
    segment in summation order), ``offsets [segments + 1]`` → ``out [segments, D]`` in ``x.dtype``."""
    dim = x.shape[1]
    out = torch.empty(segments, dim, dtype=x.dtype, device=x.device)
    if segments == 0 or dim == 0:
        return out
    block_d = min(256, max(16, next_power_of_2(dim)))
    with device_guard(x):
        _segment_sum_kernel[(segments, triton.cdiv(dim, block_d))](
            x, entry_rows, entry_coef, offsets, out, dim, BLOCK_D=block_d, num_warps=4, **LAUNCH_OPTIONS
        )
    return out
