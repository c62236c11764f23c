"""LLaVA-1.5 and LLaVA-NeXT in vLLM with visual token pruning.

Each class subclasses vLLM's own model and processing info: the processing info reserves :func:`kept_count`
placeholder tokens per image, and the model prunes each image's projected tokens (LLaVA-NeXT: after the anyres
packing, so the layout is :class:`~mrprune.LlavaNextLayout`, newlines included) before they are merged into the
prompt. Without a switch (see :mod:`.config`) both behave exactly as vLLM's classes.

Positions: vLLM numbers a LLaVA prompt's tokens ``0..L'-1`` (1-D RoPE, positions follow the token index), so the
kept tokens take *compact* positions, as ``mrprune.patch(..., position_mode="compact")`` does in transformers.
Precomputed ``image_embeds`` inputs are not pruned (their placeholder count is their length).
"""

from __future__ import annotations

import math
from typing import Any

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...layouts import GridLayout, LlavaNextLayout
from ._select import Selector, pruner_for
from .config import kept_count

__all__ = ["PrunedLlava", "PrunedLlavaNext", "llava_layout", "llava_next_layout"]


def llava_layout(num_tokens: int) -> GridLayout:
    """A LLaVA-1.5 image's layout: the square patch grid (a flat row when the count is not a square)."""
    side = math.isqrt(num_tokens)
    return GridLayout(1, side, side) if side * side == num_tokens else GridLayout(1, 1, num_tokens)


def llava_next_layout(hf_config: Any, height: int, width: int) -> LlavaNextLayout:
    """A LLaVA-NeXT image's anyres layout, from the model config and the image size in pixels."""
    vision = hf_config.vision_config
    return LlavaNextLayout.from_image_size(
        (height, width), hf_config.image_grid_pinpoints, crop_size=vision.image_size, patch_size=vision.patch_size
    )


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """Reserves the pruned count of placeholder tokens per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        found = pruner_for(self.get_hf_config())
        return full if found is None else kept_count(found[1], llava_layout(full))


class PrunedLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """Reserves the pruned count of placeholder tokens per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        found = pruner_for(self.get_hf_config())
        if found is None:
            return full
        layout = llava_next_layout(self.get_hf_config(), image_height, image_width)
        if layout.num_tokens != full:
            raise ValueError(
                f"mrprune vLLM plugin: LLaVA-NeXT image {image_height}x{image_width} has {full} tokens in vLLM but "
                f"{layout.num_tokens} in {layout} (vision_feature_select_strategy must be 'default')"
            )
        return kept_count(found[1], layout)


def _llava_info(ctx: Any) -> Any:
    if type(ctx.get_hf_config().vision_config).__name__ == "PixtralVisionConfig":
        return PixtralHFProcessingInfo(ctx)  # Pixtral-HF is served unpruned
    return PrunedLlavaProcessingInfo(ctx)


def _llava_processor(info: Any, dummy_inputs: Any, **kwargs: Any) -> Any:
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs, **kwargs)
    return LlavaMultiModalProcessor(info, dummy_inputs, **kwargs)


@MULTIMODAL_REGISTRY.register_processor(_llava_processor, info=_llava_info, dummy_inputs=LlavaDummyInputsBuilder)
class PrunedLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with the configured pruner applied to each image's projected tokens."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mrprune = Selector.from_hf_config(self.config)

    def _process_image_input(self, image_input: Any) -> Any:
        embeds = super()._process_image_input(image_input)
        if self.mrprune is None or isinstance(image_input, LlavaImageEmbeddingInputs):
            return embeds
        items = list(embeds)
        return self.mrprune.prune(items, [llava_layout(item.shape[0]) for item in items], "image")


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=PrunedLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaNext(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with the configured pruner applied to each image's packed anyres tokens."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mrprune = Selector.from_hf_config(self.config)

    def _process_image_input(self, image_input: Any) -> Any:
        embeds = super()._process_image_input(image_input)
        if self.mrprune is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return embeds
        sizes = image_input.get("image_sizes")
        side = self.config.vision_config.image_size
        hw = [(side, side)] * len(embeds) if sizes is None else [tuple(map(int, s)) for s in sizes.tolist()]
        layouts = [llava_next_layout(self.config, h, w) for h, w in hw]
        return self.mrprune.prune(list(embeds), layouts, "image")
