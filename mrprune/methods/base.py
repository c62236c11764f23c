"""The pruner interface and the batching glue every method shares.

A pruner decides which visual tokens of each image to keep. It sees the tokens of one image (``select``) or of a
padded batch of images (``select_batch``), plus each image's layout, and returns the kept indices of each image sorted
ascending (spatial order). All numerics run in ``torch.ops.mrprune``; methods only arrange inputs and budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from .. import ops
from ..layouts import GridLayout, LlavaNextLayout
from .stages import Need, Stage

Layout = LlavaNextLayout | GridLayout


def round_half_up(value: float) -> int:
    """``round`` without banker's rounding: 0.5 rounds up (budgets are counts of tokens)."""
    return math.floor(value + 0.5)


def check_keep_ratio(keep_ratio: float) -> float:
    if isinstance(keep_ratio, bool) or not (isinstance(keep_ratio, int | float) and 0 < keep_ratio <= 1):
        raise ValueError(f"keep_ratio must lie in (0, 1], got {keep_ratio!r}")
    return float(keep_ratio)


def take_prefixes(indices: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """The first ``counts[b]`` entries of each row of ``indices [B, k]`` (a top-k or greedy order is prefix-stable)."""
    return [indices[b, :count] for b, count in enumerate(counts)]


class Pruner:
    """Base class of the pruning methods.

    Subclasses implement :meth:`_select_batch` and declare where they act and what they read (see
    :mod:`mrprune.methods.stages`): ``stage``, ``needs`` (each need arrives as a keyword argument of
    ``_select_batch``), ``position_mode`` (the positions the kept tokens take by default in an integration) and, for
    ``vision``-stage methods, ``attention_layers`` (the vision encoder layers whose attention they read).
    """

    stage: ClassVar[Stage] = Stage.PROJECTOR
    needs: ClassVar[frozenset[Need]] = frozenset({Need.LAYOUT})
    position_mode: ClassVar[str] = "original"
    attention_layers: tuple[int, ...] = ()

    @property
    def uses_text(self) -> bool:
        """The method takes text embeddings (``Need.TEXT``)."""
        return Need.TEXT in self.needs

    def select(
        self,
        features: torch.Tensor,
        layout: Layout | None = None,
        text: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Kept token indices of one image.

        Parameters
        ----------
        features : Tensor ``[N, D]``
            The image's visual tokens in the LLM input space (after the projector / merger).
        layout : LlavaNextLayout or GridLayout or None
            Where each token sits; ``None`` is a flat sequence of ``N`` tokens (``GridLayout(1, 1, N)``).
        text : Tensor ``[M, D]`` or None
            Text token embeddings, for text-conditioned methods.

        Returns
        -------
        Tensor ``[K]``, int64, sorted ascending.
        """
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"select: features must be a [N, D] tensor, got {getattr(features, 'shape', features)}")
        layout = GridLayout(1, 1, features.shape[0]) if layout is None else layout
        lengths = torch.tensor([features.shape[0]], device=features.device)
        texts = None if text is None else [text]
        return self.select_batch(features[None], [layout], lengths, texts, **kwargs)[0]

    def select_batch(
        self,
        features: torch.Tensor,
        layouts: Sequence[Layout | None],
        lengths: torch.Tensor | Sequence[int] | None = None,
        texts: Sequence[torch.Tensor | None] | None = None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        """Kept token indices of every image of a padded batch.

        Parameters
        ----------
        features : Tensor ``[B, N_max, D]``
            Image ``b`` owns ``features[b, :lengths[b]]``.
        layouts : sequence of B layouts (``None``: flat)
            Each must describe exactly ``lengths[b]`` tokens.
        lengths : Tensor or sequence of B ints, or None (every image uses all ``N_max`` rows)
        texts : sequence of B ``[M_b, D]`` tensors (or None entries), or None
            Text token embeddings per image, for text-conditioned methods.

        Returns
        -------
        list of B int64 tensors, each sorted ascending.
        """
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            raise ValueError(f"select_batch: features must be [B, N, D], got {getattr(features, 'shape', features)}")
        batch, tokens, _ = features.shape
        lengths = torch.full((batch,), tokens) if lengths is None else torch.as_tensor(lengths)
        if lengths.shape != (batch,):
            raise ValueError(f"select_batch: lengths must have {batch} entries, got shape {tuple(lengths.shape)}")
        lengths = lengths.to(device=features.device, dtype=torch.int64)
        if len(layouts) != batch:
            raise ValueError(f"select_batch: expected {batch} layouts, got {len(layouts)}")
        sizes = lengths.tolist()
        if min(sizes, default=1) < 1:
            raise ValueError(f"select_batch: every image needs at least one token, got lengths {sizes}")
        layouts = [GridLayout(1, 1, n) if lay is None else lay for lay, n in zip(layouts, sizes, strict=True)]
        for b, (layout, n) in enumerate(zip(layouts, sizes, strict=True)):
            if layout.num_tokens != n:
                raise ValueError(
                    f"select_batch: item {b} has {n} tokens but its layout {layout} describes {layout.num_tokens}"
                )
        if texts is not None and len(texts) != batch:
            raise ValueError(f"select_batch: expected {batch} text entries, got {len(texts)}")
        if texts is not None and not self.uses_text:
            raise ValueError(f"{type(self).__name__} does not use text; pass texts=None")
        kept = self._select_batch(features, list(layouts), lengths, texts, **kwargs)
        return [k.sort().values for k in kept]

    def _select_batch(
        self,
        features: torch.Tensor,
        layouts: list[Layout],
        lengths: torch.Tensor,
        texts: Sequence[torch.Tensor | None] | None,
        **kwargs: Any,
    ) -> list[torch.Tensor]:
        raise NotImplementedError


def top_tokens(scores: torch.Tensor, lengths: torch.Tensor, counts: Sequence[int]) -> list[torch.Tensor]:
    """Per item, the ``counts[b]`` best-scored tokens (ties to the lower index), through ``mrprune.topk_indices``."""
    k = max(counts, default=0)
    return take_prefixes(ops.topk_indices(scores, lengths, k), counts)
