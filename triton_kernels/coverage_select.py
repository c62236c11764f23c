"""Triton ``coverage_select``: SCOPE's saliency-weighted greedy coverage, all ``k`` steps in one launch.

The spec is ``mrprune.reference.coverage_select``. The cosine matrix ``S`` of each item is written once (float32,
bitwise symmetric: ``cosine_graph``'s :func:`~triton_kernels.cosine_graph.gram_store`, from the raw half or float32
features and float32 inverse norms; the diagonal set to exactly 1 for non-zero tokens, as the spec says). Then one
program per item runs the greedy (:func:`_coverage_greedy_kernel`): each step sweeps ``S`` in tiles to form every
gain ``sum_i max(0, S_ij - cur_i)``, takes the first maximum of ``gain_j * w_j`` over the unpicked tokens, and
raises ``cur`` to the picked row. The coverage ``cur`` and the picked flags live in a small global workspace
(``[B, N]``) that only this program touches, behind a barrier between steps. A step is O(N^2) reads from L2/HBM;
one program per item is the layout without cross-program synchronisation (the C++ kernel's lazy greedy does not map
to a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrprune import _validation, backends, reference

from ._common import (
    LAUNCH_OPTIONS,
    check_device,
    device_guard,
    feature_block,
    interpreting,
    next_power_of_2,
    row_norms,
    token_block,
)
from .cosine_graph import gram_store

__all__ = ["coverage_select_triton"]


@triton.jit
def _coverage_greedy_kernel(
    S,
    weights,
    lengths,
    cur,
    picked,
    out,
    N,
    K,
    stride_sb,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    steps = tl.minimum(n, K)
    s_base = S + b * stride_sb
    state = b * N
    offs_i = tl.arange(0, BLOCK_I)
    offs_j = tl.arange(0, BLOCK_J)
    for i0 in range(0, n, BLOCK_I):  # cur = 0, nothing picked
        rows = i0 + offs_i
        tl.store(cur + state + rows, tl.zeros([BLOCK_I], dtype=tl.float32), mask=rows < n)
        tl.store(picked + state + rows, tl.zeros([BLOCK_I], dtype=tl.int8), mask=rows < n)
    tl.debug_barrier()
    for t in range(0, steps):
        best = -float("inf")
        best_j = 0
        for j0 in range(0, n, BLOCK_J):
            cols = j0 + offs_j
            col_ok = cols < n
            gain = tl.zeros([BLOCK_J], dtype=tl.float32)
            for i0 in range(0, n, BLOCK_I):
                rows = i0 + offs_i
                row_ok = rows < n
                s = tl.load(
                    s_base + rows.to(tl.int64)[:, None] * N + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                c = tl.load(cur + state + rows, mask=row_ok, other=0.0)
                gain += tl.sum(tl.maximum(s - c[:, None], 0.0), axis=0)
            w = tl.load(weights + state + cols, mask=col_ok, other=0.0)
            taken = tl.load(picked + state + cols, mask=col_ok, other=1)
            score = tl.where(col_ok & (taken == 0), gain * w, -float("inf"))
            tile_best = tl.max(score, axis=0)
            # the first maximum of the tile (lowest index), and the earlier tile on an equal score
            tile_j = tl.min(tl.where(score == tile_best, cols, N), axis=0)
            if tile_best > best:
                best = tile_best
                best_j = tile_j
        tl.store(out + b * K + t, best_j.to(tl.int64))
        tl.store(picked + state + best_j, 1)
        row = s_base + best_j.to(tl.int64) * N  # S is bitwise symmetric: row best_j is column best_j
        for i0 in range(0, n, BLOCK_I):
            rows = i0 + offs_i
            row_ok = rows < n
            c = tl.load(cur + state + rows, mask=row_ok, other=0.0)
            s = tl.load(row + rows, mask=row_ok, other=0.0)
            tl.store(cur + state + rows, tl.maximum(c, s), mask=row_ok)
        tl.debug_barrier()


def coverage_select_triton(
    features: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    saliency: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    block: int | None = None,
) -> torch.Tensor:
    """Indices ``[B, k]`` int64 in pick order (-1 past ``n_b``) for contiguous ``features [B, N, D]``
    (float16/bfloat16/float32), int64 ``lengths`` and optional float32 ``saliency [B, N]``; see
    ``mrprune.reference.coverage_select``. ``block`` overrides the sweep tile (tests: ties across tiles)."""
    batch, tokens, dim = features.shape
    out = torch.full((batch, k), -1, dtype=torch.int64, device=features.device)
    if batch == 0 or k == 0:
        return out
    with device_guard(features):
        norms, inv = row_norms(features)
        S = torch.empty(batch, tokens, tokens, dtype=torch.float32, device=features.device)
        gram_store(features, inv, lengths, S, token_block(tokens, features), feature_block(dim, features))
        diagonal = S.diagonal(dim1=1, dim2=2)
        diagonal.copy_(torch.where(norms >= reference.NORM_EPS, 1.0, diagonal))
        if saliency is None:
            weights = torch.ones(batch, tokens, dtype=torch.float32, device=features.device)
        else:
            weights = saliency.to(torch.float32) ** alpha
        cur = torch.empty(batch, tokens, dtype=torch.float32, device=features.device)
        picked = torch.empty(batch, tokens, dtype=torch.int8, device=features.device)
        if block is None:
            block = min(256, max(16, next_power_of_2(tokens))) if interpreting() else 64
        _coverage_greedy_kernel[(batch,)](
            S, weights.contiguous(), lengths, cur, picked, out, tokens, k, S.stride(0),
            BLOCK_I=block, BLOCK_J=block, num_warps=4, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return out


# --- registration ---------------------------------------------------------------------------------------------------


def _check_dtype(features: torch.Tensor) -> None:
    if features.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.coverage_select: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {features.dtype}"
        )


@torch.library.custom_op("mrprune::_coverage_select_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _coverage_select_op(
    features: torch.Tensor,
    lengths: torch.Tensor,
    k: int,
    saliency: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    check_device("coverage_select", features)
    _check_dtype(features)
    sal = None if saliency is None else saliency.to(torch.float32).contiguous()
    return coverage_select_triton(features.contiguous(), lengths.to(torch.int64).contiguous(), k, sal, alpha)


@_coverage_select_op.register_fake
def _(features, lengths, k, saliency=None, alpha=1.0):
    _validation.coverage_select("coverage_select", features, lengths, k, saliency, alpha)
    _check_dtype(features)
    return features.new_empty(features.shape[0], k, dtype=torch.int64)


def _backend(features, lengths, k, saliency, alpha):
    return torch.ops.mrprune._coverage_select_triton(
        features.contiguous(),
        lengths.to(torch.int64).contiguous(),
        int(k),
        None if saliency is None else saliency.to(torch.float32).contiguous(),
        float(alpha),
    )


backends.register("coverage_select", "triton", _backend)
