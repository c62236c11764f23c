"""FastV inside the language model (Chen et al., ECCV 2024; official code pkunlp-icler/FastV).

Layers ``0 .. K-1`` run on the full prefill. At the entry of layer ``K`` every visual token is scored by the
head-averaged attention the last prompt token pays it in layer ``K - 1``; each image / video keeps its
``round(keep_ratio * n)`` best tokens (``mrprune.topk_indices``, ties to the lower index), the others leave the
sequence for layers ``K ..`` (hidden states, rotary embeddings and attention mask are gathered; positions stay the
original ones), and the cache entries layers ``0 .. K-1`` wrote for them are dropped too, so every layer's cache
holds the same pruned prompt (the official KV-cache variant). The one attention row is computed from the layer's own
``q_proj`` / ``k_proj`` and rotary embedding, so the model keeps its attention implementation (SDPA, flash, ...).

Use it through :func:`mrprune.patch`: ``mrprune.patch(model, mrprune.FastV(keep_ratio=0.5, layer=2))``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ..methods.base import check_keep_ratio, round_half_up, top_tokens
from ._cache import cache_of

__all__ = ["FastV"]


class FastV:
    """FastV: drop the visual tokens the last prompt token attends to least, inside the language model.

    Parameters
    ----------
    keep_ratio : float in (0, 1]
        Fraction of each image's / video's tokens kept (``round(keep_ratio * n)``); the paper's R = 50 % is 0.5.
    layer : int >= 1
        ``K``: pruning happens before decoder layer ``K``, scored with layer ``K - 1``'s attention (paper: 2).

    Notes
    -----
    The official code scores batch row 0 at a hard-coded image span; here every prompt of the batch and every image
    is scored on its own (an image keeps its share, so no image is dropped wholesale). Positions stay the unpruned
    ones (``position_mode="original"``).
    """

    def __init__(self, keep_ratio: float = 0.5, layer: int = 2) -> None:
        self.keep_ratio = check_keep_ratio(keep_ratio)
        if not (isinstance(layer, int) and layer >= 1):
            raise ValueError(f"FastV: layer must be an int >= 1 (layer 0 has no previous attention), got {layer!r}")
        self.layer = layer

    def __repr__(self) -> str:
        return f"FastV(keep_ratio={self.keep_ratio}, layer={self.layer})"


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def last_token_attention(
    layer: Any, hidden: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], query: torch.Tensor, keys: torch.Tensor
) -> torch.Tensor:
    """Head-averaged attention probabilities of one query token per row in ``layer``.

    Parameters
    ----------
    layer : decoder layer (``input_layernorm``, ``self_attn.q_proj`` / ``k_proj``)
    hidden : ``[B, L, D]`` the layer's input
    rotary : ``(cos, sin)``, each ``[B or 1, L, head_dim]``, the layer's rotary embeddings
    query : ``[B]`` the query column per row
    keys : ``[B, L]`` bool, the columns the query may attend to

    Returns
    -------
    Tensor ``[B, L]`` float32, zero outside ``keys``.
    """
    attention = layer.self_attn
    rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    batch, length, _ = hidden.shape
    head_dim = attention.head_dim
    rows = torch.arange(batch, device=hidden.device)
    normed = layer.input_layernorm(hidden)
    q = attention.q_proj(normed[rows, query][:, None]).view(batch, 1, -1, head_dim).transpose(1, 2)
    k = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in rotary)
    q, _ = rope(q, q, cos[rows, query][:, None], sin[rows, query][:, None])
    k, _ = rope(k, k, cos, sin)
    k = k.repeat_interleave(attention.num_key_value_groups, dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2))[:, :, 0] * attention.scaling  # [B, heads, L]
    logits = logits.masked_fill(~keys[:, None], float("-inf"))
    return logits.softmax(-1).mean(1)


class _Run:
    """One FastV prefill: set while the language model runs, read back by the handle afterwards."""

    def __init__(self, runner: FastVRunner, items: list[Any], rows: Any, side: str) -> None:
        self.runner, self.items, self.rows_in, self.side = runner, items, rows, side
        self.slots = [rows.slots(item.row, item.cols) for item in items]  # each item's slots in the rows
        self.captured: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.pruned: dict[str, Any] | None = None
        self.kept: list[torch.Tensor] = []
        self.rows = None
        self.seconds = 0.0

    def __enter__(self) -> _Run:
        self.runner.run = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.run = None
        if exc[0] is None and self.pruned is None:
            raise RuntimeError(f"FastV: decoder layer {self.runner.method.layer} never ran during the prefill")


class FastVRunner:
    """Hooks FastV into the language model's decoder layers (active only while a prefill :class:`_Run` is set)."""

    def __init__(self, method: FastV, adapter: Any) -> None:
        self.method, self.adapter = method, adapter
        self.layers = adapter.text_model.layers
        if method.layer >= len(self.layers):
            raise ValueError(f"FastV: layer {method.layer} >= the language model's {len(self.layers)} layers")
        adapter.check_fastv()
        attention = self.layers[method.layer - 1].self_attn
        missing = [
            name
            for name in ("q_proj", "k_proj", "head_dim", "num_key_value_groups", "scaling")
            if not hasattr(attention, name)
        ]
        if missing or not hasattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb"):
            raise TypeError(f"FastV: unsupported attention module {type(attention).__name__} (missing {missing})")
        self.run: _Run | None = None

    def install(self) -> Callable[[], None]:
        """Register the layer hooks; returns their removal."""
        k = self.method.layer
        handles = [self.layers[k - 1].register_forward_pre_hook(self._capture, with_kwargs=True)]
        handles.append(self.layers[k].register_forward_pre_hook(self._prune, with_kwargs=True))
        handles.extend(
            layer.register_forward_pre_hook(self._follow, with_kwargs=True) for layer in self.layers[k + 1 :]
        )

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove

    def start(self, items: list[Any], rows: Any, side: str) -> _Run:
        """A context manager for one prefill over ``rows`` (the batch the language model sees)."""
        return _Run(self, items, rows, side)

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.run is not None and self.run.pruned is None:
            self.run.captured = (_hidden(args, kwargs), kwargs["position_embeddings"])

    def _prune(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = self.run
        if run is None or run.pruned is not None:
            return None
        from transformers.masking_utils import create_causal_mask

        from .hf import _clock, _rebuild

        start = _clock(run.rows_in.index.device)
        real = run.rows_in.real
        positions = torch.arange(real.shape[1], device=real.device)
        query = torch.where(real, positions, -1).amax(1)  # the last prompt token of every row
        hidden_before, rotary = run.captured
        with torch.no_grad():
            scores = last_token_attention(
                self.layers[self.method.layer - 1], hidden_before, rotary, query, real & (positions <= query[:, None])
            )
        lengths = torch.tensor([slots.numel() for slots in run.slots], device=real.device)
        item_scores = scores.new_zeros(len(run.items), int(lengths.max()))
        for i, (item, slots) in enumerate(zip(run.items, run.slots, strict=True)):
            item_scores[i, : slots.numel()] = scores[item.row, slots]
        counts = [round_half_up(self.method.keep_ratio * n) for n in lengths.tolist()]
        run.kept = [k.sort().values for k in top_tokens(item_scores, lengths, counts)]
        keep = real.clone()
        for item, slots, kept in zip(run.items, run.slots, run.kept, strict=True):
            dropped = torch.ones(slots.shape[0], dtype=torch.bool, device=real.device)
            dropped[kept] = False
            keep[item.row, slots[dropped]] = False
        rows = _rebuild(keep, ~real, run.side)

        hidden = rows.take(_hidden(args, kwargs))
        cos, sin = kwargs["position_embeddings"]
        position_ids = kwargs.get("position_ids")
        mask = create_causal_mask(self.adapter.text_model.config, hidden, rows.real.long(), None)
        run.pruned = {
            "attention_mask": mask,
            "position_embeddings": (rows.take(cos), rows.take(sin)),
            "position_ids": None if position_ids is None else rows.take(position_ids),
        }
        cache = cache_of(kwargs)
        if cache is not None:
            self._prune_cache(cache, rows.index)
        run.rows = rows
        run.seconds = _clock(real.device) - start
        return _with_hidden(args, {**kwargs, **run.pruned}, hidden)

    def _follow(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.run is None or self.run.pruned is None:
            return None
        return args, {**kwargs, **self.run.pruned}

    def _prune_cache(self, cache: Any, index: torch.Tensor) -> None:
        """Gather the prompt entries layers ``0 .. K-1`` cached: ``[B, heads, L, d] -> [B, heads, L', d]``."""
        from transformers.cache_utils import DynamicLayer

        for layer in cache.layers[: self.method.layer]:
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(f"FastV: cache layers of type {type(layer).__name__} are not supported")
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
