"""Triton ``bipartite_dedup``: VisPruner's even/odd de-duplication, every round in one launch.

The spec is ``mrprune.reference.bipartite_dedup``. The cosine matrix ``S`` of each item is written once (float32,
bitwise symmetric: ``cosine_graph``'s :func:`~triton_kernels.cosine_graph.gram_store`). Then one program per item
runs all the rounds (:func:`_dedup_rounds_kernel`): with the current order in one half of a ``[B, 2, N]`` workspace,
each round scores every even position by its largest cosine to the odd positions (tiles of ``S`` gathered through
the order), ranks the evens by a stable descending comparison count (``rank_e = #{f: s_f > s_e} + #{f < e: s_f ==
s_e}``, the position a stable sort would give, so no sort is needed), and writes the next order into the other half:
the evens with rank ``>= r`` at ``rank - r``, then the odds. Barriers separate the phases; nothing leaves the program.
A round costs O(R^2 / 4) reads of ``S``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrprune import _validation, backends

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

__all__ = ["bipartite_dedup_triton"]


@triton.jit
def _dedup_rounds_kernel(S, lengths, order, score, out, N, K, per_round, stride_sb, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(lengths + b).to(tl.int32)
    s_base = S + b * stride_sb
    lanes = tl.arange(0, BLOCK)
    for p0 in range(0, n, BLOCK):  # the initial order 0, 1, ..., n - 1 in half 0
        p = p0 + lanes
        tl.store(order + b * 2 * N + p, p, mask=p < n)
    tl.debug_barrier()
    remaining = n
    half = 0
    while remaining > K:
        src = order + b * 2 * N + half * N
        dst = order + b * 2 * N + (1 - half) * N
        evens = (remaining + 1) // 2
        odds = remaining // 2
        r = tl.minimum(tl.minimum(per_round, remaining - K), evens)
        # 1. score of every even position: its largest cosine to the odd positions
        for e0 in range(0, evens, BLOCK):
            e = e0 + lanes
            ok_e = e < evens
            tok_e = tl.load(src + 2 * e, mask=ok_e, other=0)
            best = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
            for o0 in range(0, odds, BLOCK):
                o = o0 + lanes
                ok_o = o < odds
                tok_o = tl.load(src + 2 * o + 1, mask=ok_o, other=0)
                s = tl.load(
                    s_base + tok_e.to(tl.int64)[:, None] * N + tok_o[None, :],
                    mask=ok_e[:, None] & ok_o[None, :],
                    other=-float("inf"),
                )
                best = tl.maximum(best, tl.max(s, axis=1))
            tl.store(score + b * N + e, best, mask=ok_e)
        tl.debug_barrier()
        # 2. stable descending rank of each even; the kept ones (rank >= r) go to rank - r
        for e0 in range(0, evens, BLOCK):
            e = e0 + lanes
            ok_e = e < evens
            s_e = tl.load(score + b * N + e, mask=ok_e, other=0.0)
            rank = tl.zeros([BLOCK], dtype=tl.int32)
            for f0 in range(0, evens, BLOCK):
                f = f0 + lanes
                ok_f = f < evens
                s_f = tl.load(score + b * N + f, mask=ok_f, other=0.0)
                ahead = (s_f[None, :] > s_e[:, None]) | ((s_f[None, :] == s_e[:, None]) & (f[None, :] < e[:, None]))
                rank += tl.sum((ahead & ok_f[None, :]).to(tl.int32), axis=1)
            tok_e = tl.load(src + 2 * e, mask=ok_e, other=0)
            tl.store(dst + rank - r, tok_e, mask=ok_e & (rank >= r))
        # 3. the odds follow, in order
        for o0 in range(0, odds, BLOCK):
            o = o0 + lanes
            ok_o = o < odds
            tl.store(dst + evens - r + o, tl.load(src + 2 * o + 1, mask=ok_o, other=0), mask=ok_o)
        tl.debug_barrier()
        remaining -= r
        half = 1 - half
    final = order + b * 2 * N + half * N
    for p0 in range(0, tl.minimum(remaining, K), BLOCK):
        p = p0 + lanes
        ok = p < tl.minimum(remaining, K)
        tl.store(out + b * K + p, tl.load(final + p, mask=ok, other=0).to(tl.int64), mask=ok)


def bipartite_dedup_triton(
    features: torch.Tensor, lengths: torch.Tensor, k: int, per_round: int = 8, *, block: int | None = None
) -> torch.Tensor:
    """Indices ``[B, k]`` int64 (positions of the survivors in the rounds' final order, -1 past ``min(k, n_b)``) for
    contiguous ``features [B, N, D]`` (float16/bfloat16/float32) and int64 ``lengths``; see
    ``mrprune.reference.bipartite_dedup``. ``block`` overrides the tile of the rounds (tests: ranks across tiles)."""
    batch, tokens, dim = features.shape
    out = torch.full((batch, k), -1, dtype=torch.int64, device=features.device)
    if batch == 0 or k == 0:
        return out
    with device_guard(features):
        _, inv = row_norms(features)
        S = torch.empty(batch, tokens, tokens, dtype=torch.float32, device=features.device)
        gram_store(features, inv, lengths, S, token_block(tokens, features), feature_block(dim, features))
        order = torch.zeros(batch, 2, tokens, dtype=torch.int32, device=features.device)  # never an invalid token
        score = torch.empty(batch, tokens, dtype=torch.float32, device=features.device)
        if block is None:
            block = min(256, max(16, next_power_of_2((tokens + 1) // 2))) if interpreting() else 64
        _dedup_rounds_kernel[(batch,)](
            S, lengths, order, score, out, tokens, k, per_round, S.stride(0), BLOCK=block, num_warps=4, **LAUNCH_OPTIONS
        )
    return out


# --- registration ---------------------------------------------------------------------------------------------------


def _check_dtype(features: torch.Tensor) -> None:
    if features.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.bipartite_dedup: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {features.dtype}"
        )


@torch.library.custom_op("mrprune::_bipartite_dedup_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _bipartite_dedup_op(features: torch.Tensor, lengths: torch.Tensor, k: int, per_round: int = 8) -> torch.Tensor:
    check_device("bipartite_dedup", features)
    _check_dtype(features)
    return bipartite_dedup_triton(features.contiguous(), lengths.to(torch.int64).contiguous(), k, per_round)


@_bipartite_dedup_op.register_fake
def _(features, lengths, k, per_round=8):
    _validation.bipartite_dedup("bipartite_dedup", features, lengths, k, per_round)
    _check_dtype(features)
    return features.new_empty(features.shape[0], k, dtype=torch.int64)


def _backend(features, lengths, k, per_round):
    return torch.ops.mrprune._bipartite_dedup_triton(
        features.contiguous(), lengths.to(torch.int64).contiguous(), int(k), int(per_round)
    )


backends.register("bipartite_dedup", "triton", _backend)
