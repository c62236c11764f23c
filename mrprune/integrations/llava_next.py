"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): each image is the base view, the unpadded high-resolution grid
and one newline token per grid row, laid out as ``pack_image_features`` packs them (``LlavaNextLayout``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ..layouts import LlavaNextLayout
from .hf import Adapter
from .llava import check_default_strategy, cls_attention_probe, config_argument

__all__ = ["LlavaNextAdapter"]


class LlavaNextAdapter(Adapter):
    """``LlavaNextForConditionalGeneration``: layouts from each image's size, the config's ``image_grid_pinpoints``
    and the vision tower's crop and patch sizes (``LlavaNextLayout.from_image_size``)."""

    visual_keys = frozenset({"pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy"})

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

    @contextlib.contextmanager
    def seed_probe(self, modality: str, arguments: dict[str, Any]) -> Iterator[Callable[[], list[int] | None]]:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        feature_layer = config_argument(arguments, "vision_feature_layer", self.model.config)
        with cls_attention_probe(self.base.vision_tower, feature_layer) as attention:

            def seeds() -> list[int] | None:
                scores = attention()  # [all crops, P]; an image's first crop is its base view
                if scores is None:
                    return None
                crops = [
                    image_size_to_num_patches(
                        size, self.model.config.image_grid_pinpoints, self.model.config.vision_config.image_size
                    )
                    for size in self._image_sizes(arguments)
                ]
                firsts = [sum(crops[:i]) for i in range(len(crops))]
                return scores[firsts].argmax(-1).tolist()

            yield seeds
