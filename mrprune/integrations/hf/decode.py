"""Decoding against a cache that a pruned prefill filled.

The caller (``generate`` or a hand-written loop) still counts the unpruned prompt. The prompt columns of its attention
mask are replaced by the pruned prompt's, and its position ids are shifted by ``(next pruned position) - (next
unpruned position)`` per sample: zero under ``"original"`` (decoding continues after the unpruned length), the number
of dropped tokens under ``"compact"``. Without position ids the next positions are filled in. The state is kept per
cache object (weakly), so beams and several return sequences that share a cache share it.

An ``llm``-stage method whose earlier layers keep the longer prompt leaves cache layers of different lengths: the
state then also lists the later groups of layers with their own prompt masks (:attr:`DecodeState.groups`), and the
caller runs the step under :meth:`~mrprune.integrations.hf.llm.LLMStage.decoding`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .rows import Rows

__all__ = ["DecodeState", "DecodeTracker"]


@dataclass
class DecodeState:
    """What decoding steps against a pruned prefill's cache need."""

    original_length: int  # L: prompt columns as the caller counts them
    pruned_length: int  # L': prompt slots in cache layer 0
    mask: torch.Tensor  # [B, L'] attention mask of the pruned prompt in cache layer 0
    next_original: torch.Tensor  # [A, B]: next position the unpruned prompt would continue at
    next_pruned: torch.Tensor  # [A, B]: next position after the pruned prompt
    # later groups of cache layers holding other prompt lengths: (first layer, end layer, prompt mask [B, L_g])
    groups: list[tuple[int, int, torch.Tensor]] = field(default_factory=list)


class DecodeTracker:
    """The decode states of one patched model, by cache."""

    def __init__(self, adapter: Any, position_mode: str) -> None:
        self.adapter, self.position_mode = adapter, position_mode
        self._states: dict[int, tuple[weakref.ref, DecodeState]] = {}

    def clear(self) -> None:
        self._states.clear()

    def remember(
        self,
        cache: Any,
        length: int,
        rows: Rows,
        positions: torch.Tensor,
        new_positions: torch.Tensor,
        groups: list[tuple[int, int, torch.Tensor]] | None = None,
    ) -> None:
        """Record a pruned prefill of ``length`` columns (positions ``[A, B, L]``) that filled ``cache`` (its layer
        0, and every layer outside ``groups``) with ``rows`` at ``new_positions [A, B, L']``."""
        next_original = positions[..., -1] + 1
        if self.position_mode == "original":
            next_pruned = next_original
        else:
            next_pruned = new_positions.amax(-1) + 1
        state = DecodeState(length, rows.index.shape[1], rows.real.long(), next_original, next_pruned, groups or [])
        key = id(cache)
        self._states[key] = (weakref.ref(cache, lambda _, key=key: self._states.pop(key, None)), state)

    def state_for(self, cache: Any) -> DecodeState | None:
        """The state of a pruned prefill that filled ``cache`` and still holds, else ``None``."""
        entry = None if cache is None else self._states.get(id(cache))
        if entry is None or entry[0]() is not cache:
            return None
        if cache.get_seq_length() == 0:  # the cache was reset: the pruned prompt is gone
            del self._states[id(cache)]
            return None
        return entry[1]

    def decode_call(self, call: dict[str, Any], state: DecodeState, cache: Any) -> dict[str, Any]:
        """Translate a decoding call from the caller's unpruned view to the pruned cache."""
        tokens = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
        batch, length = tokens.shape[:2]
        if batch != state.mask.shape[0]:
            raise ValueError(f"mrprune: the cache holds {state.mask.shape[0]} pruned prompts, the call has {batch}")
        appended = cache.get_seq_length() - state.pruned_length
        mask = call.get("attention_mask")
        if mask is None:
            tail = state.mask.new_ones(batch, appended + length)
        elif mask.dim() != 2 or mask.shape[1] != state.original_length + appended + length:
            raise ValueError(
                f"mrprune: a decoding step's attention_mask must be 2-D and cover the unpruned prompt "
                f"({state.original_length}) plus {appended + length} tokens, got shape {tuple(mask.shape)}"
            )
        else:
            tail = mask[:, state.original_length :]
        call = dict(call)
        call["attention_mask"] = torch.cat([state.mask.to(tail.dtype), tail], dim=1)
        position_ids = call.get("position_ids")
        if position_ids is None:
            steps = torch.arange(length, device=tokens.device) + appended
            positions = state.next_pruned[..., None] + steps
        else:
            positions = self.adapter.normalize_positions(position_ids, batch)
            positions = positions + (state.next_pruned - state.next_original)[..., None]
        call["position_ids"] = self.adapter.model_positions(positions)
        return call
