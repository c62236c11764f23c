"""Prune the visual tokens of Hugging Face multimodal models at prefill: :func:`patch` and :func:`patched`.

Where the hook sits
-------------------
:func:`patch` replaces the model instance's ``forward`` (and, on its base model, ``get_image_features`` /
``get_video_features``, only to remember each item's layout and ResPrune seed). ``generate`` and plain
``model(...)`` calls both run through ``forward``, so scoring and generation prune the same way.

* **Prefill** — a call whose ``input_ids`` hold visual placeholders and that carries pixels or pre-encoded features
  (``mm_encoder_outputs``, which ``generate`` fills from transformers 5.23 on): every image's / video's tokens are
  encoded (or taken as given), the pruner picks the tokens to keep, the dropped placeholders leave their rows, the
  batch is re-padded on the side it was padded on, and the language model runs on the merged ``inputs_embeds``
  with the re-padded attention mask and explicit position ids, ``"original"`` (the unpruned positions, gathered;
  Qwen2.5-VL's 3-D M-RoPE positions are computed on the unpruned sequence first) or ``"compact"`` (``0..L'-1``).
  :class:`~mrprune.integrations.fastv.FastV` instead runs the full sequence up to its layer and prunes there.
* **Decoding** against a cache a pruned prefill filled: the caller (``generate`` or a hand-written loop) still counts
  the unpruned prompt. The prompt columns of its attention mask are replaced by the pruned prompt's, and its position
  ids are shifted by ``(next pruned position) - (next unpruned position)`` per sample: zero under ``"original"``
  (decoding continues after the unpruned length), the number of dropped tokens under ``"compact"``. Without position
  ids the next positions are filled in.

Outputs keep the caller's view where they can: ``generate`` returns the original prompt followed by the new tokens;
``forward`` returns logits (and hidden states) for the *pruned* rows, with ``labels`` gathered the same way;
:attr:`PruningHandle.last` maps every pruned row back to its original columns.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..batching import pad_batch
from ..layouts import GridLayout, LlavaNextLayout
from ..methods import DivPrune, GPrune, MRPruner, Pruner, ResPrune
from ..text import extract_nouns, noun_token_ids
from ._cache import cache_of

logger = logging.getLogger(__name__)

__all__ = ["MIN_TRANSFORMERS", "PruneRecord", "PruningHandle", "patch", "patched"]

#: The oldest transformers release the integration supports (and is tested with).
MIN_TRANSFORMERS = "5.17.0"

POSITION_MODES = ("original", "compact")
PADDING_SIDES = ("auto", "left", "right")

#: Model classes (by name, matched along the MRO) -> "module:Adapter". Adapters import transformers; they are loaded
#: only when a model is patched, so ``import mrprune`` does not need transformers.
ADAPTERS: dict[str, str] = {
    "LlavaForConditionalGeneration": "mrprune.integrations.llava:LlavaAdapter",
    "LlavaNextForConditionalGeneration": "mrprune.integrations.llava_next:LlavaNextAdapter",
    "Qwen2_5_VLForConditionalGeneration": "mrprune.integrations.qwen2_5_vl:Qwen2_5_VLAdapter",
}

# Per-method default position policy (research/algorithms.md §1.4: what each reference implementation does).
_DEFAULT_POSITION_MODE: tuple[tuple[type, str], ...] = (
    (MRPruner, "original"),
    (GPrune, "original"),
    (DivPrune, "compact"),
    (ResPrune, "compact"),
)

Layout = LlavaNextLayout | GridLayout


# ---------------------------------------------------------------------------------------------------------------------
# Records and per-item information
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneRecord:
    """What the last pruned prefill did to one sample (one row of the batch).

    Attributes
    ----------
    kept : list of int64 Tensors
        One per visual item of the sample (images in prompt order, then videos), the kept indices into that item's
        tokens, sorted ascending.
    modalities : list of str
        ``"image"`` or ``"video"`` per item.
    tokens_before, tokens_after : int
        Visual tokens of the sample before and after pruning.
    seconds : float
        Wall time of the batch's pruning step (selection and batch rebuild, not the vision encoder), shared by the
        samples of one call; for FastV the in-layer scoring and selection.
    columns : int64 Tensor ``[n]``
        The original input column of every real (non-padding) token of the pruned row, in order: pruned logits and
        hidden states of that row map back to the input through it.
    """

    kept: list[torch.Tensor]
    modalities: list[str]
    tokens_before: int
    tokens_after: int
    seconds: float
    columns: torch.Tensor


@dataclass(frozen=True)
class ItemInfo:
    """How an image / video was encoded: the encoder call's ``arguments`` other than pixels (its layout follows from
    them), its ``index`` among that call's items, and for CLS vision towers its ResPrune seed."""

    arguments: dict[str, Any]
    index: int
    seed: int | None = None


