"""Re-padding a batch after tokens leave it: every stage that drops tokens rebuilds its rows here.

A rebuilt batch is an index map ``[B, L']`` from slots to original columns, with which slots hold kept tokens; the
language-model call (projector and vision stages), the hidden states, rotary tables and cache entries (``llm`` stage)
and the labels are all gathered through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["Rows", "clock", "rebuild", "take_labels"]


@dataclass
class Rows:
    """A re-padded batch: slot ``j`` of row ``b`` holds original column ``index[b, j]``.

    ``real[b, j]``: the slot holds a kept token (the new attention mask); ``source_ok[b, j]``: the slot holds a kept
    token or one of the row's original padding columns (anything else is filler for padding).
    """

    index: torch.Tensor  # [B, L'] int64
    real: torch.Tensor  # [B, L'] bool
    source_ok: torch.Tensor  # [B, L'] bool

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Gather ``x`` along its sequence dimension ``dim`` (batch at ``dim - 1``) into the new layout."""
        shape = list(x.shape)
        index = self.index.reshape([1] * (dim - 1) + list(self.index.shape) + [1] * (x.dim() - dim - 1))
        shape[dim] = self.index.shape[1]
        shape[dim - 1] = self.index.shape[0]
        return x.expand(*x.shape[: dim - 1], self.index.shape[0], *x.shape[dim:]).gather(dim, index.expand(shape))

    def columns(self, b: int) -> torch.Tensor:
        """The original columns of row ``b``'s real tokens, in order."""
        return self.index[b][self.real[b]]

    def slots(self, row: int, cols: torch.Tensor) -> torch.Tensor:
        """The slots of row ``row`` that hold its original columns ``cols`` (kept tokens, ascending)."""
        first = int(self.real[row].int().argmax())  # real slots are contiguous and in column order
        return first + torch.searchsorted(self.columns(row), cols)

    def compose(self, inner: Rows) -> Rows:
        """``inner`` rebuilds these rows again: the combined map from the original columns."""
        return Rows(
            index=self.index.gather(1, inner.index),
            real=inner.real,
            source_ok=inner.source_ok & self.source_ok.gather(1, inner.index),
        )


def rebuild(keep: torch.Tensor, padding: torch.Tensor, side: str) -> Rows:
    """Drop the unkept columns of every row and re-pad on ``side``.

    ``keep [B, L]``: real tokens that stay; ``padding [B, L]``: the original padding columns. Original padding is
    reused for the new padding where the row has enough of it, so a batch that loses nothing comes back unchanged.
    """
    batch, length = keep.shape
    counts = keep.sum(1)
    pads = padding.sum(1)
    width = int(counts.max()) if batch else 0
    slots = torch.arange(width, device=keep.device)
    if side == "left":  # [padding..., kept..., dropped...]; the window ends at the last kept column
        rank = torch.where(padding, 0, torch.where(keep, 1, 2))
        start = (pads + counts - width)[:, None]
        source = slots[None] + start
        real = slots[None] >= (width - counts)[:, None]
    else:  # [kept..., padding..., dropped...]; the window starts at the first kept column
        rank = torch.where(keep, 0, torch.where(padding, 1, 2))
        source = slots[None].expand(batch, width)
        real = slots[None] < counts[:, None]
    order = torch.sort(rank.to(torch.int8), dim=1, stable=True).indices
    in_range = (source >= 0) & (source < (pads + counts)[:, None])
    index = order.gather(1, source.clamp(0, max(length - 1, 0)))
    return Rows(index=index, real=real, source_ok=in_range)


def take_labels(labels: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Labels of the rebuilt rows; filler slots get -100 (ignored by the loss)."""
    return torch.where(rows.source_ok, rows.take(labels), torch.full_like(rows.index, -100))


def clock(device: torch.device) -> float:
    """Wall time after the device's queued work (the pruning step's timer)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
