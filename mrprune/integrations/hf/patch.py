"""Prune the visual tokens of Hugging Face multimodal models at prefill: :func:`patch`, :func:`patched` and the
:class:`PruningHandle` they return.

Where the hooks sit
-------------------
:func:`patch` replaces the model instance's ``forward`` and, on its base model, ``get_image_features`` /
``get_video_features`` (to remember each item's layout and the vision signals the method reads). ``generate`` and
plain ``model(...)`` calls both run through ``forward``, so scoring and generation prune the same way. A prefill is a
call whose ``input_ids`` hold visual placeholders and that carries pixels or pre-encoded features
(``mm_encoder_outputs``, which ``generate`` fills from transformers 5.23 on); it runs the method's stage:

* ``vision`` / ``projector`` (:mod:`.vision`, :mod:`.projector`) — every item is encoded, the method picks the
  tokens to keep, the dropped placeholders leave their rows, the batch is re-padded on the side it was padded on, and
  the language model runs on the merged ``inputs_embeds`` with explicit positions, ``"original"`` (the unpruned
  positions; Qwen2.5-VL's 3-D M-RoPE positions are computed on the unpruned sequence first) or ``"compact"``;
* ``llm`` (:mod:`.llm`) — the full sequence runs up to the method's first pruning layer; each pruning layer prunes
  further (layer groups may keep different cache lengths).

Decoding steps against a pruned prefill's cache are translated by :mod:`.decode`. Outputs keep the caller's view
where they can: ``generate`` returns the original prompt followed by the new tokens; ``forward`` returns logits (and
hidden states) for the *pruned* rows, with ``labels`` gathered the same way; :attr:`PruningHandle.last` maps every
pruned row back to its original columns.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...methods.base import Pruner
from ...methods.results import MergedTokens, Result, kept_indices
from ...methods.stages import Need, Stage
from .._cache import cache_of
from .adapters import resolve_adapter
from .adapters.base import Adapter
from .decode import DecodeTracker
from .llm import LLMStage
from .projector import Texts, merged_call, select
from .rows import Rows, clock, rebuild, take_labels
from .vision import VisionStage, VisualItem, _flat_arguments

logger = logging.getLogger(__name__)

__all__ = ["MIN_TRANSFORMERS", "PruneRecord", "PruningHandle", "patch", "patched"]

#: The oldest transformers release the integration supports (and is tested with).
MIN_TRANSFORMERS = "5.17.0"

POSITION_MODES = ("original", "compact")
PADDING_SIDES = ("auto", "left", "right")


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
        samples of one call; for ``llm``-stage methods plus the in-layer scoring and selection.
    columns : int64 Tensor ``[n]``
        The original input column of every real (non-padding) token of the pruned row, in order: pruned logits and
        hidden states of that row map back to the input through it.
    merged : list of :class:`~mrprune.methods.results.MergedTokens` or None
        One per item: for merging methods its merged tokens and source map (``kept`` then holds the
        representatives, whose rows the merged tokens took), ``None`` for a plain selection.
    """

    kept: list[torch.Tensor]
    modalities: list[str]
    tokens_before: int
    tokens_after: int
    seconds: float
    columns: torch.Tensor
    merged: list[MergedTokens | None] = field(default_factory=list)


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


def _padding_side(mask: torch.Tensor, requested: str, tokenizer: Any) -> str:
    if requested != "auto":
        return requested
    if bool((mask[:, 0] == 0).any()):
        return "left"
    if bool((mask[:, -1] == 0).any()):
        return "right"
    return getattr(tokenizer, "padding_side", None) or "left"


