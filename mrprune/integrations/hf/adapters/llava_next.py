"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): each image is the base view, the unpadded high-resolution grid
and one newline token per grid row, laid out as ``pack_image_features`` packs them (``LlavaNextLayout``); every crop
(the base view and each tile) is one run of the CLIP tower."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from ....layouts import LlavaNextLayout, best_resolution
from ..vision import ItemAttention
from . import clip
from .base import Adapter
from .llava import check_default_strategy, config_argument, merge_depth

__all__ = ["LlavaNextAdapter", "token_sources"]


def token_sources(layout: LlavaNextLayout, image_size: tuple[int, int], pinpoints: Any, crop_size: int) -> torch.Tensor:
    """Where each token of a LLaVA-NeXT image comes from: ``[n, 2]`` int64 ``(crop, patch)``, ``(-1, -1)`` for
    newlines. Crop 0 is the base view, crop ``1 + r * tiles_wide + c`` the tile at row ``r``, column ``c`` of the
    anyres canvas (``divide_to_patches`` order); ``patch`` indexes the crop's ``side x side`` raster. The unpadded
    grid sits centred in the canvas's token grid (``unpad_image`` crops symmetrically)."""
    side = layout.base_side
    sources = torch.full((layout.num_tokens, 2), -1, dtype=torch.int64)
    sources[: layout.num_base, 0] = 0
    sources[: layout.num_base, 1] = torch.arange(layout.num_base)
    if layout.rows and layout.cols:
        canvas_h, canvas_w = best_resolution(image_size, pinpoints)
        tiles_wide = canvas_w // crop_size
        top = ((canvas_h // crop_size) * side - layout.rows) // 2
        left = (tiles_wide * side - layout.cols) // 2
        rows = torch.arange(layout.rows)[:, None] + top
        cols = torch.arange(layout.cols)[None] + left
        crop = 1 + (rows // side) * tiles_wide + cols // side
        patch = (rows % side) * side + cols % side
        sources[layout.highres_indices, 0] = crop.reshape(-1)
        sources[layout.highres_indices, 1] = patch.reshape(-1)
    return sources


class LlavaNextAdapter(Adapter):
    """``LlavaNextForConditionalGeneration``: layouts from each image's size, the config's ``image_grid_pinpoints``
    and the vision tower's crop and patch sizes (``LlavaNextLayout.from_image_size``)."""

    visual_keys = frozenset({"pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy"})

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.attention_kind = "cls" if clip.cls_layers(self.base.vision_tower) is not None else None
        if self.attention_kind == "cls":
            self.vision_merge_refusal = None
            self.provides_keys = True

    def _image_sizes(self, arguments: dict[str, Any]) -> list[tuple[int, int]]:
        sizes = arguments.get("image_sizes")
        if sizes is None:
            raise ValueError(
                "mrprune: LLaVA-NeXT image sizes are unknown (the features were encoded before patch() and the call "
                "has no image_sizes); pass pixel_values and image_sizes, or encode with the patched model"
            )
        return [(int(h), int(w)) for h, w in sizes.tolist()]

    def layout(self, modality: str, arguments: dict[str, Any], index: int) -> LlavaNextLayout:
        check_default_strategy(self.model.config, arguments)
        vision = self.model.config.vision_config
        return LlavaNextLayout.from_image_size(
            self._image_sizes(arguments)[index],
            self.model.config.image_grid_pinpoints,
            crop_size=vision.image_size,
            patch_size=vision.patch_size,
        )

    def feature_attention_layer(self, arguments: dict[str, Any]) -> int | None:
        feature_layer = config_argument(arguments, "vision_feature_layer", self.model.config)
        return clip.feature_attention_layer(self.base.vision_tower, feature_layer)

    def _crop_counts(self, arguments: dict[str, Any]) -> list[int]:
        """Crops per image of the call: the base view and the tiles of its anyres canvas."""
        crop_size = self.model.config.vision_config.image_size
        counts = []
        for size in self._image_sizes(arguments):
            canvas_h, canvas_w = best_resolution(size, self.model.config.image_grid_pinpoints)
            counts.append(1 + (canvas_h // crop_size) * (canvas_w // crop_size))
        return counts

    def crop_features(self, modality: str, arguments: dict[str, Any], output: Any) -> list[torch.Tensor] | None:
        feature_layer = config_argument(arguments, "vision_feature_layer", self.model.config)
        states = clip.crop_features(output, feature_layer)  # [all crops, P, D]
        return None if states is None else list(states.split(self._crop_counts(arguments)))

    @contextlib.contextmanager
    def attention_probe(
        self, modality: str, arguments: dict[str, Any], layers: Sequence[int], heads: str = "mean"
    ) -> Iterator[Callable[[], list[ItemAttention] | None]]:
        with clip.cls_attention_probe(self.base.vision_tower, layers, heads) as probe:

            def items() -> list[ItemAttention] | None:
                rows = probe()  # {layer: [all crops, P]}; each image's crops in a run, its base view first
                if rows is None:
                    return None
                crop_size = self.model.config.vision_config.image_size
                pinpoints = self.model.config.image_grid_pinpoints
                result, first = [], 0
                counts = self._crop_counts(arguments)
                for index, (size, count) in enumerate(zip(self._image_sizes(arguments), counts, strict=True)):
                    sources = token_sources(self.layout(modality, arguments, index), size, pinpoints, crop_size)
                    made = sources[:, 0] >= 0
                    scores, per_crop = {}, {}
                    for layer, attention in rows.items():
                        per_crop[layer] = attention[first : first + count]
                        flat = per_crop[layer][sources[:, 0].clamp(min=0), sources[:, 1].clamp(min=0)]
                        scores[layer] = torch.where(made.to(flat.device), flat, 0.0)
                    result.append(ItemAttention("cls", scores, sources[:, 0], sources[:, 1], per_crop))
                    first += count
                return result

            yield items

    @contextlib.contextmanager
    def key_probe(
        self, modality: str, arguments: dict[str, Any], layers: Sequence[int]
    ) -> Iterator[Callable[[], list[dict[int, torch.Tensor]] | None]]:
        with clip.key_probe(self.base.vision_tower, layers) as probe:

            def items() -> list[dict[int, torch.Tensor]] | None:
                keys = probe()  # {layer: [all crops, P, H, d]}; each image's crops in a run, its base view first
                if keys is None:
                    return None
                counts = self._crop_counts(arguments)
                split = {layer: k.split(counts) for layer, k in keys.items()}
                return [{layer: parts[i] for layer, parts in split.items()} for i in range(len(counts))]

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
        pinpoints = self.model.config.image_grid_pinpoints
        counts = self._crop_counts(arguments)
        sources = [
            token_sources(self.layout(modality, arguments, index), size, pinpoints, vision.image_size)
            for index, size in enumerate(self._image_sizes(arguments))
        ]
        crop_tokens = [
            torch.bincount(s[s[:, 0] >= 0, 0], minlength=c).tolist() for s, c in zip(sources, counts, strict=True)
        ]
        newlines = [int((s[:, 0] < 0).sum()) for s in sources]
        schedule = method.schedule(patches, blocks, crop_tokens, newlines)

        def groups(rows: torch.Tensor | None) -> list[torch.Tensor] | None:
            # every crop merges on its own: a token's group is (its crop, its row after the last merge)
            if rows is None:
                return None
            result, first = [], 0
            for own, count in zip(sources, counts, strict=True):
                own = own.to(rows.device)
                crop, patch = own[:, 0].clamp(min=0), own[:, 1].clamp(min=0)
                row = rows[first + crop, 1 + patch]
                result.append(torch.where(own[:, 0] >= 0, crop * rows.shape[1] + row, -1))
                first += count
            return result

        with clip.merge_blocks(self.base.vision_tower, method, schedule) as source:
            yield lambda: groups(source())