@dataclass
class VisualItem:
    """One image or video of a prefill: its tokens ``[n, D]`` and their placeholder cells ``(row, cols [n])``."""

    modality: str
    features: torch.Tensor
    info: ItemInfo | None
    row: int = -1
    cols: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


class _ItemRegistry:
    """``ItemInfo`` of feature tensors by identity, dropped with the tensor (``generate`` repeats the same tensor
    objects for ``num_return_sequences`` / beams, so the information follows them)."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref, ItemInfo]] = {}

    def add(self, tensor: torch.Tensor, info: ItemInfo) -> None:
        key = id(tensor)
        self._items[key] = (weakref.ref(tensor, lambda _, key=key: self._items.pop(key, None)), info)

    def get(self, tensor: torch.Tensor) -> ItemInfo | None:
        entry = self._items.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def clear(self) -> None:
        self._items.clear()


# ---------------------------------------------------------------------------------------------------------------------
# Adapters (model-specific glue; subclasses live in llava.py, llava_next.py, qwen2_5_vl.py)
# ---------------------------------------------------------------------------------------------------------------------


class Adapter:
    """Glue between the patch machinery and one model family.

    Positions are handled internally as ``[A, B, L]`` (``A = 1`` for 1-D RoPE, 3 for M-RoPE).
    """

    #: modality -> name of the config attribute holding its placeholder token id
    modalities: dict[str, str] = {"image": "image_token_id"}
    #: forward keyword arguments that only feed the vision path (dropped once the features are merged)
    visual_keys: frozenset[str] = frozenset()
    position_axes = 1

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base = model.model

    @property
    def text_model(self) -> Any:
        """The decoder-only language model (``model.model.language_model``)."""
        return self.base.language_model

    def token_id(self, modality: str) -> int:
        return int(getattr(self.model.config, self.modalities[modality]))

    def encoder_name(self, modality: str) -> str:
        return f"get_{modality}_features"

    def layout(self, modality: str, arguments: dict[str, Any], index: int) -> Layout:
        """The token layout of item ``index`` of an encoder call with ``arguments`` (the call's arguments by name,
        or a ``forward`` call's). Raises ``ValueError`` when they do not tell it."""
        raise NotImplementedError

    def seed_probe(self, modality: str, arguments: dict[str, Any]) -> contextlib.AbstractContextManager:
        """A context manager around one encoder call yielding a callable that returns, afterwards, each item's
        CLS-attention seed, or ``None`` without a CLS token (ResPrune then seeds with the largest-norm token)."""
        return contextlib.nullcontext(lambda: None)

    def default_positions(self, call: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """``[A, B, L]``: the positions the unpatched model would use when the call gives none."""
        batch, length = input_ids.shape
        past = cache_of(call)
        start = past.get_seq_length() if past is not None else 0
        positions = torch.arange(start, start + length, device=input_ids.device)
        return positions.expand(self.position_axes, batch, length)

    def normalize_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """The model's ``position_ids`` as ``[A, B, L]``."""
        if position_ids.dim() != 2:
            raise ValueError(f"expected position_ids [batch, length], got shape {tuple(position_ids.shape)}")
        return position_ids.expand(batch, -1)[None]

    def model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``[A, B, L]`` back to the model's ``position_ids`` format."""
        return positions[0]

    def check_fastv(self) -> None:
        """Raise if FastV cannot run inside this language model."""
        layer_types = getattr(self.text_model.config, "layer_types", None) or ()
        if "sliding_attention" in layer_types:
            raise NotImplementedError("FastV: language models with sliding-window layers are not supported")


def _resolve_adapter(model: Any) -> type[Adapter]:
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            module, name = ADAPTERS[cls.__name__].split(":")
            return getattr(importlib.import_module(module), name)
    raise TypeError(
        f"mrprune.patch supports {', '.join(sorted(ADAPTERS))} (and their subclasses); got {type(model).__name__}"
    )


def _check_transformers() -> None:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            f"mrprune.patch needs transformers>={MIN_TRANSFORMERS}: pip install 'transformers>={MIN_TRANSFORMERS}'"
        ) from error
    from packaging.version import Version

    if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
        raise ImportError(
            f"mrprune.patch needs transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Batch rebuild
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Rows:
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

    def compose(self, inner: _Rows) -> _Rows:
        """``inner`` rebuilds these rows again: the combined map from the original columns."""
        return _Rows(
            index=self.index.gather(1, inner.index),
            real=inner.real,
            source_ok=inner.source_ok & self.source_ok.gather(1, inner.index),
        )


def _rebuild(keep: torch.Tensor, padding: torch.Tensor, side: str) -> _Rows:
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
    return _Rows(index=index, real=real, source_ok=in_range)


# ---------------------------------------------------------------------------------------------------------------------
# Decode-time state
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _DecodeState:
    """What decoding steps against a pruned prefill's cache need."""

    original_length: int  # L: prompt columns as the caller counts them
    pruned_length: int  # L': prompt slots in the cache
    mask: torch.Tensor  # [B, L'] attention mask of the pruned prompt
    next_original: torch.Tensor  # [A, B]: next position the unpruned prompt would continue at
    next_pruned: torch.Tensor  # [A, B]: next position after the pruned prompt


def _padding_side(mask: torch.Tensor, requested: str, tokenizer: Any) -> str:
    if requested != "auto":
        return requested
    if bool((mask[:, 0] == 0).any()):
        return "left"
    if bool((mask[:, -1] == 0).any()):
        return "right"
    return getattr(tokenizer, "padding_side", None) or "left"


# ---------------------------------------------------------------------------------------------------------------------
# The handle
# ---------------------------------------------------------------------------------------------------------------------


class PruningHandle:
    """A patched model: prunes visual tokens at every prefill until :meth:`remove`.

    Attributes
    ----------
    model, pruner, position_mode
        As given to :func:`patch` (``position_mode`` resolved).
    last : list of :class:`PruneRecord` or None
        One record per sample of the last pruned prefill (``None`` before the first).
    instructions : list of str or None
        One instruction per sample for ResPrune's text gate, used instead of decoding the prompt; assign before a
        call whose instructions differ.
    texts : list of Tensor or None
        One entry per sample for ResPrune, used before ``instructions``: ``[M, D]`` text embeddings, or a 1-D
        tensor of token ids looked up in the model's input-embedding table.
    """

    def __init__(
        self,
        model: Any,
        pruner: Any,
        adapter: Adapter,
        position_mode: str,
        padding_side: str,
        tokenizer: Any,
        instructions: Sequence[str] | None,
        texts: Sequence[torch.Tensor] | None,
    ) -> None:
        self.model = model
        self.pruner = pruner
        self.adapter = adapter
        self.position_mode = position_mode
        self.padding_side = padding_side
        self.tokenizer = tokenizer
        self.instructions = None if instructions is None else list(instructions)
        self.texts = None if texts is None else list(texts)
        self.last: list[PruneRecord] | None = None
        self._registry = _ItemRegistry()
        self._states: dict[int, tuple[weakref.ref, _DecodeState]] = {}
        self._restore: list[Callable[[], None]] = []
        self._active = False
        self._fastv = None

    # -- installation ---------------------------------------------------------------------------------------------

    def _install(self) -> None:
        from .fastv import FastV, FastVRunner

        if isinstance(self.pruner, FastV):  # validates the language model before anything changes
            self._fastv = FastVRunner(self.pruner, self.adapter)
        model = self.model
        self._original_forward = model.forward
        self._signature = inspect.signature(self._original_forward)
        self._set_instance_attr(model, "forward", self._wrap_forward(self._original_forward))
        for modality in self.adapter.modalities:
            name = self.adapter.encoder_name(modality)
            encoder = self._wrap_encoder(modality, getattr(self.adapter.base, name))
            self._set_instance_attr(self.adapter.base, name, encoder)
        if self._fastv is not None:
            self._restore.append(self._fastv.install())
        self._active = True

    def _set_instance_attr(self, obj: Any, name: str, value: Any) -> None:
        had, previous = name in obj.__dict__, obj.__dict__.get(name)

        def restore() -> None:
            if obj.__dict__.get(name) is not value:
                raise RuntimeError(
                    f"mrprune: {type(obj).__name__}.{name} was replaced after patching; remove the later patch first"
                )
            if had:
                obj.__dict__[name] = previous
            else:
                del obj.__dict__[name]

        obj.__dict__[name] = value
        self._restore.append(restore)

    def remove(self) -> None:
        """Undo :func:`patch`: the model's methods and hooks are exactly as before. Idempotent."""
        if not self._active:
            return
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()
        self._registry.clear()
        self._states.clear()
        self._active = False
        _PATCHED.pop(self.model, None)

    @property
    def active(self) -> bool:
        return self._active

    def __enter__(self) -> PruningHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"PruningHandle({type(self.model).__name__}, {self.pruner!r}, {self.position_mode!r}, {state})"

    # -- wrappers -------------------------------------------------------------------------------------------------

    def _wrap_encoder(self, modality: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode(*args: Any, **kwargs: Any) -> Any:
            arguments = _flat_arguments(signature, args, kwargs)
            with self.adapter.seed_probe(modality, arguments) as seeds:
                output = original(*args, **kwargs)
            pooled = getattr(output, "pooler_output", None)
            if isinstance(pooled, list | tuple):
                metadata = {k: v for k, v in arguments.items() if not k.startswith("pixel_values")}
                item_seeds = seeds() or [None] * len(pooled)
                for index, (tensor, seed) in enumerate(zip(pooled, item_seeds, strict=True)):
                    self._registry.add(tensor, ItemInfo(metadata, index, seed))
            return output

        return encode

    def _wrap_forward(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = _flat_arguments(self._signature, args, kwargs)
            cache = cache_of(call)
            state = self._state_for(cache)
            visual = self._has_visual_inputs(call)
            if state is not None:
                if visual:
                    raise NotImplementedError(
                        "mrprune: new visual inputs on top of a pruned prefill's cache are not supported"
                    )
                return original(**self._decode_call(call, state, cache))
            if not visual:
                return original(**call)
            return self._prefill(original, call)

        return forward

    # -- prefill --------------------------------------------------------------------------------------------------

    def _has_visual_inputs(self, call: dict[str, Any]) -> bool:
        encoded = call.get("mm_encoder_outputs") or {}
        raw = any(call.get(key) is not None for key in self.adapter.visual_keys if key.startswith("pixel_values"))
        if not raw and not any(encoded.get(m) is not None for m in self.adapter.modalities):
            return False
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise ValueError("mrprune: a pruned call needs input_ids (they locate the visual placeholders)")
        return any(bool((input_ids == self.adapter.token_id(m)).any()) for m in self.adapter.modalities)

    def _encode(self, call: dict[str, Any]) -> list[VisualItem]:
        """Every visual item of the call, images first then videos, each in placeholder order."""
        items = []
        encoded = call.get("mm_encoder_outputs") or {}
        for modality in self.adapter.modalities:
            output = encoded.get(modality)
            if output is None:
                encoder = getattr(self.adapter.base, self.adapter.encoder_name(modality))
                parameters = inspect.signature(encoder).parameters
                inputs = {k: v for k, v in call.items() if k in parameters and k != "kwargs" and v is not None}
                if not any(k.startswith("pixel_values") for k in inputs):
                    continue
                output = encoder(**inputs, return_dict=True)
            pooled = list(output.pooler_output)
            infos = [self._registry.get(t) for t in pooled]
            items.extend(VisualItem(modality, t, info) for t, info in zip(pooled, infos, strict=True))
        return items

    def _locate(self, items: list[VisualItem], input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Assign each item its placeholder cells (placeholders are consumed batch-major, item after item)."""
        for modality in self.adapter.modalities:
            group = [item for item in items if item.modality == modality]
            cells = ((input_ids == self.adapter.token_id(modality)) & mask.bool()).nonzero()
            total = sum(item.features.shape[0] for item in group)
            if cells.shape[0] != total:
                raise ValueError(
                    f"mrprune: the prompt holds {cells.shape[0]} {modality} placeholders but the {modality} features "
                    f"have {total} tokens"
                )
            start = 0
            for item in group:
                n = item.features.shape[0]
                rows = cells[start : start + n, 0]
                if n and bool((rows != rows[0]).any()):
                    raise ValueError(f"mrprune: a {modality}'s placeholders span several prompts")
                item.row = int(rows[0]) if n else 0
                item.cols = cells[start : start + n, 1]
                start += n

    def _prefill(self, original: Callable, call: dict[str, Any]) -> Any:
        cache = cache_of(call)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("mrprune: pruning a prompt that continues a non-empty cache is not supported")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise NotImplementedError("mrprune: static (compileable) caches are not supported; use the default cache")
        input_ids = call["input_ids"]
        batch, length = input_ids.shape
        mask = call.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        elif mask.dim() != 2:
            raise ValueError("mrprune: pass a 2-D attention_mask [batch, length] (a 4-D mask cannot be pruned)")
        position_ids = call.get("position_ids")
        positions = (
            self.adapter.default_positions(call, input_ids)
            if position_ids is None
            else self.adapter.normalize_positions(position_ids, batch)
        )
        real = mask.bool()
        side = _padding_side(mask, self.padding_side, self.tokenizer)
        items = self._encode(call)
        self._locate(items, input_ids, real)

        start = _clock(input_ids.device)
        keep = real.clone()
        kept = None
        if self._fastv is None:
            kept = self._select(items, call, input_ids, real)
            for item, k in zip(items, kept, strict=True):
                dropped = torch.ones(item.cols.shape[0], dtype=torch.bool, device=keep.device)
                dropped[k.to(keep.device)] = False
                keep[item.row, item.cols[dropped]] = False
        rows = _rebuild(keep, ~real, side)
        new_call, new_positions = self._merged_call(call, items, kept, rows, positions, mask.dtype)
        seconds = _clock(input_ids.device) - start

        if self._fastv is None:
            output = original(**new_call)
        else:
            labels = new_call.pop("labels", None)
            run = self._fastv.start(items, rows, side)
            with run:
                output = original(**new_call)
            kept, rows, seconds = run.kept, rows.compose(run.rows), seconds + run.seconds
            new_positions = rows.take(positions, dim=2)
            if labels is not None:
                loss = self.model.loss_function(
                    logits=output.logits,
                    labels=_take_labels(call["labels"], rows),
                    vocab_size=self.model.config.text_config.vocab_size,
                )
                output = type(output)(**{**output, "loss": loss})

        self.last = self._records(items, kept, rows, seconds)
        cache = cache_of(output)
        if cache is not None:
            self._remember(cache, length, rows, positions, new_positions)
        return output if call.get("return_dict") is not False else output.to_tuple()

    def _select(
        self, items: list[VisualItem], call: dict[str, Any], input_ids: torch.Tensor, real: torch.Tensor
    ) -> list[torch.Tensor]:
        """Run the pruner on every item of the batch at once: kept indices per item."""
        layouts = []
        for modality in self.adapter.modalities:
            group = [item for item in items if item.modality == modality]
            for index, item in enumerate(group):
                if item.info is None:  # encoded before patch(): the forward call's metadata is all there is
                    item.info = ItemInfo(call, index)
        for item in items:
            layout = self.adapter.layout(item.modality, item.info.arguments, item.info.index)
            if layout.num_tokens != item.features.shape[0]:
                raise ValueError(
                    f"mrprune: a {item.modality} has {item.features.shape[0]} tokens but its layout {layout} "
                    f"describes {layout.num_tokens}"
                )
            layouts.append(layout)
        features, lengths = pad_batch([item.features for item in items])
        texts = self._texts(items, input_ids, real) if self.pruner.uses_text else None
        extra = {}
        if isinstance(self.pruner, ResPrune):  # negative: no CLS seed, ResPrune takes the largest-norm token
            extra["seeds"] = torch.tensor(
                [-1 if i.info.seed is None else i.info.seed for i in items], device=features.device
            )
        with torch.no_grad():
            return self.pruner.select_batch(features, layouts, lengths, texts, **extra)

    def _texts(self, items: list[VisualItem], input_ids: torch.Tensor, real: torch.Tensor) -> list[torch.Tensor]:
        """ResPrune's text embeddings ``[M, D]`` per item: its sample's instruction nouns in the embedding table."""
        batch = input_ids.shape[0]
        embed = self.model.get_input_embeddings()
        with torch.no_grad():
            if self.texts is not None:
                rows = [
                    embed(t.to(input_ids.device)) if t.dim() == 1 else t for t in _per_row(self.texts, batch, "texts")
                ]
            else:
                if self.instructions is not None:
                    strings = _per_row(self.instructions, batch, "instructions")
                else:  # the prompt's text after its last visual token
                    strings = []
                    for b in range(batch):
                        last = max((int(item.cols.max()) for item in items if item.row == b), default=None)
                        if last is None:  # a prompt without visual tokens needs no text
                            strings.append("")
                            continue
                        tail = input_ids[b, last + 1 :][real[b, last + 1 :]]
                        strings.append(self.tokenizer.decode(tail.tolist(), skip_special_tokens=True))
                rows = []
                for text in strings:
                    nouns = extract_nouns(text, self.pruner.noun_extractor)
                    ids = noun_token_ids(text, nouns, self.tokenizer)
                    rows.append(embed(torch.tensor(ids, dtype=torch.int64, device=input_ids.device)))
        return [rows[item.row] for item in items]

    def _merged_call(
        self,
        call: dict[str, Any],
        items: list[VisualItem],
        kept: list[torch.Tensor] | None,
        rows: _Rows,
        positions: torch.Tensor,
        mask_dtype: torch.dtype,
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """The language-model call on the rebuilt rows: kept features merged into ``inputs_embeds`` (as the model
        merges them), the new attention mask, explicit positions ``[A, B, L']`` (also returned) and labels."""
        visual = set(self.adapter.visual_keys) | {"mm_encoder_outputs", "input_ids"}
        new_call = {k: v for k, v in call.items() if k not in visual}
        new_ids = rows.take(call["input_ids"])
        embeds = self.model.get_input_embeddings()(new_ids)
        for modality in self.adapter.modalities:
            group = [(i, item) for i, item in enumerate(items) if item.modality == modality]
            if not group:
                continue
            features = torch.cat([item.features if kept is None else item.features[kept[i]] for i, item in group])
            cells = (new_ids == self.adapter.token_id(modality)) & rows.real
            embeds = embeds.masked_scatter(cells[..., None], features.to(embeds.device, embeds.dtype))
        if self.position_mode == "original":
            new_positions = rows.take(positions, dim=2)
        else:
            compact = (rows.real.cumsum(1) - 1).clamp(min=0).masked_fill(~rows.real, 0)
            new_positions = compact.expand(positions.shape[0], -1, -1)
        new_call.update(
            inputs_embeds=embeds,
            attention_mask=rows.real.to(mask_dtype),
            position_ids=self.adapter.model_positions(new_positions),
            return_dict=True,
        )
        if call.get("labels") is not None:
            new_call["labels"] = _take_labels(call["labels"], rows)
        return new_call, new_positions

    def _records(
        self, items: list[VisualItem], kept: list[torch.Tensor], rows: _Rows, seconds: float
    ) -> list[PruneRecord]:
        records = []
        for b in range(rows.index.shape[0]):
            mine = [(item, k) for item, k in zip(items, kept, strict=True) if item.row == b]
            records.append(
                PruneRecord(
                    kept=[k.cpu() for _, k in mine],
                    modalities=[item.modality for item, _ in mine],
                    tokens_before=sum(item.features.shape[0] for item, _ in mine),
                    tokens_after=sum(k.numel() for _, k in mine),
                    seconds=seconds,
                    columns=rows.columns(b).cpu(),
                )
            )
        return records

    # -- decoding -------------------------------------------------------------------------------------------------

    def _remember(
        self, cache: Any, length: int, rows: _Rows, positions: torch.Tensor, new_positions: torch.Tensor
    ) -> None:
        next_original = positions[..., -1] + 1
        if self.position_mode == "original":
            next_pruned = next_original
        else:
            next_pruned = new_positions.amax(-1) + 1
        state = _DecodeState(length, rows.index.shape[1], rows.real.long(), next_original, next_pruned)
        key = id(cache)
        self._states[key] = (weakref.ref(cache, lambda _, key=key: self._states.pop(key, None)), state)

    def _state_for(self, cache: Any) -> _DecodeState | None:
        entry = None if cache is None else self._states.get(id(cache))
        if entry is None or entry[0]() is not cache:
            return None
        if cache.get_seq_length() == 0:  # the cache was reset: the pruned prompt is gone
            del self._states[id(cache)]
            return None
        return entry[1]

    def _decode_call(self, call: dict[str, Any], state: _DecodeState, cache: Any) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _flat_arguments(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments by name, ``**kwargs`` flattened in."""
    bound = signature.bind(*args, **kwargs)
    flat = {}
    for name, value in bound.arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[name] = value
    return flat


def _take_labels(labels: torch.Tensor, rows: _Rows) -> torch.Tensor:
    """Labels of the rebuilt rows; filler slots get -100 (ignored by the loss)."""
    return torch.where(rows.source_ok, rows.take(labels), torch.full_like(rows.index, -100))


def _per_row(entries: Sequence[Any], batch: int, name: str) -> list[Any]:
    """One entry per row; ``generate`` repeats every prompt for beams / ``num_return_sequences``."""
    if not entries or batch % len(entries):
        raise ValueError(f"mrprune: {len(entries)} {name} for a batch of {batch}; give one per prompt")
    return [entry for entry in entries for _ in range(batch // len(entries))]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _default_position_mode(pruner: Any) -> str:
    for cls, mode in _DEFAULT_POSITION_MODE:
        if isinstance(pruner, cls):
            return mode
    return "original"


#: model -> its active handle (a model is patched at most once at a time)
_PATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def patch(
    model: Any,
    pruner: Any,
    *,
    position_mode: str | None = None,
    padding_side: str = "auto",
    processor: Any = None,
    instructions: Sequence[str] | None = None,
    texts: Sequence[torch.Tensor] | None = None,
) -> PruningHandle:
    """Make ``model`` prune its visual tokens at every prefill (``generate`` and ``forward``).

    Parameters
    ----------
    model : LlavaForConditionalGeneration, LlavaNextForConditionalGeneration or Qwen2_5_VLForConditionalGeneration
        Patched in place (instance attributes only; the class is untouched).
    pruner : mrprune.Pruner or mrprune.FastV
        A pre-LLM method (MRPruner, GPrune, ResPrune, DivPrune, RandomPruner, or a custom :class:`~mrprune.Pruner`)
        selects each image's / video's tokens before the language model; :class:`~mrprune.FastV` prunes inside it.
        LLaVA-1.5 images are :class:`~mrprune.GridLayout` rasters, LLaVA-NeXT images
        :class:`~mrprune.LlavaNextLayout` (base view, high-resolution grid, newline tokens; from the image sizes and
        the config's grid pinpoints), Qwen2.5-VL images and videos ``GridLayout.from_grid_thw``.
    position_mode : {"original", "compact"}, optional
        ``"original"``: kept tokens keep their unpruned positions and decoding continues after the unpruned length
        (MR-Pruner, G-Prune, FastV; the default for any method without its own); ``"compact"``: the pruned sequence
        is renumbered ``0..L'-1`` and decoding continues after it (DivPrune's and ResPrune's default). On Qwen2.5-VL
        ``"original"`` keeps the 3-D M-RoPE positions of the unpruned sequence, ``"compact"`` uses plain 1-D
        positions on all three axes (the spatial positions are lost). FastV supports ``"original"`` only.
    padding_side : {"auto", "left", "right"}
        Side the rebuilt batch is padded on; ``"auto"``: the side the input is padded on, else the processor's
        tokenizer's ``padding_side``, else left (what decoder-only generation expects).
    processor : transformers processor or tokenizer, optional
        For ResPrune: decodes each prompt's text after its last visual token, extracts the nouns
        (``mrprune.text.extract_nouns`` with the pruner's ``noun_extractor``) and maps them to token ids
        (``mrprune.text.noun_token_ids``); their rows of the model's input-embedding table condition the gate.
    instructions : sequence of str, optional
        For ResPrune: one instruction per prompt, used instead of decoding the prompt (needs ``processor`` for the
        token ids). Settable later as ``handle.instructions``.
    texts : sequence of Tensor, optional
        For ResPrune: one entry per prompt, ``[M, D]`` text embeddings or a 1-D tensor of token ids; used before
        ``instructions``. Settable later as ``handle.texts``.

    Returns
    -------
    PruningHandle
        ``handle.last`` describes the last pruned prefill; ``handle.remove()`` (or leaving ``with handle:``)
        restores the model exactly.

    Notes
    -----
    ResPrune on CLIP vision towers (LLaVA, LLaVA-NeXT) is seeded with the patch token the CLS token attends to most
    at the feature layer (of the base view for LLaVA-NeXT); Qwen2.5-VL has no CLS token, so its seed is the
    largest-norm token (the method's default). Not supported: ``inputs_embeds`` without ``input_ids``, static
    caches, chunked prefill, and adding images to a cache that already holds a pruned prompt.
    """
    _check_transformers()
    from .fastv import FastV

    adapter_cls = _resolve_adapter(model)
    if not isinstance(pruner, Pruner | FastV):
        raise TypeError(f"mrprune.patch: pruner must be a mrprune.Pruner or mrprune.FastV, not {type(pruner).__name__}")
    if position_mode is None:
        position_mode = "original" if isinstance(pruner, FastV) else _default_position_mode(pruner)
    if position_mode not in POSITION_MODES:
        raise ValueError(f"mrprune.patch: position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
    if isinstance(pruner, FastV) and position_mode != "original":
        raise ValueError("mrprune.patch: FastV keeps the original positions (its cache holds them); use 'original'")
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"mrprune.patch: padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    tokenizer = getattr(processor, "tokenizer", processor)
    if getattr(pruner, "uses_text", False) and texts is None and tokenizer is None:
        raise ValueError(
            f"mrprune.patch: {type(pruner).__name__} is text-conditioned; pass processor= (prompts are decoded, or "
            "instructions= given) or texts= (embeddings or token ids per prompt)"
        )
    if model in _PATCHED:
        raise ValueError("mrprune.patch: the model is already patched; remove() the existing handle first")
    adapter = adapter_cls(model)
    handle = PruningHandle(model, pruner, adapter, position_mode, padding_side, tokenizer, instructions, texts)
    handle._install()
    _PATCHED[model] = handle
    logger.info("mrprune: patched %s with %r (%s positions)", type(model).__name__, pruner, position_mode)
    return handle


@contextlib.contextmanager
def patched(model: Any, pruner: Any, **kwargs: Any) -> Iterator[PruningHandle]:
    """:func:`patch` as a context manager: ``with mrprune.patched(model, pruner) as handle: ...``."""
    handle = patch(model, pruner, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
