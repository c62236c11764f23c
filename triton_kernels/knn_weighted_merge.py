"""Triton ``knn_weighted_merge`` (PruMerge): the cosines of the kept tokens to all tokens as one batched float32
matmul of unit rows (``K x N`` per item: a few dozen kept tokens), the ``k`` nearest others by a stable descending
sort (ties to the lower position), and the weighted sums ``x_c + sum_j w_j x_j`` by the deterministic segment-sum
kernel (:func:`._merge.segment_sum`). Batched, no per-item loop, no host synchronisation. The spec is
``mrprune.reference.knn_weighted_merge``.
"""

from __future__ import annotations

import torch

from mrprune import _validation, backends

from ._common import check_device, device_guard
from ._merge import csr_order, segment_sum

__all__ = ["knn_weighted_merge_triton"]


def knn_weighted_merge_triton(
    x: torch.Tensor, metric: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor, kept: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``x [B, N, D]``, ``metric [B, N, C]``, float32 ``weights [B, N]``, int64 ``lengths`` and ``kept
    [B, K]``; see ``mrprune.reference.knn_weighted_merge``."""
    batch, tokens, dim = x.shape
    slots = kept.shape[1]
    device = x.device
    if tokens == 0 or slots == 0:  # every slot unused
        empty = torch.full((batch, slots, k), -1, dtype=torch.int64, device=device)
        return x.new_zeros(batch, slots, dim), empty
    with device_guard(x):
        unit = metric.float()
        unit = unit / torch.linalg.vector_norm(unit, dim=-1, keepdim=True).clamp_min(1e-12)
        used = kept >= 0
        centre = kept.clamp_min(0)
        cos = unit.gather(1, centre[..., None].expand(-1, -1, unit.shape[2])) @ unit.transpose(1, 2)  # [B, K, N]
        position = torch.arange(tokens, device=device)
        other = (position[None, None, :] < lengths[:, None, None]) & (position[None, None, :] != centre[..., None])
        cos = cos.masked_fill(~other, float("-inf"))
        take = min(k, max(tokens - 1, 0))
        near = torch.sort(cos, dim=2, descending=True, stable=True).indices[..., :take]  # [B, K, take]
        count = (lengths - 1).clamp_min(0).clamp_max(k)  # neighbours per item
        real = (torch.arange(take, device=device)[None, None, :] < count[:, None, None]) & used[..., None]
        neighbors = torch.full((batch, slots, k), -1, dtype=torch.int64, device=device)
        neighbors[..., :take] = torch.where(real, near, -1)
        # entries per output row (b, t): the kept token itself (coefficient 1), then its neighbours (w_j)
        base = torch.arange(batch, device=device)[:, None, None] * tokens
        rows_in = torch.cat([(base[..., 0] + centre)[..., None], base + near], dim=2)  # [B, K, 1 + take]
        coef = torch.cat(
            [torch.ones_like(centre, dtype=torch.float32)[..., None], weights.gather(1, near.flatten(1)).view_as(near)],
            dim=2,
        )
        live = torch.cat([used[..., None], real], dim=2)
        segment = torch.arange(batch * slots, device=device).view(batch, slots, 1).expand_as(live)
        order, offsets = csr_order(torch.where(live, segment, -1).flatten(), batch * slots)
        rows_in, coef = rows_in.flatten()[order], coef.flatten()[order]
        merged = segment_sum(x.reshape(batch * tokens, dim), rows_in, coef, offsets, batch * slots)
    return merged.reshape(batch, slots, dim), neighbors


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.knn_weighted_merge: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {x.dtype}"
        )


@torch.library.custom_op("mrprune::_knn_weighted_merge_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _knn_weighted_merge_op(
    x: torch.Tensor, metric: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor, kept: torch.Tensor, k: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    check_device("knn_weighted_merge", x)
    _check_dtype(x)
    return knn_weighted_merge_triton(x, metric, weights, lengths, kept, k)


@_knn_weighted_merge_op.register_fake
def _(x, metric, weights, lengths, kept, k=32):
    _validation.knn_weighted_merge("knn_weighted_merge", x, metric, weights, lengths, kept, k)
    batch, slots, dim = x.shape[0], kept.shape[1], x.shape[2]
    return x.new_empty(batch, slots, dim), x.new_empty(batch, slots, k, dtype=torch.int64)


def _backend(x, metric, weights, lengths, kept, k):
    return torch.ops.mrprune._knn_weighted_merge_triton(
        x.contiguous(),
        metric.contiguous(),
        weights.to(torch.float32).contiguous(),
        lengths.to(torch.int64).contiguous(),
        kept.to(torch.int64).contiguous(),
        k,
    )


backends.register("knn_weighted_merge", "triton", _backend)
