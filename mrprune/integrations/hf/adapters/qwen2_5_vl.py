"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and videos are ``t x h x w`` rasters after the 2 x 2
patch merge (``GridLayout.from_grid_thw``); positions are 3-D M-RoPE, computed on the unpruned sequence.

The vision tower has no [CLS] token: its vision signal is the attention each token *receives* in a block (column sums
of the head-averaged softmax within the block's attention segments: windows, or whole items in the full-attention
blocks; ``mrprune.ops.received_attention``, streamed from the block's q/k), averaged over the 2 x 2 patches the merger
folds into one token, as the VisPruner authors recommend for Qwen2.5-VL.

Methods that merge inside the tower (``Need.VISION_MERGE``: ToMe) run every block through :func:`merge_blocks`:
2 x 2 patch groups merged within their windows, segments and rotary angles recomputed for the units left.
"""

from __future__ import annotations

import contextlib
import itertools
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
    vision_merge_refusal = None

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

    @contextlib.contextmanager
    def vision_merge(
        self, modality: str, arguments: dict[str, Any], method: Any
    ) -> Iterator[Callable[[], list[torch.Tensor] | None]]:
        if method is None:
            yield lambda: None
            return
        if getattr(method, "official", False):
            raise NotImplementedError(
                f"mrprune: {type(method).__name__}(official=True) reproduces an official LLaVA port; Qwen2.5-VL has no "
                "official one (use the default mode)"
            )
        grids = arguments.get(f"{modality}_grid_thw")
        if grids is None:
            raise ValueError(f"mrprune: merging inside Qwen2.5-VL's vision tower needs {modality}_grid_thw")
        with merge_blocks(self.base.visual, method, grids) as groups:
            yield groups

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


def _packed_rows(counts: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """Flat indices into ``[len(counts) * width]`` of each window's first ``counts[w]`` rows, windows end to end."""
    total = sum(counts)
    sizes = torch.tensor(list(counts), device=device)
    window = torch.repeat_interleave(torch.arange(len(counts), device=device), sizes, output_size=total)
    starts = sizes.cumsum(0) - sizes
    return window * width + torch.arange(total, device=device) - starts[window]


def _biased_attention(
    attention: Any, hidden: torch.Tensor, lengths: list[int], rotary: tuple[torch.Tensor, torch.Tensor], bias: Any
) -> torch.Tensor:
    """``Qwen2_5_VLVisionAttention.forward`` (its non-flash branch, segment by segment) with ``bias [S]`` added to
    every query's logit of each key (``attention_mask``; the module's own forward passes none)."""
    model_code = sys.modules[type(attention).__module__]
    seq = hidden.shape[0]
    query, key, value = attention.qkv(hidden).reshape(seq, 3, attention.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    query, key = model_code.apply_rotary_pos_emb_vision(query, key, *rotary)
    query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
    interface = model_code.ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, model_code.eager_attention_forward
    )
    outputs = [
        interface(
            attention,
            q,
            k,
            v,
            attention_mask=b.view(1, 1, 1, -1),
            scaling=attention.scaling,
            dropout=0.0,
            is_causal=False,
        )[0]
        for q, k, v, b in zip(
            query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), bias.split(lengths), strict=True
        )
    ]
    return attention.proj(torch.cat(outputs, dim=1).reshape(seq, -1).contiguous())


