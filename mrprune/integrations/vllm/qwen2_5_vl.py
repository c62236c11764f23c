"""Qwen2.5-VL in vLLM with visual token pruning (images and videos), at the original M-RoPE positions.

The processor reserves :func:`kept_count` placeholder tokens per image or video (``GridLayout(t, h/2, w/2)`` after
the 2 x 2 merge). The model prunes each item's merger output and appends to every kept token its 3-D M-RoPE
position relative to the item (and the item's extent), which vLLM's multimodal-pruning path
(``SupportsMultiModalPruning.recompute_mrope_positions``, the mechanism vLLM's EVS video pruning uses) turns into
the prompt's positions before the language model runs. The kept tokens keep the positions they had in the unpruned
sequence, and the text after an item continues where it would have without pruning, as
``mrprune.patch(..., position_mode="original")`` does in transformers.

Positions travel as 8 extra channels (each of the 4 values as ``value // 256`` and ``value % 256``), exact in
bfloat16 and float16 up to 65,535 (vLLM's EVS appends the 4 values as they are, which bfloat16 rounds above 256).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

from ._select import Selector, pruner_for
from .config import grid_layout, kept_count

__all__ = ["PrunedQwen2_5_VL", "media_positions"]

_CHANNELS = 8  # 4 position values, each as (value // 256, value % 256)


def media_positions(grid_thw: Sequence[int], merge_size: int, t_factor: float = 1.0) -> torch.Tensor:
    """M-RoPE positions of an item's merged tokens relative to the item's first token.

    Parameters
    ----------
    grid_thw : (t, h, w) in patches
    merge_size : int
        The merger's spatial factor (2).
    t_factor : float
        ``second_per_grid_t * tokens_per_second`` for videos, 1 for images.

    Returns
    -------
    Tensor ``[t * h/m * w/m, 4]`` int64: the (temporal, height, width) positions in raster order, and in the last
    column the item's extent ``max + 1`` (where the text after the item starts, relative to the item).
    """
    t, h, w = (int(v) for v in grid_thw)
    grid = torch.from_numpy(np.indices((t, h // merge_size, w // merge_size)).reshape(3, -1).copy())
    grid[0] = (grid[0] * t_factor).long() if t_factor != 1.0 else grid[0]
    extent = int(grid.max()) + 1
    return torch.cat([grid, torch.full((1, grid.shape[1]), extent, dtype=torch.int64)]).T.contiguous()


def _encode(positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([positions // 256, positions % 256], dim=1).to(dtype)


def _decode(channels: torch.Tensor) -> torch.Tensor:
    values = channels.round().long()
    return (values[:, :4] * 256 + values[:, 4:]).T  # [4, K]


class PrunedQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    """Reserves the pruned count of placeholder tokens per image and video."""

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any) -> Any:
        hf_config = self.info.get_hf_config()
        found = pruner_for(hf_config)
        if found is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        pruner = found[1]
        merge = hf_config.vision_config.spatial_merge_size
        token = {"image": hf_config.image_token_id, "video": hf_config.video_token_id}

        def replacement(item_idx: int, modality: str) -> list[int]:
            grid = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data
            return [token[modality]] * kept_count(pruner, grid_layout(grid.tolist(), merge))

        return [
            PromptReplacement(modality=m, target=[token[m]], replacement=partial(replacement, modality=m))
            for m in ("image", "video")
        ]


def _enable_pruning_path(multimodal_config: Any) -> None:
    """Make vLLM's model runner call :meth:`recompute_mrope_positions` (it does when the multimodal config reports
    pruning, which it otherwise only does for EVS video pruning)."""
    object.__setattr__(multimodal_config, "is_multimodal_pruning_enabled", lambda: True)


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor, info=Qwen2_5_VLProcessingInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class PrunedQwen2_5_VL(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with the configured pruner applied to each image's and video's merged tokens."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        selector = Selector.from_hf_config(vllm_config.model_config.hf_config)
        if selector is not None:
            if vllm_config.model_config.multimodal_config.video_pruning_rate:
                raise ValueError("mrprune vLLM plugin: do not combine mrprune with video_pruning_rate (EVS)")
            _enable_pruning_path(vllm_config.model_config.multimodal_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.mrprune = selector

    def _t_factors(self, media: Any, count: int, video: bool) -> list[float]:
        """Per item, the temporal position step: ``second_per_grid_t * tokens_per_second`` for videos, else 1."""
        seconds = media.get("second_per_grid_ts") if video else None
        if seconds is None:
            return [1.0] * count
        per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        return [float(s) * per_second for s in seconds.tolist()]

    def embed_multimodal(self, **kwargs: object) -> Any:
        if self.mrprune is None:
            return super().embed_multimodal(**kwargs)
        merge = self.visual.spatial_merge_size
        out: tuple[torch.Tensor, ...] = ()
        for modality, media in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                items, grids = self._process_image_input(media), media["image_grid_thw"].tolist()
                embeds_given = media["type"] == "image_embeds"
            else:
                items, grids = self._process_video_input(media), media["video_grid_thw"].tolist()
                embeds_given = media["type"] == "video_embeds"
            items = list(items)
            factors = self._t_factors(media, len(items), video=modality == "video")
            layouts = [grid_layout(grid, merge) for grid in grids]
            if embeds_given:  # precomputed embeddings: their placeholders were counted unpruned
                kept = [torch.arange(item.shape[0], device=item.device) for item in items]
            else:
                kept = self.mrprune.select(items, layouts, modality)
            for item, grid, factor, index in zip(items, grids, factors, kept, strict=True):
                positions = media_positions(grid, merge, factor)[index.cpu()].to(item.device)
                out += (torch.cat([item[index], _encode(positions, item.dtype)], dim=1),)
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Positions of the pruned prompt: text tokens exactly where the unpruned prompt has them; each item's kept
        tokens provisionally at its first positions until :meth:`recompute_mrope_positions` sets the kept ones."""
        if self.mrprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        merge = self.config.vision_config.spatial_merge_size
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        parts, start, next_position = [], 0, 0
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(features), strict=True):
            text = offset - start
            parts.append(torch.arange(text).expand(3, text) + next_position)
            relative = media_positions((t, h * merge, w * merge), merge, t_factor)
            length = feature.mm_position.length
            parts.append(relative[:length, :3].T + next_position + text)
            next_position += text + int(relative[0, 3])
            start = offset + length
        tail = len(input_tokens) - start
        parts.append(torch.arange(tail).expand(3, tail) + next_position)
        positions = torch.cat(parts, dim=1)
        return positions, int(positions.max()) + 1 - len(input_tokens) if positions.numel() else 0

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        if self.mrprune is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = input_ids.long() if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, device=device)
        embeds = [mm[:, :-_CHANNELS] for mm in multimodal_embeddings]
        positions = [_decode(mm[:, -_CHANNELS:]) for mm in multimodal_embeddings]
        new_positions, delta = recompute_mrope_positions(
            ids.to(device),
            positions,
            mrope_positions,
            num_computed_tokens,
            self.config.vision_start_token_id,
            self.config.image_token_id,
            self.config.video_token_id,
        )
        return embeds, new_positions, delta
