"""The adapter interface: where each stage hooks into one model family.

=============  ==============================================================================================
stage          what the adapter provides
=============  ==============================================================================================
vision         ``layout`` (each item's token layout), ``attention_probe`` (the encoder's attention per token at
               given layers), ``attention_kind``, ``key_probe`` / ``provides_keys`` (the encoder's keys per crop),
               ``feature_attention_layer``, ``crop_features``
projector      ``modalities`` / ``token_id`` (placeholders), ``encoder_name``, ``visual_keys``
llm            ``text_model`` (decoder layers), positions (``default_positions``, ``normalize_positions``,
               ``model_positions``: ``[A, B, L]`` with ``A = 1`` for 1-D RoPE, 3 for M-RoPE), ``check_llm``
=============  ==============================================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ....layouts import GridLayout, LlavaNextLayout
from ..._cache import cache_of

__all__ = ["Adapter"]

Layout = LlavaNextLayout | GridLayout


class Adapter:
    """Glue between the stages and one model family (subclasses: LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL)."""

    #: modality -> name of the config attribute holding its placeholder token id
    modalities: dict[str, str] = {"image": "image_token_id"}
    #: forward keyword arguments that only feed the vision path (dropped once the features are merged)
    visual_keys: frozenset[str] = frozenset()
    position_axes = 1
    #: what ``attention_probe`` records: ``"cls"`` (the [CLS] query row), ``"received"``, or ``None`` (nothing)
    attention_kind: str | None = None
    #: whether ``key_probe`` records the encoder's keys per crop (CLIP towers); where not, ``Need.VISION_KEYS``
    #: methods get ``crop_keys=None``
    provides_keys: bool = False
    #: why methods that merge inside the vision encoder (``Need.VISION_MERGE``) cannot run here; ``None``: they can
    vision_merge_refusal: str | None = "this model's vision tower has no per-block merge support in mrprune"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.base = model.model

    # -- vision -----------------------------------------------------------------------------------------------------

    def layout(self, modality: str, arguments: dict[str, Any], index: int) -> Layout:
        """The token layout of item ``index`` of an encoder call with ``arguments`` (the call's arguments by name,
        or a ``forward`` call's). Raises ``ValueError`` when they do not tell it."""
        raise NotImplementedError

    def attention_probe(
        self, modality: str, arguments: dict[str, Any], layers: Sequence[int], heads: str = "mean"
    ) -> contextlib.AbstractContextManager[Callable[[], list[Any] | None]]:
        """A context manager around one encoder call yielding a callable that returns, afterwards, one
        :class:`~mrprune.integrations.hf.vision.ItemAttention` per item of the call with the encoder's attention at
        ``layers`` (indices into the encoder's layers), or ``None`` when the tower provides none. ``heads="joint"``
        (the [CLS] row without a head split) is asked only of ``attention_kind == "cls"`` adapters; the vision stage
        refuses it elsewhere."""
        return contextlib.nullcontext(lambda: None)

    def key_probe(
        self, modality: str, arguments: dict[str, Any], layers: Sequence[int]
    ) -> contextlib.AbstractContextManager[Callable[[], list[dict[int, torch.Tensor]] | None]]:
        """A context manager around one encoder call yielding a callable that returns, afterwards, per item of the
        call ``{layer: Tensor [crops, P, H, d]}``: the keys of every patch of every crop of the item at ``layers``
        (per head, [CLS] dropped, crops in ``ItemAttention.per_crop`` order), or ``None`` when the tower provides
        none (``provides_keys`` is ``False``)."""
        return contextlib.nullcontext(lambda: None)

    def vision_merge(
        self, modality: str, arguments: dict[str, Any], method: Any
    ) -> contextlib.AbstractContextManager[Callable[[], list[torch.Tensor] | None]]:
        """A context manager around one encoder call that, for a ``Need.VISION_MERGE`` method (``None``: none), runs
        the encoder's blocks through the method's merge and yields a callable that returns, afterwards, each item's
        tokens' merged groups (``[n]`` int64, -1 for tokens of no crop), or ``None``."""
        return contextlib.nullcontext(lambda: None)

    def crop_features(self, modality: str, arguments: dict[str, Any], output: Any) -> list[torch.Tensor] | None:
        """Per item of an encoder call with ``arguments`` and ``output``, the vision tower's feature-layer states of
        its crops ``[crops, P, D_vision]`` (before the projector, [CLS] dropped), or ``None`` when not available."""
        return None

    def feature_attention_layer(self, arguments: dict[str, Any]) -> int | None:
        """The encoder layer whose output is the feature layer the projector reads (``None``: not one layer)."""
        return None

    # -- projector --------------------------------------------------------------------------------------------------

    def token_id(self, modality: str) -> int:
        return int(getattr(self.model.config, self.modalities[modality]))

    def encoder_name(self, modality: str) -> str:
        return f"get_{modality}_features"

    # -- llm --------------------------------------------------------------------------------------------------------

    @property
    def text_model(self) -> Any:
        """The decoder-only language model (``model.model.language_model``)."""
        return self.base.language_model

    def check_llm(self, method: Any) -> None:
        """Raise if an ``llm``-stage method cannot run inside this language model."""
        layer_types = getattr(self.text_model.config, "layer_types", None) or ()
        if "sliding_attention" in layer_types:
            raise NotImplementedError(
                f"{type(method).__name__}: language models with sliding-window layers are not supported"
            )

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
