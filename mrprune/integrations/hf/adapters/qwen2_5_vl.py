"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and videos are ``t x h x w`` rasters after the 2 x 2
patch merge (``GridLayout.from_grid_thw``); positions are 3-D M-RoPE, computed on the unpruned sequence.

The vision tower has no [CLS] token: its vision signal is the attention each token *receives* in a block (column sums
of the head-averaged softmax within the block's attention segments: windows, or whole items in the full-attention
blocks; ``mrprune.ops.received_attention``, streamed from the block's q/k), averaged over the 2 x 2 patches the merger
folds into one token, as the VisPruner authors recommend for Qwen2.5-VL.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .... import ops
from ....layouts import GridLayout
from ..._cache import cache_keyword, cache_of
from ..vision import ItemAttention
from .base import Adapter

__all__ = ["Qwen2_5_VLAdapter"]


class Qwen2_5_VLAdapter(Adapter):
    """``Qwen2_5_VLForConditionalGeneration``: images and videos, positions ``[3, B, L]`` (temporal, height, width).

    ResPrune keeps its default seed (the largest-norm token): there is no [CLS] attention.
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
    attention_kind = "received"
    vision_merge_refusal = (
        "Qwen2.5-VL's vision tower is not supported: its blocks attend within windows (cu_seqlens over a "
        "window-reordered sequence) and its merger folds 2 x 2 neighbouring patches, so a token merged across "
        "windows or merge units has no place in either"
    )

    def layout(self, modality: str, arguments: dict[str, Any], index: int) -> GridLayout:
        grids = arguments.get(f"{modality}_grid_thw")
        if grids is None:
            raise ValueError(
                f"mrprune: Qwen2.5-VL {modality} grids are unknown (the features were encoded before patch() and the "
                f"call has no {modality}_grid_thw); encode with the patched model"
            )
        return GridLayout.from_grid_thw(grids[index].tolist(), self.model.config.vision_config.spatial_merge_size)

    @contextlib.contextmanager
    def attention_probe(
        self, modality: str, arguments: dict[str, Any], layers: Sequence[int]
    ) -> Iterator[Callable[[], list[ItemAttention] | None]]:
        visual = self.base.visual
        blocks = visual.blocks
        for layer in layers:
            if not -len(blocks) <= layer < len(blocks):
                raise ValueError(f"mrprune: vision layer {layer} out of range for a tower of {len(blocks)} blocks")
        captured: dict[int, torch.Tensor] = {}

        def hook_for(layer: int) -> Callable:
            def capture(module: Any, args: tuple, kwargs: dict) -> None:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                cu_seqlens = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
                cos, sin = kwargs["position_embeddings"]
                rope = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision
                with torch.no_grad():
                    qkv = module.qkv(hidden.detach()).reshape(hidden.shape[0], 3, module.num_heads, -1)
                    q, k = rope(qkv[:, 0], qkv[:, 1], cos, sin)
                    segments = ops.segment_ids_from_cu_seqlens(cu_seqlens, hidden.shape[0])[None]
                    lengths = torch.tensor([hidden.shape[0]], device=hidden.device)
                    q, k = q.transpose(0, 1)[None], k.transpose(0, 1)[None]  # [1, heads, S, d]
                    captured[layer] = ops.received_attention(q, k, lengths, segments, module.scaling)[0]

            return capture

        hooks = [blocks[layer].attn.register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in layers]

        def items() -> list[ItemAttention] | None:
            if len(captured) != len(set(layers)):
                return None
            grids = arguments[f"{modality}_grid_thw"]
            unit = visual.spatial_merge_size**2
            window_index, _ = sys.modules[type(visual).__module__].get_vision_window_index(
                grids,
                spatial_merge_size=visual.spatial_merge_size,
                window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
            order = torch.argsort(window_index.to(next(iter(captured.values())).device))
            merged = {layer: scores.view(-1, unit).mean(1)[order] for layer, scores in captured.items()}
            sizes = (grids.prod(-1) // unit).tolist()
            result, first = [], 0
            for (t, h, w), n in zip(grids.tolist(), sizes, strict=True):
                mine = {layer: scores[first : first + n] for layer, scores in merged.items()}
                frames, patches = torch.arange(n) // (h * w // unit), torch.arange(n) % (h * w // unit)
                per_frame = {layer: scores.view(t, -1) for layer, scores in mine.items()}
                result.append(ItemAttention("received", mine, frames, patches, per_frame))
                first += n
            return result

        try:
            yield items
        finally:
            for hook in hooks:
                hook.remove()

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
