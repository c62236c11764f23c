"""Packing ragged token sets into the padded ``[B, N, D]`` + ``lengths[B]`` form every op takes."""

from __future__ import annotations

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
