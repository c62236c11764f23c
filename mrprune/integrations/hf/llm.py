"""The ``llm`` stage: selecting inside the language model, at the entry of each of the method's pruning layers.

A method declares its pruning layers ``K_1 < K_2 < ...`` (``layers``, or ``layer`` for one) and where it is scored
(``score_offset``: layer ``K - 1`` run on its input, or layer ``K`` on the states entering it; see
:mod:`mrprune.methods.stages`). One pre-hook per decoder layer does the work of a prefill:

* before the scoring layer of the next pruning layer, the layer's input and rotary embeddings are captured;
* at the entry of ``K_s`` the method gets, per image / video, the hidden states of its surviving tokens
  (``features``) and what its needs ask for, all recomputed from the scoring layer's own modules
  (``input_layernorm``, ``q_proj`` / ``k_proj``, the rotary embedding; the attention rows through
  ``mrprune.attention_rows``), so the model keeps SDPA / FlashAttention;
* the unkept tokens leave the sequence for layers ``K_s ..``: hidden states, rotary embeddings, position ids and the
  attention mask are gathered (positions stay the original ones); a :class:`~mrprune.MergedTokens` result replaces
  its representatives' hidden states by the merged states first;
* cache entries: with ``prune_earlier_cache`` the layers before ``K_s`` drop the unkept tokens too (every layer
  ends with the final pruned prompt); otherwise each group of layers between two pruning layers keeps the prompt it
  saw, so the cache layers hold different lengths. Decoding steps against such a cache get one attention mask per
  group (:meth:`LLMStage.decoding`), built by transformers' own ``create_causal_mask`` sized on the group's first
  cache layer. Dynamic and static caches both work: a static cache's later layers simply fill fewer slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ... import ops
from ...batching import pad_batch
from ...methods.results import MergedTokens, Result, kept_indices
from ...methods.stages import Need, PromptTokens
from .._cache import cache_of
from .rows import Rows, clock, rebuild

__all__ = ["LLMStage", "pruning_layers"]

#: needs that hand the method the prompt's text tokens (:class:`PromptTokens`)
_PROMPT_NEEDS = frozenset({Need.PROMPT_ATTENTION, Need.KEY_NORMS, Need.NORMED_STATES, Need.ROTARY})


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": hidden}
    return (hidden, *args[1:]), kwargs


def pruning_layers(method: Any) -> tuple[int, ...]:
    """An ``llm``-stage method's pruning layers: ``method.layers``, else ``(method.layer,)``."""
    layers = getattr(method, "layers", None)
    layers = tuple(layers) if layers else (getattr(method, "layer", None),)
    name = type(method).__name__
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in layers):
        raise ValueError(f"{name}: pruning layers must be ints >= 0, got {layers!r}")
    if any(b <= a for a, b in zip(layers, layers[1:], strict=False)):
        raise ValueError(f"{name}: pruning layers must increase, got {layers!r}")
    return layers


def _rope(attention: Any) -> Callable:
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb


def _keys(layer: Any, normed: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[B, H_kv, L, d]``: the layer's keys after the rotary embedding, from its normed input ``[B, L, D]``."""
    attention = layer.self_attn
    batch, length, _ = normed.shape
    k = attention.k_proj(normed).view(batch, length, -1, attention.head_dim).transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1) for t in rotary)
    return _rope(attention)(k, k, cos, sin)[1]


