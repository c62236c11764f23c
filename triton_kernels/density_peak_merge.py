"""Triton ``density_peak_merge`` (SparseVLM v1's DPC-kNN recycling): batched torch ops for the clustering (exact
difference-based distances, so duplicates are exactly 0 apart; density from the ``m`` smallest; distance to a denser
token; centres by a stable sort; first-minimum assignment) and the cluster means by the deterministic segment-sum
kernel (:func:`._merge.segment_sum`). No per-item loop and no host synchronisation; the recycled sets are a few
hundred tokens, so the ``n x n`` distances are small. The spec is ``mrprune.reference.density_peak_merge``.
"""

from __future__ import annotations

import torch

from mrprune import _validation, backends

from ._common import check_device, device_guard
from ._merge import csr_order, segment_sum

__all__ = ["density_peak_merge_triton"]


def density_peak_merge_triton(
    x: torch.Tensor, lengths: torch.Tensor, clusters: int, neighbors: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous ``x [B, N, D]`` and int64 ``lengths``; see ``mrprune.reference.density_peak_merge``."""
    batch, tokens, dim = x.shape
    device = x.device
    assignment = torch.full((batch, tokens), -1, dtype=torch.int64, device=device)
    centers = torch.full((batch, clusters), -1, dtype=torch.int64, device=device)
    if tokens == 0 or clusters == 0:
        return x.new_zeros(batch, clusters, dim), assignment, centers
    with device_guard(x):
        v = x.float()
        dist = torch.cdist(v, v, compute_mode="donot_use_mm_for_euclid_dist") / dim**0.5  # [B, N, N]
        position = torch.arange(tokens, device=device)
        valid = position[None, :] < lengths[:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        m = (torch.full_like(lengths, clusters if neighbors is None else neighbors)).clamp_max(lengths).clamp_min(1)
        nearest = torch.sort(dist.masked_fill(~pair, float("inf")), dim=2).values  # ascending; padding last
        take = torch.arange(tokens, device=device)[None, None, :] < m[:, None, None]
        mean_sq = (nearest.masked_fill(~take, 0.0) ** 2).sum(2) / m[:, None].float()
        density = torch.exp(-mean_sq)
        denser = (density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & (position[None, None, :] < position[None, :, None])
        )
        denser = denser & pair
        dmax = dist.masked_fill(~pair, 0.0).flatten(1).amax(1)  # [B]
        delta = torch.where(denser, dist, float("inf")).amin(2)
        delta = torch.where(torch.isinf(delta), dmax[:, None], delta)
        score = torch.where(valid, density * delta, float("-inf"))
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :clusters]  # [B, c]
        count = lengths.clamp_max(clusters)  # centres per item
        live = torch.arange(clusters, device=device)[None, :] < count[:, None]
        centers = torch.where(live, order, -1)
        to_centre = dist.gather(2, order[:, None, :].expand(-1, tokens, -1))  # [B, N, c]
        to_centre = to_centre.masked_fill(~live[:, None, :], float("inf"))
        slot = torch.argmin(to_centre, dim=2)  # the first minimum: the lower slot
        own = torch.full((batch, tokens + 1), -1, dtype=torch.int64, device=device)
        own.scatter_(
            1, torch.where(live, order, tokens), torch.arange(clusters, device=device).expand(batch, -1).clone()
        )
        slot = torch.where(own[:, :tokens] >= 0, own[:, :tokens], slot)
        assignment = torch.where(valid & (count[:, None] > 0), slot, -1)
        segment = torch.where(assignment >= 0, torch.arange(batch, device=device)[:, None] * clusters + assignment, -1)
        order, offsets = csr_order(segment.flatten(), batch * clusters)
        sizes = (offsets[1:] - offsets[:-1]).clamp_min(1).to(torch.float32)
        rows_in = order
        coef = 1.0 / sizes[segment.flatten()[order].clamp_min(0)]
        merged = segment_sum(x.reshape(batch * tokens, dim), rows_in, coef, offsets, batch * clusters)
    return merged.reshape(batch, clusters, dim), assignment, centers


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.density_peak_merge: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {x.dtype}"
        )


@torch.library.custom_op("mrprune::_density_peak_merge_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _density_peak_merge_op(
    x: torch.Tensor, lengths: torch.Tensor, clusters: int, neighbors: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("density_peak_merge", x)
    _check_dtype(x)
    return density_peak_merge_triton(x, lengths, clusters, neighbors)


@_density_peak_merge_op.register_fake
def _(x, lengths, clusters, neighbors=None):
    _validation.density_peak_merge("density_peak_merge", x, lengths, clusters, neighbors)
    batch, tokens, dim = x.shape
    return (
        x.new_empty(batch, clusters, dim),
        x.new_empty(batch, tokens, dtype=torch.int64),
        x.new_empty(batch, clusters, dtype=torch.int64),
    )


def _backend(x, lengths, clusters, neighbors):
    return torch.ops.mrprune._density_peak_merge_triton(
        x.contiguous(), lengths.to(torch.int64).contiguous(), clusters, neighbors
    )


backends.register("density_peak_merge", "triton", _backend)
