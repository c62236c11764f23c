"""Selection inside the vLLM model: prune the encoder outputs of a batch of media items with the configured pruner."""

from __future__ import annotations

import collections
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...batching import pad_batch
from ...methods import Pruner
from ...methods.base import Layout
from .config import PruneConfig, kept_count, resolve_config

__all__ = ["Selection", "Selector", "pruner_for"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def _build(key: str) -> tuple[PruneConfig, Pruner]:
    config = PruneConfig.parse(key)
    pruner = config.build()
    logger.info("mrprune vLLM plugin: pruning with %r", pruner)
    return config, pruner


def pruner_for(hf_config: Any) -> tuple[PruneConfig, Pruner] | None:
    """The (config, pruner) a model config asks for (see :func:`resolve_config`), built once per distinct setting."""
    config = resolve_config(hf_config)
    if config is None:
        return None
    return _build(json.dumps({"method": config.method, "record": config.record, **config.kwargs}, sort_keys=True))


@dataclass(frozen=True)
class Selection:
    """One recorded selection: the item's encoder output ``features [N, D]`` (on the CPU), its layout, and the kept
    indices ``kept [K]`` (int64, ascending)."""

    modality: str
    layout: Layout
    features: torch.Tensor
    kept: torch.Tensor


class Selector:
    """Runs the pruner on the items of one ``embed_multimodal`` call and checks each kept count against the count
    the processor reserved (:func:`kept_count`).

    Parameters
    ----------
    config, pruner
        From :func:`pruner_for`.
    """

    def __init__(self, config: PruneConfig, pruner: Pruner) -> None:
        self.config, self.pruner = config, pruner
        self.records: collections.deque[Selection] = collections.deque(maxlen=max(config.record, 1))

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> Selector | None:
        found = pruner_for(hf_config)
        return None if found is None else cls(*found)

    def count(self, layout: Layout) -> int:
        """Placeholder tokens of an item with ``layout`` (what the processor reserves)."""
        return kept_count(self.pruner, layout)

    @torch.inference_mode()
    def select(self, items: Sequence[torch.Tensor], layouts: Sequence[Layout], modality: str) -> list[torch.Tensor]:
        """Kept indices of each item.

        Parameters
        ----------
        items : sequence of B tensors ``[N_b, D]``
            Encoder outputs (after the projector / merger), any float dtype, one device.
        layouts : sequence of B layouts, ``layouts[b].num_tokens == N_b``

        Returns
        -------
        list of B int64 tensors ``[K_b]`` on the items' device, ascending, ``K_b = count(layouts[b])``.
        """
        if not items:
            return []
        for item, layout in zip(items, layouts, strict=True):
            if item.shape[0] != layout.num_tokens:
                raise RuntimeError(
                    f"mrprune vLLM plugin: {modality} item has {item.shape[0]} tokens, {layout} says "
                    f"{layout.num_tokens}"
                )
        features, lengths = pad_batch(list(items))
        kept = self.pruner.select_batch(features, list(layouts), lengths)
        for index, layout, item in zip(kept, layouts, items, strict=True):
            expected = self.count(layout)
            if index.numel() != expected:  # the placeholders are already in the prompt
                raise RuntimeError(
                    f"mrprune vLLM plugin: {self.pruner!r} kept {index.numel()} tokens of {layout}, the prompt "
                    f"reserved {expected}"
                )
            if self.config.record:
                self.records.append(Selection(modality, layout, item.detach().cpu(), index.detach().cpu()))
        return kept

    def prune(self, items: Sequence[torch.Tensor], layouts: Sequence[Layout], modality: str) -> list[torch.Tensor]:
        """The kept rows of each item, ``[K_b, D]``, in spatial order."""
        kept = self.select(items, layouts, modality)
        return [item[index] for item, index in zip(items, kept, strict=True)]