def _rotary(layer: Any, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[B, L, d]`` float32: the layer's rotary embedding of an all-ones head vector at every slot of ``x [B, L, D]``
    (what :attr:`Need.ROTARY` asks for)."""
    attention = layer.self_attn
    batch, length, _ = x.shape
    ones = x.new_ones(batch, 1, length, attention.head_dim)
    cos, sin = (t.expand(batch, -1, -1) for t in rotary)
    return _rope(attention)(ones, ones, cos, sin)[0][:, 0].float()


def _queries(
    layer: Any, normed: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor
) -> torch.Tensor:
    """``[B, H, M, d]``: the layer's queries (after the rotary embedding) at ``slots [B, M]`` (-1: padding)."""
    attention = layer.self_attn
    batch, rows = slots.shape
    at = slots.clamp(min=0)
    picked = normed.gather(1, at[..., None].expand(-1, -1, normed.shape[-1]))
    q = attention.q_proj(picked).view(batch, rows, -1, attention.head_dim).transpose(1, 2)
    cos, sin = (t.expand(batch, -1, -1).gather(1, at[..., None].expand(-1, -1, t.shape[-1])) for t in rotary)
    return _rope(attention)(q, q, cos, sin)[0]


class _Run:
    """One prefill: set while the language model runs, read back by the handle afterwards."""

    def __init__(self, stage: LLMStage, items: list[Any], layouts: Sequence[Any], rows: Rows, side: str) -> None:
        self.stage, self.items, self.layouts, self.rows_in, self.side = stage, items, list(layouts), rows, side
        self.current = rows  # slots of the current sequence -> original columns
        self.inner: Rows | None = None  # slots of the current sequence -> slots of the language model's input
        device = rows.index.device
        self.origin = [torch.arange(item.cols.shape[0], device=device) for item in items]
        self.results: list[Result | None] = [None] * len(items)
        self.step = 0  # the next pruning layer
        self.captured: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.embeddings: torch.Tensor | None = None  # the language model's input
        self.overrides: dict[str, Any] | None = None
        self.groups: list[tuple[int, Rows]] = []  # (first layer, inner rows) of each cache group after the first
        self.seconds = 0.0

    def __enter__(self) -> _Run:
        self.stage.run = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.stage.run = None
        if exc[0] is None and self.step < len(self.stage.pruning):
            raise RuntimeError(
                f"{type(self.stage.method).__name__}: decoder layer {self.stage.pruning[self.step]} never ran during "
                "the prefill"
            )

    @property
    def kept(self) -> list[Result]:
        """Per item, the kept tokens as indices into its original tokens (a merge: its last merge, remapped)."""
        out: list[Result] = []
        for origin, result in zip(self.origin, self.results, strict=True):
            out.append(result if isinstance(result, MergedTokens) else origin)
        return out

    @property
    def rows(self) -> Rows | None:
        """The final rows, relative to the language model's input rows (``None``: nothing ran)."""
        return self.inner

    def cache_groups(self, outer: Rows) -> tuple[Rows, list[tuple[int, int, torch.Tensor]]]:
        """The rows layer 0's cache holds (``outer`` the input rows) and, for the later groups of layers whose cache
        holds other lengths, ``(first layer, end layer, 2-D prompt mask [B, L_g])``."""
        if self.stage.method_prunes_earlier or not self.groups:
            return (outer if self.inner is None else outer.compose(self.inner)), []
        ends = [first for first, _ in self.groups[1:]] + [len(self.stage.layers)]
        return outer, [(first, end, inner.real.long()) for (first, inner), end in zip(self.groups, ends, strict=True)]


class LLMStage:
    """Hooks an ``llm``-stage method into the language model's decoder layers (active during a prefill run, and
    during decoding steps against a cache whose layers hold different lengths)."""

    def __init__(self, method: Any, adapter: Any) -> None:
        self.method, self.adapter = method, adapter
        name = type(method).__name__
        self.layers = adapter.text_model.layers
        self.pruning = pruning_layers(method)
        self.offset = int(getattr(method, "score_offset", -1))
        if self.offset not in (-1, 0):
            raise ValueError(f"{name}: score_offset must be -1 or 0, got {self.offset!r}")
        self.method_prunes_earlier = bool(getattr(method, "prune_earlier_cache", False))
        if self.pruning[-1] >= len(self.layers):
            raise ValueError(f"{name}: layer {self.pruning[-1]} >= the language model's {len(self.layers)} layers")
        if self.pruning[0] + self.offset < 0:
            raise ValueError(f"{name}: layer {self.pruning[0]} has no previous layer to score with")
        adapter.check_llm(method)
        for k in self.pruning:
            attention = self.layers[k + self.offset].self_attn
            missing = [
                attr
                for attr in ("q_proj", "k_proj", "head_dim", "num_key_value_groups", "scaling")
                if not hasattr(attention, attr)
            ]
            if missing or not hasattr(sys.modules[type(attention).__module__], "apply_rotary_pos_emb"):
                raise TypeError(f"{name}: unsupported attention module {type(attention).__name__} (missing {missing})")
        self.needs = frozenset(method.needs)
        self.per_head = getattr(method, "prompt_attention_heads", "mean")
        if self.per_head not in ("mean", "per_head"):
            raise ValueError(f"{name}.prompt_attention_heads must be 'mean' or 'per_head', got {self.per_head!r}")
        self.per_head = self.per_head == "per_head"
        if Need.ROTARY in self.needs and adapter.position_axes != 1:
            raise NotImplementedError(
                f"{name}: the RoPE-only attention term (Need.ROTARY) is defined for 1-D rotary embeddings; "
                f"{type(adapter.model).__name__} uses M-RoPE over {adapter.position_axes} position axes"
            )
        self.run: _Run | None = None
        self._decode: dict[int, torch.Tensor] | None = None  # first layer of a group -> its 2-D decoding mask
        self._decode_mask: Any = None

    def install(self) -> Callable[[], None]:
        """Register the layer hooks; returns their removal."""
        handles = [
            layer.register_forward_pre_hook(functools.partial(self._hook, index), with_kwargs=True)
            for index, layer in enumerate(self.layers)
        ]

        def remove() -> None:
            for handle in handles:
                handle.remove()

        return remove

    def start(self, items: list[Any], layouts: Sequence[Any], rows: Rows, side: str) -> _Run:
        """A context manager for one prefill over ``rows`` (the batch the language model sees)."""
        return _Run(self, items, layouts, rows, side)

    @contextlib.contextmanager
    def decoding(self, groups: Sequence[tuple[int, int, torch.Tensor]], tail: torch.Tensor) -> Iterator[None]:
        """During one decoding step: the layers of each group attend with the group's prompt mask followed by
        ``tail [B, n]`` (the mask of every token appended since the prefill, this step's included)."""
        self._decode = {first: torch.cat([mask.to(tail.dtype), tail], dim=1) for first, _, mask in groups}
        self._decode_mask = None
        try:
            yield
        finally:
            self._decode, self._decode_mask = None, None

    # -- hooks ----------------------------------------------------------------------------------------------------

    def _hook(self, index: int, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        run = self.run
        if run is None:
            return None if self._decode is None else self._decoding_step(index, args, kwargs)
        changed = run.overrides is not None
        if changed:
            kwargs = {**kwargs, **run.overrides}
        if index == 0 and self.needs & _PROMPT_NEEDS:
            run.embeddings = _hidden(args, kwargs)
        if run.step < len(self.pruning) and index == self.pruning[run.step]:
            start = clock(run.rows_in.index.device)
            with torch.no_grad():
                args, kwargs = self._prune(run, index, args, kwargs)
            run.seconds += clock(run.rows_in.index.device) - start
            changed = True
        if self.offset == -1 and run.step < len(self.pruning) and index == self.pruning[run.step] - 1:
            run.captured = (_hidden(args, kwargs), kwargs["position_embeddings"])
        return (args, kwargs) if changed else None

    def _decoding_step(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if index in self._decode:
            from transformers.masking_utils import create_causal_mask

            hidden = _hidden(args, kwargs)
            self._decode_mask = create_causal_mask(
                self.adapter.text_model.config, hidden, self._decode[index], cache_of(kwargs), None, layer_idx=index
            )
        elif index < min(self._decode):
            return None
        return args, {**kwargs, "attention_mask": self._decode_mask}  # None: SDPA's causal path, no padding

    # -- scoring --------------------------------------------------------------------------------------------------

    def _needs(
        self, run: _Run, layer: int, hidden: torch.Tensor, rotary: tuple, slots: list[torch.Tensor], n: int
    ) -> dict[str, Any]:
        """The keyword arguments the method's needs ask for, from the scoring layer of pruning layer ``layer``."""
        extra: dict[str, Any] = {}
        needs = self.needs
        if not needs & (_PROMPT_NEEDS | {Need.LAST_QUERY_ATTENTION}):
            return extra
        if self.offset == -1:
            x, rope = run.captured
        else:
            x, rope = hidden, rotary
        scorer = self.layers[layer + self.offset]
        current = run.current
        real = current.real
        device = real.device
        normed = scorer.input_layernorm(x)
        k = (
            _keys(scorer, normed, rope)
            if needs & {Need.LAST_QUERY_ATTENTION, Need.PROMPT_ATTENTION, Need.KEY_NORMS}
            else None
        )
        scale = float(scorer.self_attn.scaling)
        columns = torch.arange(real.shape[1], device=device)

        def per_item(rowwise: torch.Tensor) -> torch.Tensor:  # [B_rows, L, ...] -> [B_items, N, ...]
            out = rowwise.new_zeros(len(slots), n, *rowwise.shape[2:])
            for i, (item, sl) in enumerate(zip(run.items, slots, strict=True)):
                out[i, : sl.numel()] = rowwise[item.row, sl]
            return out

        if Need.LAST_QUERY_ATTENTION in needs:
            query = torch.where(real, columns, -1).amax(1)  # the last prompt token of every row
            q = _queries(scorer, normed, rope, query[:, None])
            rows = ops.attention_rows(q, k, real, query[:, None], scale=scale)[:, 0].float()
            extra["attention"] = per_item(rows)
        if Need.KEY_NORMS in needs:
            norms = k.float().abs().sum(-1).sum(1)  # [B, L]: L1 over every key head
            extra["key_norms"] = per_item(norms)
        final = self.adapter.text_model.norm(hidden) if Need.NORMED_STATES in needs else None
        if final is not None:
            extra["normed"] = per_item(final)
        rotary = _rotary(scorer, x, rope) if Need.ROTARY in needs else None
        if rotary is not None:
            extra["rotary"] = per_item(rotary)
        if needs & _PROMPT_NEEDS:
            extra["prompt"], originals = self._prompt(run, scorer, x, normed, rope, k, final, rotary, slots)
            if Need.PROMPT_ATTENTION in needs:
                extra["input_embeddings"] = originals
        return extra

    def _prompt(
        self,
        run: _Run,
        scorer: Any,
        x: torch.Tensor,
        normed: torch.Tensor,
        rope: tuple,
        k: torch.Tensor | None,
        final: torch.Tensor | None,
        rotary: torch.Tensor | None,
        slots: list[torch.Tensor],
    ) -> tuple[PromptTokens, torch.Tensor]:
        """The prompt's text tokens (:class:`PromptTokens`, one entry per item) and the items' original tokens' input
        embeddings ``[B, N0, D]``."""
        current = run.current
        real = current.real
        batch, length = real.shape
        text = real.clone()
        for item, sl in zip(run.items, slots, strict=True):
            text[item.row, sl] = False
        counts = text.sum(1)
        width = int(counts.max()) if batch else 0
        order = torch.sort((~text).to(torch.int8), dim=1, stable=True).indices[:, :width]  # text slots first, in order
        valid = torch.arange(width, device=real.device)[None] < counts[:, None]
        text_slots = torch.where(valid, order, -1)  # [B_rows, T]
        first = real.int().argmax(1)  # real slots are contiguous
        at = text_slots.clamp(min=0)[..., None]
        gather = lambda t: t.gather(1, at.expand(-1, -1, t.shape[-1]))  # noqa: E731
        input_slots = at[..., 0] if run.inner is None else run.inner.index.gather(1, at[..., 0])
        embeddings_rows = run.embeddings.gather(1, input_slots[..., None].expand(-1, -1, run.embeddings.shape[-1]))
        attention_rows = head_rows = None
        if Need.PROMPT_ATTENTION in self.needs:
            q = _queries(scorer, normed, rope, text_slots)
            scale = float(scorer.self_attn.scaling)
            if self.per_head:  # every query head as its own row of the batch: one op call, one head each
                heads = q.shape[1]
                keys = k.repeat_interleave(heads // k.shape[1], dim=1)  # query head h reads key head h // groups
                head_rows = ops.attention_rows(
                    q.reshape(batch * heads, 1, *q.shape[2:]),
                    keys.reshape(batch * heads, 1, *keys.shape[2:]),
                    real.repeat_interleave(heads, 0),
                    text_slots.repeat_interleave(heads, 0),
                    scale=scale,
                )
                head_rows = head_rows.float().view(batch, heads, width, length)  # [B_rows, H, T, L]
            else:
                attention_rows = ops.attention_rows(q, k, real, text_slots, scale=scale).float()  # [B_rows, T, L]
        norms_rows = k.float().abs().sum(-1).sum(1).gather(1, at[..., 0]) if Need.KEY_NORMS in self.needs else None
        normed_rows = None if final is None else gather(final)

        n_items = len(run.items)
        rows = torch.tensor([item.row for item in run.items], device=real.device, dtype=torch.long)
        lengths = counts[rows] if n_items else counts[:0]
        last = torch.stack(
            [sl.max() if sl.numel() else first[item.row] - 1 for item, sl in zip(run.items, slots, strict=True)]
        )
        item_text = text_slots[rows]
        n = max((sl.numel() for sl in slots), default=0)
        attention = head_attention = None
        if attention_rows is not None:
            attention = attention_rows.new_zeros(n_items, width, n)
            for i, sl in enumerate(slots):
                attention[i, :, : sl.numel()] = attention_rows[run.items[i].row][:, sl]
        if head_rows is not None:
            head_attention = head_rows.new_zeros(n_items, head_rows.shape[1], width, n)
            for i, sl in enumerate(slots):
                head_attention[i, :, :, : sl.numel()] = head_rows[run.items[i].row][..., sl]
        prompt = PromptTokens(
            lengths=lengths,
            positions=torch.where(item_text >= 0, item_text - first[rows, None], -1),
            after=(item_text > last[:, None]) & (item_text >= 0),
            embeddings=embeddings_rows[rows],
            hidden=gather(x)[rows],
            attention=attention,
            key_norms=None if norms_rows is None else norms_rows[rows],
            normed=None if normed_rows is None else normed_rows[rows],
            head_attention=head_attention,
            rotary=None if rotary is None else gather(rotary)[rows],
        )
        originals = []
        for item in run.items:
            cols = run.rows_in.slots(item.row, item.cols)  # the item's slots in the language model's input
            originals.append(run.embeddings[item.row, cols])
        return prompt, pad_batch(originals)[0]

    # -- pruning --------------------------------------------------------------------------------------------------

    def _prune(self, run: _Run, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        from transformers.masking_utils import create_causal_mask

        hidden = _hidden(args, kwargs)
        rotary = kwargs["position_embeddings"]
        current = run.current
        real = current.real
        device = real.device
        slots = [current.slots(item.row, item.cols[origin]) for item, origin in zip(run.items, run.origin, strict=True)]
        features, lengths = pad_batch([hidden[item.row, sl] for item, sl in zip(run.items, slots, strict=True)])
        n = features.shape[1]
        extra = self._needs(run, layer, hidden, rotary, slots, n)
        first = real.int().argmax(1)
        origin = torch.full((len(slots), n), -1, dtype=torch.long, device=device)
        positions = torch.full_like(origin, -1)
        for i, (item, sl, o) in enumerate(zip(run.items, slots, run.origin, strict=True)):
            origin[i, : o.numel()] = o
            positions[i, : sl.numel()] = sl - first[item.row]
        layouts = run.layouts if run.step == 0 else [None] * len(slots)
        original_lengths = torch.tensor([item.cols.shape[0] for item in run.items], device=device, dtype=torch.long)
        arguments = dict(
            step=run.step, layer=layer, origin=origin, original_lengths=original_lengths, positions=positions, **extra
        )
        active = [i for i, n in enumerate(lengths.tolist()) if n > 0]  # an item an earlier layer emptied stays empty
        results: list[Result] = [origin.new_zeros(0)] * len(slots)
        if len(active) == len(slots):
            results = self.method.select_batch(features, layouts, lengths, None, **arguments)
        elif active:
            index = torch.tensor(active, device=device)
            chosen = self.method.select_batch(
                features[index],
                [layouts[i] for i in active],
                lengths[index],
                None,
                **{name: _subset(value, index) for name, value in arguments.items()},
            )
            for i, result in zip(active, chosen, strict=True):
                results[i] = result

        keep = real.clone()
        merged = False
        for i, (item, sl, result) in enumerate(zip(run.items, slots, results, strict=True)):
            kept = kept_indices(result).to(device)
            dropped = torch.ones(sl.shape[0], dtype=torch.bool, device=device)
            dropped[kept] = False
            keep[item.row, sl[dropped]] = False
            if isinstance(result, MergedTokens):
                if not merged:
                    hidden, merged = hidden.clone(), True
                hidden[item.row, sl[kept]] = result.tokens.to(device=device, dtype=hidden.dtype)
                run.results[i] = _remap(result, run.origin[i], item.cols.shape[0])
            elif isinstance(run.results[i], MergedTokens):
                run.results[i] = None  # a later plain selection: the record is the kept indices
            run.origin[i] = run.origin[i][kept]
        inner = rebuild(keep, ~real, run.side)

        hidden = inner.take(hidden)
        cos, sin = rotary
        position_ids = kwargs.get("position_ids")
        cache = cache_of(kwargs)
        mask = create_causal_mask(
            self.adapter.text_model.config, hidden, inner.real.long(), cache, None, layer_idx=layer
        )
        run.overrides = {
            "attention_mask": mask,
            "position_embeddings": (inner.take(cos), inner.take(sin)),
            "position_ids": None if position_ids is None else inner.take(position_ids),
        }
        if cache is not None and self.method_prunes_earlier:
            self._prune_cache(cache, inner.index, inner.real, layer)
        run.inner = inner if run.inner is None else run.inner.compose(inner)
        run.current = current.compose(inner)
        run.groups.append((layer, run.inner))
        run.step += 1
        run.captured = None
        return _with_hidden(args, {**kwargs, **run.overrides}, hidden)

    def _prune_cache(self, cache: Any, index: torch.Tensor, real: torch.Tensor, layer: int) -> None:
        """Gather the prompt entries layers ``0 .. layer-1`` cached: ``[B, heads, L, d] -> [B, heads, L', d]``
        (a static layer: into its first ``L'`` slots, in place)."""
        from transformers.cache_utils import DynamicLayer, StaticLayer

        for cached in cache.layers[:layer]:
            gather = index[:, None, :, None].expand(-1, cached.keys.shape[1], -1, cached.keys.shape[-1])
            if type(cached) is DynamicLayer:
                cached.keys = cached.keys.gather(2, gather)
                cached.values = cached.values.gather(2, gather)
            elif type(cached) is StaticLayer:
                width = index.shape[1]
                keys, values = cached.keys.gather(2, gather), cached.values.gather(2, gather)
                cached.keys[:, :, :width].copy_(keys)
                cached.values[:, :, :width].copy_(values)
                cached.keys[:, :, width:].zero_()
                cached.values[:, :, width:].zero_()
                cached.cumulative_length.fill_(width)
            else:
                raise NotImplementedError(
                    f"{type(self.method).__name__}: cache layers of type {type(cached).__name__} are not supported"
                )


def _subset(value: Any, index: torch.Tensor) -> Any:
    """A per-item keyword argument (a tensor or :class:`PromptTokens` with items first) for the items ``index``."""
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, PromptTokens):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return PromptTokens(**{name: None if t is None else t[index] for name, t in fields.items()})
    return value


def _remap(result: MergedTokens, origin: torch.Tensor, total: int) -> MergedTokens:
    """A merge over an item's current tokens (``origin [N]``: their original indices) as a merge over all ``total``
    original tokens (those dropped before: source -1, weight 0)."""
    origin = origin.to(result.kept.device)
    sources = torch.full((total,), -1, dtype=torch.long, device=origin.device)
    weights = torch.zeros(total, dtype=result.weights.dtype, device=origin.device)
    sources[origin] = result.sources.to(origin.device)
    weights[origin] = result.weights.to(origin.device)
    return MergedTokens(result.tokens, origin[result.kept], sources, weights)
