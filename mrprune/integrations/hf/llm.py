"""The ``llm`` stage: selecting inside the language model, at the entry of decoder layer ``K = method.layer``.

Layers ``0 .. K-1`` run on the full prefill. A pre-hook on layer ``K - 1`` captures its input; at the entry of layer
``K`` the method gets, per image / video, the hidden states of its tokens (``features``) and what its needs ask for
(``Need.LAST_QUERY_ATTENTION``: the head-averaged attention the last prompt token pays each token in layer ``K - 1``,
recomputed from that layer's ``q_proj`` / ``k_proj`` and rotary embedding, so the model keeps SDPA / FlashAttention).
The unkept tokens leave the sequence for layers ``K ..`` (hidden states, rotary embeddings and attention mask are
gathered; positions stay the original ones) and the cache entries layers ``0 .. K-1`` wrote for them are dropped too,
so every layer's cache holds the same pruned prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...batching import pad_batch
from ...methods.stages import Need
from .._cache import cache_of
from .rows import Rows, clock, rebuild

__all__ = ["LLMStage", "last_token_attention"]


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
    """One prefill: set while the language model runs, read back by the handle afterwards."""

    def __init__(self, stage: LLMStage, items: list[Any], layouts: Sequence[Any], rows: Rows, side: str) -> None:
        self.stage, self.items, self.layouts, self.rows_in, self.side = stage, items, list(layouts), rows, side
        self.slots = [rows.slots(item.row, item.cols) for item in items]  # each item's slots in the rows
        self.captured: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.pruned: dict[str, Any] | None = None
        self.kept: list[torch.Tensor] = []
        self.rows: Rows | None = None
        self.seconds = 0.0

    def __enter__(self) -> _Run:
        self.stage.run = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage.run = None
        if exc[0] is None and self.pruned is None:
            raise RuntimeError(
                f"{type(self.stage.method).__name__}: decoder layer {self.stage.method.layer} never ran during the "
                "prefill"
            )


class LLMStage:
    """Hooks an ``llm``-stage method into the language model's decoder layers (active only during a prefill run)."""

    def __init__(self, method: Any, adapter: Any) -> None:
        self.method, self.adapter = method, adapter
        name = type(method).__name__
        self.layers = adapter.text_model.layers
        if method.layer >= len(self.layers):
            raise ValueError(f"{name}: layer {method.layer} >= the language model's {len(self.layers)} layers")
        adapter.check_llm(method)
        attention = self.layers[method.layer - 1].self_attn
        missing = [
            name
            for name in ("q_proj", "k_proj", "head_dim", "num_key_value_groups", "scaling")
            if not hasattr(attention, name)
        ]
        if missing or not hasattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb"):
            raise TypeError(f"{name}: unsupported attention module {type(attention).__name__} (missing {missing})")
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

    def start(self, items: list[Any], layouts: Sequence[Any], rows: Rows, side: str) -> _Run:
        """A context manager for one prefill over ``rows`` (the batch the language model sees)."""
        return _Run(self, items, layouts, rows, side)

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _capture(self, module: Any, args: tuple, kwargs: dict) -> None:
        if self.run is not None and self.run.pruned is None:
            self.run.captured = (_hidden(args, kwargs), kwargs["position_embeddings"])

    def _select(self, run: _Run, hidden: torch.Tensor) -> list[torch.Tensor]:
        real = run.rows_in.real
        tokens = [hidden[item.row, slots] for item, slots in zip(run.items, run.slots, strict=True)]
        features, lengths = pad_batch(tokens)
        extra = {}
        if Need.LAST_QUERY_ATTENTION in self.method.needs:
            positions = torch.arange(real.shape[1], device=real.device)
            query = torch.where(real, positions, -1).amax(1)  # the last prompt token of every row
            hidden_before, rotary = run.captured
            scores = last_token_attention(
                self.layers[self.method.layer - 1], hidden_before, rotary, query, real & (positions <= query[:, None])
            )
            item_scores = scores.new_zeros(features.shape[:2])
            for i, (item, slots) in enumerate(zip(run.items, run.slots, strict=True)):
                item_scores[i, : slots.numel()] = scores[item.row, slots]
            extra["attention"] = item_scores
        return self.method.select_batch(features, run.layouts, lengths, None, **extra)

    def _prune(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = self.run
        if run is None or run.pruned is not None:
            return None
        from transformers.masking_utils import create_causal_mask

        start = clock(run.rows_in.index.device)
        real = run.rows_in.real
        with torch.no_grad():
            run.kept = self._select(run, _hidden(args, kwargs))
        keep = real.clone()
        for item, slots, kept in zip(run.items, run.slots, run.kept, strict=True):
            dropped = torch.ones(slots.shape[0], dtype=torch.bool, device=real.device)
            dropped[kept] = False
            keep[item.row, slots[dropped]] = False
        rows = rebuild(keep, ~real, run.side)

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
        run.seconds = clock(real.device) - start
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
                raise NotImplementedError(
                    f"{type(self.method).__name__}: cache layers of type {type(layer).__name__} are not supported"
                )
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, gather)
            layer.values = layer.values.gather(2, gather)
