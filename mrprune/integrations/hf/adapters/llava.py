"""LLaVA-1.5 (``LlavaForConditionalGeneration``): every image is a ``side x side`` raster of patch tokens, one crop
of a CLIP tower."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ....layouts import GridLayout
from ..vision import ItemAttention
from . import clip
from .base import Adapter

__all__ = ["LlavaAdapter", "check_default_strategy", "config_argument", "merge_depth"]


def config_argument(arguments: dict[str, Any], name: str, config: Any) -> Any:
    """A vision argument of the call, or the config's default (as ``merge_with_config_defaults`` fills it)."""
    value = arguments.get(name)
    return getattr(config, name) if value is None else value


def check_default_strategy(config: Any, arguments: dict[str, Any]) -> None:
    strategy = config_argument(arguments, "vision_feature_select_strategy", config)
    if strategy != "default":
        raise ValueError(
            f"mrprune: vision_feature_select_strategy={strategy!r} keeps the CLS token among the image tokens, which "
            "then are no grid; only 'default' is supported"
        )


class LlavaAdapter(Adapter):
    """``LlavaForConditionalGeneration``: images are ``GridLayout(1, side, side)`` (24 x 24 for CLIP-336/14)."""

    visual_keys = frozenset({"pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy"})

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.attention_kind = "cls" if clip.cls_layers(self.base.vision_tower) is not None else None
        if self.attention_kind == "cls":
            self.vision_merge_refusal = None
            self.provides_keys = True

    def layout(self, modality: str, arguments: dict[str, Any], index: int) -> GridLayout:
        check_default_strategy(self.model.config, arguments)
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return GridLayout(1, side, side)

    def feature_attention_layer(self, arguments: dict[str, Any]) -> int | None:
        feature_layer = config_argument(arguments, "vision_feature_layer", self.model.config)
        return clip.feature_attention_layer(self.base.vision_tower, feature_layer)

    def crop_features(self, modality: str, arguments: dict[str, Any], output: Any) -> list[torch.Tensor] | None:
        feature_layer = config_argument(arguments, "vision_feature_layer", self.model.config)
        states = clip.crop_features(output, feature_layer)  # [images, P, D]: one crop per image
        return None if states is None else [states[i : i + 1] for i in range(states.shape[0])]

    @contextlib.contextmanager
    def attention_probe(
        self, modality: str, arguments: dict[str, Any], layers: Sequence[int], heads: str = "mean"
    ) -> Iterator[Callable[[], list[ItemAttention] | None]]:
        with clip.cls_attention_probe(self.base.vision_tower, layers, heads) as probe:

            def items() -> list[ItemAttention] | None:
                rows = probe()  # {layer: [images, P]}: one crop per image
                if rows is None:
                    return None
                images, count = next(iter(rows.values())).shape
                crops, patches = torch.zeros(count, dtype=torch.int64), torch.arange(count)
                return [
                    ItemAttention(
                        "cls",
                        {layer: scores[i] for layer, scores in rows.items()},
                        crops,
                        patches,
                        {layer: scores[i : i + 1] for layer, scores in rows.items()},
                    )
                    for i in range(images)
                ]

            yield items

    @contextlib.contextmanager
    def key_probe(
        self, modality: str, arguments: dict[str, Any], layers: Sequence[int]
    ) -> Iterator[Callable[[], list[dict[int, torch.Tensor]] | None]]:
        with clip.key_probe(self.base.vision_tower, layers) as probe:

            def items() -> list[dict[int, torch.Tensor]] | None:
                keys = probe()  # {layer: [images, P, H, d]}: one crop per image
                if keys is None:
                    return None
                images = next(iter(keys.values())).shape[0]
                return [{layer: k[i : i + 1] for layer, k in keys.items()} for i in range(images)]

            yield items

    @contextlib.contextmanager
    def vision_merge(
        self, modality: str, arguments: dict[str, Any], method: Any
    ) -> Iterator[Callable[[], list[torch.Tensor] | None]]:
        if method is None:
            yield lambda: None
            return
        blocks = merge_depth(self, arguments)
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        images = arguments["pixel_values"].shape[0]
        schedule = method.schedule(patches, blocks, [[patches]] * images, [0] * images)
        with clip.merge_blocks(self.base.vision_tower, method, schedule) as source:
            # an image's tokens are its crop's patches: their rows after the last merge ([CLS] is row 0)
            yield lambda: None if source() is None else list(source()[:, 1:])


def merge_depth(adapter: Adapter, arguments: dict[str, Any]) -> int:
    """Encoder blocks up to the one whose output the projector reads (those a vision-encoder merge acts in)."""
    check_default_strategy(adapter.model.config, arguments)
    layer = adapter.feature_attention_layer(arguments)
    if layer is None:
        raise ValueError(
            "mrprune: merging inside the vision encoder needs one int vision_feature_layer after the embeddings"
        )
    return layer + 1
