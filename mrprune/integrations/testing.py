"""Tiny random models and reference loops for testing the integrations offline (no hub, CPU, well under a second).

The models are built from config objects with random weights (``torch.manual_seed(seed)``): a 100-token vocabulary,
a 64-wide language model, a 28 x 28 CLIP tower with 7 x 7 patches (16 patch tokens + CLS) for LLaVA and LLaVA-NeXT,
and a two-block Qwen2.5-VL tower (14 px patches merged 2 x 2).

Generation never stops early (``generation_config.eos_token_id = None``): continuations have a fixed length.

The references only call the *unpatched* model: :func:`greedy_decode` is a hand-written prefill + decode loop with
explicit attention masks and position ids, which is how a mask oracle (the full sequence with the dropped visual
tokens masked out, at the same positions) is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._cache import cache_keyword, cache_of

__all__ = [
    "IMAGE_TOKEN",
    "VIDEO_TOKEN",
    "VISION_END",
    "VISION_START",
    "greedy_decode",
    "kept_mask",
    "left_pad",
    "mask_positions",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_qwen2_5_vl",
]

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 90, 91, 92, 93


def _text_config(layers: int) -> dict[str, Any]:
    return dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _clip_config(image_size: int = 28) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=7,
    )


def _no_eos(model: Any) -> Any:
    model.generation_config.eos_token_id = None
    return model


def tiny_llava(layers: int = 2, seed: int = 0, image_size: int = 28) -> Any:
    """``LlavaForConditionalGeneration``: images ``[N, 3, 28, 28]``, 16 tokens each (a 4 x 4 grid); with
    ``image_size`` (a multiple of the 7 px patch) ``[N, 3, s, s]`` images of ``(s / 7) ** 2`` tokens (42: 36, enough
    for PruMerge's 32 neighbours)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_clip_config(image_size),
        text_config=LlamaConfig(**_text_config(layers)),
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(image_size // 7) ** 2,
    )
    return _no_eos(LlavaForConditionalGeneration(config).eval())


def tiny_llava_next(layers: int = 2, seed: int = 0) -> Any:
    """``LlavaNextForConditionalGeneration`` with pinpoints (28, 56), (56, 28), (56, 56): ``pixel_values`` are
    ``[N, 5, 3, 28, 28]`` with ``image_sizes [N, 2]``; a (28, 56) image has 52 tokens, (56, 56) 88."""
    from transformers import LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaNextConfig(
        vision_config=_clip_config(),
        text_config=LlamaConfig(**_text_config(layers)),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
    )
    return _no_eos(LlavaNextForConditionalGeneration(config).eval())


def tiny_qwen2_5_vl(layers: int = 2, seed: int = 0, vision_depth: int = 2) -> Any:
    """``Qwen2_5_VLForConditionalGeneration``: ``pixel_values [sum(t*h*w), 1176]`` with ``image_grid_thw`` rows
    ``(t, h, w)`` in 14 px patches (``t*h*w/4`` tokens each); videos alike. The vision tower has ``vision_depth``
    blocks, block 1 with full attention, the others windowed (4 x 4 patches)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2_5_VLConfig(
        text_config=dict(**_text_config(layers), rope_parameters=rope),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return _no_eos(Qwen2_5_VLForConditionalGeneration(config).eval())


def left_pad(sequences: Sequence[Sequence[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> left-padded ``(input_ids [B, L], attention_mask [B, L])``."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad, dtype=torch.int64)
    mask = torch.zeros((len(sequences), length), dtype=torch.int64)
    for b, sequence in enumerate(sequences):
        input_ids[b, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.int64)
        mask[b, length - len(sequence) :] = 1
    return input_ids, mask


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The positions ``generate`` gives a 2-D mask's tokens: ``cumsum - 1``, padding at 0."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def kept_mask(records: Sequence[Any], attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` int: 1 where a token of the original batch survived pruning (``PruneRecord.columns``)."""
    kept = torch.zeros_like(attention_mask)
    for b, record in enumerate(records):
        kept[b, record.columns] = 1
    return kept


@torch.no_grad()
def greedy_decode(
    model: Any,
    steps: int,
    *,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    next_positions: torch.Tensor | None,
    decode_mask: torch.Tensor | None = None,
    **inputs: Any,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A hand-written greedy loop: prefill with the given mask and positions, then ``steps`` single-token steps.

    Parameters
    ----------
    attention_mask : ``[B, L]``
        The prefill's 2-D mask (zeros hide tokens from every layer).
    decode_mask : ``[B, L]``, optional
        The prompt's mask during the decoding steps (default ``attention_mask``); each step appends a one.
    position_ids : ``[B, L]`` or ``[3, B, L]``
        The prefill's positions.
    next_positions : ``[B]`` or ``[3, B]``, or None
        The first generated token's position; step ``t`` uses ``next_positions + t``. ``None``: the steps pass no
        position ids (the model infers them).
    **inputs
        ``input_ids``, pixel inputs, ... for the prefill.

    Returns
    -------
    tokens ``[B, steps]`` and the logits ``[B, V]`` each token was chosen from.
    """
    output = model(attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **inputs)
    mask = attention_mask if decode_mask is None else decode_mask
    tokens, scores = [], []
    for step in range(steps):
        logits = output.logits[:, -1]
        token = logits.argmax(-1)
        tokens.append(token)
        scores.append(logits)
        if step == steps - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        output = model(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=None if next_positions is None else (next_positions + step)[..., None],
            **cache_keyword(model.forward, cache_of(output)),
            use_cache=True,
        )
    return torch.stack(tokens, dim=1), scores
