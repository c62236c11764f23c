"""Packing ragged token sets into the padded ``[B, N, D]`` + ``lengths[B]`` form every op takes."""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

__all__ = ["pad_batch"]


def pad_batch(items: list[torch.Tensor], *, pad_value: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged token sets into one padded batch.

    Parameters
    ----------
    items : list of torch.Tensor
        ``B >= 1`` tensors ``[N_i, D]`` with the same ``D``, dtype and device (``N_i`` may be 0).
    pad_value : float, optional
        Value of the padding rows.

    Returns
    -------
    batch : torch.Tensor
        ``[B, max N_i, D]`` with the dtype and device of the items; row ``n >= N_i`` of item ``i`` is ``pad_value``.
        For a single item this is a view of it (no copy): write to it only if the item may change too.
    lengths : torch.Tensor
        int64 ``[B]`` tensor of the ``N_i``, on the same device.

    Raises
    ------
    ValueError
        If ``items`` is empty, an item is not 2-D, or the items disagree in ``D``, dtype or device.
    """
    if len(items) == 0:
        raise ValueError("pad_batch needs at least one tensor, got an empty list")
    first = items[0]
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor) or item.dim() != 2:
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"pad_batch items must be 2-D [N, D] tensors, item {i} is {shape}")
        for what, got, want in (
            ("feature dim", item.shape[1], first.shape[1]),
            ("dtype", item.dtype, first.dtype),
            ("device", item.device, first.device),
        ):
            if got != want:
                raise ValueError(f"pad_batch items must share {what}: item 0 has {want}, item {i} has {got}")
    lengths = torch.tensor([item.shape[0] for item in items], dtype=torch.int64, device=first.device)
    # Nothing to pad: no copy for one item (a view), one stacking copy for equal lengths; else only the padding rows
    # are filled (a full-size fill first would write every row twice).
    if len(items) == 1:
        return first.unsqueeze(0), lengths
    tokens = max(item.shape[0] for item in items)
    if all(item.shape[0] == tokens for item in items):
        return torch.stack(items), lengths
    batch = first.new_empty((len(items), tokens, first.shape[1]))
    for i, item in enumerate(items):
        batch[i, : item.shape[0]] = item
        batch[i, item.shape[0] :] = pad_value
    return batch, lengths


#: Gathers of at least this many bytes on a Linux CPU ask for transparent huge pages (:func:`gather_rows`): glibc's
#: largest mmap threshold, above which every allocation is a fresh mapping. Below it, whether a buffer comes back from
#: the heap already faulted in depends on what the process freed before; advising the 19 MB bf16 LLaVA-NeXT gather
#: once cost more than it saved (6 -> 19 ms) and later showed no clear gain in whole G-Prune / MR-Pruner calls.
HUGE_PAGE_GATHER_BYTES = 32 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <linux/mman.h>


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)``: ``x [N, ...]``, ``index [K]`` int64 → ``[K, ...]`` (a new tensor).

    On a Linux CPU a result of :data:`HUGE_PAGE_GATHER_BYTES` or more is put on transparent huge pages where the
    system allows them (THP mode ``madvise`` or ``always``): glibc maps such a buffer fresh on every call, and faulting
    it in 4 KiB pages took 12-30 ms for the 38 MB of high-resolution float32 tokens of one LLaVA-NeXT image, 6-7 ms in
    2 MiB pages. Elsewhere (other devices or systems, THP off, tracing) it is a plain ``index_select``.
    """
    out = torch.empty((index.numel(), *x.shape[1:]), dtype=x.dtype, device=x.device)
    if out.device.type == "cpu" and out.nbytes >= HUGE_PAGE_GATHER_BYTES and _madvise() is not None:
        if not isinstance(out, torch._subclasses.fake_tensor.FakeTensor):
            start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE  # whole huge pages inside the buffer only
            end = (out.data_ptr() + out.nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if end > start:
                _madvise()(start, end - start, _MADV_HUGEPAGE)  # advice: a refusal (-1) changes nothing
    return torch.index_select(x, 0, index, out=out)


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:
    """libc's ``madvise`` on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