class PruningHandle:
    """A patched model: prunes visual tokens at every prefill until :meth:`remove`.

    Attributes
    ----------
    model, pruner, position_mode
        As given to :func:`patch` (``position_mode`` resolved).
    last : list of :class:`PruneRecord` or None
        One record per sample of the last pruned prefill (``None`` before the first).
    instructions : list of str or None
        One instruction per sample for text-conditioned methods, used instead of decoding the prompt; assign before
        a call whose instructions differ.
    texts : list of Tensor or None
        One entry per sample for text-conditioned methods, used before ``instructions``: ``[M, D]`` text
        embeddings, or a 1-D tensor of token ids looked up in the model's input-embedding table.
    """

    def __init__(
        self,
        model: Any,
        pruner: Pruner,
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
        self._texts = Texts(tokenizer, instructions, texts)
        self.last: list[PruneRecord] | None = None
        # every stage validates the model before anything changes
        self._vision = VisionStage(pruner, adapter)
        self._llm = LLMStage(pruner, adapter) if pruner.stage is Stage.LLM else None
        self._decode = DecodeTracker(adapter, position_mode)
        self._restore: list[Callable[[], None]] = []
        self._active = False

    @property
    def instructions(self) -> list[str] | None:
        return self._texts.instructions

    @instructions.setter
    def instructions(self, value: Sequence[str] | None) -> None:
        _check_text_sources("mrprune.PruningHandle", instructions=value)
        self._texts.instructions = None if value is None else list(value)

    @property
    def texts(self) -> list[torch.Tensor] | None:
        return self._texts.texts

    @texts.setter
    def texts(self, value: Sequence[torch.Tensor] | None) -> None:
        _check_text_sources("mrprune.PruningHandle", texts=value)
        self._texts.texts = None if value is None else list(value)

    # -- installation ---------------------------------------------------------------------------------------------

    def _install(self) -> None:
        model = self.model
        self._original_forward = model.forward
        self._signature = inspect.signature(self._original_forward)
        self._set_instance_attr(model, "forward", self._wrap_forward(self._original_forward))
        for modality in self.adapter.modalities:
            name = self.adapter.encoder_name(modality)
            encoder = self._vision.wrap_encoder(modality, getattr(self.adapter.base, name))
            self._set_instance_attr(self.adapter.base, name, encoder)
        if self._llm is not None:
            self._restore.append(self._llm.install())
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
        self._vision.registry.clear()
        self._decode.clear()
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

    # -- forward ----------------------------------------------------------------------------------------------------

    def _wrap_forward(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = _flat_arguments(self._signature, args, kwargs)
            cache = cache_of(call)
            state = self._decode.state_for(cache)
            visual = self._has_visual_inputs(call)
            if getattr(cache, "is_compileable", False) and (state is not None or visual):
                call = self._static_call(call, state)
            if state is not None:
                if visual:
                    raise NotImplementedError(
                        "mrprune: new visual inputs on top of a pruned prefill's cache are not supported"
                    )
                call = self._decode.decode_call(call, state, cache)
                if not state.groups:
                    return original(**call)
                with self._llm.decoding(state.groups, call["attention_mask"][:, state.pruned_length :]):
                    return original(**call)
            if not visual:
                return original(**call)
            return self._prefill(original, call)

        return forward

    def _static_call(self, call: dict[str, Any], state: Any) -> dict[str, Any]:
        """A call on a static (compileable) cache with the 2-D mask the pruned rows are built from: ``generate``
        hands such calls a 4-D mask (or one per layer type) for the unpruned sequence. At prefill the padding is read
        off the last query's row; decoding steps see the pruned prompt plus every token appended since (``generate``
        never masks a generated token). The language model rebuilds its 4-D mask for the static cache from it."""
        mask = call.get("attention_mask")
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return call
        if isinstance(mask, dict):
            mask = mask.get("full_attention", next(iter(mask.values())))
        tokens = call["input_ids"] if call.get("input_ids") is not None else call["inputs_embeds"]
        if state is None:  # prefill: row of the last query over the prompt's columns
            last = mask[:, 0, -1, : tokens.shape[1]]
            flat = last if last.dtype == torch.bool else last == 0
        else:
            cache = cache_of(call)
            seen = state.original_length + cache.get_seq_length() - state.pruned_length
            flat = torch.ones(tokens.shape[0], seen + tokens.shape[1], dtype=torch.bool, device=tokens.device)
        return {**call, "attention_mask": flat.long()}

    def _has_visual_inputs(self, call: dict[str, Any]) -> bool:
        encoded = call.get("mm_encoder_outputs") or {}
        raw = any(call.get(key) is not None for key in self.adapter.visual_keys if key.startswith("pixel_values"))
        if not raw and not any(encoded.get(m) is not None for m in self.adapter.modalities):
            return False
        input_ids = call.get("input_ids")
        if input_ids is None:
            raise ValueError("mrprune: a pruned call needs input_ids (they locate the visual placeholders)")
        return any(bool((input_ids == self.adapter.token_id(m)).any()) for m in self.adapter.modalities)

    def _prefill(self, original: Callable, call: dict[str, Any]) -> Any:
        cache = cache_of(call)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("mrprune: pruning a prompt that continues a non-empty cache is not supported")
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
        items = self._vision.encode(call)
        self._vision.locate(items, input_ids, real)

        start = clock(input_ids.device)
        keep = real.clone()
        kept = None
        if self._llm is None:  # vision / projector stage: select before the language model
            kept = select(self.pruner, self._vision, self._texts, self.model, items, input_ids, real)
            for item, result in zip(items, kept, strict=True):
                dropped = torch.ones(item.cols.shape[0], dtype=torch.bool, device=keep.device)
                dropped[kept_indices(result).to(keep.device)] = False
                keep[item.row, item.cols[dropped]] = False
        rows = rebuild(keep, ~real, side)
        new_call, new_positions = merged_call(
            self.adapter, self.model, self.position_mode, call, items, kept, rows, positions, mask.dtype
        )
        seconds = clock(input_ids.device) - start

        if self._llm is None:
            output = original(**new_call)
        else:
            labels = new_call.pop("labels", None)
            run = self._llm.start(items, self._vision.layouts(items), rows, side)
            with run:
                output = original(**new_call)
            cache_rows, groups = run.cache_groups(rows)
            kept, rows, seconds = run.kept, rows.compose(run.rows), seconds + run.seconds
            new_positions = rows.take(positions, dim=2)
            if labels is not None:
                loss = self.model.loss_function(
                    logits=output.logits,
                    labels=take_labels(call["labels"], rows),
                    vocab_size=self.model.config.text_config.vocab_size,
                )
                output = type(output)(**{**output, "loss": loss})

        self.last = self._records(items, kept, rows, seconds)
        cache = cache_of(output)
        if cache is not None:
            if self._llm is None:
                cache_rows, groups = rows, []
            self._decode.remember(cache, length, cache_rows, positions, new_positions, groups)
        return output if call.get("return_dict") is not False else output.to_tuple()

    def _records(self, items: list[VisualItem], kept: list[Result], rows: Rows, seconds: float) -> list[Any]:
        records = []
        for b in range(rows.index.shape[0]):
            mine = [(item, k) for item, k in zip(items, kept, strict=True) if item.row == b]
            records.append(
                PruneRecord(
                    kept=[kept_indices(k).cpu() for _, k in mine],
                    modalities=[item.modality for item, _ in mine],
                    tokens_before=sum(item.features.shape[0] for item, _ in mine),
                    tokens_after=sum(kept_indices(k).numel() for _, k in mine),
                    seconds=seconds,
                    columns=rows.columns(b).cpu(),
                    merged=[k.cpu() if isinstance(k, MergedTokens) else None for _, k in mine],
                )
            )
        return records


#: model -> its active handle (a model is patched at most once at a time)
_PATCHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def patch(
    model: Any,
    pruner: Pruner,
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
        Patched in place (instance attributes and hooks only; the class is untouched).
    pruner : mrprune.Pruner
        Any method; where it acts and what it reads are its ``stage`` and ``needs`` (:mod:`mrprune.methods.stages`).
        LLaVA-1.5 images are :class:`~mrprune.GridLayout` rasters, LLaVA-NeXT images
        :class:`~mrprune.LlavaNextLayout` (base view, high-resolution grid, newline tokens; from the image sizes and
        the config's grid pinpoints), Qwen2.5-VL images and videos ``GridLayout.from_grid_thw``.
    position_mode : {"original", "compact"}, optional
        ``"original"``: kept tokens keep their unpruned positions and decoding continues after the unpruned length;
        ``"compact"``: the pruned sequence is renumbered ``0..L'-1`` and decoding continues after it. Default: the
        method's ``position_mode`` (``"compact"`` for DivPrune and ResPrune, as their reference code does). On
        Qwen2.5-VL ``"original"`` keeps the 3-D M-RoPE positions of the unpruned sequence, ``"compact"`` uses plain
        1-D positions on all three axes (the spatial positions are lost). ``llm``-stage methods support
        ``"original"`` only (the cache already holds those positions).
    padding_side : {"auto", "left", "right"}
        Side the rebuilt batch is padded on; ``"auto"``: the side the input is padded on, else the processor's
        tokenizer's ``padding_side``, else left (what decoder-only generation expects).
    processor : transformers processor or tokenizer, optional
        For text-conditioned methods (``Need.TEXT``): decodes each prompt's text after its last visual token,
        extracts the nouns (``mrprune.text.extract_nouns`` with the pruner's ``noun_extractor``) and maps them to
        token ids (``mrprune.text.noun_token_ids``); their rows of the model's input-embedding table condition the
        method.
    instructions : sequence of str, optional
        For text-conditioned methods: one instruction per prompt, used instead of decoding the prompt (needs
        ``processor`` for the token ids). Settable later as ``handle.instructions``.
    texts : sequence of Tensor, optional
        For text-conditioned methods: one entry per prompt, ``[M, D]`` text embeddings or a 1-D tensor of token
        ids; used before ``instructions``. Settable later as ``handle.texts``.

    Returns
    -------
    PruningHandle
        ``handle.last`` describes the last pruned prefill; ``handle.remove()`` (or leaving ``with handle:``)
        restores the model exactly.

    Notes
    -----
    ``Need.CLS_SEED`` (ResPrune) on CLIP vision towers (LLaVA, LLaVA-NeXT) is the patch token the [CLS] token attends
    to most at the feature layer (of the base view for LLaVA-NeXT); Qwen2.5-VL has no [CLS] token, so the method
    uses its default. Static caches (``generate(..., cache_implementation="static")``) work with every stage: the
    pruned prompt fills fewer slots (``llm`` stage: per layer). Not supported: ``inputs_embeds`` without
    ``input_ids``, chunked prefill, and adding images to a cache that already holds a pruned prompt.
    """
    _check_transformers()
    adapter_cls = resolve_adapter(model)
    if not isinstance(pruner, Pruner):
        raise TypeError(f"mrprune.patch: pruner must be a mrprune.Pruner, not {type(pruner).__name__}")
    name = type(pruner).__name__
    if position_mode is None:
        position_mode = pruner.position_mode
    if position_mode not in POSITION_MODES:
        raise ValueError(f"mrprune.patch: position_mode must be one of {POSITION_MODES}, got {position_mode!r}")
    if pruner.stage is Stage.LLM and position_mode != "original":
        raise ValueError(
            f"mrprune.patch: {name} prunes inside the language model, whose cache holds the original positions; "
            "use position_mode='original'"
        )
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"mrprune.patch: padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    _check_text_sources("mrprune.patch", processor, instructions, texts)
    tokenizer = getattr(processor, "tokenizer", processor)
    if Need.TEXT in pruner.needs and texts is None and tokenizer is None:
        raise ValueError(
            f"mrprune.patch: {name} is text-conditioned; pass processor= (prompts are decoded, or "
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


def _check_text_sources(owner: str, processor: Any = None, instructions: Any = None, texts: Any = None) -> None:
    """Types of the text sources (a str would otherwise become one instruction per character, a tensor one text per
    row, and a non-tokenizer fail mid-generation)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"{owner}: processor must be a transformers processor or tokenizer, got {type(processor).__name__}"
        )
    if instructions is not None and (
        isinstance(instructions, str | bytes)
        or not isinstance(instructions, Sequence)
        or not all(isinstance(s, str) for s in instructions)
    ):
        raise TypeError(f"{owner}: instructions must be a list of str (one per prompt), got {instructions!r:.80}")
    if texts is not None and (
        isinstance(texts, str | bytes | torch.Tensor)
        or not isinstance(texts, Sequence)
        or not all(isinstance(t, torch.Tensor) and t.dim() in (1, 2) for t in texts)
    ):
        raise TypeError(
            f"{owner}: texts must be a list with one [M, D] embedding tensor or 1-D token-id tensor per prompt, got "
            f"{type(texts).__name__}"
        )


@contextlib.contextmanager
def patched(model: Any, pruner: Pruner, **kwargs: Any) -> Iterator[PruningHandle]:
    """:func:`patch` as a context manager: ``with mrprune.patched(model, pruner) as handle: ...``."""
    handle = patch(model, pruner, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
