"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and videos are ``t x h x w`` rasters after the 2 x 2
patch merge (``GridLayout.from_grid_thw``); positions are 3-D M-RoPE, computed on the unpruned sequence."""

from __future__ import annotations

from typing import Any

import torch

from ..layouts import GridLayout
from ._cache import cache_keyword, cache_of
from .hf import Adapter

__all__ = ["Qwen2_5_VLAdapter"]


class Qwen2_5_VLAdapter(Adapter):
    """``Qwen2_5_VLForConditionalGeneration``: images and videos, positions ``[3, B, L]`` (temporal, height, width).

    The vision tower has no CLS token, so ResPrune keeps its default seed (the largest-norm token).
    """

    modalities = {"image": "image_token_id", "video": "video_token_id"}
    visual_keys = frozenset(
        {
            "pixel_values",
            "pixel_values_videos",
            "image_grid_thw",
            "video_grid_thw",
            "second_per_grid_ts",
            "mm_token_type_ids",
        }
    )
    position_axes = 3

    def layout(self, modality: str, arguments: dict[str, Any], index: int) -> GridLayout:
        grids = arguments.get(f"{modality}_grid_thw")
        if grids is None:
            raise ValueError(
                f"mrprune: Qwen2.5-VL {modality} grids are unknown (the features were encoded before patch() and the "
                f"call has no {modality}_grid_thw); encode with the patched model"
            )
        return GridLayout.from_grid_thw(grids[index].tolist(), self.model.config.vision_config.spatial_merge_size)

    def default_positions(self, call: dict[str, Any], input_ids: torch.Tensor) -> torch.Tensor:
        """The model's own M-RoPE positions (``compute_3d_position_ids``; plain positions when it cannot tell)."""
        batch, length = input_ids.shape
        compute = self.base.compute_3d_position_ids
        positions = compute(
            input_ids=input_ids,
            image_grid_thw=call.get("image_grid_thw"),
            video_grid_thw=call.get("video_grid_thw"),
            second_per_grid_ts=call.get("second_per_grid_ts"),
            inputs_embeds=input_ids.new_empty((batch, length, 0), dtype=torch.float32),
            attention_mask=call.get("attention_mask"),
            **cache_keyword(compute, cache_of(call)),
            mm_token_type_ids=call.get("mm_token_type_ids"),
        )
        return super().default_positions(call, input_ids) if positions is None else positions

    def normalize_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        if position_ids.dim() == 2:  # text positions, the same on every axis
            return position_ids.expand(batch, -1)[None].expand(3, -1, -1)
        if position_ids.dim() == 3 and position_ids.shape[0] in (3, 4):  # [4, B, L]: text positions first, dropped
            return position_ids[-3:].expand(-1, batch, -1)
        raise ValueError(f"expected position_ids [B, L], [3, B, L] or [4, B, L], got {tuple(position_ids.shape)}")

    def model_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.contiguous()
