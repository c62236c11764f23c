"""Triton ``attention_rows``: head-averaged softmax rows of ``M`` queries against the keys, from ``q`` and ``k``
(FastV / PDrop / SparseVLM scoring rows while the model itself keeps SDPA/FlashAttention).

One program per (query tile, head, item) streams the key tiles twice: flash-attention style online max and sum, then
the normalised probabilities, written to a ``[B, H, M, N]`` buffer (``M`` is a handful of rows); the head mean (and
the mean over real rows for ``reduce``) is one deterministic torch reduction. Grouped-query attention reads key head
``h // (H / H_kv)``. Values are loaded in their storage dtype (float32 dot on upcast operands where
``dot_upcast`` says so); the softmax is float32. The spec is ``mrprune.reference.attention_rows``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrprune import _validation, backends

from ._common import LAUNCH_OPTIONS, check_device, device_guard, dot_upcast, interpreting, next_power_of_2

__all__ = ["attention_rows_triton"]


@triton.jit
def _logit_tile(q_tile, k_head, mask_b, last, offs_j, N, D, stride_kn, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_j < N
    kt = tl.load(
        k_head + offs_d[:, None] + offs_j.to(tl.int64)[None, :] * stride_kn,
        mask=(offs_d[:, None] < D) & col_ok[None, :],
        other=0.0,
    )
    if UPCAST:
        kt = kt.to(tl.float32)
    z = tl.dot(q_tile, kt, input_precision="ieee")
    key_ok = tl.load(mask_b + offs_j, mask=col_ok, other=0) != 0
    ok = col_ok[None, :] & key_ok[None, :] & (offs_j[None, :] <= last[:, None])
    return z, ok


@triton.jit
def _attention_rows_kernel(
    q,
    k,
    mask,
    pos,
    probs,
    H,
    HKV,
    M,
    N,
    D,
    scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    g = h // (H // HKV)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < M
    q_tile = tl.load(
        q + b * stride_qb + h * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    if UPCAST:
        q_tile = q_tile.to(tl.float32)
    if HAS_POS:
        last = tl.load(pos + b * M + offs_m, mask=row_ok, other=-1)
    else:
        last = tl.where(row_ok, N - 1, -1).to(tl.int64)
    k_head = k + b * stride_kb + g * stride_kh
    mask_b = mask + b * N
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        z, ok = _logit_tile(q_tile, k_head, mask_b, last, offs_j, N, D, stride_kn, BLOCK_D, UPCAST)
        z = tl.where(ok, z * scale, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, axis=1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = row_sum * tl.exp(row_max - safe) + tl.sum(tl.exp(z - safe[:, None]), axis=1)
        row_max = new_max
    safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    inv_sum = tl.where(row_sum > 0, 1.0 / row_sum, 0.0)
    out = probs + ((b * H + h) * M + offs_m.to(tl.int64))[:, None] * N
    for j0 in range(0, N, BLOCK_N):
        offs_j = j0 + tl.arange(0, BLOCK_N)
        z, ok = _logit_tile(q_tile, k_head, mask_b, last, offs_j, N, D, stride_kn, BLOCK_D, UPCAST)
        p = tl.where(ok, tl.exp(z * scale - safe[:, None]) * inv_sum[:, None], 0.0)
        tl.store(out + offs_j[None, :], p, mask=row_ok[:, None] & (offs_j < N)[None, :])


def attention_rows_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    query_positions: torch.Tensor | None,
    scale: float | None,
    reduce: bool,
) -> torch.Tensor:
    """Contiguous ``q [B, H, M, d]``, ``k [B, H_kv, N, d]`` (same dtype), bool ``key_mask [B, N]``, int64
    ``query_positions [B, M]`` or None; see ``mrprune.reference.attention_rows``."""
    batch, heads, rows, dim = q.shape
    kv_heads, tokens = k.shape[1], k.shape[2]
    scale = dim**-0.5 if scale is None else float(scale)
    probs = torch.zeros(batch, heads, rows, tokens, dtype=torch.float32, device=q.device)
    if batch and rows and tokens:
        upcast = dot_upcast(q, k)
        if interpreting() or q.device.type != "cuda":
            block_m = min(64, max(16, next_power_of_2(rows)))
            block_n = min(128, max(16, next_power_of_2(tokens)))
        else:  # 64 query rows: the wgmma tensor-core tile on sm_90 (rows past M are masked); float32 (no tensor
            # cores) in 16 x 32 tiles, which do not spill with 128-feature heads
            block_m, block_n = (16, 32) if upcast else (64, 64)
        block_d = max(16, next_power_of_2(dim))
        with device_guard(q):
            _attention_rows_kernel[(triton.cdiv(rows, block_m), heads, batch)](
                q,
                k,
                key_mask.view(torch.uint8),
                query_positions if query_positions is not None else q,
                probs,
                heads,
                kv_heads,
                rows,
                tokens,
                dim,
                scale,
                q.stride(0),
                q.stride(1),
                q.stride(2),
                k.stride(0),
                k.stride(1),
                k.stride(2),
                HAS_POS=query_positions is not None,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
                UPCAST=upcast,
                num_warps=4,
                **LAUNCH_OPTIONS,
            )
    out = probs.mean(dim=1)  # [B, M, N]
    if not reduce:
        return out
    real = torch.ones(batch, rows, dtype=torch.bool, device=q.device)
    if query_positions is not None:
        real = query_positions >= 0
    count = real.sum(1, keepdim=True).clamp_min(1).to(torch.float32)
    return (out * real[..., None]).sum(1) / count


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "mrprune.attention_rows: the Triton kernels take float16/bfloat16/float32 (float64 is served by the "
            f"reference), got {q.dtype}"
        )


@torch.library.custom_op("mrprune::_attention_rows_triton", mutates_args=(), device_types=("cpu", "cuda"))
def _attention_rows_op(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor,
    query_positions: torch.Tensor | None = None,
    scale: float | None = None,
    reduce: bool = False,
) -> torch.Tensor:
    check_device("attention_rows", q)
    _check_dtype(q)
    return attention_rows_triton(q, k, key_mask, query_positions, scale, reduce)


@_attention_rows_op.register_fake
def _(q, k, key_mask, query_positions=None, scale=None, reduce=False):
    _validation.attention_rows("attention_rows", q, k, key_mask, query_positions, scale, reduce)
    batch, rows, tokens = q.shape[0], q.shape[2], k.shape[2]
    return q.new_empty((batch, tokens) if reduce else (batch, rows, tokens), dtype=torch.float32)


def _backend(q, k, key_mask, query_positions, scale, reduce):
    return torch.ops.mrprune._attention_rows_triton(
        q.contiguous(),
        k.contiguous(),
        key_mask.contiguous(),
        None if query_positions is None else query_positions.to(torch.int64).contiguous(),
        None if scale is None else float(scale),
        reduce,
    )


backends.register("attention_rows", "triton", _backend)
