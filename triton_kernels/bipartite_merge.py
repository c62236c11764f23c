"""Triton ``bipartite_merge`` (ToMe): the even/odd best-match kernel (:func:`._merge.best_match`, no similarity
matrix) and the deterministic segment-sum kernel (:func:`._merge.segment_sum`) around a few batched torch ops for the
ranking (a stable sort of the even tokens' scores per item) and the slot bookkeeping: no per-item Python loop and no
host synchronisation. The spec is ``mrprune.reference.bipartite_merge``; merged rows are ``sum_i (s_i / mass_t) x_i``
in float32 (a row that absorbed nothing has coefficient exactly 1 and is copied exactly).
"""

from __future__ import annotations

import torch

from mrprune import _validation, backends

from ._common import check_device, device_guard
from ._merge import best_match, csr_order, segment_sum

__all__ = ["bipartite_merge_triton"]


def inverse_norms(metric: torch.Tensor) -> torch.Tensor:
    """``1 / max(||m_i||, 1e-12)`` in float32, ``[B, N]``."""
    return 1.0 / torch.linalg.vector_norm(metric, dim=-1, dtype=torch.float32).clamp_min(1e-12)


def bipartite_merge_triton(
    x: torch.Tensor,
    metric: torch.Tensor,
    lengths: torch.Tensor,
    r: int,
    sizes: torch.Tensor | None,
    protect_first: bool,
    spatial_order: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous ``x [B, N, D]``, ``metric [B, N, C]`` (float16/bfloat16/float32), int64 ``lengths``, float32
    ``sizes`` or None; see ``mrprune.reference.bipartite_merge``."""
    batch, tokens, dim = x.shape
    device = x.device
    out_tokens = tokens - r
    with device_guard(x):
        position = torch.arange(tokens, device=device)
        valid = position[None, :] < lengths[:, None]  # [B, N]
        evens, odds = position[0::2], position[1::2]
        rows = torch.where(evens[None, :] < lengths[:, None], evens[None, :], -1)
        cols = torch.where(odds[None, :] < lengths[:, None], odds[None, :], -1)
        best, partner = best_match(metric, inverse_norms(metric), rows.contiguous(), cols.contiguous())
        protect = torch.full_like(lengths, int(protect_first)) * (lengths > 0)
        if protect_first and best.shape[1]:
            best[:, 0] = torch.where(protect > 0, float("-inf"), best[:, 0])
        rank = torch.sort(best, dim=1, descending=True, stable=True).indices
        rank_pos = torch.empty_like(rank).scatter_(1, rank, torch.arange(rank.shape[1], device=device).expand_as(rank))
        merged_r = torch.minimum(torch.full_like(lengths, r), (lengths - protect).clamp_min(0) // 2)  # [B]
        even_valid = rows >= 0
        gone = (rank_pos < merged_r[:, None]) & even_valid  # [B, A]
        # output order key of each token (big: not an output row)
        big = 4 * tokens + 4
        key = torch.full((batch, tokens), big, dtype=torch.int64, device=device)
        if spatial_order:
            even_key = evens[None, :].expand_as(rank_pos)
            odd_key = odds[None, :].expand(batch, -1)
        else:
            even_key = evens[None, :].expand_as(rank_pos) if protect_first else rank_pos
            odd_key = tokens + odds[None, :].expand(batch, -1)
        key[:, 0::2] = torch.where(even_valid & ~gone, even_key, big)
        key[:, 1::2] = torch.where(cols >= 0, odd_key, big)
        order = torch.sort(key, dim=1, stable=True).indices
        slot = torch.empty_like(order).scatter_(1, order, torch.arange(tokens, device=device).expand_as(order))
        slot = torch.where(key < big, slot, -1)
        partner_pos = 2 * partner + 1  # [B, A]
        partner_slot = slot.gather(1, partner_pos.clamp_max(max(tokens - 1, 0))) if tokens else partner_pos
        slot[:, 0::2] = torch.where(gone, partner_slot, slot[:, 0::2])
        slot = torch.where(valid, slot, -1)
        # CSR over the B * (N - r) output rows: entries are the valid tokens, by slot, then position
        size = torch.ones(batch, tokens, dtype=torch.float32, device=device) if sizes is None else sizes
        segment = torch.where(valid, torch.arange(batch, device=device)[:, None] * out_tokens + slot, -1).flatten()
        order, offsets = csr_order(segment, batch * out_tokens)
        rows_in = order  # entries are the flattened [B * N] tokens
        entry_size = torch.where(valid, size, 0.0).flatten()[order]
        cumulative = torch.cat([entry_size.new_zeros(1, dtype=torch.float64), entry_size.double().cumsum(0)])
        mass = (cumulative[offsets[1:]] - cumulative[offsets[:-1]]).to(torch.float32)  # exact order, no atomics
        owner = segment[order].clamp_min(0)
        coef = entry_size / torch.where(mass[owner] > 0, mass[owner], 1.0)
        merged = segment_sum(x.reshape(batch * tokens, dim), rows_in, coef, offsets, batch * out_tokens)
    return (
        merged.reshape(batch, out_tokens, dim),
        mass.reshape(batch, out_tokens),
        slot,
        lengths - merged_r,
    )


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.bipartite_merge: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {x.dtype}"
        )


@torch.library.custom_op("mrprune::_bipartite_merge_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _bipartite_merge_op(
    x: torch.Tensor,
    metric: torch.Tensor,
    lengths: torch.Tensor,
    r: int,
    sizes: torch.Tensor | None = None,
    protect_first: bool = True,
    spatial_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("bipartite_merge", x)
    _check_dtype(x)
    return bipartite_merge_triton(x, metric, lengths, r, sizes, protect_first, spatial_order)


@_bipartite_merge_op.register_fake
def _(x, metric, lengths, r, sizes=None, protect_first=True, spatial_order=False):
    _validation.bipartite_merge("bipartite_merge", x, metric, lengths, r, sizes, protect_first, spatial_order)
    batch, tokens, dim = x.shape
    return (
        x.new_empty(batch, tokens - r, dim),
        x.new_empty(batch, tokens - r, dtype=torch.float32),
        x.new_empty(batch, tokens, dtype=torch.int64),
        x.new_empty(batch, dtype=torch.int64),
    )


def _backend(x, metric, lengths, r, sizes, protect_first, spatial_order):
    metric = metric.contiguous() if metric.dtype == x.dtype else metric.to(x.dtype).contiguous()
    return torch.ops.mrprune._bipartite_merge_triton(
        x.contiguous(),
        metric,
        lengths.to(torch.int64).contiguous(),
        r,
        None if sizes is None else sizes.to(torch.float32).contiguous(),
        protect_first,
        spatial_order,
    )


backends.register("bipartite_merge", "triton", _backend)
