"""The vision stage: encoding each image / video, and what the vision encoder tells about its tokens.

Every visual item of a prefill is encoded through the model's own ``get_image_features`` / ``get_video_features``
(wrapped, so ``generate``'s early encoding is seen too). Around each encoder call the adapter's
:meth:`~mrprune.integrations.hf.adapters.base.Adapter.attention_probe` records, for the encoder layers the method
asks for, the attention the encoder paid each token: the [CLS] query row on CLIP towers (computed from the layer's
own q/k, one row, so SDPA / FlashAttention stay on), the attention each token receives on towers without a [CLS]
token (Qwen2.5-VL; ``mrprune.ops.received_attention``, streamed from the layer's q/k). The signals are aligned with
the item's tokens in the LLM input space, so vision-stage methods select on the same indices as every other method.
For ``Need.VISION_KEYS`` the adapter's :meth:`~mrprune.integrations.hf.adapters.base.Adapter.key_probe` records the
keys of the method's ``key_layers`` per crop (CLIP towers; a forward hook on ``k_proj``, nothing recomputed).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ...batching import pad_batch
from ...layouts import GridLayout, LlavaNextLayout
from ...methods.stages import Need

__all__ = [
    "ItemAttention",
    "ItemInfo",
    "ItemRegistry",
    "VisionStage",
    "VisualItem",
    "cls_attention_row",
]

Layout = LlavaNextLayout | GridLayout


@dataclass(frozen=True)
class ItemAttention:
    """What the vision encoder's attention says about one item's tokens.

    Attributes
    ----------
    kind : {"cls", "received"}
        The [CLS] query row, or the attention each token receives (towers without [CLS]).
    scores : dict int -> Tensor ``[n]`` float32
        Per encoder layer (index into the encoder's layers, as requested), per token of the item: head-averaged
        attention; 0 for tokens no crop produced (LLaVA-NeXT newlines).
    crops : Tensor ``[n]`` int64
        The crop (0 = base view / the only crop, ``1 + row * cols + col`` for LLaVA-NeXT tiles, the frame for
        Qwen2.5-VL videos) that produced each token, -1 for none.
    patches : Tensor ``[n]`` int64
        Each token's index in its crop's raster (``per_crop`` column), -1 for none.
    per_crop : dict int -> Tensor ``[crops, P]`` float32
        The same attention per crop over all of the crop's ``P`` patches, including those no token kept (LLaVA-NeXT
        unpadding): what per-crop official selections rank.
    """

    kind: str
    scores: dict[int, torch.Tensor]
    crops: torch.Tensor
    patches: torch.Tensor
    per_crop: dict[int, torch.Tensor]


@dataclass(frozen=True)
class ItemInfo:
    """How an image / video was encoded: the encoder call's ``arguments`` other than pixels (its layout follows from
    them), its ``index`` among that call's items, its encoder ``attention`` when the method asked for any, and the
    vision tower's own features of its crops when the method reads them (``Need.VISION_FEATURES``), and each token's
    merged group when the method merges inside the encoder (``Need.VISION_MERGE``), and its crops' keys at the
    method's ``key_layers`` (``Need.VISION_KEYS``)."""

    arguments: dict[str, Any]
    index: int
    attention: ItemAttention | None = None
    crop_features: torch.Tensor | None = None  # [crops, P, D_vision]: the tower's feature-layer states, per crop
    groups: torch.Tensor | None = None  # [n] int64: each token's merged group, -1 for none
    keys: dict[int, torch.Tensor] | None = None  # {layer: [crops, P, H, d]}: the tower's keys, per crop


@dataclass
class VisualItem:
    """One image or video of a prefill: its tokens ``[n, D]`` and their placeholder cells ``(row, cols [n])``."""

    modality: str
    features: torch.Tensor
    info: ItemInfo | None
    row: int = -1
    cols: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))


class ItemRegistry:
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