@contextlib.contextmanager
def merge_blocks(visual: Any, method: Any, grids: torch.Tensor) -> Iterator[Callable[[], list[torch.Tensor] | None]]:
    """Around one run of Qwen2.5-VL's vision tower on items ``grids [I, 3]``: every block runs on the method's merged
    units, yields a callable giving each item's tokens' merged groups (``[t h w / 4]`` int64, raster order: the
    group ids of the tokens the patch merger makes), or ``None`` if the tower did not run.

    The ToMe unit is a 2 x 2 patch group (the merger's 4 consecutive rows of the window-reordered sequence: one future
    LLM token) and the merge set a window (:meth:`mrprune.ToMe.window_schedule`): windowed blocks attend within a
    window only, and a unit merged across windows would have no window in the later windowed blocks. Each block
    runs the same steps as ``Qwen2_5_VLVisionBlock.forward`` on the windows' current units laid end to end, with
    ``cu_seqlens`` recomputed from the units left per window (windowed blocks) or per frame (full-attention blocks),
    each unit's rotary angles those of its group's first unit (:meth:`mrprune.ToMe.representatives`), and the
    method's merge between the attention residual and the MLP on the units' pre-rotary keys (the ``qkv`` output,
    captured by a forward hook; a unit's metric is its 4 patches' head-averaged keys side by side). With
    proportional attention, ``log(size)`` of each key's unit is added to the logits (the module's own forward takes
    no mask, so those blocks run :func:`_biased_attention`; SDPA and eager attention only, FlashAttention-2 and flex
    attention are refused). Each block returns its units *unmerged* (every patch gets its group's state), so the
    recorded ``hidden_states`` and the patch merger see the usual shapes: the merger maps every token of a group to
    the same output, and the LLM stage keeps one token per group.
    """
    model_code = sys.modules[type(visual).__module__]
    unit = visual.spatial_merge_size**2
    window_index, cu_window = model_code.get_vision_window_index(
        grids,
        spatial_merge_size=visual.spatial_merge_size,
        window_size=visual.window_size,
        patch_size=visual.patch_size,
    )
    bounds = cu_window.tolist()
    windows = [(end - start) // unit for start, end in itertools.pairwise(bounds)]
    items = (grids.prod(-1) // unit).tolist()
    frames = [h * w // unit for t, h, w in grids.tolist() for _ in range(t)]
    # windows never span frames (the tower windows each frame on its own): the windows of each frame and item
    frame_windows = _split_windows(windows, frames)
    item_windows = [[windows[w] for w in group] for group in _split_windows(windows, items)]
    blocks = visual.blocks
    schedule = method.window_schedule(item_windows, len(blocks))
    implementation = getattr(visual.config, "_attn_implementation", None)
    if method.uses_bias(schedule, packed=True) and implementation not in ("sdpa", "eager", None):
        raise NotImplementedError(
            f"mrprune: {type(method).__name__} adds log(size) to the vision tower's attention logits (proportional "
            f"attention), which its {implementation!r} attention does not take; load the model with "
            "attn_implementation='sdpa' (or 'eager'), or use proportional_attention=False"
        )
    width = max(windows)
    run: dict[str, Any] = {}

    def capture_qkv(module: Any, args: tuple, output: torch.Tensor) -> None:
        run["qkv"] = output

    def forward_for(index: int, block: Any) -> Callable:
        attention = block.attn
        full = index in visual.fullatt_block_indexes

        def forward(
            hidden_states: torch.Tensor,
            cu_seqlens: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            dim = hidden_states.shape[-1]
            if index == 0:
                device = hidden_states.device
                run["originals"] = _packed_rows(windows, width, device)
                run["offsets"] = torch.tensor([0, *windows[:-1]], device=device).cumsum(0)
                units = hidden_states.new_zeros(len(windows) * width, unit * dim)
                units[run["originals"]] = hidden_states.reshape(-1, unit * dim)
                run["state"] = method.start_windows(units.view(len(windows), width, -1), windows, schedule)
                run["rotary"] = tuple(p.reshape(-1, unit, p.shape[-1]) for p in position_embeddings)
            elif hidden_states is not run.get("out"):
                raise RuntimeError(
                    f"mrprune: Qwen2.5-VL vision block {index} did not receive block {index - 1}'s output, so the "
                    "merged tokens cannot be followed"
                )
            state = run["state"]
            features = state.tokens.shape[-1]
            rows = _packed_rows(state.counts, state.tokens.shape[1], hidden_states.device)
            hidden = state.tokens.reshape(-1, features)[rows].view(-1, dim)
            lengths = _segment_lengths(state.counts, frame_windows if full else None, unit)
            if state.merged:  # units left: new segments, each unit at its group's first unit
                cu_seqlens = torch.tensor(
                    [0, *itertools.accumulate(lengths)], dtype=cu_seqlens.dtype, device=cu_seqlens.device
                )
                if kwargs.get("max_seqlen") is not None:
                    kwargs["max_seqlen"] = max(lengths)
                first = method.representatives(state) + run["offsets"][:, None]
                position_embeddings = tuple(p[first.reshape(-1)[rows]].reshape(-1, p.shape[-1]) for p in run["rotary"])
            bias = method.unit_bias(state, hidden.dtype)
            normed = block.norm1(hidden)
            if bias is None:
                attended = attention(normed, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings, **kwargs)
            else:
                per_key = bias.reshape(-1)[rows].repeat_interleave(unit)
                attended = _biased_attention(attention, normed, lengths, position_embeddings, per_key)
            hidden = hidden + attended
            keys = run.pop("qkv").reshape(hidden.shape[0] // unit, unit, 3, attention.num_heads, -1)[:, :, 1]
            padded = hidden.new_zeros(len(windows) * state.tokens.shape[1], features)
            padded[rows] = hidden.reshape(-1, features)
            padded_keys = keys.new_zeros(padded.shape[0], attention.num_heads, keys.shape[1] * keys.shape[-1])
            padded_keys[rows] = keys.transpose(1, 2).flatten(2)  # [units, heads, 4 * d]: the unit's keys side by side
            method.merge_block(
                state,
                index,
                padded.view(len(windows), -1, features),
                padded_keys.view(len(windows), -1, *padded_keys.shape[1:]),
            )
            rows = _packed_rows(state.counts, state.tokens.shape[1], hidden.device)
            hidden = state.tokens.reshape(-1, features)[rows].view(-1, dim)
            hidden = hidden + block.mlp(block.norm2(hidden))
            tokens = hidden.new_zeros(state.tokens.shape[0] * state.tokens.shape[1], features)
            tokens[rows] = hidden.reshape(-1, features)
            state.tokens = tokens.view(state.tokens.shape)
            run["out"] = method.unmerge(state, state.tokens).reshape(-1, features)[run["originals"]].view(-1, dim)
            return run["out"]

        return forward

    def groups() -> list[torch.Tensor] | None:
        if "state" not in run:
            return None
        state = run["state"]
        device = state.source.device
        ids = state.source + torch.arange(len(windows), device=device)[:, None] * state.tokens.shape[1]
        raster = torch.empty(sum(items), dtype=torch.int64, device=device)
        raster[window_index.to(device)] = ids.reshape(-1)[run["originals"]]
        return list(raster.split(items))

    if any("forward" in block.__dict__ for block in blocks):
        raise RuntimeError("mrprune: the Qwen2.5-VL vision blocks' forward is already patched; remove that patch first")
    hooks = [block.attn.qkv.register_forward_hook(capture_qkv) for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = forward_for(index, block)
    try:
        yield groups
    finally:
        for block in blocks:
            del block.__dict__["forward"]
        for hook in hooks:
            hook.remove()


def _segment_lengths(counts: list[int], frames: list[range] | None, unit: int) -> list[int]:
    """Rows per attention segment: each window's (``frames`` ``None``) or each frame's units times ``unit``."""
    if frames is None:
        return [unit * c for c in counts]
    return [unit * sum(counts[w] for w in group) for group in frames]


def _split_windows(windows: list[int], sizes: list[int]) -> list[range]:
    """The consecutive windows (units per window) that make up each of ``sizes`` (units per frame or item)."""
    groups, first, last, filled = [], 0, 0, 0
    for size in sizes:
        while filled < size and last < len(windows):
            filled, last = filled + windows[last], last + 1
        if filled != size:
            raise ValueError(f"mrprune: Qwen2.5-VL windows {windows} do not tile frames / items of {sizes} units")
        groups.append(range(first, last))
        first, filled = last, 0
    return groups
