"""Triton ``assign_merge`` (VisionZip's contextual tokens): every token's best target by the streaming best-match
kernel (:func:`._merge.best_match`, columns = the targets in slot order, so ties go to the lower slot; no N x T
matrix), then the members summed per slot by the deterministic segment-sum kernel (:func:`._merge.segment_sum`), with
batched torch ops for the bookkeeping (no per-item loop, no host synchronisation). The spec is
``mrprune.reference.assign_merge``.
"""

from __future__ import annotations

import torch

from mrprune import _validation, backends

from ._common import check_device, device_guard
from ._merge import best_match, csr_order, segment_sum
from .bipartite_merge import inverse_norms

__all__ = ["assign_merge_triton"]


def assign_merge_triton(
    x: torch.Tensor, metric: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, include_target: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous ``x [B, N, D]``, ``metric [B, N, C]``, int64 ``lengths`` and ``targets [B, T]``; see
    ``mrprune.reference.assign_merge``."""
    batch, tokens, dim = x.shape
    slots = targets.shape[1]
    device = x.device
    with device_guard(x):
        position = torch.arange(tokens, device=device)
        valid = position[None, :] < lengths[:, None]
        rows = torch.where(valid, position[None, :], -1).contiguous()
        best, arg = best_match(metric, inverse_norms(metric), rows, targets)
        has_target = (targets >= 0).any(dim=1, keepdim=True)
        assignment = torch.where(valid & has_target, arg, -1)
        is_target = torch.zeros(batch, tokens + 1, dtype=torch.bool, device=device)
        used = targets >= 0
        where = torch.where(used, targets, tokens)  # unused slots write to a dummy column
        is_target.scatter_(1, where, used)
        own = torch.full((batch, tokens + 1), -1, dtype=torch.int64, device=device)
        own.scatter_(1, where, torch.arange(slots, device=device).expand(batch, -1).clone())
        is_target, own = is_target[:, :tokens], own[:, :tokens]
        assignment = torch.where(is_target, own, assignment)
        member = (assignment >= 0) & ~is_target
        batch_index = torch.arange(batch, device=device)[:, None]
        segment = torch.where(assignment >= 0, batch_index * slots + assignment, -1)  # [B, N]
        members = torch.zeros(batch * slots + 1, dtype=torch.int64, device=device)
        dummy = batch * slots
        members.scatter_add_(0, torch.where(member, segment, dummy).flatten(), member.flatten().to(torch.int64))
        sizes = (members[:dummy].reshape(batch, slots) + used).to(torch.int64)
        # entries: every assigned token (the flattened [B * N] rows), by slot then position, with its coefficient
        count = members.to(torch.float32)[segment.clamp_min(0)]  # (the dummy slot keeps this in range when T = 0)
        if include_target:
            coef = 1.0 / (count + 1.0)
        else:
            coef = torch.where(is_target, 1.0, 1.0 / count.clamp_min(1.0))
        order, offsets = csr_order(segment.flatten(), dummy)
        rows_in, coef = order, coef.flatten()[order]
        merged = segment_sum(x.reshape(batch * tokens, dim), rows_in, coef.to(torch.float32), offsets, dummy)
    return merged.reshape(batch, slots, dim), assignment, sizes


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.assign_merge: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {x.dtype}"
        )


@torch.library.custom_op("mrprune::_assign_merge_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _assign_merge_op(
    x: torch.Tensor, metric: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, include_target: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_device("assign_merge", x)
    _check_dtype(x)
    return assign_merge_triton(x, metric, lengths, targets, include_target)


@_assign_merge_op.register_fake
def _(x, metric, lengths, targets, include_target=False):
    _validation.assign_merge("assign_merge", x, metric, lengths, targets, include_target)
    batch, tokens, dim = x.shape
    slots = targets.shape[1]
    return (
        x.new_empty(batch, slots, dim),
        x.new_empty(batch, tokens, dtype=torch.int64),
        x.new_empty(batch, slots, dtype=torch.int64),
    )


def _backend(x, metric, lengths, targets, include_target):
    metric = metric.contiguous() if metric.dtype == x.dtype else metric.to(x.dtype).contiguous()
    return torch.ops.mrprune._assign_merge_triton(
        x.contiguous(),
        metric,
        lengths.to(torch.int64).contiguous(),
        targets.to(torch.int64).contiguous(),
        include_target,
    )


backends.register("assign_merge", "triton", _backend)