def cls_attention_row(
    q_proj: Callable, k_proj: Callable, hidden: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Head-averaged attention of the [CLS] query (token 0) over the other tokens, from the layer's projections.

    Parameters
    ----------
    q_proj, k_proj : the attention layer's query and key projections
    hidden : Tensor ``[crops, 1 + P, D]``, the attention layer's input
    heads : int
    scale : float, the softmax scale (``head_dim ** -0.5``)

    Returns
    -------
    Tensor ``[crops, P]`` float32: one softmax row per crop (over all ``1 + P`` keys), [CLS] column dropped.
    """
    crops, tokens, _ = hidden.shape
    query = q_proj(hidden[:, :1]).view(crops, 1, heads, -1).transpose(1, 2)
    keys = k_proj(hidden).view(crops, tokens, heads, -1).transpose(1, 2)
    logits = (query.float() @ keys.float().transpose(-1, -2)) * scale  # [crops, heads, 1, tokens]
    return logits.softmax(-1).mean(1)[:, 0, 1:]


def _pad_rows(rows: list[torch.Tensor], value: float) -> torch.Tensor:
    """``[n_i]`` rows -> ``[B, max n_i]``, padded with ``value``."""
    return pad_batch([row[:, None] for row in rows], pad_value=value)[0][..., 0]


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


class VisionStage:
    """Encoding and vision signals for one patched model and method.

    The method's ``attention_layers`` (``Need.VISION_ATTENTION``) and, for ``Need.CLS_SEED``, the layer behind the
    feature layer are probed in every encoder call.
    """

    def __init__(self, method: Any, adapter: Any) -> None:
        self.method, self.adapter = method, adapter
        self.registry = ItemRegistry()
        if Need.VISION_ATTENTION in method.needs and adapter.attention_kind is None:
            raise ValueError(
                f"mrprune.patch: {type(method).__name__} reads the vision encoder's attention, which "
                f"{type(adapter.model).__name__}'s vision tower does not provide ([CLS] row or received attention)"
            )
        if Need.VISION_MERGE in method.needs and adapter.vision_merge_refusal is not None:
            raise NotImplementedError(f"mrprune.patch: {type(method).__name__}: {adapter.vision_merge_refusal}")
        self.heads = getattr(method, "attention_heads", "mean")
        if self.heads not in ("mean", "joint"):
            raise ValueError(f"mrprune.patch: {type(method).__name__}.attention_heads must be 'mean' or 'joint'")
        if self.heads == "joint" and adapter.attention_kind != "cls":
            raise ValueError(
                f"mrprune.patch: {type(method).__name__} reads the [CLS] attention without a head split, which "
                f"{type(adapter.model).__name__}'s vision tower does not provide (no [CLS] token)"
            )
        self.key_layers = sorted(set(getattr(method, "key_layers", ()))) if Need.VISION_KEYS in method.needs else []

    def layers(self, arguments: dict[str, Any]) -> list[int]:
        """The encoder layers to probe in a call with ``arguments``."""
        layers = list(self.method.attention_layers) if Need.VISION_ATTENTION in self.method.needs else []
        if Need.CLS_SEED in self.method.needs and self.adapter.attention_kind == "cls":
            seed_layer = self.adapter.feature_attention_layer(arguments)
            if seed_layer is not None:
                layers.append(seed_layer)
        return sorted(set(layers))

    def wrap_encoder(self, modality: str, original: Callable) -> Callable:
        """``original`` (``get_image_features`` / ``get_video_features``) that also registers every item it
        encodes, with its arguments and requested attention."""
        signature = inspect.signature(original)

        @functools.wraps(original)
        def encode(*args: Any, **kwargs: Any) -> Any:
            arguments = _flat_arguments(signature, args, kwargs)
            layers = self.layers(arguments)
            merging = Need.VISION_MERGE in self.method.needs
            # heads only when not the default: adapters without a [CLS] row take no such argument
            joint = {"heads": "joint"} if self.heads == "joint" else {}
            with (
                self.adapter.attention_probe(modality, arguments, layers, **joint) as probe,
                self.adapter.key_probe(modality, arguments, self.key_layers) as key_probe,
                self.adapter.vision_merge(modality, arguments, self.method if merging else None) as merged,
            ):
                output = original(*args, **kwargs)
            pooled = getattr(output, "pooler_output", None)
            if isinstance(pooled, list | tuple):
                metadata = {k: v for k, v in arguments.items() if not k.startswith("pixel_values")}
                attention = (probe() if layers else None) or [None] * len(pooled)
                crop_features = None
                if self.method.needs & {Need.VISION_FEATURES, Need.CLIP_EMBEDDINGS}:
                    crop_features = self.adapter.crop_features(modality, arguments, output)
                crop_features = crop_features or [None] * len(pooled)
                groups = merged() or [None] * len(pooled)
                keys = (key_probe() if self.key_layers else None) or [None] * len(pooled)
                for index, (tensor, item, own, group, key) in enumerate(
                    zip(pooled, attention, crop_features, groups, keys, strict=True)
                ):
                    self.registry.add(tensor, ItemInfo(metadata, index, item, own, group, key))
            return output

        return encode

    def encode(self, call: dict[str, Any]) -> list[VisualItem]:
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
            infos = [self.registry.get(t) for t in pooled]
            items.extend(VisualItem(modality, t, info) for t, info in zip(pooled, infos, strict=True))
        for modality in self.adapter.modalities:
            group = [item for item in items if item.modality == modality]
            for index, item in enumerate(group):
                if item.info is None:  # encoded before patch(): the forward call's metadata is all there is
                    item.info = ItemInfo(call, index)
        return items

    def locate(self, items: list[VisualItem], input_ids: torch.Tensor, mask: torch.Tensor) -> None:
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

    def layouts(self, items: Sequence[VisualItem]) -> list[Layout]:
        """Every item's token layout (checked against its token count)."""
        layouts = []
        for item in items:
            layout = self.adapter.layout(item.modality, item.info.arguments, item.info.index)
            if layout.num_tokens != item.features.shape[0]:
                raise ValueError(
                    f"mrprune: a {item.modality} has {item.features.shape[0]} tokens but its layout {layout} "
                    f"describes {layout.num_tokens}"
                )
            layouts.append(layout)
        return layouts

    def signals(self, items: Sequence[VisualItem]) -> dict[str, Any]:
        """The keyword arguments the method's vision needs take, padded like ``pad_batch`` pads the features."""
        needs, extra = self.method.needs, {}
        device = items[0].features.device if items else None
        if Need.CLS_SEED in needs:
            seeds = []
            for item in items:
                attention = item.info.attention
                layer = self.adapter.feature_attention_layer(item.info.arguments)
                if attention is None or attention.kind != "cls" or layer not in attention.scores:
                    seeds.append(-1)  # no [CLS] token: the method's own default seed
                else:
                    base = torch.where(attention.crops == 0, attention.scores[layer], -1.0)
                    seeds.append(int(base.argmax()))
            extra["seeds"] = torch.tensor(seeds, dtype=torch.int64, device=device)
        if Need.VISION_ATTENTION in needs:
            missing = [i for i, item in enumerate(items) if item.info.attention is None]
            if missing:
                raise ValueError(
                    f"mrprune: {type(self.method).__name__} reads the vision encoder's attention, but item(s) "
                    f"{missing} were encoded before patch(); pass pixels to the patched model"
                )
            extra["attention"] = {
                layer: _pad_rows([item.info.attention.scores[layer].to(device) for item in items], 0.0)
                for layer in self.method.attention_layers
            }
            extra["crops"] = _pad_rows([item.info.attention.crops.to(device) for item in items], -1)
            extra["patches"] = _pad_rows([item.info.attention.patches.to(device) for item in items], -1)
            extra["crop_attention"] = {
                layer: [item.info.attention.per_crop[layer].to(device) for item in items]
                for layer in self.method.attention_layers
            }
            extra["attention_kind"] = self.adapter.attention_kind
        if Need.VISION_MERGE in needs:
            if any(item.info.groups is None for item in items):
                raise ValueError(
                    f"mrprune: {type(self.method).__name__} merges inside the vision encoder, but some items were "
                    "encoded before patch(); pass pixels to the patched model"
                )
            extra["groups"] = _pad_rows([item.info.groups.to(device) for item in items], -1)
        if Need.VISION_KEYS in needs:  # where the tower provides them (CLIP), else None
            if not self.adapter.provides_keys:
                extra["crop_keys"] = None
            elif any(item.info.keys is None for item in items) and self.key_layers:
                raise ValueError(
                    f"mrprune: {type(self.method).__name__} reads the vision encoder's keys, but some items were "
                    "encoded before patch(); pass pixels to the patched model"
                )
            else:
                extra["crop_keys"] = {
                    layer: [item.info.keys[layer].to(device) for item in items] for layer in self.key_layers
                }
        if Need.VISION_FEATURES in needs:  # where the tower provides them (CLIP), else None
            own = [item.info.crop_features for item in items]
            extra["crop_features"] = None if any(f is None for f in own) else [f.to(device) for f in own]
        return extra


def clip_signals(method: Any, items: Sequence[VisualItem], strings: Sequence[str]) -> dict[str, Any]:
    """``Need.CLIP_EMBEDDINGS``: per token its patch's CLIP image embedding ``clip_image [B, N, E]`` (0 for
    newlines), and per item the CLIP text embeddings ``[M, E]`` of its instruction ``strings[b]`` in 77-token
    segments, with the CLIP model and tokenizer the method carries; both ``None`` when it carries none or the tower
    gave no features."""
    clip, tokenizer = getattr(method, "clip", None), getattr(method, "clip_tokenizer", None)
    own = [item.info.crop_features for item in items]
    if clip is None or any(f is None for f in own) or any(item.info.attention is None for item in items):
        return {"clip_image": None, "clip_text": None}
    device = items[0].features.device
    with torch.no_grad():
        rows = []
        for item, states in zip(items, own, strict=True):
            crops, patches = item.info.attention.crops, item.info.attention.patches
            embedded = clip.visual_projection(clip.vision_model.post_layernorm(states.to(device)))  # [crops, P, E]
            token = embedded[crops.clamp(min=0), patches.clamp(min=0)]
            rows.append(torch.where((crops >= 0).to(device)[:, None], token, 0.0))
        texts = []
        for text in strings:
            ids = [] if tokenizer is None or not text else list(tokenizer(text)["input_ids"])
            segments = [ids[i : i + 77] for i in range(0, len(ids), 77)]
            embeds = [
                clip.get_text_features(input_ids=torch.tensor([segment], device=device), return_dict=True).pooler_output
                for segment in segments
            ]
            texts.append(torch.cat(embeds) if embeds else None)
    return {"clip_image": pad_batch(rows)[0], "clip_text": texts}
